"""The EEG models of braindecode as an outside set: networks written by others, with the
code around their layers (Ensure4d, einops' Rearrange, ``padding="same"``, max-norm
weight parametrizations, inputs reshaped before the first convolution).

What must hold (the survey in docs/eeg.md):

* every model whose activations can all be set to the ReLU family, built that way on
  small random inputs, is traced, fitted and explained: Gradient equals autograd's input
  gradient (float32, 1e-5 of its largest value), every pattern has the shape of its
  layer's weight, PatternNet and PatternAttribution are finite and not zero;
* Deep4Net merges its first two convolutions into one functional ``F.conv2d``
  (braindecode's CombinedConv); it is refused as built, naming the operation and the
  module, and supported once CombinedConv is written as the two convolutions it merges,
  which computes the same outputs;
* every other model is refused with the layer or operation that stops it, by name;
* every model of ``braindecode.models`` is in one of these tables, so that a model a
  braindecode upgrade adds is noticed.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

braindecode_models = pytest.importorskip("braindecode.models")
from braindecode.modules import CombinedConv  # noqa: E402

from toolkit.layers import UnsupportedLayerError, trace  # noqa: E402
from toolkit.methods import Gradient, PatternAttribution, PatternNet  # noqa: E402
from toolkit.patterns import fit_patterns  # noqa: E402

RELU = nn.ReLU

#: The models whose every activation can be set to the ReLU family, with small sizes
#: (build keywords; ``scale``: of the random inputs).
SUPPORTED = {
    "Deep4Net": dict(n_times=400, activation_first_conv_nonlin=RELU, activation_later_conv_nonlin=RELU,
                     n_filters_time=5, n_filters_spat=5, n_filters_2=6, n_filters_3=6, n_filters_4=6),
    "EEGNet": dict(n_times=128, activation=RELU, F1=4, D=2),
    "EEGInceptionERP": dict(n_times=128, activation=RELU, n_filters=4),
    "EEGInceptionMI": dict(n_times=256, activation=RELU, n_convs=2, n_filters=4),
    "EEGITNet": dict(n_times=128, activation=RELU),
    "EEGNeX": dict(n_times=128, activation=RELU),
    "EEGSimpleConv": dict(n_times=128, sfreq=80, activation=RELU, feature_maps=8),
    "EEGTCNet": dict(n_times=128, activation=RELU),
    "AttentionBaseNet": dict(n_times=256, activation=RELU),
    "TIDNet": dict(n_times=128, s_growth=8, t_filters=8),         # its own LeakyReLU
    "TSception": dict(n_times=256, number_filter_temp=4, number_filter_spat=4, hidden_size=16),  # LeakyReLU
    "SleepStagerChambon2018": dict(n_times=256, activation=RELU),
    # its signal fades through seven convolutions with small random weights: inputs in microvolts
    "SleepStagerBlanco2020": dict(n_times=1500, sfreq=50, activation=RELU, n_conv_chans=8, scale=1e3),
    "SPARCNet": dict(n_times=64, activation=RELU, block_layers=1, growth_rate=4, bottleneck_size=2),
}

#: The models that are refused with ReLU activations: build keywords and what the
#: message names. ``chs_info`` means the model needs channel positions.
REFUSED = {
    "ATCNet": (dict(tcn_activation=RELU), r"'conv_block\.activation2' of type ELU"),
    "AttnSleep": (dict(n_chans=1, n_times=3000, sfreq=100, activation=RELU, activation_mrcnn=RELU),
                  r"'feature_extractor\.0\.AFR\.0\.se\.fc\.3' of type Sigmoid"),
    "BDTCN": (dict(activation=RELU), r"'Tensor\.view'.*mixes the samples"),
    "BENDR": (dict(activation=RELU), r"of type GroupNorm"),
    "BIOT": (dict(activation=RELU), r"of type Embedding"),
    "BrainModule": (dict(activation=RELU), r"of type GLU"),
    "CBraMod": (dict(n_times=400, sfreq=200, activation=RELU), r"of type GroupNorm"),
    "CTNet": (dict(activation_patch=RELU, activation_transformer=RELU), r"'operator\.add'.*an offset"),
    "ContraWR": (dict(activation=RELU), r"'Tensor\.reshape'.*\(_STFTModule\).*mixes the samples"),
    "DANCE": (dict(chs_info=4, activation=RELU), r"of type FourierEmb"),
    "DGCNN": (dict(chs_info=4, activation=RELU), r"'torch\.matmul'"),
    "DeepSleepNet": (dict(activation_large=RELU, activation_small=RELU), r"of type LSTM"),
    "EEGConformer": (dict(activation=RELU, activation_transfor=RELU), r"of type LayerNorm"),
    "EEGDINO": (dict(activation=RELU, patch_activation=RELU), r"of type GroupNorm"),
    "EEGMiner": (dict(), r"of type GeneralizedGaussianFilter"),
    "EEGPT": (dict(), r"'operator\.add'.*an offset"),
    "EEGSym": (dict(chs_info=4, activation=RELU), r"'operator\.add'.*broadcasting"),
    "EMG2QwertyNet": (dict(n_chans=32, n_times=4000, sfreq=2000, activation=RELU),
                      r"'Tensor\.reshape'.*\(Spectrogram\).*mixes the samples"),
    "FBCNet": (dict(activation=RELU), r"'torch\._C\._fft\.fft_rfft'"),
    "FBLightConvNet": (dict(activation=RELU), r"'torch\._C\._fft\.fft_rfft'"),
    "FBMSNet": (dict(activation=RELU), r"'torch\._C\._fft\.fft_rfft'"),
    "HybridNet": (dict(n_times=1000, sfreq=250, activation=RELU), r"'torch\.conv2d'.*\(CombinedConv\)"),
    "IFNet": (dict(activation=RELU), r"'torch\._C\._fft\.fft_rfft'"),
    "Labram": (dict(n_chans=128, n_times=400, sfreq=200, activation=RELU), r"of type _SegmentPatch"),
    "LUNA": (dict(n_times=240, activation=RELU), r"of type GroupNorm"),
    "MEDFormer": (dict(activation_class=RELU, activation_trans=RELU), r"of type _PositionalEmbedding"),
    "MSVTNet": (dict(activation=RELU), r"'operator\.add'.*an offset"),
    "MVPFormer": (dict(activation=RELU), r"of type RMSNorm"),
    "NeuroPose": (dict(n_chans=16, n_times=1024, activation=RELU), r"of type Upsample"),
    "PBT": (dict(activation=RELU), r"'operator\.add'.*an offset"),
    "SCCNet": (dict(activation=RELU), r"'torch\.pow'"),
    "SSTDPN": (dict(activation=RELU), r"'Tensor\.reshape'.*\(_DepthwiseTemporalConv1d\).*mixes the samples"),
    "STEEGFormer": (dict(activation=RELU), r"of type _TemporalPositionalEncoding"),
    "SensingDynamics": (dict(n_chans=16, n_times=4000, sfreq=2000, activation=RELU), r"'torch\._C\._fft\.fft_rfft'"),
    "ShallowFBCSPNet": (dict(conv_nonlin=RELU, activation_pool_nonlin=RELU), r"'torch\.conv2d'.*\(CombinedConv\)"),
    "SignalJEPA_PostLocal": (dict(activation=RELU), r"\(Rearrange\).*mixes the samples"),
    "SignalJEPA_PreLocal": (dict(activation=RELU), r"\(Rearrange\).*mixes the samples"),
    "SincShallowNet": (dict(activation=RELU), r"'torch\.conv2d'.*\(_SincFilter\)"),
    "SyncNet": (dict(activation=RELU), r"'Tensor\.float'"),
    "TCFormer": (dict(activation=RELU, activation_ffn=RELU), r"of type Sigmoid"),
    "TCN": (dict(n_times=None, sfreq=None, activation=RELU), r"'Tensor\.view'.*mixes the samples"),
    "USleep": (dict(activation=RELU), r"of type Upsample"),
    "ZUNA": (dict(chs_info=4, activation=RELU, dim=64, n_layers=1, n_heads=2, head_dim=32, multiple_of=32),
             r"'Tensor\.float'"),
}

#: Models not built here, and why (each is refused for other reasons too: docs/eeg.md).
NOT_BUILT = {
    "REVE": "it downloads its electrode positions when built",
    "CodeBrain": "torch.fx stops at an assert on shapes inside a module, and a GroupNorm follows",
    "InterpolatedLaBraM": "it needs the 128 channel names of its own montage",
    "InterpolatedBENDR": "a ChannelInterpolationLayer in front of BENDR (GroupNorm)",
    "InterpolatedBIOT": "a ChannelInterpolationLayer in front of BIOT (Embedding)",
    "InterpolatedEEGPT": "a ChannelInterpolationLayer in front of EEGPT (an offset)",
    "InterpolatedSignalJEPA": "a ChannelInterpolationLayer in front of SignalJEPA",
    "SignalJEPA": "torch.fx cannot trace it (expand with a traced batch size); a transformer",
    "SignalJEPA_Contextual": "torch.fx cannot trace it (expand with a traced batch size); a transformer",
    "VEMG2Pose": "torch.fx cannot trace it (round() of a traced length); needs 1790 samples of context",
    "MetaNeuromotorHand": "its forward fails on the EMG window lengths tried (up to 8000 samples)",
}

BASE = dict(n_chans=4, n_outputs=2, n_times=256, sfreq=128)


def chs_info(n: int) -> list:
    """Channel descriptions with positions (mne's standard 10-20 montage, shipped with mne)."""
    mne = pytest.importorskip("mne")
    names = ["C3", "Cz", "C4", "Pz", "Fz", "F3", "F4", "P3"][:n]
    info = mne.create_info(names, 128.0, "eeg")
    info.set_montage("standard_1020")
    return info["chs"]


def build(name: str, options: dict) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode and 16 random inputs shaped for it."""
    kwargs = {**BASE, **options}
    scale = kwargs.pop("scale", 1.0)
    if "chs_info" in kwargs:
        kwargs["chs_info"] = chs_info(kwargs.pop("chs_info"))
        kwargs.pop("n_chans")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(braindecode_models, name)(**kwargs).eval()
    channels = len(kwargs["chs_info"]) if "chs_info" in kwargs else kwargs["n_chans"]
    return model, scale * torch.randn(16, channels, kwargs.get("n_times", BASE["n_times"]))


def split_combined_conv(model: nn.Module) -> nn.Module:
    """Every CombinedConv (a temporal and a spatial convolution merged into one
    functional ``F.conv2d``) as the two convolutions it merges, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, CombinedConv):
                setattr(module, name, nn.Sequential(child.conv_time, child.conv_spat))
    return model


