"""Tests of region perturbation (toolkit.perturbation) and its figure.

What must hold, on a model where the answer is known -- a linear two-class model whose
weights have zero mean over every region, so that replacing a region by its mean
removes exactly that region's share ``sum (w_c - w_other) * x`` of the logit difference:
* the most-relevant order drops the probability at least as fast as any random order,
  which drops it at least as fast as the least-relevant order (at every step);
* the random baseline is the mean over ``random_repeats`` orderings;
* step 0 is the unperturbed probability; a hand-computed 2-region image matches exactly;
* AOPC is its formula; nothing depends on the batch size;
* bad settings and data get clear errors.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _nets import random_images
from toolkit.perturbation import PerturbationResult, region_perturbation, region_relevance

C, H, W, PATCH = 3, 20, 22, 4  # 5 x 5 regions; the last 2 columns belong to none


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
class LogitDifferenceTimesInput:
    """Relevance ``(w_target - w_other) * x`` of a linear two-class model."""

    def __init__(self, model: nn.Sequential):
        self.weight = model[1].weight.detach()

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = torch.as_tensor(target).expand(inputs.shape[0])
        diff = self.weight[target] - self.weight[1 - target]
        return diff.reshape(inputs.shape) * inputs


class InputTimesGradient:
    """``x * d logit_target / dx`` by autograd, for any classifier."""

    def __init__(self, model: nn.Module):
        self.model = model

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = inputs.detach().clone().requires_grad_(True)
        logits = self.model(x)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
        return grad * x.detach()


def zero_mean_linear_model(seed: int = 0) -> nn.Sequential:
    """flatten -> linear(C*H*W -> 2), float64, ``w_1 = -w_0``, and ``w_0`` with zero mean
    over every region (per channel)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(C, H, W, generator=g, dtype=torch.float64)
    gh, gw = H // PATCH, W // PATCH
    inner = v[:, :gh * PATCH, :gw * PATCH].reshape(C, gh, PATCH, gw, PATCH)
    inner = inner - inner.mean((2, 4), keepdim=True)
    v[:, :gh * PATCH, :gw * PATCH] = inner.reshape(C, gh * PATCH, gw * PATCH)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([v.reshape(-1), -v.reshape(-1)]) * 0.1)
        model[1].bias.zero_()
    return model


def images(n: int, seed: int = 1) -> torch.Tensor:
    return random_images(n, (C, H, W), seed)


@pytest.fixture(scope="module")
def setup():
    model = zero_mean_linear_model()
    return model, LogitDifferenceTimesInput(model), images(12)


# ----------------------------------------------------------------------------------
# the known answer
# ----------------------------------------------------------------------------------
def test_most_relevant_drops_fastest_then_random_then_least(setup):
    model, explainer, x = setup
    kw = dict(patch=PATCH, batch_size=512, progress=False)
    most = region_perturbation(model, explainer, x, order="most_relevant", **kw)
    rand = region_perturbation(model, explainer, x, order="random", random_repeats=6, **kw)
    least = region_perturbation(model, explainer, x, order="least_relevant", **kw)
    assert most.steps == rand.steps == least.steps == 25 and most.grid == (5, 5)
    tol = 1e-12
    # image by image and ordering by ordering (sum of the k largest shares >= any k shares)
    assert (most.per_image[:, None, :] <= rand.per_ordering + tol).all()
    assert (rand.per_ordering <= least.per_image[:, None, :] + tol).all()
    assert (most.curve < rand.curve - 1e-3)[1:-1].all()
    assert (rand.curve < least.curve - 1e-3)[1:-1].all()
    assert most.aopc > rand.aopc > least.aopc
    # after all regions the images are the same whatever the order
    torch.testing.assert_close(most.per_image[:, -1], least.per_image[:, -1], rtol=0, atol=1e-12)


