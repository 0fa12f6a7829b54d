"""Tests of the layer-wise signal-estimator quality (toolkit.quality) and its figure.

What must hold:
* ``layer_quality`` equals a brute-force least-squares regression of ``y`` on the
  explicitly computed distractor ``d = x - S(x)`` for every estimator, in a Conv2d with
  stride and padding and a Linear layer behind ReLUs -- also when some inputs are
  constant (a dead channel makes ``Sigma_x`` singular);
* on data from an exactly linear model, S_a and S_a+- leave no signal (rho = 1) and
  S_w and the random baseline do;
* the result does not depend on the batch size;
* undefined neurons are NaN, masked and left out of the means; the identity estimator
  and bad input get clear errors; too few samples warn.
"""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

matplotlib.use("Agg")

from _nets import layer_inputs_outputs, patch_rows, position_rows, random_images  # noqa: E402
from toolkit.linear import UndefinedQualityError  # noqa: E402
from toolkit.patterns import PatternMismatchError, fit_patterns  # noqa: E402
from toolkit.quality import (MEASURABLE, REGIMES, QualityResult, collect_moments,  # noqa: E402
                             filter_pattern, layer_quality, random_pattern, rho_from_moments)


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def small_net(dead_channel: bool = False, seed: int = 0) -> nn.Sequential:
    """conv(2->4, 3x3, pad 1) ReLU conv(4->5, 3x3, stride 2, pad 1) ReLU flatten linear(80->6), float64.

    With ``dead_channel`` the first conv's last channel is 0 after the ReLU, so the
    second conv sees constant inputs; neuron 0 of that conv ignores the channel, neuron
    1 is always active and neuron 2 never (one-sided neurons).
    """
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(80, 6)).double()
    if dead_channel:
        with torch.no_grad():
            net[0].weight[3] = 0.0
            net[0].bias[3] = -1.0
            net[2].weight[0, 3] = 0.0
            net[2].bias[1] = 50.0
            net[2].bias[2] = -50.0
    return net


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    return x + 0.5 * x.roll(1, dims=3)  # correlated neighbours


def samples_of(module: nn.Module, x: torch.Tensor, z: torch.Tensor):
    """(patches (n, D), outputs incl. bias (n, J)) of one layer as NumPy arrays."""
    if isinstance(module, nn.Conv2d):
        return patch_rows(module, x).numpy(), position_rows(z).numpy()
    return x.numpy(), z.numpy()


def group_samples(module: nn.Module, x: torch.Tensor, z: torch.Tensor):
    """([patches (n, D) of each group], outputs incl. bias (n, J)) of one layer as NumPy
    arrays. A Conv2d's patches come from ``F.unfold`` (its columns run channel by channel,
    so a group's are consecutive); a Conv1d's or Conv3d's from the convolution of each
    group's channels with the ``D`` one-hot filters, which copies patch entry ``r`` to
    output channel ``r``."""
    if not isinstance(module, (nn.Conv1d, nn.Conv3d)):
        patches, outputs = samples_of(module, x, z)
        return np.split(patches, getattr(module, "groups", 1), axis=1), outputs
    per_group = module.in_channels // module.groups
    kernel = module.kernel_size
    dim = per_group * math.prod(kernel)
    one_hot = torch.eye(dim, dtype=x.dtype).reshape(dim, per_group, *kernel)
    conv = torch.nn.functional.conv1d if isinstance(module, nn.Conv1d) else torch.nn.functional.conv3d
    groups = [conv(x[:, g * per_group:(g + 1) * per_group], one_hot, None, module.stride, module.padding,
                   module.dilation).movedim(1, -1).reshape(-1, dim).numpy() for g in range(module.groups)]
    return groups, z.movedim(1, -1).reshape(-1, z.shape[1]).numpy()


def brute_force_rho(patches: np.ndarray, w: np.ndarray, active: np.ndarray,
                    a_pos: np.ndarray, a_neg: np.ndarray) -> float:
    """1 - corr(fitted, y) of the least-squares regression of centred y on centred d."""
    y = patches @ w
    y_pos = y * active
    d = patches - np.outer(y_pos, a_pos) - np.outer(y - y_pos, a_neg)
    d = d - d.mean(0)
    yc = y - y.mean()
    if not yc.any():
        return math.nan  # y constant: rho undefined
    # singular values below 1e-9 of the largest are rounding (constant inputs, w^T d ~ 0)
    coef, *_ = np.linalg.lstsq(d, yc, rcond=1e-9)
    fitted = d @ coef
    if fitted @ fitted == 0:
        return 1.0
    return 1.0 - (fitted @ yc) / np.sqrt((fitted @ fitted) * (yc @ yc))


