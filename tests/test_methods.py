"""Tests of the explanation methods (toolkit.methods) and their figures.

What must hold:
* Gradient / DeconvNet / GuidedBackprop equal Captum's Saliency / Deconvolution /
  GuidedBackprop on torchvision VGG11 and AlexNet;
* identities: PatternNet with A = W is the gradient, PatternAttribution with A = 1 is
  the gradient (both times the logit), on one linear neuron PatternNet recovers the
  true signal a_s y and PatternAttribution gives w * a_s * y;
* LRP-z equals an explicit layer-by-layer z-rule, and conserves relevance up to the
  bias contributions;
* on the toy data with a distractor, the gradient points partly along the distractor
  and PatternNet does not;
* the model is left as it was, results do not depend on the batch, float32 and
  float64 work, BatchNorm is folded;
* bad input gets clear errors.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from toolkit.layers import UnsupportedLayerError, trace
from toolkit.linear import fit_filter, make_data
from toolkit.methods import (LRPZ, REGISTRY, DeconvNet, Gradient, GuidedBackprop, PatternAttribution,
                             PatternNet)
from toolkit.patterns import LayerPatterns, PatternMismatchError, Patterns, fingerprint, fit_patterns

GRADIENT_TYPE = (Gradient, DeconvNet, GuidedBackprop)


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def small_cnn(batchnorm: bool = False, inplace: bool = False, seed: int = 0) -> nn.Sequential:
    """conv-[BN]-ReLU-maxpool-conv-ReLU-avgpool-flatten-linear-ReLU-dropout-linear on 3x8x8."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if batchnorm:
        bn = nn.BatchNorm2d(4)
        with torch.no_grad():  # statistics far from the identity, so folding matters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 3.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.3, 0.3)
        layers.append(bn)
    layers += [nn.ReLU(inplace), nn.MaxPool2d(2),
               nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace), nn.AvgPool2d(2),
               nn.Flatten(), nn.Linear(24, 8), nn.ReLU(inplace), nn.Dropout(0.5), nn.Linear(8, 5)]
    return nn.Sequential(*layers)


def dense_net(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-Linear, 6 -> 10 -> 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10, bias=bias), nn.ReLU(), nn.Linear(10, 4, bias=bias))


def patterns_like(model: nn.Module, example: torch.Tensor, fill=None) -> Patterns:
    """Patterns built by hand: every pattern equal to the (folded) weight, or to ``fill``."""
    layers = {}
    for layer in trace(model, example):
        w = layer.weight().to(torch.float64).cpu()
        a = w if fill is None else torch.full_like(w, fill)
        layers[layer.name] = LayerPatterns(a, a, a)
    return Patterns(layers, fingerprint(model))


def logits_of(model, x, target):
    with torch.no_grad():
        return model.eval()(x).gather(1, torch.as_tensor(target)[:, None])


def per_sample(t: torch.Tensor, dim: int = 4) -> torch.Tensor:
    """Broadcast one value per sample over the remaining dimensions."""
    return t.reshape(-1, *([1] * (dim - 1)))


