"""Explanations that never lie: no overflow, no silent zeros, clear errors at the door.

What must hold:
* the backward signal is rescaled per sample, so every method is finite on deep
  networks (torchvision VGG19 and VGG19-BN with random weights) and exact against a
  float64 closed form where float32 alone would overflow, also in between;
* results that do not fit the dtype come back normalised, with a warning, and
  ``attribute_scaled`` gives their scale;
* a two-component explainer asked about a class whose output neuron was never active
  on the fitting data raises an error that names the class, or, opted in, uses that
  neuron's linear pattern (checked against a backward pass written out by hand);
* patterns with a NaN or an infinity are refused when a pattern explainer is made,
  naming the layer, so no explanation is ever NaN;
* targets that are strings, lists of None or too large for int64 get clear errors; an
  inplace ReLU as the first module works and leaves the caller's input alone;
  ``attribute`` works under ``torch.inference_mode()``.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from toolkit.layers import trace
from toolkit.methods import (LRPZ, DeconvNet, ExplanationScaleWarning, Gradient, GuidedBackprop,
                             NeverActiveOutputError, PatternAttribution, PatternNet)
from toolkit.patterns import LayerPatterns, Patterns, fingerprint, fit_patterns

METHODS = (Gradient, DeconvNet, GuidedBackprop, PatternNet, PatternAttribution, LRPZ)


def hand_patterns(model: nn.Module, example: torch.Tensor) -> Patterns:
    """Every pattern equal to the layer's weight (PatternNet is then the gradient times
    the logit)."""
    layers = {}
    for layer in trace(model, example):
        w = layer.weight().to(torch.float64)
        layers[layer.name] = LayerPatterns(w, w, w)
    return Patterns(layers, fingerprint(model))


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q


def linear_chain(gains: list[int], width: int = 8, seed: int = 0):
    """Linear layers without bias, ``W_l = 2**gains[l] * Q_l`` (Q_l orthogonal), in
    float32, with the float64 product ``W_L ... W_1`` as the closed form of the gradient."""
    generator = torch.Generator().manual_seed(seed)
    layers, product = [], torch.eye(width, dtype=torch.float64)
    for gain in gains:
        w = orthogonal(width, generator) * 2.0 ** gain
        layer = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        layers.append(layer)
        product = layer.weight.detach().double() @ product  # float32 weights, exactly
    return nn.Sequential(*layers).eval(), product


# ----------------------------------------------------------------------------------
# overflow
# ----------------------------------------------------------------------------------
def test_gradient_beyond_float32_comes_back_normalised_with_its_exact_scale():
    """24 layers of gain 64: the gradient is about 64**24 = 2e43 > float32's 3.4e38."""
    model, product = linear_chain([6] * 24)
    x = torch.full((2, 8), 1e-36)  # the forward stays finite: logits of about 2e7
    target = [3, 5]
    expected = product[target]  # d logit_t / d x = row t of W_L ... W_1
    scaled = Gradient(model).attribute_scaled(x, target)
    assert scaled.values.dtype == torch.float32
    assert (scaled.log2_scale > 128).all()  # beyond float32
    torch.testing.assert_close(scaled.exact(), expected, rtol=1e-5, atol=0)
    peaks = scaled.values.abs().amax(1)
    assert ((peaks >= 0.5) & (peaks < 1)).all()

    with pytest.warns(ExplanationScaleWarning, match=r"samples \[0, 1\].*1e43.*attribute_scaled"):
        result = Gradient(model).attribute(x, target)
    assert torch.isfinite(result).all()
    assert torch.equal(result, scaled.values)


def test_patternnet_beyond_float32_equals_gradient_times_logit():
    model, product = linear_chain([6] * 24, seed=1)
    x = torch.full((2, 8), 1e-36)
    x[1] *= -1
    with torch.no_grad():
        logits = model(x).double()
    expected = product[[0, 7]] * logits[[0, 1], [0, 7]][:, None]
    scaled = PatternNet(model, hand_patterns(model, x)).attribute_scaled(x, [0, 7])
    torch.testing.assert_close(scaled.exact(), expected, rtol=1e-5, atol=0)


def test_exact_where_representable_even_if_the_plain_pass_overflows_in_between():
    """The top 17 layers amplify the backward signal by 2**136 (beyond float32), the
    bottom 17 shrink it back: the result is of order 1 and must come back exactly."""
    model, product = linear_chain([-8] * 17 + [8] * 17, seed=2)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 2.0 ** 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scale warning: the result fits
        result = Gradient(model).attribute(x, [0, 1, 2])
    torch.testing.assert_close(result.double(), product[[0, 1, 2]], rtol=1e-5, atol=1e-6)
    assert result.abs().max() > 0.1