def on_plane(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rescale rows with w^T a = 1 up to round-off to w^T a = 1 exactly-ish.

    A fitted pattern is normalised so that w^T a = 1, but round-off (e.g. 5e-13 when
    inputs have a large mean) leaves w^T d = (1 - w^T a) y, a read-out that lstsq finds
    and that makes rho = 0. The toolkit counts |1 - w^T a| <= 1e-8 |w| |a| as w^T a = 1;
    the reference does the same by rescaling.
    """
    wa = (a * w).sum(1, keepdims=True)
    scale = np.linalg.norm(a, axis=1, keepdims=True) * np.linalg.norm(w, axis=1, keepdims=True)
    close = np.abs(1 - wa) <= 1e-8 * scale
    return np.where(close & (wa != 0), a / np.where(wa != 0, wa, 1), a)


def directions(name, weight, layer_patterns, seed=0):
    j = weight.shape[0]
    w = weight.reshape(j, -1).numpy()
    if name == "random":
        a_pos = a_neg = random_pattern(weight, seed)
    elif name == "filter":
        a_pos = a_neg = filter_pattern(weight)
    elif name == "linear":
        a_pos = a_neg = layer_patterns.linear
    else:
        a_pos, a_neg = layer_patterns.positive, layer_patterns.negative
    return on_plane(a_pos.reshape(j, -1).numpy(), w), on_plane(a_neg.reshape(j, -1).numpy(), w)


def reference(model, patterns, x, regime="all"):
    """Brute-force rho per layer, estimator and neuron: :func:`brute_force_rho` on all
    samples, or (``regime="active"``) :func:`brute_force_active_rho` on each neuron's
    active samples."""
    result = {}
    for name, (layer_input, layer_output) in layer_inputs_outputs(model, x).items():
        module = model.get_submodule(name)
        groups, z = group_samples(module, layer_input, layer_output)
        weight = module.weight.detach()
        w = weight.reshape(weight.shape[0], -1).numpy()
        patches = [groups[j // (len(w) // len(groups))] for j in range(len(w))]  # neuron j's
        bias = module.bias.detach().numpy() if module.bias is not None else 0.0
        active = (z > 0)  # z includes the bias
        assert np.allclose(z - bias, np.stack([patches[j] @ w[j] for j in range(len(w))], 1))
        result[name] = {}
        for est in MEASURABLE:
            a_pos, a_neg = directions(est, weight, patterns[name])
            result[name][est] = np.array([
                brute_force_rho(patches[j], w[j], active[:, j], a_pos[j], a_neg[j]) if regime == "all"
                else brute_force_active_rho(patches[j], w[j], active[:, j], a_pos[j])
                for j in range(w.shape[0])])
    return result


@pytest.fixture(scope="module")
def fitted():
    model = small_net()
    patterns = fit_patterns(model, torch.split(images(200, seed=1), 50), progress=False,
                            keep_statistics=True)
    return model, patterns


# ----------------------------------------------------------------------------------
# the closed form equals brute force
# ----------------------------------------------------------------------------------
def test_equals_brute_force_regression(fitted):
    model, patterns = fitted
    x = images(300, seed=2)
    result = layer_quality(model, patterns, torch.split(x, 64), progress=False)
    expected = reference(model, patterns, x)
    assert result.layers == ["0", "2", "5"]
    for layer in result.layers:
        for est in MEASURABLE:
            got = result.per_neuron[layer][est].numpy()
            np.testing.assert_allclose(got, expected[layer][est], rtol=0, atol=1e-6,
                                       err_msg=f"layer {layer}, estimator {est}")
            assert result.defined[layer][est].all()
            assert result.mean[layer][est] == pytest.approx(expected[layer][est].mean(), abs=1e-6)
    # the measure separates the estimators: S_a+- at least as good as S_a in every layer here
    for layer in result.layers:
        assert result.mean[layer]["two_component"] > result.mean[layer]["random"]


def test_equals_brute_force_with_constant_inputs():
    """A dead channel makes Sigma_x singular. The filter pattern of a neuron that
    weighs the dead channel has a component where x is constant, so d carries y there
    exactly (rho = 0); neuron 0 ignores the channel and gets a proper value."""
    model = small_net(dead_channel=True)
    patterns = fit_patterns(model, torch.split(images(200, seed=1), 50), progress=False)
    x = images(300, seed=2)
    result = layer_quality(model, patterns, x, batch_size=100, progress=False)
    expected = reference(model, patterns, x)
    io = layer_inputs_outputs(model, x)
    patches, _ = samples_of(model[2], *io["2"])
    assert np.linalg.matrix_rank(patches - patches.mean(0)) < patches.shape[1]  # Sigma_x singular
    # the dead neuron of the first layer has w = 0: y is constant, rho undefined
    assert not result.defined["0"]["linear"][3] and result.defined["0"]["linear"][:3].all()
    for layer in result.layers:
        for est in MEASURABLE:
            np.testing.assert_allclose(result.per_neuron[layer][est].numpy(), expected[layer][est],
                                       rtol=0, atol=1e-6, err_msg=f"layer {layer}, estimator {est}")
    filt = result.per_neuron["2"]["filter"]
    assert filt[1:].abs().max() < 1e-6 and filt[0] > 0.01


def test_arbitrary_directions_equal_brute_force(fitted):
    """The closed form for any a_+ != a_-, also off the plane w^T a = 1 (where
    w^T d = (1 - w^T a_+) y_+ + (1 - w^T a_-) y_- is a read-out the estimator leaves)."""
    model, _ = fitted
    x = images(300, seed=2)
    plan, moments = collect_moments(model, x, layers=["2"], progress=False)
    layer = plan["2"]
    w = layer.weight().reshape(5, -1)
    g = torch.Generator().manual_seed(7)
    a_pos = torch.randn(5, 36, generator=g, dtype=torch.float64)
    a_neg = torch.randn(5, 36, generator=g, dtype=torch.float64)
    on_plane = (a_pos / (a_pos * w).sum(1, keepdim=True), a_neg / (a_neg * w).sum(1, keepdim=True))
    off_plane = (a_pos, a_neg)
    half = (on_plane[0], a_neg)  # a_+ on the plane, a_- off it
    rho, defined = rho_from_moments(moments["2"], layer.weight(),
                                       {"on": on_plane, "off": off_plane, "half": half})
    io = layer_inputs_outputs(model, x)
    patches, z = samples_of(model[2], *io["2"])
    for name, (p, n) in {"on": on_plane, "off": off_plane, "half": half}.items():
        expected = [brute_force_rho(patches, w[j].numpy(), z[:, j] > 0, p[j].numpy(), n[j].numpy())
                    for j in range(5)]
        np.testing.assert_allclose(rho[name].numpy(), expected, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------
# the linear signal/distractor model
# ----------------------------------------------------------------------------------
def linear_model_data(n: int, a_s: torch.Tensor, a_d: torch.Tensor, seed: int) -> torch.Tensor:
    """x = a_s y + a_d eps with eps exactly uncorrelated with (1, y) on {y > 0} and {y <= 0}."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, a_d.shape[1], generator=g, dtype=torch.float64)
    for side in (y > 0, y <= 0):
        basis = torch.stack([torch.ones(int(side.sum()), dtype=torch.float64), y[side]], 1)
        e = eps[side]
        eps[side] = e - basis @ torch.linalg.lstsq(basis, e).solution
    return y[:, None] * a_s + eps @ a_d.T


def test_linear_model_patterns_recover_the_signal():
    g = torch.Generator().manual_seed(42)  # not seed 0: that is the random baseline's draw
    dim = 5
    a_s = torch.randn(dim, generator=g, dtype=torch.float64)
    a_d = torch.randn(dim, dim - 1, generator=g, dtype=torch.float64)
    # the filter: orthogonal to the distractor, w^T a_s = 1
    q, _ = torch.linalg.qr(torch.cat([a_d, a_s[:, None]], 1))
    w = q[:, -1] / (q[:, -1] @ a_s)
    model = nn.Sequential(nn.Linear(dim, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(w[None])
    fit = linear_model_data(2000, a_s, a_d, seed=1)
    patterns = fit_patterns(model, [fit], progress=False)
    np.testing.assert_allclose(patterns["0"].linear[0].numpy(), a_s.numpy(), atol=1e-10)
    test = linear_model_data(3000, a_s, a_d, seed=2)
    result = layer_quality(model, patterns, test, batch_size=512, progress=False)
    mean = result.mean["0"]
    assert mean["linear"] == pytest.approx(1.0, abs=1e-7)
    assert mean["two_component"] == pytest.approx(1.0, abs=1e-7)
    assert mean["filter"] < 0.9 and mean["random"] < 0.9


# ----------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------
def test_batch_size_independence(fitted):
    model, patterns = fitted
    x = images(120, seed=3)
    a = layer_quality(model, patterns, torch.split(x, 7), progress=False)
    b = layer_quality(model, patterns, x, batch_size=120, progress=False)
    for layer in a.layers:
        for est in MEASURABLE:
            np.testing.assert_allclose(a.per_neuron[layer][est].numpy(),
                                       b.per_neuron[layer][est].numpy(), rtol=1e-10, atol=1e-12)


def test_layers_subset_labels_and_max_batches(fitted):
    model, patterns = fitted
    x = images(120, seed=3)
    pairs = [(b, torch.zeros(len(b))) for b in torch.split(x, 40)]
    sub = layer_quality(model, patterns, pairs, estimators=("filter", "linear"), layers=["2"],
                        max_batches=2, progress=False)
    assert sub.layers == ["2"] and sub.estimators == ("filter", "linear")
    assert sub.samples["2"] == 80 * 16
    with pytest.warns(RuntimeWarning, match="no more samples than inputs"):
        full = layer_quality(model, patterns, x[:80], progress=False)
    np.testing.assert_allclose(sub.per_neuron["2"]["linear"].numpy(),
                               full.per_neuron["2"]["linear"].numpy(), rtol=1e-10)


def test_float32_model_matches_float64(fitted):
    model, patterns = fitted
    x = images(200, seed=4)
    a = layer_quality(model, patterns, x, progress=False)
    model32 = small_net().float()
    patterns32 = fit_patterns(model32, torch.split(images(200, seed=1).float(), 50), progress=False)
    b = layer_quality(model32, patterns32, x.float(), progress=False)
    for layer in a.layers:
        for est in MEASURABLE:
            np.testing.assert_allclose(a.per_neuron[layer][est].numpy(),
                                       b.per_neuron[layer][est].numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------
# undefined values, errors, warnings
# ----------------------------------------------------------------------------------
def test_zero_variance_neuron_is_masked_not_averaged():
    model = small_net()
    with torch.no_grad():
        model[5].weight[2] = 0.0
    patterns = fit_patterns(model, torch.split(images(200, seed=1), 50), progress=False)
    result = layer_quality(model, patterns, images(300, seed=2), progress=False)
    for est in MEASURABLE:
        values, mask = result.per_neuron["5"][est], result.defined["5"][est]
        assert not mask[2] and mask.sum() == 5
        assert math.isnan(values[2]) and not values[mask].isnan().any()
        assert result.mean["5"][est] == pytest.approx(float(values[mask].mean()))
    assert result.undefined("5") == 1 and result.undefined("0") == 0
    assert "undefined" in result.table()


def test_identity_estimator_is_undefined(fitted):
    model, patterns = fitted
    with pytest.raises(UndefinedQualityError, match="identity"):
        layer_quality(model, patterns, images(10, seed=0), estimators=("identity", "linear"))
    with pytest.raises(ValueError, match="unknown estimator"):
        layer_quality(model, patterns, images(10, seed=0), estimators=("pattern",))


def test_clear_errors(fitted):
    model, patterns = fitted
    x = images(20, seed=0)
    with pytest.raises(ValueError, match="no batches"):
        layer_quality(model, patterns, [], progress=False)
    bad = x.clone()
    bad[3, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        layer_quality(model, patterns, bad, progress=False)
    with pytest.raises(ValueError, match="need fitted patterns"):
        layer_quality(model, None, x, progress=False)
    with pytest.raises(ValueError, match="unknown layers"):
        layer_quality(model, patterns, x, layers=["nope"], progress=False)
    with pytest.raises(PatternMismatchError):
        layer_quality(small_net(seed=5), patterns, x, progress=False)
    with pytest.raises(ValueError, match="ridge"):
        layer_quality(model, patterns, x, ridge=-1.0, progress=False)


def test_too_few_samples_warn_and_ridge(fitted):
    model, patterns = fitted
    x = images(30, seed=5)  # the Linear layer has D = 80 inputs
    with pytest.warns(RuntimeWarning, match=r"n <= D \+ 1"):
        result = layer_quality(model, patterns, x, progress=False)
    assert result.per_neuron["5"]["linear"].abs().max() < 1e-6  # trivially perfect fit
    ridged = layer_quality(model, patterns, x, ridge=0.1, progress=False)
    assert (ridged.per_neuron["5"]["linear"] > 0.01).all()
    assert all(0 <= v <= 1 for e in ridged.mean.values() for v in e.values())


def test_random_pattern_is_reproducible_and_scaled():
    weight = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    a = random_pattern(weight, seed=3)
    assert torch.equal(a, random_pattern(weight, seed=3))
    assert not torch.equal(a, random_pattern(weight, seed=4))
    ones = (a.reshape(7, -1) * weight.reshape(7, -1)).sum(1)
    np.testing.assert_allclose(ones.numpy(), 1.0, rtol=1e-12)
    weight[2] = 0
    assert random_pattern(weight, 3)[2].abs().max() == 0 and filter_pattern(weight)[2].abs().max() == 0


# ----------------------------------------------------------------------------------
# the result and its figure
# ----------------------------------------------------------------------------------
def test_result_table_dict_and_plot(fitted):
    from toolkit.plotting.evaluation import plot_layer_quality

    model, patterns = fitted
    result = layer_quality(model, patterns, images(100, seed=6), progress=False)
    assert isinstance(result, QualityResult)
    table = str(result)
    assert all(name in table for name in MEASURABLE) and len(table.splitlines()) == 2 + 3
    assert result.to_dict()["2"]["linear"] == result.mean["2"]["linear"]
    ax = plot_layer_quality(result)
    assert len(ax.get_lines()) == len(MEASURABLE)
    assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "random" and any("S_w" in t or "S_{w}" in t for t in labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == result.layers


# ----------------------------------------------------------------------------------
# the active regime: each neuron on the samples where it is active
# ----------------------------------------------------------------------------------
def brute_force_active_rho(patches: np.ndarray, w: np.ndarray, active: np.ndarray,
                           a_pos: np.ndarray) -> float:
    """Least squares on the active samples only: there S(x) = a_+ y for every estimator.
    NaN where the neuron has at most D + 1 active samples."""
    x = patches[active]
    if len(x) <= x.shape[1] + 1:
        return math.nan
    y = x @ w
    d = x - np.outer(y, a_pos)
    d = d - d.mean(0)
    yc = y - y.mean()
    # singular values below 1e-9 of the largest are rounding (constant inputs, w^T d ~ 0)
    v, *_ = np.linalg.lstsq(d, yc, rcond=1e-9)  # the best read-out v
    readout = d @ v
    return 1.0 - (readout @ yc) / np.sqrt((readout @ readout) * (yc @ yc))


def test_active_regime_equals_least_squares_on_the_active_samples(fitted):
    model, patterns = fitted
    x = images(400, seed=2)
    result = layer_quality(model, patterns, torch.split(x, 64), progress=False, regime="active")
    expected = reference(model, patterns, x, regime="active")
    assert result.regime == "active"
    for layer in result.layers:
        for est in MEASURABLE:
            got = result.per_neuron[layer][est].numpy()
            want = expected[layer][est]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-8,
                                       err_msg=f"layer {layer}, estimator {est}")
    # the convolutions have every neuron defined; the dense layer (400 samples, D = 80) too
    assert all(result.defined[layer]["linear"].all() for layer in result.layers)
    # and the regimes differ: the all-samples values are not the active ones
    everything = layer_quality(model, patterns, x, progress=False)
    assert not np.allclose(everything.per_neuron["2"]["two_component"].numpy(),
                           result.per_neuron["2"]["two_component"].numpy(), atol=1e-3)


def test_active_regime_with_one_sided_neurons_and_constant_inputs():
    """Neuron 1 of layer 2 is always active (its active regime is the whole data), neuron
    2 never (undefined); the dead channel makes every active covariance singular."""
    model = small_net(dead_channel=True)
    patterns = fit_patterns(model, torch.split(images(200, seed=1), 50), progress=False)
    x = images(300, seed=2)
    result = layer_quality(model, patterns, x, batch_size=100, progress=False, regime="active")
    expected = reference(model, patterns, x, regime="active")
    for layer in result.layers:
        for est in MEASURABLE:
            got = result.per_neuron[layer][est].numpy()
            np.testing.assert_allclose(got, expected[layer][est], rtol=0, atol=1e-6,
                                       err_msg=f"layer {layer}, estimator {est}")
    assert not result.defined["2"]["linear"][2]  # never active
    everything = layer_quality(model, patterns, x, batch_size=100, progress=False,
                               estimators=("linear",))
    # always active: both regimes see the same samples and the same linear-type estimator
    assert result.per_neuron["2"]["linear"][1] == pytest.approx(
        float(everything.per_neuron["2"]["linear"][1]), abs=1e-9)


@pytest.mark.parametrize("intervals", [None, "split_half"])
def test_active_regime_with_a_neuron_active_on_one_sample(intervals):
    """A neuron active on a single sample has a zero covariance up to round-off (moments
    added over blocks of images are re-expressed about one shift: not exactly zero), which
    need not factorise: it is undefined, and the other neurons are measured as without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, 0.3, 0.0, 0.0], dtype=torch.float64)
        model[0].bias[0] = -10.0
    g = torch.Generator().manual_seed(4)
    fit = torch.randn(400, 4, generator=g, dtype=torch.float64)
    fit[::50, 0] = 20.0  # eight fitting samples make neuron 0 active, so it has patterns
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    x[7, 0] = 20.0       # one measuring sample does
    assert (model[0](x)[:, 0] > 0).sum() == 1
    patterns = fit_patterns(model, fit.split(100), progress=False)
    result = layer_quality(model, patterns, x, layers=["0"], progress=False, regime="active",
                           intervals=intervals, blocks=3, batch_size=50)
    expected = reference(model, patterns, x, regime="active")["0"]
    for est in MEASURABLE:
        got = result.per_neuron["0"][est].numpy()
        assert np.isnan(got[0]) and not result.defined["0"][est][0]
        np.testing.assert_allclose(got[1:], expected[est][1:], rtol=0, atol=1e-9)
        assert np.isfinite(got[1:]).all()


def test_active_regime_on_a_subset_of_neurons(fitted):
    model, patterns = fitted
    x = images(300, seed=2)
    full = layer_quality(model, patterns, x, progress=False, regime="active", batch_size=100, seed=3)
    some = layer_quality(model, patterns, x, progress=False, regime="active", neurons=2, seed=3,
                         batch_size=50)
    again = layer_quality(model, patterns, x, progress=False, regime="active", neurons=2, seed=3)
    chosen = some.neurons["2"]
    assert chosen.numel() == 2 and torch.equal(chosen, again.neurons["2"])
    assert torch.equal(chosen, torch.randperm(5, generator=torch.Generator().manual_seed(3))[:2].sort().values)
    for est in MEASURABLE:
        got = some.per_neuron["2"][est]
        np.testing.assert_allclose(got[chosen].numpy(), full.per_neuron["2"][est][chosen].numpy(),
                                   rtol=0, atol=1e-10)
        others = torch.ones(5, dtype=torch.bool)
        others[chosen] = False
        assert torch.isnan(got[others]).all() and not some.defined["2"][est][others].any()
        assert some.mean["2"][est] == pytest.approx(float(got[chosen].mean()), abs=1e-12)
    assert some.undefined("2") == 0
    picked = layer_quality(model, patterns, x, progress=False, regime="active", neurons={"0": [3, 1]})
    assert picked.neurons["0"].tolist() == [1, 3] and picked.neurons["2"].numel() == 5


def test_active_regime_bad_settings(fitted, monkeypatch):
    model, patterns = fitted
    x = images(50, seed=2)
    with pytest.raises(ValueError, match="regime"):
        layer_quality(model, patterns, x, progress=False, regime="positive")
    with pytest.raises(ValueError, match="regime='active'"):
        layer_quality(model, patterns, x, progress=False, neurons=3)
    with pytest.raises(ValueError, match=r"neurons\['0'\]"):
        layer_quality(model, patterns, x, progress=False, regime="active", neurons={"0": [7]})
    with pytest.raises(ValueError, match="positive count"):
        layer_quality(model, patterns, x, progress=False, regime="active", neurons=0)
    import toolkit.quality as quality
    monkeypatch.setattr(quality, "ACTIVE_MOMENT_ELEMENTS", 10_000)
    with pytest.raises(ValueError, match="layer 5: the active regime needs 6 x 80 x 80"):
        layer_quality(model, patterns, x, progress=False, regime="active")


def test_active_moments_reshift_is_exact():
    """Moving the active sums to another shift (as all_reduce does) changes no covariance."""
    from toolkit.layers import trace as trace_plan
    from toolkit.quality import ActiveLayerMoments
    model = small_net()
    x = images(20, seed=5)
    plan = trace_plan(model, x)
    layer = plan.layers[1]
    io = layer_inputs_outputs(model, x)
    m = ActiveLayerMoments.zeros(36, 5)
    m.update(layer, *io["2"])
    before = m.sum_xx_act / m.n_act[:, None, None] - (m.sum_x_act / m.n_act[:, None])[:, :, None] \
        * (m.sum_x_act / m.n_act[:, None])[:, None, :]
    m.reshift(m.shift + 3.0)
    after = m.sum_xx_act / m.n_act[:, None, None] - (m.sum_x_act / m.n_act[:, None])[:, :, None] \
        * (m.sum_x_act / m.n_act[:, None])[:, None, :]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-9)


def test_active_regime_counts_per_layer_and_the_memory_plan(fitted):
    from toolkit.quality import active_regime_neurons
    import toolkit.quality as quality
    model, patterns = fitted
    x = images(100, seed=2)
    result = layer_quality(model, patterns, x, progress=False, regime="active",
                           neurons={"2": 3, "5": [0, 5]}, seed=1)
    assert torch.equal(result.neurons["2"], torch.randperm(5, generator=torch.Generator().manual_seed(1))[:3].sort().values)
    assert result.neurons["5"].tolist() == [0, 5] and result.neurons["0"].numel() == 4
    # layer 0: D = 18, layer 2: D = 36, layer 5: D = 80
    counts = active_regime_neurons(model, x, ["0", "2", "5"], cap=4)
    assert counts == {"0": 4, "2": 4, "5": 4}
    old = quality.ACTIVE_MOMENT_ELEMENTS
    try:
        quality.ACTIVE_MOMENT_ELEMENTS = 2 * 36 * 36
        counts = active_regime_neurons(model, x, ["0", "2", "5"], cap=4)
    finally:
        quality.ACTIVE_MOMENT_ELEMENTS = old
    assert counts == {"0": 4, "2": 2}  # not even one neuron of layer 5 fits


def test_several_pattern_sets_on_one_pass(fitted):
    from toolkit.patterns import Patterns
    from toolkit.layers import trace as trace_plan
    model, patterns = fitted
    x = images(120, seed=2)
    masked = Patterns.from_statistics(trace_plan(model, x[:1]), patterns.statistics,
                                      patterns.fingerprint, mean_y="masked")
    for regime in ("all", "active"):
        both = layer_quality(model, {"global": patterns, "masked": masked}, x, progress=False,
                             regime=regime)
        assert list(both) == ["global", "masked"]
        for label, p in (("global", patterns), ("masked", masked)):
            alone = layer_quality(model, p, x, progress=False, regime=regime)
            for layer in alone.layers:
                for est in MEASURABLE:
                    torch.testing.assert_close(both[label].per_neuron[layer][est],
                                               alone.per_neuron[layer][est], equal_nan=True,
                                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="empty mapping"):
        layer_quality(model, {}, x, progress=False)


# ----------------------------------------------------------------------------------
# every layer type: grouped and depthwise convolutions, Conv1d, Conv3d, standalone BatchNorm
# ----------------------------------------------------------------------------------
#: Per-sample input shapes of the test networks of each convolution dimension.
SIGNAL_SHAPES = {1: (3, 20), 2: (3, 8, 8), 3: (2, 3, 6, 6)}


def centred(net: nn.Sequential, shape: tuple[int, ...]) -> nn.Sequential:
    """``net`` with every layer's bias set to minus the median of its output on random
    inputs, layer by layer: each neuron is active on about half of its samples."""
    x = random_images(64, shape, seed=99)
    with torch.no_grad():
        for module in net:
            if hasattr(module, "bias") and module.bias is not None:
                module.bias.zero_()
                z = module(x).movedim(1, -1).reshape(-1, module.bias.shape[0])
                module.bias.copy_(-z.median(0).values)
            x = module(x)
    return net


def grouped_net(seed: int = 0) -> nn.Sequential:
    """conv(3->8) ReLU, a grouped conv (2 groups of 4 channels -> 3 neurons each, D = 36)
    ReLU, a depthwise conv with two neurons per channel (6 groups, D = 9, stride 2) ReLU,
    global pooling, linear(12->4); float64 on 3x8x8 inputs, centred."""
    torch.manual_seed(seed)
    return centred(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.ReLU(),
                                 nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).double(),
                  SIGNAL_SHAPES[2])


def signals_net(dims: int, seed: int = 0) -> nn.Sequential:
    """A Conv1d or Conv3d network with stride, padding, dilation and a grouped layer,
    then pooling and a Linear layer; float64 on 3x20 (1-D) or 2x3x6x6 (3-D) inputs, centred."""
    torch.manual_seed(seed)
    if dims == 1:
        net = nn.Sequential(nn.Conv1d(3, 4, 5, stride=2, padding=2), nn.ReLU(),
                            nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                            nn.AvgPool1d(5), nn.Flatten(), nn.Linear(12, 3))
    else:
        net = nn.Sequential(nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.ReLU(),
                            nn.Conv3d(4, 4, 3, padding=(1, 2, 1), dilation=(1, 2, 1), groups=2), nn.ReLU(),
                            nn.AvgPool3d((2, 3, 3)), nn.Flatten(), nn.Linear(4, 3))
    return centred(net.double(), SIGNAL_SHAPES[dims])


def check_against_reference(result, model, patterns, x, regime, atol):
    expected = reference(model, patterns, x, regime=regime)
    assert result.layers == list(expected)
    for layer in result.layers:
        for est in MEASURABLE:
            got, want = result.per_neuron[layer][est].numpy(), expected[layer][est]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"layer {layer}, {est}")
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"layer {layer}, {est}")


@pytest.fixture(scope="module")
def grouped():
    model = grouped_net()
    fit = random_images(100, SIGNAL_SHAPES[2], seed=1)
    return model, fit_patterns(model, torch.split(fit, 50), progress=False)


@pytest.mark.parametrize("regime", ["all", "active"])
def test_grouped_and_depthwise_convolutions_equal_brute_force(grouped, regime):
    """Each neuron of a grouped or depthwise convolution against least squares on its
    own group's patches, over all samples and over its active ones."""
    model, patterns = grouped
    x = random_images(100, SIGNAL_SHAPES[2], seed=2)
    result = layer_quality(model, patterns, torch.split(x, 32), progress=False, regime=regime)
    assert result.layers == ["0", "2", "4", "8"] and result.dims == {"0": 27, "2": 36, "4": 9, "8": 12}
    check_against_reference(result, model, patterns, x, regime, atol=1e-6 if regime == "all" else 1e-8)
    assert all(result.defined[layer]["linear"].all() for layer in ("2", "4"))


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_equal_brute_force(dims):
    model = signals_net(dims)
    shape = SIGNAL_SHAPES[dims]
    patterns = fit_patterns(model, torch.split(random_images(100, shape, seed=1), 50), progress=False)
    x = random_images(100, shape, seed=2)
    for regime in REGIMES:
        result = layer_quality(model, patterns, torch.split(x, 32), progress=False, regime=regime)
        assert result.layers == ["0", "2", "6"]
        check_against_reference(result, model, patterns, x, regime, atol=1e-6 if regime == "all" else 1e-8)


def test_grouped_layer_does_not_depend_on_the_batch_size(grouped, monkeypatch):
    """Nor on the blocks of neurons of the closed form: with blocks of 40 numbers the
    grouped layer (D = 36, 3 neurons per group) is cut inside its groups, the depthwise one
    (D = 9, 2 per group) into blocks of two groups."""
    import toolkit.quality as quality

    model, patterns = grouped
    x = random_images(40, SIGNAL_SHAPES[2], seed=3)
    whole = {}
    for regime in REGIMES:
        a = layer_quality(model, patterns, torch.split(x, 7), layers=["2", "4"], progress=False,
                          regime=regime)
        whole[regime] = layer_quality(model, patterns, x, batch_size=40, layers=["2", "4"],
                                      progress=False, regime=regime)
        for layer in a.layers:
            for est in MEASURABLE:
                np.testing.assert_allclose(a.per_neuron[layer][est].numpy(),
                                           whole[regime].per_neuron[layer][est].numpy(),
                                           rtol=1e-10, atol=1e-12, err_msg=f"{regime}, layer {layer}, {est}")
    monkeypatch.setattr(quality, "NEURON_BLOCK_ELEMENTS", 40)
    blocks = layer_quality(model, patterns, x, batch_size=40, layers=["2", "4"], progress=False)
    assert [len(list(quality._neuron_blocks(g, j, d))) for g, j, d in ((2, 6, 36), (6, 12, 9))] == [6, 3]
    for layer in blocks.layers:
        for est in MEASURABLE:
            np.testing.assert_allclose(blocks.per_neuron[layer][est].numpy(),
                                       whole["all"].per_neuron[layer][est].numpy(),
                                       rtol=1e-12, atol=1e-14, err_msg=f"blocks, layer {layer}, {est}")


def test_grouped_moments_move_to_another_shift_exactly(grouped):
    """What all_reduce does: moments of two processes, each with its own shift, moved to
    one shift and added, equal the moments of all the data (per group and per neuron)."""
    from toolkit.layers import trace as trace_plan
    from toolkit.quality import ActiveLayerMoments

    model, _ = grouped
    x = random_images(20, SIGNAL_SHAPES[2], seed=5)
    plan = trace_plan(model, x)
    io = layer_inputs_outputs(model, x)
    for name in ("2", "4"):
        layer = plan[name]
        parts = [ActiveLayerMoments.zeros(layer.weight()[0].numel(), layer.out_features,
                                          measured=[1, 4, 5], groups=layer.groups) for _ in range(3)]
        whole, first, second = parts
        whole.update(layer, *io[name])
        first.update(layer, io[name][0][:8], io[name][1][:8])
        second.update(layer, io[name][0][8:], io[name][1][8:])
        assert first.sum_xx.shape == (layer.groups, first.dim, first.dim)
        # each starts from the mean of its first image: whole's shift is first's
        assert torch.equal(whole.shift, first.shift) and not torch.equal(first.shift, second.shift)
        second.reshift(first.shift)
        for f in ("n", "sum_x", "sum_xx", "sum_xy_pos", "n_act", "sum_x_act", "sum_xx_act"):
            torch.testing.assert_close(getattr(first, f) + getattr(second, f), getattr(whole, f),
                                       rtol=0, atol=1e-9, msg=f"layer {name}, {f}")


def batchnorm_net(seed: int = 0) -> nn.Sequential:
    """:func:`small_net` with a standalone BatchNorm (after the first ReLU, then a ReLU:
    DenseNet's BN-ReLU-conv), its statistics and affine parameters far from the identity."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(80, 6)).double().eval()
    with torch.no_grad():
        net[2].running_mean.uniform_(0.2, 0.6)
        net[2].running_var.uniform_(0.3, 3.0)
        net[2].weight.uniform_(0.5, 2.0)
        net[2].bias.uniform_(-0.3, 0.3)
    return net


def test_standalone_batchnorm_is_skipped_and_named():
    """A standalone BatchNorm's neurons have one input each: every estimator's pattern is
    1 / w, its signal the input itself and its distractor 0, so rho is undefined. It is
    skipped (named in ``skipped`` and under the table), the other layers are measured as
    brute force says; naming it in layers= raises; figures and comparisons take the result."""
    from toolkit.compare import estimator_patterns, merge_quality, regime_table
    from toolkit.linear import UndefinedQualityError
    from toolkit.plotting.evaluation import plot_layer_quality, plot_layer_quality_regimes
    from toolkit.quality import ONE_INPUT, estimator_directions

    model = batchnorm_net()
    patterns = fit_patterns(model, torch.split(images(200, seed=1), 50), progress=False)
    x = images(300, seed=2)
    result = layer_quality(model, patterns, torch.split(x, 64), progress=False)
    assert result.layers == ["0", "4", "7"] and result.skipped == {"2": ONE_INPUT}
    check_against_reference(result, model, patterns, x, "all", atol=1e-6)
    assert result.table().splitlines()[-1] == f"not measured ({ONE_INPUT}): 2"
    # every estimator's direction is a = 1 / w: S(x) = a w x = x, d = 0
    w = model[2].weight / torch.sqrt(model[2].running_var + model[2].eps)
    for est in MEASURABLE:
        a_pos, a_neg = estimator_directions(est, w.detach(), patterns["2"])
        torch.testing.assert_close(a_pos * w.detach(), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(a_neg * w.detach(), torch.ones(4, dtype=torch.float64))
    with pytest.raises(UndefinedQualityError, match="layer 2 has one input per neuron"):
        layer_quality(model, patterns, x, layers=["0", "2"], progress=False)
    active = layer_quality(model, patterns, x, progress=False, regime="active")
    assert active.layers == ["0", "4", "7"] and list(active.skipped) == ["2"]
    # figures and comparisons
    ax = plot_layer_quality(result, layers=["0", "2", "4", "7"])
    assert np.isnan(ax.get_lines()[0].get_ydata()[1])  # a gap where the BatchNorm is
    plot_layer_quality_regimes({"all": result, "active": active})
    merged = merge_quality(layer_quality(model, patterns, x, layers=["0"], progress=False),
                           layer_quality(model, patterns, x, layers=["4", "7"], progress=False))
    assert merged.layers == ["0", "4", "7"] and merged.mean == result.mean
    rows = regime_table({"all": result, "active": active}).splitlines()[3:]
    assert [row.split()[0] for row in rows] == ["0", "4", "7"]
    filtered = estimator_patterns(model, patterns, "filter", x[:1])
    torch.testing.assert_close(filtered["2"].positive * w.detach(), torch.ones(4, dtype=torch.float64))
