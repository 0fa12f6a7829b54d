"""Residual networks: the tiny residual network of tests/_nets.py against
references written out here, and torchvision's ResNets end to end.

What must hold (float64, 1e-6 or better):
* the ReLU after the additions is found for every layer (torch.fx), both masks;
* patterns equal an explicit per-neuron computation from unfolded patches, with the
  activity mask ``z > 0`` and with the input of the ReLU after the addition;
* rho(S) of layer quality uses the same masks (brute-force least squares on the samples);
* PatternNet and PatternAttribution equal an explicit layer-by-layer backward pass
  (transposed convolutions, the ReLU masks, the addition passing the signal to both
  branches, average pooling spreading it evenly);
* Gradient equals autograd, and LRP-z conserves the logit up to the biases' share;
* fits on 1 and 2 processes (gloo) are equal;
* every torchvision ResNet (18, 34, 50, random weights, small inputs) fits and is
  explained by every method with finite values, and the model is left untouched.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from _distributed import run_workers
from _nets import (CONVS, explicit_forward, folded, patch_rows, position_rows, residual_batches,
                   residual_images, tiny_residual)
from toolkit.layers import trace
from toolkit.methods import LRPZ, DeconvNet, Gradient, GuidedBackprop, PatternAttribution, PatternNet
from toolkit.patterns import Patterns, fit_patterns
from toolkit.quality import layer_quality
from toolkit.layers import MASKS

LAYER_NAMES = [name for name, _ in CONVS] + ["fc"]


def fit(net, mask, data=None):
    """The authors' E[y] convention, which brute_force_patterns writes out."""
    return fit_patterns(net, data if data is not None else residual_batches(), progress=False, mask=mask,
                        mean_y="global")


# ----------------------------------------------------------------------------------
# which ReLU masks which layer
# ----------------------------------------------------------------------------------
def test_relu_after_additions_of_the_tiny_network():
    net = tiny_residual()
    plan = trace(net, residual_images(1))
    assert plan.names == LAYER_NAMES
    assert [layer.batchnorm_name for layer in plan][:6] == [bn for _, bn in CONVS]
    nodes = plan.graph.nodes
    sources = {name: a.source for name, a in plan.activities.items()}
    relu_calls = [n.name for n in nodes.values() if n.name in plan.graph.activations]
    assert len(relu_calls) == 5 and all(nodes[n].target == "relu" for n in relu_calls)
    expected = {"stem": (0, True), "a_conv1": (1, True), "a_conv2": (2, False), "a_down": (2, False),
                "b_conv1": (3, True), "b_conv2": (4, False)}
    for name, (call, direct) in expected.items():
        assert sources[name].node == relu_calls[call] and sources[name].direct == direct, name
        assert sources[name].steps == ()
    assert sources["fc"] is None and plan.activities["fc"].last
    assert not any(a.passes_inactive for a in plan.activities.values())


def test_bad_mask_is_named():
    with pytest.raises(ValueError, match="mask must be one of"):
        fit(tiny_residual(), "after_relu")


# ----------------------------------------------------------------------------------
# patterns against an explicit per-neuron computation
# ----------------------------------------------------------------------------------
def neuron_samples(name, layer_input, z, mask_source, net):
    """Rows x (patches), y = w^T x (no bias), active (the mask), one row per sample and
    position; for fc the inputs themselves."""
    if name == "fc":
        w = net.fc.weight.detach()
        return layer_input, layer_input @ w.T, mask_source > 0, w
    w, b = folded(net, name)
    x = patch_rows(getattr(net, name), layer_input)
    w = w.reshape(w.shape[0], -1)
    active = position_rows(mask_source > 0)
    y = position_rows(z - b[None, :, None, None])
    torch.testing.assert_close(y, x @ w.T, rtol=1e-12, atol=1e-12)  # the patches are right
    return x, y, active, w


def brute_force_patterns(x, y, active, w):
    """Per neuron, in a loop: a = cov(x, y) / w^T cov(x, y), and
    a_+ = (E_+[x y] - E_+[x] E[y]) / w^T (...) with the unmasked E[y]."""
    linear, positive = [], []
    for j in range(w.shape[0]):
        yj, on = y[:, j], active[:, j]
        cov = (x * yj[:, None]).mean(0) - x.mean(0) * yj.mean()
        linear.append(cov / (w[j] @ cov))
        if on.any():
            c_pos = (x[on] * yj[on, None]).mean(0) - x[on].mean(0) * yj.mean()
            positive.append(c_pos / (w[j] @ c_pos))
        else:
            positive.append(torch.zeros_like(cov))
    return torch.stack(linear), torch.stack(positive)