def test_rescaling_by_powers_of_two_is_exact():
    """attribute and attribute_scaled agree bit for bit where the result fits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(36, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    for cls in METHODS:
        method = cls(model, hand_patterns(model, x)) if cls in (PatternNet, PatternAttribution) else cls(model)
        scaled = method.attribute_scaled(x, 2)
        assert torch.equal(method.attribute(x, 2), scaled.exact(torch.float32)), cls.__name__


def _vgg(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    model.classifier = nn.Sequential(nn.Linear(25088, 64), nn.ReLU(), nn.Dropout(),
                                     nn.Linear(64, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))
    return model.eval()


@pytest.fixture(scope="module", params=["vgg19", "vgg19_bn"])
def fitted_vgg(request):
    model = _vgg(request.param)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    patterns = fit_patterns(model, [images[:4]], progress=False, compute_dtype=torch.float32)
    return request.param, model, patterns, images[4:]


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_every_method_is_finite_on_vgg19(fitted_vgg, cls):
    name, model, patterns, x = fitted_vgg
    if cls in (PatternNet, PatternAttribution):
        method = cls(model, patterns, never_active="linear")  # 4 images leave classes unseen
    else:
        method = cls(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplanationScaleWarning)
        result = method.attribute(x)
    assert result.dtype == torch.float32 and result.shape == x.shape
    assert torch.isfinite(result).all(), f"{cls.__name__} on {name}"
    assert (result.flatten(1).abs().amax(1) > 0).all()
    scaled = method.attribute_scaled(x)
    assert torch.isfinite(scaled.values).all()
    # the scale is the same whether it is applied or kept apart
    fits = scaled.log2_scale <= 128
    assert torch.equal(result[fits], scaled.exact(torch.float32)[fits])


def test_patternnet_on_vgg19_is_far_beyond_float32(fitted_vgg):
    """The case that was all NaN: it is about 1e40 (float32 ends at 3.4e38)."""
    _, model, patterns, x = fitted_vgg
    scaled = PatternNet(model, patterns, never_active="linear").attribute_scaled(x)
    assert (scaled.log2_scale * math.log10(2) > 35).all()


# ----------------------------------------------------------------------------------
# output neurons never active on the fitting data
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def never_active_fit():
    """Linear-ReLU-Linear, 6 -> 10 -> 4; the logits of classes 0 and 2 are never positive."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).double().eval()
    with torch.no_grad():
        model[2].bias[[0, 2]] = -100.0
    x = torch.randn(400, 6, dtype=torch.float64)
    patterns = fit_patterns(model, x.split(100), progress=False)
    return model, patterns, x


def test_never_active_class_is_refused_with_a_fix(never_active_fit):
    model, patterns, x = never_active_fit
    assert patterns["2"].n_pos.tolist()[0] == 0
    for cls in (PatternNet, PatternAttribution):
        with pytest.raises(NeverActiveOutputError, match=r"class 0:.*layer '2' was never active.*"
                                                         r"kind='linear'.*never_active='linear'"):
            cls(model, patterns).attribute(x[:3], 0)
        with pytest.raises(NeverActiveOutputError, match="class 0, 2:"):
            cls(model, patterns).attribute(x[:3], [2, 1, 0])
        # the classes that were active, and the linear patterns, are fine
        assert cls(model, patterns).attribute(x[:3], 1).abs().max() > 0
        assert cls(model, patterns, kind="linear").attribute(x[:3], 0).abs().max() > 0
    assert issubclass(NeverActiveOutputError, ValueError)
    with pytest.raises(ValueError, match="never_active"):
        PatternNet(model, patterns, never_active="zero")


def test_never_active_without_statistics_is_read_from_the_zero_pattern(never_active_fit):
    model, patterns, x = never_active_fit
    bare = Patterns({name: LayerPatterns(**p.tensors()) for name, p in patterns.layers.items()},
                    patterns.fingerprint)  # made by hand: no sample counts
    with pytest.raises(NeverActiveOutputError, match="class 0, 2:"):
        PatternNet(model, bare).attribute(x[:2], [0, 2])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_patterns_that_are_not_finite_are_refused_once(never_active_fit, value):
    model, patterns, x = never_active_fit
    for kind, refused in (("positive", (PatternNet, PatternAttribution)), ("linear", ())):
        p = patterns["0"].tensors()
        p[kind] = p[kind].clone()
        p[kind][3, 1] = value
        broken = Patterns({**patterns.layers, "0": LayerPatterns(**p)}, patterns.fingerprint)
        for cls in (PatternNet, PatternAttribution):
            if cls in refused:
                with pytest.raises(ValueError, match=f"the {kind} pattern of layer '0' holds NaN or Inf"):
                    cls(model, broken)
            else:  # a pattern the rules do not read is no reason to refuse
                assert torch.isfinite(cls(model, broken).attribute(x[:3], 1)).all()
    # the linear pattern, where the rules read it: kind="linear", or never_active="linear"
    for options in ({"kind": "linear"}, {"never_active": "linear"}):
        with pytest.raises(ValueError, match="the linear pattern of layer '0' holds NaN or Inf"):
            PatternAttribution(model, broken, **options)


