"""Every classifier of ``torchvision.models.list_models()``: supported, or refused by name.

The 43 classifiers built only from neuron layers, ReLU-family activations, pooling and
linear operations are traced with their forward code verified, and their Gradient equals
autograd's input gradient (random weights, small inputs). The smallest member of each of
their 13 families is also fitted, explained by every method, measured (rho of its first
and last layer) and perturbed. The other 37 are refused with a message naming the module
or the operation (SiLU, Hardswish, GELU, LayerNorm, sigmoid gates, ...) and where it is.
A torchvision release that adds a classifier fails :func:`test_the_table_covers_list_models`
until the table here says which it is.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from toolkit.layers import UnsupportedLayerError, trace  # noqa: E402
from toolkit.methods import REGISTRY, Gradient  # noqa: E402
from toolkit.patterns import fit_patterns  # noqa: E402
from toolkit.perturbation import region_perturbation  # noqa: E402
from toolkit.quality import layer_quality  # noqa: E402

#: Family -> its classifiers; the first is the smallest, the one fitted end to end.
SUPPORTED = {
    "alexnet": ["alexnet"],
    "vgg": ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"],
    "resnet": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
    "wide_resnet": ["wide_resnet50_2", "wide_resnet101_2"],
    "resnext": ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"],
    "regnet_x": ["regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
                 "regnet_x_16gf", "regnet_x_32gf"],
    "densenet": ["densenet121", "densenet161", "densenet169", "densenet201"],
    "googlenet": ["googlenet"],
    "inception": ["inception_v3"],
    "mobilenet_v2": ["mobilenet_v2"],
    "mnasnet": ["mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"],
    "shufflenet": ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"],
    "squeezenet": ["squeezenet1_1", "squeezenet1_0"],
}

#: Family -> its classifiers and what the refusal must name (the first module or operation
#: outside the ReLU family and the linear operations that the forward pass reaches).
REFUSED = {
    "convnext": (["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"],
                 r"layer_norm.*LayerNorm2d"),
    "efficientnet": ([f"efficientnet_b{i}" for i in range(8)] + ["efficientnet_v2_s", "efficientnet_v2_m",
                                                                  "efficientnet_v2_l"], r"type SiLU"),
    "maxvit": (["maxvit_t"], r"type GELU"),
    "mobilenet_v3": (["mobilenet_v3_large", "mobilenet_v3_small"], r"type Hardswish"),
    "regnet_y": (["regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
                  "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf"], r"type Sigmoid"),
    "swin": (["swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"], r"type LayerNorm"),
    "vit": (["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"],
            r"operator\.add.*encoder.*offset"),
}

#: The input side a model needs at least (others: 32).
SIZES = {"alexnet": 64, "squeezenet1_0": 64, "squeezenet1_1": 64, "googlenet": 64, "inception_v3": 75,
         "maxvit_t": 224, **{f"vit_{v}": 224 for v in ("b_16", "b_32", "l_16", "l_32", "h_14")}}


def supported_names():
    return [name for names in SUPPORTED.values() for name in names]


def refused_names():
    return [(name, reason) for names, reason in REFUSED.values() for name in names]


def test_the_table_covers_list_models():
    listed = set(torchvision.models.list_models(module=torchvision.models))
    table = set(supported_names()) | {name for name, _ in refused_names()}
    assert listed == table, (f"not in the table: {sorted(listed - table)}; "
                             f"no longer in torchvision: {sorted(table - listed)}")
    assert len(supported_names()) == 43 and len(refused_names()) == 37


@contextlib.contextmanager
def no_initialisation():
    """Build a refused model without drawing its random weights (a large one takes a
    minute otherwise): the refusal does not depend on their values."""
    names = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "zeros_",
             "ones_", "constant_", "xavier_uniform_", "xavier_normal_", "orthogonal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def build(name: str, initialise: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # GoogLeNet's and Inception's notes on initialisation
        with (contextlib.nullcontext() if initialise else no_initialisation()):
            return torchvision.models.get_model(name, weights=None).eval()


def images(name: str, n: int = 2) -> torch.Tensor:
    side = SIZES.get(name, 32)
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", supported_names())
def test_supported_classifier_is_traced_and_its_gradient_is_autograd(name):
    model = build(name)
    x = images(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = trace(model, x)
    assert plan.forward_verified and len(plan) >= 8
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xg)[:, 7].sum(), xg)
    got = Gradient(model).attribute(x, 7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name, reason", refused_names())
def test_other_classifier_is_refused_by_name(name, reason):
    model = build(name, initialise=False)
    with pytest.raises(UnsupportedLayerError, match=reason):
        trace(model, images(name))


def for_fitting(model: torch.nn.Module) -> torch.nn.Module:
    """The model with signals that reach its output on a few random images.

    Two changes, both outside what is tested here: GoogLeNet's and Inception's
    convolutions and Linear layers drawn again with He's initialisation (their own, a
    normal of standard deviation 0.01, gives 64 x 64 inputs outputs that do not depend on
    the input, so every pattern of the last layer is rightly 0), and AlexNet's and VGG's
    4096-wide Linear-ReLU classifier, the layer type supported longest, narrowed to 64
    neurons so that its float64 sums do not dominate the test's time.
    """
    generator = torch.Generator().manual_seed(2)
    classifier = getattr(model, "classifier", None)
    linears = [m for m in classifier if isinstance(m, torch.nn.Linear)] if isinstance(
        classifier, torch.nn.Sequential) else []
    if linears and linears[0].out_features == 4096:
        model.classifier = torch.nn.Sequential(torch.nn.Linear(linears[0].in_features, 64), torch.nn.ReLU(),
                                               torch.nn.Linear(64, 1000)).eval()
    small_init = isinstance(model, (torchvision.models.GoogLeNet, torchvision.models.Inception3))
    for module in model.modules() if small_init else ():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    return model


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_smallest_of_each_family_is_fitted_explained_measured_and_perturbed(family):
    name = SUPPORTED[family][0]
    model = for_fitting(build(name))
    x = images(name, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # output neurons never active on 4 random images
        patterns = fit_patterns(model, [x[:2], x[2:]], progress=False)
    assert patterns.names == trace(model, x).names
    target = int(model(x).detach().argmax(1)[0])
    explainers = {method: (m.make(model, patterns, never_active="linear") if m.needs_patterns
                           else m.make(model)) for method, m in REGISTRY.items()}
    for method, explainer in explainers.items():
        result = explainer.attribute(x[:2], target)
        assert result.shape == x[:2].shape and torch.isfinite(result).all(), method
        assert float(result.abs().max()) > 0, method
    first, last = patterns.names[0], patterns.names[-1]
    quality = layer_quality(model, patterns, [x], layers=[first, last], progress=False)
    assert set(quality.mean) == {first, last}
    curve = region_perturbation(model, explainers["patternattribution"], x[:2], patch=8, steps=3,
                                progress=False)
    assert curve.curve.shape == (4,) and torch.isfinite(curve.curve).all()