def test_logit_drops_by_exactly_the_removed_relevance(setup):
    model, explainer, x = setup
    result = region_perturbation(model, explainer, x, patch=PATCH, steps=5, progress=False)
    logits = model(x)
    c = logits.argmax(1)
    regions = region_relevance(explainer.attribute(x, c), PATCH)
    removed = regions.sort(1, descending=True).values[:, :5].cumsum(1)
    margin = (logits.gather(1, c[:, None]) - logits.gather(1, 1 - c[:, None]))[:, 0]
    expected = torch.sigmoid(margin[:, None] - removed)
    torch.testing.assert_close(result.per_image[:, 1:], expected.detach(), rtol=0, atol=1e-12)


def test_random_baseline_is_the_mean_of_its_orderings(setup):
    model, explainer, x = setup
    kw = dict(patch=PATCH, order="random", random_repeats=7, batch_size=512, progress=False)
    result = region_perturbation(model, explainer, x, seed=3, **kw)
    assert result.repeats == 7 and result.per_ordering.shape == (12, 7, 26)
    torch.testing.assert_close(result.per_image, result.per_ordering.mean(1))
    torch.testing.assert_close(result.curve, result.per_ordering.mean((0, 1)))
    # the orderings differ, and another seed gives other ones
    assert (result.per_ordering[:, 0] != result.per_ordering[:, 1]).any()
    other = region_perturbation(model, explainer, x, seed=4, **kw)
    assert not torch.equal(other.per_ordering, result.per_ordering)
    # the random order does not need an explainer
    none = region_perturbation(model, None, x, seed=3, **kw)
    torch.testing.assert_close(none.per_ordering, result.per_ordering, rtol=0, atol=0)


def test_step_zero_is_the_unperturbed_probability_and_aopc_formula(setup):
    model, explainer, x = setup
    result = region_perturbation(model, explainer, x, patch=PATCH, steps=10, progress=False)
    probabilities = model(x).softmax(1)
    torch.testing.assert_close(result.per_image[:, 0], probabilities.max(1).values.detach(),
                               rtol=0, atol=1e-15)
    assert torch.equal(result.predicted, probabilities.argmax(1))
    by_hand = sum((result.per_image[:, 0] - result.per_image[:, k]) for k in range(11)) / 11
    torch.testing.assert_close(result.per_image_aopc, by_hand, rtol=0, atol=1e-15)
    assert result.aopc == pytest.approx(float(by_hand.mean()), abs=1e-15)
    assert result.curve.shape == (11,) and "AOPC" in str(result)


def test_hand_computed_two_regions():
    """One 1x2x4 image, 2x2 regions: left [[1, 2], [3, 6]] (mean 3), right [[0, 4], [2, 2]]
    (mean 2); class 0 has logit w0 . x, class 1 logit 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.5, 0.25, 0.1, -0.2, 0.0, 0.1, 0.3, 0.1], [0.0] * 8],
                                            dtype=torch.float64))
        model[1].bias.zero_()
    x = torch.tensor([[[[1.0, 2.0, 0.0, 4.0], [3.0, 6.0, 2.0, 2.0]]]], dtype=torch.float64)
    explainer = LogitDifferenceTimesInput(model)
    # relevance w0 * x: left 0.5 + 0.5 + 0 + 0.6 = 1.6, right 0 - 0.8 + 0.6 + 0.2 = 0.0
    # logits: x 1.6; left -> 3: [[3,3,0,4],[3,3,2,2]] 2.55; then right -> 2: 3.15
    #         right -> 2 first: [[1,2,2,2],[3,6,2,2]] 2.2
    s = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    most = region_perturbation(model, explainer, x, patch=2, progress=False)
    least = region_perturbation(model, explainer, x, patch=2, order="least_relevant", progress=False)
    zero = region_perturbation(model, explainer, x, patch=2, replace="zero", progress=False)
    torch.testing.assert_close(most.curve, torch.tensor([s(1.6), s(2.55), s(3.15)], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(least.curve, torch.tensor([s(1.6), s(2.2), s(3.15)], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # zero: left -> 0 leaves -0.8 + 0.6 + 0.2 = 0, then everything 0
    torch.testing.assert_close(zero.curve, torch.tensor([s(1.6), 0.5, 0.5], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert most.aopc == pytest.approx(((s(1.6) - s(2.55)) + (s(1.6) - s(3.15))) / 3, abs=1e-15)
    assert most.grid == (1, 2) and most.steps == 2


def test_border_outside_the_grid_is_never_perturbed():
    """22 = 5 * 4 + 2: the last two columns belong to no region. A model that only looks
    at them keeps its output whatever is perturbed."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 2)).double()
    weight = torch.zeros(2, C, H, W, dtype=torch.float64)
    weight[0, :, :, 20:] = torch.randn(C, H, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[1].weight.copy_(weight.reshape(2, -1))
        model[1].bias.zero_()
    x = images(4)
    for replace in ("mean", "zero"):
        result = region_perturbation(model, InputTimesGradient(model), x, patch=PATCH,
                                     replace=replace, progress=False)
        torch.testing.assert_close(result.per_image, result.per_image[:, :1].expand(-1, 26),
                                   rtol=0, atol=1e-15)
        assert result.aopc == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------------------------
# batching, other models
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["most_relevant", "random"])
def test_batch_size_independence(setup, order):
    model, explainer, x = setup
    kw = dict(patch=PATCH, steps=12, order=order, random_repeats=4, seed=2, progress=False)
    a = region_perturbation(model, explainer, x, batch_size=16, **kw)
    pairs = [(b, torch.zeros(len(b))) for b in torch.split(x, 7)]
    b = region_perturbation(model, explainer, pairs, batch_size=500, **kw)
    torch.testing.assert_close(a.per_ordering, b.per_ordering, rtol=0, atol=1e-12)
    assert a.aopc == pytest.approx(b.aopc, abs=1e-12)