def assert_close(actual, expected, rel=1e-5):
    """Equal up to ``rel`` times the largest magnitude of ``expected``."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-30))


def model_state(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                  for m in model.modules()],
    }


# ----------------------------------------------------------------------------------
# against Captum
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["vgg11", "alexnet"])
def torchvision_model(request):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, request.param)(weights=None)
    x = torch.randn(3, 3, 64, 64)
    return request.param, model, x


@pytest.mark.filterwarnings("ignore::UserWarning:captum")
@pytest.mark.parametrize("ours, theirs", [
    (Gradient, "Saliency"), (DeconvNet, "Deconvolution"), (GuidedBackprop, "GuidedBackprop")])
def test_equals_captum(torchvision_model, ours, theirs):
    captum_attr = pytest.importorskip("captum.attr")
    name, model, x = torchvision_model
    target = [1, 500, 999]
    ours_result = ours(model).attribute(x, target)
    # Captum hooks the ReLUs of the model it is given: hand it a separate copy, in eval
    # mode (torchvision builds models in training mode, with active Dropout).
    reference_model = copy.deepcopy(model).eval()
    method = getattr(captum_attr, theirs)(reference_model)
    kwargs = {"abs": False} if theirs == "Saliency" else {}
    expected = method.attribute(x.clone(), target=target, **kwargs)
    assert ours_result.shape == x.shape
    assert expected.abs().max() > 0
    assert_close(ours_result, expected, rel=1e-5)


# ----------------------------------------------------------------------------------
# identities
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patternnet_with_weights_is_gradient_times_logit(dtype):
    model = small_cnn(batchnorm=True).to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    target = [0, 1, 2, 4]
    expected = Gradient(model).attribute(x, target) * per_sample(logits_of(model, x, target))
    result = PatternNet(model, patterns_like(model, x)).attribute(x, target)
    assert_close(result, expected, rel=1e-5 if dtype == torch.float32 else 1e-12)
    # start="one" is the gradient itself
    result = PatternNet(model, patterns_like(model, x), start="one").attribute(x, target)
    assert_close(result, Gradient(model).attribute(x, target), rel=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patternattribution_with_ones_is_gradient_times_logit(dtype):
    model = small_cnn(batchnorm=True).to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    expected = Gradient(model).attribute(x) * per_sample(logits_of(model, x, model.eval()(x).argmax(1)))
    for kind in ("two_component", "linear"):
        result = PatternAttribution(model, patterns_like(model, x, fill=1.0), kind=kind).attribute(x)
        assert_close(result, expected, rel=1e-5 if dtype == torch.float32 else 1e-12)


A_S, A_D = np.array([1.0, 0.0]), np.array([1.0, 1.0])


@pytest.fixture(scope="module")
def toy():
    data = make_data(20000, A_S, A_D, noise_mean=0.0, noise_std=1.0, seed=0)
    w = fit_filter(data.x, data.y)
    return data, w


def one_neuron(w) -> nn.Linear:
    neuron = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        neuron.weight.copy_(torch.as_tensor(w)[None])
    return neuron


def test_one_neuron_recovers_the_true_signal(toy):
    """On y = w^T x, PatternNet (start="logit") gives a_s y and PatternAttribution w a_s y."""
    data, w = toy
    neuron = one_neuron(w)
    x = torch.as_tensor(data.x)
    signal = torch.as_tensor(data.s)  # the true a_s * y
    a_s = torch.as_tensor(A_S)[None]
    name = trace(neuron, x).names[0]  # the single layer's name
    exact = Patterns({name: LayerPatterns(a_s, a_s, a_s)}, fingerprint(neuron))
    for kind in ("two_component", "linear"):
        assert_close(PatternNet(neuron, exact, kind=kind).attribute(x, 0), signal, rel=1e-12)
        assert_close(PatternAttribution(neuron, exact, kind=kind).attribute(x, 0),
                     torch.as_tensor(w) * signal, rel=1e-12)

    # fitted patterns: a_+ and a estimate a_s, so the result is the signal up to sampling
    # error, which is larger for a_+ around E_+[y] (a covariance over half the range of y)
    batches = [x[i:i + 5000] for i in range(0, len(x), 5000)]
    for mean_y, atol in (("global", 0.02), ("masked", 0.03)):
        fitted = fit_patterns(neuron, batches, progress=False, mean_y=mean_y)
        for kind in ("two_component", "linear"):
            pn = PatternNet(neuron, fitted, kind=kind).attribute(x, 0)
            pa = PatternAttribution(neuron, fitted, kind=kind).attribute(x, 0)
            torch.testing.assert_close(pn, signal, rtol=0, atol=atol)
            torch.testing.assert_close(pa, torch.as_tensor(w) * signal, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------
# LRP-z against an explicit z-rule
# ----------------------------------------------------------------------------------
def _dense_matrix(module: nn.Module, in_shape) -> torch.Tensor:
    """The linear part (no bias) of a Conv2d / Linear / AvgPool2d as an (out, in) matrix."""
    size = int(np.prod(in_shape))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *in_shape)
    if isinstance(module, nn.Conv2d):
        out = F.conv2d(basis, module.weight, None, module.stride, module.padding)
    elif isinstance(module, nn.Linear):
        out = F.linear(basis, module.weight)
    else:
        out = module(basis)
    return out.reshape(size, -1).T


def zrule_reference(model: nn.Sequential, x: torch.Tensor, target) -> torch.Tensor:
    """Layer by layer: R_i = sum_j x_i w_ij / z_j R_j (z with bias), winner-takes-all for
    max pooling, ReLU passes relevance; the output relevance is the selected logit."""
    activations = [x]
    with torch.no_grad():
        for module in model:
            activations.append(module(activations[-1]))
    out = activations[-1]
    relevance = torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))
    for module, a, z in reversed(list(zip(model, activations[:-1], activations[1:]))):
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.AvgPool2d)):
            matrix = _dense_matrix(module, a.shape[1:])
            zf, rf = z.reshape(len(z), -1), relevance.reshape(len(z), -1)
            ratio = torch.where(zf != 0, rf / torch.where(zf != 0, zf, 1), 0)
            relevance = (a.reshape(len(a), -1) * (ratio @ matrix)).reshape(a.shape)
        elif isinstance(module, nn.MaxPool2d):
            _, index = F.max_pool2d(a, module.kernel_size, module.stride, return_indices=True)
            relevance = torch.zeros_like(a).flatten(2).scatter_(
                2, index.flatten(2), relevance.flatten(2)).reshape(a.shape)
        elif isinstance(module, nn.Flatten):
            relevance = relevance.reshape(a.shape)
        else:
            assert isinstance(module, (nn.ReLU, nn.Dropout))
    return relevance


@pytest.mark.parametrize("net", ["dense", "conv"])
def test_lrpz_equals_explicit_zrule(net):
    model = (dense_net() if net == "dense" else small_cnn()).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64) if net == "dense" else torch.randn(5, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 1])
    expected = zrule_reference(model, x, target)
    assert expected.abs().max() > 0
    assert_close(LRPZ(model).attribute(x, target), expected, rel=1e-10)


def test_lrpz_conserves_relevance_without_biases():
    model = dense_net(bias=False).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    relevance = LRPZ(model).attribute(x)
    logits = model(x).max(1).values
    torch.testing.assert_close(relevance.sum(1), logits.detach(), rtol=1e-12, atol=1e-12)
    # start="one": the relevances sum to 1
    ones = LRPZ(model, start="one").attribute(x).sum(1)
    torch.testing.assert_close(ones, torch.ones_like(ones), rtol=1e-10, atol=1e-10)


def test_lrpz_loses_exactly_the_bias_contributions():
    """sum_i R_i = logit - b2[t] - sum_j b1_j w2[t, j] [z1_j > 0]: each bias takes its share
    b_j / z_j R_j = b_j g_j of the relevance, and only the rest reaches the input."""
    model = dense_net(bias=True).double()
    first, _, last = model
    x = torch.randn(8, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    relevance = LRPZ(model).attribute(x, target)
    with torch.no_grad():
        active = (first(x) > 0).double()
        logits = model(x).gather(1, target[:, None]).squeeze(1)
        bias_share = last.bias[target] + (active * last.weight[target] * first.bias).sum(1)
    assert bias_share.abs().min() > 1e-3  # the biases matter here
    torch.testing.assert_close(relevance.sum(1) + bias_share, logits, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------
# the distractor: the gradient follows it, PatternNet does not
# ----------------------------------------------------------------------------------
def test_patternnet_ignores_the_distractor_the_gradient_follows(toy):
    """x = a_s y + a_d eps with a_s = (1, 0), a_d = (1, 1): the second coordinate holds
    only distractor. The network w -> ReLU -> 2 * (.) must use it (w = (1, -1) cancels
    eps), so the gradient has half its energy there; the true signal has none."""
    data, w = toy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(w)[None])
        model[2].weight.fill_(2.0)
    x = torch.as_tensor(data.x)
    patterns = fit_patterns(model, [x[i:i + 5000] for i in range(0, len(x), 5000)], progress=False)

    def distractor_energy(e):  # fraction of the explanation's energy on the distractor-only coordinate
        return (e[:, 1] ** 2).sum().item() / (e ** 2).sum().item()

    def cos_signal(e):  # mean |cos| between explanation and a_s, over samples with y > 0
        e = e[torch.as_tensor(data.y) > 0]
        return (e[:, 0].abs() / e.norm(dim=1)).mean().item()

    methods = {
        "Gradient": Gradient(model), "DeconvNet": DeconvNet(model), "GuidedBackprop": GuidedBackprop(model),
        "LRP-z": LRPZ(model),
        "PatternNet": PatternNet(model, patterns), "PatternAttribution": PatternAttribution(model, patterns),
    }
    energy, cosine = {}, {}
    for name, method in methods.items():
        e = method.attribute(x, 0)
        energy[name], cosine[name] = distractor_energy(e), cos_signal(e)
        print(f"{name:>18}: distractor energy {energy[name]:.2e}  |cos(e, a_s)| {cosine[name]:.6f}")
    true_signal = torch.as_tensor(data.s)[torch.as_tensor(data.y) > 0]
    print(f"{'true signal':>18}: distractor energy {distractor_energy(true_signal):.2e}")
    assert energy["Gradient"] == pytest.approx(0.5, abs=1e-6)
    assert energy["LRP-z"] > 0.3
    assert energy["PatternNet"] < 1e-3 and energy["PatternAttribution"] < 1e-3
    assert cosine["PatternNet"] > 0.999 and cosine["Gradient"] == pytest.approx(2 ** -0.5, abs=1e-6)


# ----------------------------------------------------------------------------------
# the model and the inputs are left alone
# ----------------------------------------------------------------------------------
#: Every registered method goes through the common checks below.
ALL_METHODS = list(REGISTRY)


def make_method(name, model, x, **kwargs):
    method = REGISTRY[name]
    return method.make(model, patterns_like(model, x) if method.needs_patterns else None, **kwargs)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_model_and_inputs_are_unchanged(name):
    model = small_cnn(batchnorm=True, inplace=True).train()
    model[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    model[1].eval()  # mixed modes are restored module by module
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    x_before = x.detach().clone()
    with torch.no_grad():
        out_before = model.eval()(x)
    model.train()
    model[1].eval()
    before = model_state(model)

    result = make_method(name, model, x).attribute(x, [0, 1, 2])

    after = model_state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"] and sum(after["hooks"]) == 0
    for k, v in before["state"].items():  # BatchNorm running statistics not updated
        assert torch.equal(after["state"][k], v), k
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and x.requires_grad and torch.equal(x.detach(), x_before)
    assert not result.requires_grad and result.shape == x.shape
    with torch.no_grad():
        assert torch.equal(model.eval()(x), out_before)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_inplace_relus_give_the_same_result(name):
    x = torch.randn(3, 3, 8, 8)
    plain = make_method(name, small_cnn(inplace=False), x).attribute(x)
    inplace = make_method(name, small_cnn(inplace=True), x).attribute(x)
    assert torch.equal(plain, inplace)


# ----------------------------------------------------------------------------------
# batches, dtypes, devices
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", ALL_METHODS)
def test_batch_size_does_not_change_the_result(name, dtype, rel):
    model = small_cnn(batchnorm=True).to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    target = [4, 3, 2, 1]
    method = make_method(name, model, x)
    batch = method.attribute(x, target)
    assert batch.dtype == dtype
    for i in range(4):
        single = method.attribute(x[i:i + 1], target[i])
        assert_close(single[0], batch[i], rel=rel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_METHODS)
def test_cuda_matches_cpu(name):
    model = small_cnn(batchnorm=True).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    expected = make_method(name, model, x).attribute(x, 1)
    gpu_model = copy.deepcopy(model).cuda()
    result = make_method(name, gpu_model, x.cuda()).attribute(x.cuda(), 1)
    assert result.is_cuda
    assert_close(result.cpu(), expected, rel=1e-10)


# ----------------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------------
def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], (conv.bias - bn.running_mean) * scale + bn.bias


def test_gradient_through_batchnorm_equals_autograd():
    model = small_cnn(batchnorm=True).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(model(x)[:, 2].sum(), x)
    assert_close(Gradient(model).attribute(x.detach(), 2), expected, rel=1e-12)


def test_patternnet_with_weights_equals_manual_backward_with_folded_weights():
    """conv-BN-ReLU-flatten-linear written out by hand: forward with the folded conv, then
    back from the logit's value through W2^T, the ReLU mask and the transposed conv."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.1, 2)
        model[1].weight.uniform_(-2, 2)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        w1, b1 = folded(model[0], model[1])
        z1 = F.conv2d(x, w1, b1, padding=1)
        logits = F.linear(F.relu(z1).flatten(1), model[4].weight, model[4].bias)
        target = logits.argmax(1)
        r = model[4].weight[target] * logits.gather(1, target[:, None])  # from the logit's value
        r = r.reshape(z1.shape) * (z1 > 0)
        expected = F.conv_transpose2d(r, w1, padding=1)
    result = PatternNet(model, patterns_like(model, x)).attribute(x)
    assert_close(result, expected, rel=1e-12)


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------
@pytest.fixture
def cnn_and_x():
    return small_cnn(), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("target, message", [
    (5, "out of range.*5 classes"), (-1, "out of range.*5 classes"), ([0, 9], "target 9 is out of range"),
    ([0, 1, 2], "3 targets.*2 inputs"), (torch.zeros(2, 2, dtype=torch.long), "4 targets"),
])
def test_bad_target(cnn_and_x, target, message):
    model, x = cnn_and_x
    with pytest.raises(ValueError, match=message):
        Gradient(model).attribute(x, target)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 8, 8, 3), (2, 192), (2, 1, 8, 8), (2, 3, 16, 16)])