@pytest.mark.parametrize("mask", MASKS)
def test_patterns_equal_per_neuron_computation_from_patches(mask):
    net = tiny_residual()
    patterns = fit(net, mask)
    data = torch.cat(residual_batches())
    with torch.no_grad():
        forward = explicit_forward(net, data)
    checked_two_sided = 0
    for name in LAYER_NAMES:
        layer_input, z, relu_input = forward["layers"][name]
        source = relu_input if mask == "relu_input" else z
        x, y, active, w = neuron_samples(name, layer_input, z, source, net)
        linear, positive = brute_force_patterns(x, y, active, w)
        got = patterns[name]
        shape = got.linear.shape
        torch.testing.assert_close(got.linear, linear.reshape(shape), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got.positive, positive.reshape(shape), rtol=1e-8, atol=1e-10)
        checked_two_sided += int(((active.sum(0) > 0) & (active.sum(0) < len(active))).sum())
    assert checked_two_sided >= 15


def test_the_two_masks_differ_only_after_additions():
    net = tiny_residual()
    output, relu_input = fit(net, "output"), fit(net, "relu_input")
    for name in LAYER_NAMES:
        same = torch.equal(output[name].positive, relu_input[name].positive)
        assert same == (name not in ("a_conv2", "a_down", "b_conv2")), name
        # the linear pattern does not use the mask (its sums are those of both sides, so
        # equal to rounding)
        torch.testing.assert_close(output[name].linear, relu_input[name].linear, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mask", MASKS)
def test_layer_quality_uses_the_mask(mask):
    """rho of S_a+- against least squares on the held-out samples: regress y on the
    distractor d = x - a_+ y_+ - a_- y_- (with a constant) and take 1 - sqrt(R^2)."""
    net = tiny_residual()
    patterns = fit(net, mask)
    held_out = residual_images(400, seed=5)
    result = layer_quality(net, patterns, [held_out], estimators=("two_component",),
                           layers=["a_conv2", "a_down", "b_conv2"], progress=False, mask=mask)
    with torch.no_grad():
        forward = explicit_forward(net, held_out)
    for name in ("a_conv2", "a_down", "b_conv2"):
        layer_input, z, relu_input = forward["layers"][name]
        x, y, active, w = neuron_samples(name, layer_input, z, relu_input if mask == "relu_input" else z, net)
        a_pos = patterns[name].positive.reshape(w.shape[0], -1)
        a_neg = patterns[name].negative.reshape(w.shape[0], -1)
        for j in range(w.shape[0]):
            y_pos = y[:, j] * active[:, j]
            d = x - a_pos[j] * y_pos[:, None] - a_neg[j] * (y[:, j] - y_pos)[:, None]
            design = torch.cat([d, torch.ones(len(d), 1, dtype=d.dtype)], 1)
            coef = torch.linalg.lstsq(design, y[:, j, None]).solution
            residual = y[:, j] - (design @ coef)[:, 0]
            r2 = 1 - residual.var(unbiased=False) / y[:, j].var(unbiased=False)
            rho = 1 - np.sqrt(max(float(r2), 0.0))
            assert abs(float(result.per_neuron[name]["two_component"][j]) - rho) < 1e-6, (name, j)


# ----------------------------------------------------------------------------------
# PatternNet and PatternAttribution against an explicit backward pass
# ----------------------------------------------------------------------------------
def conv_transpose(net, name, r, weight, input_shape):
    """``weight^T r`` through the convolution ``name``: a transposed convolution."""
    m = getattr(net, name)
    k, s, p = weight.shape[-1], m.stride[0], m.padding[0]
    extra = input_shape[-1] - ((r.shape[-1] - 1) * s - 2 * p + k)
    return F.conv_transpose2d(r, weight, None, s, p, output_padding=extra)


def explicit_backward(net, x, target, rule):
    """From the logit's value at ``target`` back to the input, layer by layer, with
    ``rule[name]`` as the weight of every layer."""
    with torch.no_grad():
        f = explicit_forward(net, x)
    layers, relu = f["layers"], f["relu"]
    logits = f["logits"]
    r = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    r = r @ rule["fc"]                                           # (N, 5)
    h4 = relu["u2"]
    r = r[:, :, None, None].expand_as(h4) / (h4.shape[2] * h4.shape[3])  # average pooling
    r = r * (relu["u2"] > 0)                                     # ReLU after block b
    branch = conv_transpose(net, "b_conv2", r, rule["b_conv2"], layers["b_conv2"][0].shape)
    branch = branch * (relu["z3"] > 0)
    r = r + conv_transpose(net, "b_conv1", branch, rule["b_conv1"], layers["b_conv1"][0].shape)
    r = r * (relu["u1"] > 0)                                     # ReLU after block a
    branch = conv_transpose(net, "a_conv2", r, rule["a_conv2"], layers["a_conv2"][0].shape)
    branch = branch * (relu["z1"] > 0)
    r = conv_transpose(net, "a_conv1", branch, rule["a_conv1"], layers["a_conv1"][0].shape) \
        + conv_transpose(net, "a_down", r, rule["a_down"], layers["a_down"][0].shape)
    r = r * (relu["z0"] > 0)
    return conv_transpose(net, "stem", r, rule["stem"], x.shape)


def weights_of(net):
    w = {name: folded(net, name)[0] for name, _ in CONVS}
    w["fc"] = net.fc.weight.detach()
    return w


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", ["two_component", "linear"])
def test_patternnet_and_patternattribution_equal_explicit_backward(kind, mask):
    net = tiny_residual()
    patterns = fit(net, mask)
    x = residual_images(5, seed=7)
    live = torch.nonzero(patterns["fc"].n_pos > 0)[:, 0]  # classes a_+ can explain
    target = live[torch.tensor([0, 1, 2, 1, 0]) % len(live)]
    field = "positive" if kind == "two_component" else "linear"
    a = {name: getattr(patterns[name], field) for name in LAYER_NAMES}
    w = weights_of(net)
    expected_signal = explicit_backward(net, x, target, a)
    expected_relevance = explicit_backward(net, x, target, {k: w[k] * a[k] for k in a})
    assert expected_signal.abs().max() > 1e-3 and expected_relevance.abs().max() > 1e-3
    signal = PatternNet(net, patterns, kind=kind).attribute(x, target)
    relevance = PatternAttribution(net, patterns, kind=kind).attribute(x, target)
    torch.testing.assert_close(signal, expected_signal, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(relevance, expected_relevance, rtol=1e-9, atol=1e-12)


def test_explicit_backward_with_weights_is_the_gradient_times_the_logit():
    """The reference backward itself, checked against autograd (A = W)."""
    net = tiny_residual()
    x = residual_images(4, seed=8).requires_grad_(True)
    target = torch.tensor([2, 0, 1, 2])
    logits = net(x).gather(1, target[:, None])
    (grad,) = torch.autograd.grad(logits.sum(), x)
    expected = grad * logits.detach()[:, :, None, None]
    torch.testing.assert_close(explicit_backward(net, x.detach(), target, weights_of(net)), expected,
                               rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------
# Gradient and LRP-z
# ----------------------------------------------------------------------------------
def test_gradient_equals_autograd():
    net = tiny_residual()
    x = residual_images(6, seed=3).requires_grad_(True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    (expected,) = torch.autograd.grad(net(x).gather(1, target[:, None]).sum(), x)
    torch.testing.assert_close(Gradient(net).attribute(x.detach(), target), expected,
                               rtol=1e-12, atol=1e-14)


def test_lrpz_conserves_relevance_without_biases():
    net = tiny_residual(biases=False)
    x = residual_images(6, seed=4)
    relevance = LRPZ(net).attribute(x)
    with torch.no_grad():
        logits = net(x).max(1).values
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-12, atol=1e-12)
    ones = LRPZ(net, start="one").attribute(x).sum((1, 2, 3))
    torch.testing.assert_close(ones, torch.ones_like(ones), rtol=1e-10, atol=1e-10)


def test_lrpz_loses_exactly_the_bias_contributions():
    """sum_i R_i = logit - sum over layers and neurons of b_j g_j, with g_j the gradient of
    the selected logit at z_j (summed over positions): measured with per-sample bias
    probes in the explicit forward pass."""
    net = tiny_residual()
    x = residual_images(6, seed=4)
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    relevance = LRPZ(net).attribute(x, target)
    probes = {name: folded(net, name)[1][None, :, None, None].repeat(len(x), 1, 1, 1).requires_grad_(True)
              for name, _ in CONVS}
    probes["fc"] = net.fc.bias.detach()[None].repeat(len(x), 1).requires_grad_(True)
    logits = explicit_forward(net, x, probes)["logits"].gather(1, target[:, None])[:, 0]
    grads = torch.autograd.grad(logits.sum(), list(probes.values()))
    bias_share = sum((p.detach() * g).flatten(1).sum(1) for p, g in zip(probes.values(), grads))
    assert bias_share.abs().min() > 1e-3
    torch.testing.assert_close(relevance.sum((1, 2, 3)) + bias_share, logits.detach(),
                               rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------
# one process or two
# ----------------------------------------------------------------------------------
def test_two_processes_equal_one(tmp_path):
    run_workers("tiny_residual", 2, tmp_path)
    net = tiny_residual()
    for mask in MASKS:
        single = fit_patterns(net, residual_batches(), progress=False, mask=mask)  # as the workers
        ranks = [Patterns.load(tmp_path / f"{mask}.rank{r}.safetensors", net) for r in range(2)]
        for name in LAYER_NAMES:
            assert ranks[0][name].n == single[name].n
            for kind in ("linear", "positive", "negative"):
                ours = [getattr(p[name], kind) for p in ranks]
                assert torch.equal(ours[0], ours[1])
                reference = getattr(single[name], kind)  # sums in another order: round-off
                torch.testing.assert_close(ours[0], reference, rtol=1e-9,
                                           atol=1e-10 * float(reference.abs().max()))


# ----------------------------------------------------------------------------------
# torchvision's ResNets
# ----------------------------------------------------------------------------------
def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


ALL_METHODS = (Gradient, DeconvNet, GuidedBackprop, LRPZ, PatternNet, PatternAttribution)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_resnet_fits_and_explains_finitely(name):
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    before = state_copy(model)
    patterns = fit_patterns(model, x.split(2), progress=False, mask="relu_input")
    assert len(patterns) == len(trace(model, x))
    for pattern in patterns.layers.values():
        assert all(torch.isfinite(t).all() for t in pattern.tensors().values())
    # classes never active on the 4 fitting images have a_+ = 0 (explained by 0): avoid them
    live = torch.nonzero(patterns["fc"].n_pos > 0)[:, 0]
    target = live[:2].repeat(1)
    assert len(target) == 2
    for method in ALL_METHODS:
        explainer = method(model, patterns) if method in (PatternNet, PatternAttribution) else method(model)
        result = explainer.attribute(x[:2], target)
        assert result.shape == (2, 3, 64, 64)
        assert torch.isfinite(result).all(), method.__name__
        assert result.abs().max() > 0, method.__name__
    after = state_copy(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not model.training


def test_default_mask_is_the_relu_after_the_addition():
    from toolkit.layers import DEFAULT_MASK

    net = tiny_residual()
    assert DEFAULT_MASK == "relu_input"
    default = fit_patterns(net, residual_batches(), progress=False, mean_y="global")
    relu_input = fit(net, "relu_input")
    assert all(torch.equal(default[n].positive, relu_input[n].positive) for n in LAYER_NAMES)


class DataDependent(torch.nn.Module):
    """A chain whose forward branches on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        x = self.relu(self.conv(x))
        if x.sum() > 0:
            x = x * 1.0
        return self.fc(x.flatten(1))


def test_untraceable_model_falls_back_to_the_own_output_with_a_warning():
    torch.manual_seed(0)
    net = DataDependent().double().eval()
    data = [residual_images(6)]
    with pytest.warns(RuntimeWarning, match="torch.fx cannot trace the model, so the activation"):
        fallback = fit_patterns(net, data, progress=False)
    explicit = fit_patterns(net, data, progress=False, mask="output")
    for name in ("conv", "fc"):
        assert torch.equal(fallback[name].positive, explicit[name].positive)