def test_linear_fallback_equals_the_backward_pass_by_hand(never_active_fit):
    """never_active='linear': a for the output neuron, a_+ below it, the forward mask."""
    model, patterns, x = never_active_fit
    x = x[:5]
    a_out = patterns["2"].linear[0]            # (10,) linear pattern of class 0
    a_hidden = patterns["0"].positive          # (10, 6)
    w_out = model[2].weight.detach()[0]
    with torch.no_grad():
        hidden = model[0](x)
        logit = model(x)[:, 0]
    signal = logit[:, None] * a_out * (hidden > 0)
    expected_pn = signal @ a_hidden
    relevance = logit[:, None] * (w_out * a_out) * (hidden > 0)
    expected_pa = relevance @ (model[0].weight.detach() * a_hidden)
    pn = PatternNet(model, patterns, never_active="linear").attribute(x, 0)
    pa = PatternAttribution(model, patterns, never_active="linear").attribute(x, 0)
    torch.testing.assert_close(pn, expected_pn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pa, expected_pa, rtol=1e-12, atol=1e-12)
    assert pn.abs().max() > 0
    # the active classes keep a_+: same result with or without the fallback
    torch.testing.assert_close(PatternNet(model, patterns, never_active="linear").attribute(x, 1),
                               PatternNet(model, patterns).attribute(x, 1), rtol=0, atol=0)


# ----------------------------------------------------------------------------------
# the smaller cases at the door
# ----------------------------------------------------------------------------------
@pytest.fixture
def dense():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)).eval(), torch.randn(8, 4)


@pytest.mark.parametrize("target, error, message", [
    ("cat", TypeError, "not the string 'cat'"),
    ([None] * 8, TypeError, "holds None; give None itself"),
    (2 ** 70, ValueError, f"target {2 ** 70} is out of range: the model has 5 classes"),
    ([1] * 7 + [2 ** 70], ValueError, f"target {2 ** 70} is out of range"),
    ([1.5] * 8, TypeError, "integer class indices"),
    ([True] * 8, TypeError, "not booleans"),
])
def test_bad_targets_get_clear_messages(dense, target, error, message):
    model, x = dense
    for cls in (Gradient, LRPZ):
        with pytest.raises(error, match=message):
            cls(model).attribute(x, target)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_inplace_relu_as_first_module(cls):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.ReLU(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    inplace = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    inplace.load_state_dict(plain.state_dict())
    x = torch.randn(5, 4)
    before = x.clone()

    def make(model):
        return cls(model, hand_patterns(model, x)) if cls in (PatternNet, PatternAttribution) else cls(model)

    expected = make(plain).attribute(x, 1)
    result = make(inplace).attribute(x, 1)
    assert torch.equal(x, before)  # the caller's input is not overwritten
    assert torch.equal(result, expected)
    if cls is Gradient:  # and it is the gradient, with the input's ReLU mask
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(plain(xg)[:, 1].sum(), xg)
        torch.testing.assert_close(result, g, rtol=1e-6, atol=1e-7)
        assert (result[x < 0] == 0).all()


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_attribute_works_under_inference_mode(dense, cls):
    model, x = dense
    method = cls(model, hand_patterns(model, x)) if cls in (PatternNet, PatternAttribution) else cls(model)
    expected = method.attribute(x, 2)
    with torch.inference_mode():
        inputs = x.clone()  # an inference tensor
        result = method.attribute(inputs, 2)
    assert torch.equal(result, expected)
    with torch.no_grad():
        assert torch.equal(method.attribute(x, 2), expected)


def test_a_signal_that_dies_after_a_large_scale_stays_zero():
    """A scale of 2**288 above (beyond float32 even in halves), a dead ReLU below: the
    explanation is 0, not 0 * inf = NaN."""
    model, _ = linear_chain([6] * 48)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), *model).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # every ReLU closed: the explanation is exactly 0
    x = torch.full((2, 8), 1e-36)
    result = Gradient(model).attribute(x, 0)
    assert torch.equal(result, torch.zeros_like(x))
    assert torch.equal(Gradient(model).attribute_scaled(x, 0).exact(), torch.zeros(2, 8, dtype=torch.float64))


def test_lrpz_per_unit_refuses_a_zero_logit():
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).eval()
    with pytest.raises(ValueError, match=r"start='one' divides by the selected logit.*samples \[0\]"):
        LRPZ(model, start="one").attribute(torch.zeros(1, 3), 0)