def test_wrong_input_shape_names_the_shape(cnn_and_x, shape):
    model, _ = cnn_and_x
    with pytest.raises(ValueError, match=re_shape(shape)):
        Gradient(model).attribute(torch.randn(*shape))


def test_unbatched_image_is_rejected():
    """(C, H, W) of a one-channel net runs through the convolution as one image; say so."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(0), nn.Linear(2, 3))
    with pytest.raises(ValueError, match=re_shape((1, 8, 8)) + r" are not \(N, C, H, W\).*'0'"):
        Gradient(model).attribute(torch.randn(1, 8, 8))


def re_shape(shape):
    return "shape " + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_nan_inputs(cnn_and_x):
    model, x = cnn_and_x
    x = x.clone()
    x[1, 0, 3, 3] = float("nan")
    for method in (Gradient(model), LRPZ(model)):
        with pytest.raises(ValueError, match="NaN"):
            method.attribute(x)


def test_patterns_of_another_model_or_none(cnn_and_x):
    model, x = cnn_and_x
    other = small_cnn(seed=1)
    for cls in (PatternNet, PatternAttribution):
        with pytest.raises(PatternMismatchError, match="another model"):
            cls(model, patterns_like(other, x))
        with pytest.raises(ValueError, match="fit_patterns"):
            cls(model, None)
        with pytest.raises(TypeError, match="Patterns"):
            cls(model, {"0": None})
        with pytest.raises(ValueError, match="kind"):
            cls(model, patterns_like(model, x), kind="negative")
    incomplete = patterns_like(model, x)
    del incomplete.layers["3"]
    with pytest.raises(PatternMismatchError, match="layer '3'"):
        PatternNet(model, incomplete).attribute(x)
    assert issubclass(PatternMismatchError, ValueError)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(UnsupportedLayerError, match="layer '1' of type Tanh"):
        Gradient(model).attribute(torch.randn(2, 4))


def test_other_bad_arguments(cnn_and_x):
    model, x = cnn_and_x
    with pytest.raises(ValueError, match="start"):
        Gradient(model, start="zero")
    with pytest.raises(TypeError, match="nn.Module"):
        Gradient(lambda t: t)
    with pytest.raises(TypeError, match="float64.*float32"):
        Gradient(model).attribute(x.double())
    with pytest.raises(TypeError, match="floating point"):
        Gradient(model).attribute(x.long())
    with pytest.raises(TypeError, match="integer"):
        Gradient(model).attribute(x, 1.5)


def test_predicted_class_is_the_default_target(cnn_and_x):
    model, x = cnn_and_x
    predicted = model.eval()(x).argmax(1)
    torch.testing.assert_close(Gradient(model).attribute(x), Gradient(model).attribute(x, predicted))
    torch.testing.assert_close(Gradient(model).attribute(x, np.int64(3)), Gradient(model).attribute(x, [3, 3]))


# ----------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------
def test_signal_and_heatmap_arrays():
    from toolkit.plotting.images import to_attribution_map, to_input_image, to_signal_image

    t = torch.tensor([[[-2.0, 0.0], [1.0, 2.0]]] * 3)
    image = to_signal_image(t)
    assert image.shape == (2, 2, 3) and image.min() == 0 and image.max() == 1 and image[0, 1, 0] == 0.5
    assert to_signal_image(t[:1]).shape == (2, 2)  # grayscale
    values, limit = to_attribution_map(t)
    assert values.shape == (2, 2) and limit == 6.0
    assert np.array_equal(to_input_image(t.abs() / 2), (t.abs() / 2).permute(1, 2, 0).numpy())
    stretched = to_input_image(t)
    assert stretched.min() == 0 and stretched.max() == 1


def test_explanation_grid():
    from matplotlib.figure import Figure

    from toolkit.plotting.images import explanation_grid

    model, x = small_cnn(), torch.randn(2, 3, 8, 8)
    explanations = {"Gradient": Gradient(model).attribute(x), "LRP-z": LRPZ(model).attribute(x)}
    fig = explanation_grid(x, explanations, {"Gradient": "signal", "LRP-z": "attribution"},
                           row_labels=["a", "b"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "Gradient", "LRP-z"]
    with pytest.raises(ValueError, match="kinds"):
        explanation_grid(x, explanations, {"Gradient": "signal"})