def centre_logits(model: nn.Module, x: torch.Tensor) -> None:
    """Shift the last layer's bias so that every class's logit is positive on about half
    of ``x`` (random weights may leave a class never predicted, which PatternAttribution
    refuses to explain)."""
    bias = trace(model, x).layers[-1].module.bias
    with torch.no_grad():
        bias -= model(x).median(0).values.reshape(bias.shape)


def supported(name: str) -> tuple[nn.Module, torch.Tensor]:
    model, x = build(name, SUPPORTED[name])
    split_combined_conv(model)
    centre_logits(model, x)
    return model, x


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_relu_built_models_are_fitted_and_explained(name):
    model, x = supported(name)
    with torch.no_grad():
        assert ((model(x)[:, 0] > 0).sum() > 0) and ((model(x)[:, 0] <= 0).sum() > 0)
    plan = trace(model, x)
    assert plan.forward_verified
    patterns = fit_patterns(model, [x[:8], x[8:]], progress=False)
    assert set(patterns.layers) == set(plan.names)
    for layer in plan:
        for kind, t in patterns.layers[layer.name].tensors().items():
            assert t.shape == layer.weight_shape, (layer.name, kind)
            assert torch.isfinite(t).all()
    sample = x[:3].clone().requires_grad_(True)
    model(sample)[:, 0].sum().backward()
    gradient = Gradient(model).attribute(x[:3], 0)
    scale = float(sample.grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(gradient, sample.grad, rtol=0, atol=1e-5 * scale)
    for cls in (PatternNet, PatternAttribution):
        explanation = cls(model, patterns).attribute(x[:3], 0)
        assert explanation.shape == x[:3].shape
        assert torch.isfinite(explanation).all() and explanation.abs().sum() > 0


def test_deep4net_is_refused_as_built_and_supported_with_its_two_convolutions():
    model, x = build("Deep4Net", SUPPORTED["Deep4Net"])
    with pytest.raises(UnsupportedLayerError, match=r"'torch\.conv2d'.*'conv_time_spat' \(CombinedConv\)"):
        trace(model, x)
    with torch.no_grad():
        merged = model(x)
        split = split_combined_conv(model)(x)
    torch.testing.assert_close(split, merged, rtol=1e-5, atol=1e-6)
    names = trace(model, x).names
    assert names[:2] == ["conv_time_spat.0", "conv_time_spat.1"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_models_are_refused_by_name(name):
    options, message = REFUSED[name]
    model, x = build(name, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedLayerError, match=message):
            trace(model, x)


def test_every_model_is_in_the_survey():
    models = {n for n, c in vars(braindecode_models).items()
              if inspect.isclass(c) and issubclass(c, nn.Module) and not n.startswith("_")}
    tables = (set(SUPPORTED), set(REFUSED), set(NOT_BUILT))
    assert not (tables[0] & tables[1]) and not (tables[0] & tables[2]) and not (tables[1] & tables[2])
    assert models <= set.union(*tables), sorted(models - set.union(*tables))