def test_cnn_with_input_times_gradient_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(6, 3, 16, 16)
    mode = model.training
    result = region_perturbation(model, InputTimesGradient(model), x, patch=5, batch_size=8,
                                 progress=False)
    assert model.training == mode
    assert result.grid == (3, 3) and result.per_image.shape == (6, 10)
    assert torch.isfinite(result.per_image).all()
    assert ((result.per_image >= 0) & (result.per_image <= 1)).all()


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------
def test_clear_errors(setup):
    model, explainer, x = setup
    with pytest.raises(ValueError, match="larger than the 20x22 images"):
        region_perturbation(model, explainer, x, patch=21, progress=False)
    with pytest.raises(ValueError, match="more than the 25 regions"):
        region_perturbation(model, explainer, x, patch=PATCH, steps=26, progress=False)
    with pytest.raises(ValueError, match="unknown replace"):
        region_perturbation(model, explainer, x, replace="blur", progress=False)
    with pytest.raises(ValueError, match="unknown order"):
        region_perturbation(model, explainer, x, order="best", progress=False)
    with pytest.raises(TypeError, match="attribute"):
        region_perturbation(model, object(), x, progress=False)
    bad = x.clone()
    bad[2, 1, 3, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        region_perturbation(model, explainer, bad, patch=PATCH, progress=False)
    with pytest.raises(ValueError, match="no images"):
        region_perturbation(model, explainer, [], progress=False)
    with pytest.raises(ValueError, match="N >= 1"):
        region_perturbation(model, explainer, x[:0], progress=False)
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        region_perturbation(model, explainer, x, patch=0, progress=False)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        region_perturbation(model, explainer, x.reshape(12, -1), progress=False)

    class Wrong:
        def attribute(self, inputs, target):
            return inputs[:, :1]

    with pytest.raises(ValueError, match="one relevance per input"):
        region_perturbation(model, Wrong(), x, patch=PATCH, progress=False)


# ----------------------------------------------------------------------------------
# the figure
# ----------------------------------------------------------------------------------
def test_plot_perturbation(setup):
    from toolkit.plotting.evaluation import plot_perturbation

    model, explainer, x = setup
    kw = dict(patch=PATCH, steps=10, progress=False)
    curves = {"w * x": region_perturbation(model, explainer, x, **kw),
              "random": region_perturbation(model, explainer, x, order="random", random_repeats=3, **kw)}
    assert all(isinstance(r, PerturbationResult) for r in curves.values())
    ax = plot_perturbation(curves)
    lines = ax.get_lines()
    assert len(lines) == 2
    assert lines[0].get_linestyle() == "-" and lines[1].get_linestyle() == "--"
    torch.testing.assert_close(torch.as_tensor(lines[0].get_ydata()), curves["w * x"].curve)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "AOPC" in labels[0] and labels[1].startswith("random")
    assert f"{curves['w * x'].aopc:.3f}" in labels[0]


# ----------------------------------------------------------------------------------
# rectangular regions and windows of time steps (recordings)
# ----------------------------------------------------------------------------------
def test_rectangular_region_sums_against_a_loop():
    relevance = torch.randn(2, 3, 7, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sums = region_relevance(relevance, (3, 4))  # a 2 x 2 grid; row 6 and columns 8, 9 left out
    expected = torch.tensor([[float(relevance[i, :, 3 * a:3 * a + 3, 4 * b:4 * b + 4].sum())
                              for a in range(2) for b in range(2)] for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-12)
    # an int on one-row inputs is a window of time steps
    one_row = relevance[:, :, :1]
    torch.testing.assert_close(region_relevance(one_row, 5), one_row.sum(1).reshape(2, 2, 5).sum(-1))


def test_hand_computed_windows_of_a_recording():
    """One recording of 2 channels x 4 steps, windows of 2 steps: the first window holds
    [1, 2] and [3, 6] (means 1.5 and 4.5 per channel), the second [0, 4] and [2, 2] (2 and 2);
    class 0 has logit w0 . x, class 1 logit 0."""
    w0 = torch.tensor([0.5, 0.25, 0.0, -0.2, 0.1, 0.1, 0.3, 0.1], dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w0, torch.zeros(8, dtype=torch.float64)]))
        model[1].bias.zero_()
    x = torch.tensor([[[1.0, 2.0, 0.0, 4.0], [3.0, 6.0, 2.0, 2.0]]], dtype=torch.float64)
    explainer = LogitDifferenceTimesInput(model)
    # relevance w0 * x: first window 0.5 + 0.5 + 0.3 + 0.6 = 1.9, second 0 - 0.8 + 0.6 + 0.2 = 0
    # logits: x 1.9; first window -> [1.5, 1.5, 0, 4], [4.5, 4.5, 2, 2]:
    #   0.75 + 0.375 - 0.8 + 0.45 + 0.45 + 0.6 + 0.2 = 2.025;
    # then the second -> [1.5, 1.5, 2, 2], [4.5, 4.5, 2, 2]: 0.75 + 0.375 - 0.4 + 0.9 + 0.8 = 2.425
    s = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    result = region_perturbation(model, explainer, x, patch=2, progress=False)
    torch.testing.assert_close(result.curve, torch.tensor([s(1.9), s(2.025), s(2.425)], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert result.grid == (1, 2) and result.region == (1, 2) and result.one_row
    assert result.region_label == "2 time steps" and "2 windows" in str(result)


def test_recordings_and_their_conv2d_form_give_the_same_curves():
    from toolkit.models import TimeSeriesCNN

    torch.manual_seed(0)
    net = TimeSeriesCNN(channels=3, times=32, num_classes=3, width=4, kernel=5, pool=2, hidden=8).double()
    twin = net.twin()
    x = torch.randn(5, 3, 32, dtype=torch.float64)
    kw = dict(patch=4, steps=6, progress=False)
    one = region_perturbation(net, InputTimesGradient(net), x, **kw)
    two = region_perturbation(twin, InputTimesGradient(twin), twin.inputs(x), **kw)
    explicit = region_perturbation(twin, InputTimesGradient(twin), twin.inputs(x), patch=(1, 4), steps=6,
                                   progress=False)
    for other in (two, explicit):
        torch.testing.assert_close(other.per_ordering, one.per_ordering, rtol=0, atol=1e-12)
        assert other.region == one.region == (1, 4) and other.grid == one.grid == (1, 8)
    rand = [region_perturbation(m, None, m.inputs(x), order="random", random_repeats=3, **kw) for m in (net, twin)]
    torch.testing.assert_close(rand[0].per_ordering, rand[1].per_ordering, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        region_perturbation(net, None, x, patch=(1, 0), order="random", progress=False)
    with pytest.raises(ValueError, match="larger than the 1x32"):
        region_perturbation(net, None, x, patch=33, order="random", progress=False)
