"""toolkit.sanity: input invariance and model-parameter randomisation.

The references are independent of the code under test: the twin's outputs against the
original network's, the shift of the global ``a_+`` against its closed form written with
NumPy for a one-layer network, the similarities against scipy's and scikit-image's own
functions, and a second run of the randomisation check with the same seed.
"""
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from _nets import conv_net, images, random_images
from toolkit import sanity, similarity
from toolkit.linear import MEAN_Y_CONVENTIONS
from toolkit.methods import REGISTRY, PatternNet
from toolkit.patterns import PatternMismatchError, fit_patterns

FEATURES = 12


def mlp(seed: int = 0) -> nn.Sequential:
    """Flatten-Linear-ReLU-Linear-ReLU-Linear on (N, 3, 2, 2) inputs, float64, with the
    biases set so that every hidden and output neuron is active on about half the data."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(),
                        nn.Linear(7, 4)).double().eval()
    x = data(64, seed=99)  # not the fitting data: no sample lies on a neuron's boundary z = 0
    with torch.no_grad():
        for index in (1, 3, 5):
            y = net[:index](x) @ net[index].weight.T
            net[index].bias.copy_(-y.median(0).values)
    return net


def data(n: int = 300, seed: int = 1) -> torch.Tensor:
    return random_images(n, (3, 2, 2), seed)


def unpadded_conv(bias: bool = False) -> nn.Sequential:
    """A convolution without padding and without a bias, a BatchNorm, pooling, a dense head."""
    torch.manual_seed(3)
    net = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 4, 3, bias=bias), bn=nn.BatchNorm2d(4), relu=nn.ReLU(),
        pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(4 * 3 * 3, 3)))
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.double().eval()


# ----------------------------------------------------------------------------------
# the shifted twin
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, -0.35, "per feature"])
def test_twin_computes_the_model_of_the_shifted_input(shift):
    net, x = mlp(), data(20, seed=5)
    if shift == "per feature":
        shift = torch.linspace(-1, 2, FEATURES).reshape(3, 2, 2)
    twin = sanity.shifted_twin(net, shift, x)
    c = sanity.shift_tensor(shift, x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(twin(x + c), net(x), rtol=0, atol=1e-13)
        assert not torch.allclose(net(x + c), net(x))          # the shift matters to f1
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) == (name != "1.bias")          # only the first bias moved


def test_twin_of_a_convolution_without_bias_and_padding_absorbs_a_shift_per_channel():
    net = unpadded_conv(bias=False)
    x = random_images(6, (2, 8, 8), seed=2)
    shift = torch.tensor([0.5, -2.0]).reshape(2, 1, 1)
    twin = sanity.shifted_twin(net, shift, x)
    with torch.no_grad():
        torch.testing.assert_close(twin(x + shift), net(x), rtol=0, atol=1e-12)
    assert net.conv.bias is None and twin.conv.bias is not None


def test_twin_refuses_zero_padding_and_names_the_layer():
    net, x = conv_net(), images(4)
    with pytest.raises(sanity.ShiftNotAbsorbableError, match=r"'conv1' \(Conv2d\) pads its input with zeros"):
        sanity.shifted_twin(net, 1.0, x)


def test_twin_refuses_a_shift_that_a_bias_cannot_absorb():
    x = random_images(4, (2, 8, 8), seed=2)
    per_pixel = torch.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8)
    with pytest.raises(sanity.ShiftNotAbsorbableError, match="same at every position"):
        sanity.shifted_twin(unpadded_conv(), per_pixel, x)
    relu_first = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(FEATURES, 3)).double()
    with pytest.raises(sanity.ShiftNotAbsorbableError, match=r"module '0' \(ReLU\) runs before"):
        sanity.shifted_twin(relu_first, 1.0, data(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        sanity.shifted_twin(mlp(), torch.ones(5), data(4))


# ----------------------------------------------------------------------------------
# input invariance
# ----------------------------------------------------------------------------------
INVARIANT = {("gradient", None), ("deconvnet", None), ("guided_backprop", None),
             ("patternnet_linear", None), ("patternattribution_linear", None),
             ("patternnet", "masked"), ("patternattribution", "masked")}


@pytest.mark.parametrize("shift", [1.0, -3.0])
def test_invariance_is_exact_for_the_invariant_methods_and_conventions(shift, one_thread):
    result = sanity.input_invariance(mlp(), data(), data(16, seed=7), shift=shift, batch_size=64)
    found = {(r.method, r.mean_y): r for r in result.rows}
    expected = {(m, None) for m, method in REGISTRY.items() if not method.needs_patterns}
    expected |= {(m, None) for m in ("patternnet_linear", "patternattribution_linear")}
    expected |= {(m, c) for m in ("patternnet", "patternattribution") for c in MEAN_Y_CONVENTIONS}
    assert set(found) == expected
    for key, row in found.items():
        if key in INVARIANT:
            assert row.relative <= 1e-10 and row.invariant, (key, row.relative)
        else:  # the global a_+ and LRP-z (input times gradient) move with the shift
            assert row.relative > 1e-3 and not row.invariant, (key, row.relative)
    e1, e2 = result.explanations["lrp_z", None]
    gradient, _ = result.explanations["gradient", None]
    # LRP-z is x * gradient: the twin adds c * gradient
    torch.testing.assert_close(e2 - e1, shift * gradient, rtol=1e-9, atol=1e-12)
    assert "< 1e-10" in result.table() and "LRP-z" in result.table()


def test_global_convention_moves_by_the_predicted_amount_in_one_layer(one_thread):
    """One Linear layer: a_+ = N / (w^T N) with N = E_+[x y] - E_+[x] m. The twin's
    numerator is N + c (E_+[y] - E[y]) with the global m = E[y]; PatternNet (starting
    from the logit) returns a_+ times the logit, PatternAttribution w * a_+ times it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)).double().eval()
    fit_data, x = random_images(400, (5,), seed=3), random_images(6, (5,), seed=4)
    shift = torch.tensor([0.7, -0.2, 1.5, 0.0, 0.3], dtype=torch.float64)
    result = sanity.input_invariance(net, fit_data, x, shift=shift, methods=["patternnet", "patternattribution"],
                                     conventions=("global",), target=[0, 1, 2, 2, 1, 0])

    X = fit_data.numpy()
    W, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    logits = (x.numpy() @ W.T + b)
    targets = result.targets.numpy()
    for j in range(3):
        y, active = X @ W[j], X @ W[j] + b[j] > 0
        numerator = (X[active] * y[active, None]).mean(0) - X[active].mean(0) * y.mean()
        moved = numerator + shift.numpy() * (y[active].mean() - y.mean())
        a, a_twin = numerator / (W[j] @ numerator), moved / (W[j] @ moved)
        for i in np.flatnonzero(targets == j):
            expected_signal = (a - a_twin) * logits[i, j]
            e1, e2 = result.explanations["patternnet", "global"]
            np.testing.assert_allclose((e1 - e2)[i].numpy(), expected_signal, rtol=1e-9, atol=1e-12)
            e1, e2 = result.explanations["patternattribution", "global"]
            np.testing.assert_allclose((e1 - e2)[i].numpy(), W[j] * expected_signal, rtol=1e-9, atol=1e-12)
    assert all(not r.invariant for r in result.rows)


def test_invariance_refuses_the_padded_network_with_its_reason():
    with pytest.raises(sanity.ShiftNotAbsorbableError, match="padding=\\(1, 1\\)"):
        sanity.input_invariance(conv_net(), images(20), images(2), methods=["gradient"])


# ----------------------------------------------------------------------------------
# randomisation
# ----------------------------------------------------------------------------------
def test_randomized_copy_redraws_only_the_chosen_layers_the_same_way_every_time():
    net, x = conv_net(), images(2)
    first = sanity.randomized_copy(net, ["fc"], x, seed=4)
    both = sanity.randomized_copy(net, ["fc", "conv2"], x, seed=4)
    other = sanity.randomized_copy(net, ["fc"], x, seed=5)
    assert torch.equal(first.fc.weight, both.fc.weight) and torch.equal(first.fc.bias, both.fc.bias)
    assert not torch.equal(first.fc.weight, other.fc.weight)
    assert torch.equal(first.conv2.weight, net.conv2.weight) and not torch.equal(both.conv2.weight, net.conv2.weight)
    assert torch.equal(both.conv1.weight, net.conv1.weight) and torch.equal(both.bn1.running_var, net.bn1.running_var)
    bound = 1 / np.sqrt(net.fc.weight.shape[1])
    assert float(first.fc.weight.detach().abs().max()) <= bound and float(first.fc.weight.detach().std()) > bound / 3
    with pytest.raises(ValueError, match="no neuron layers \\['relu1'\\]"):
        sanity.randomized_copy(net, ["relu1"], x)


def test_spearman_and_ssim_equal_scipy_and_scikit_image():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 2, 9, 9, generator=g), torch.randn(5, 2, 9, 9, generator=g)
    b[1] = a[1] * 3           # same ranks and the same map up to scale
    b[2] = 0.0                # undefined
    spearman, ssim = similarity.spearman_similarity(a, b), similarity.ssim_similarity(a, b)
    for i in (0, 3, 4):
        p, q = a[i].double().abs().sum(0).numpy(), b[i].double().abs().sum(0).numpy()
        assert spearman[i] == pytest.approx(spearmanr(p.ravel(), q.ravel()).statistic, abs=1e-12)
        assert ssim[i] == pytest.approx(structural_similarity(p / p.max(), q / q.max(), data_range=1.0), abs=1e-12)
    assert spearman[1] == pytest.approx(1.0) and ssim[1] == pytest.approx(1.0)
    assert np.isnan(spearman[2]) and np.isnan(ssim[2])


def test_mean_interval_is_scipy_bootstrap_with_a_fixed_generator():
    from scipy.stats import bootstrap

    values = np.random.default_rng(1).normal(0.5, 0.2, 40)
    mean, low, high, n = similarity.mean_interval(np.append(values, np.nan), seed=3)
    reference = bootstrap((values,), np.mean, n_resamples=1000, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(3)).confidence_interval
    assert (mean, low, high, n) == (pytest.approx(values.mean()), reference.low, reference.high, 40)
    assert similarity.mean_interval([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25, 3)
    assert np.isnan(similarity.mean_interval([np.nan])[0])


def test_stale_patterns_are_explicit_and_labelled():
    net, x = conv_net(), images(3)
    patterns = fit_patterns(net, images(48), kinds=("positive",), progress=False)
    random = sanity.randomized_copy(net, ["fc"], x, seed=0)
    with pytest.raises(PatternMismatchError):
        PatternNet(random, patterns)
    stale = sanity.stale_patterns(patterns, random)
    assert stale.stale_from == patterns.fingerprint and patterns.fingerprint != stale.fingerprint
    assert not hasattr(patterns, "stale_from")
    signal = PatternNet(random, stale, never_active="linear").attribute(x)
    assert signal.shape == x.shape and torch.isfinite(signal).all()


def test_randomization_is_deterministic_for_a_seed(one_thread):
    net, fit_data, x = conv_net(), images(48), images(8, seed=3)
    run = dict(methods=["gradient", "patternattribution"], n_resamples=200)
    first = sanity.model_randomization(net, fit_data, x, seed=0, **run)
    again = sanity.model_randomization(net, fit_data, x, seed=0, **run)
    other = sanity.model_randomization(net, fit_data, x, seed=1, **run)
    assert first.layers == ["fc", "conv2", "conv1"]
    assert first.steps == {"cascading": ["fc", "conv2", "conv1"], "independent": ["fc", "conv2", "conv1"]}
    assert first.variants == ["gradient", "patternattribution", "patternattribution (stale)"]
    for order in sanity.RANDOMIZATIONS:
        for metric in sanity.SIMILARITIES:
            values = first.similarity[order][metric]
            assert values.shape == (3, 3, 8)
            np.testing.assert_array_equal(values, again.similarity[order][metric])
            assert not np.allclose(values, other.similarity[order][metric], equal_nan=True)
        assert first.table(order, "spearman") == again.table(order, "spearman")
    # the first step of both orders randomises only the top layer: one network, the same numbers
    np.testing.assert_array_equal(first.similarity["cascading"]["ssim"][0], first.similarity["independent"]["ssim"][0])
    # the similarity is that of the kept explanations
    for step, found in first.randomized["cascading"].items():
        s = first.steps["cascading"].index(step)
        np.testing.assert_array_equal(first.similarity["cascading"]["spearman"][s, 0],
                                      similarity.spearman_similarity(first.original["gradient"], found["gradient"]))


def test_randomization_refits_patterns_on_the_randomised_network(one_thread):
    net, fit_data, x = conv_net(), images(48), images(4, seed=3)
    result = sanity.model_randomization(net, fit_data, x, methods=["patternnet"], orders=("independent",))
    random = sanity.randomized_copy(net, ["conv2"], x, seed=0)
    fresh = sanity.fit_quietly(random, fit_data, ("linear", "positive"))
    expected = PatternNet(random, fresh, never_active="linear").attribute(x, result.targets)
    torch.testing.assert_close(result.randomized["independent"]["conv2"]["patternnet"], expected)
    original = fit_patterns(net, fit_data, progress=False)
    stale = PatternNet(random, sanity.stale_patterns(original, random), never_active="linear").attribute(x, result.targets)
    torch.testing.assert_close(result.randomized["independent"]["conv2"]["patternnet (stale)"], stale)


def test_import_toolkit_imports_no_optional_package():
    code = ("import sys, toolkit, toolkit.sanity, toolkit.interop; "
            "print(sorted(m for m in ('skimage', 'quantus', 'captum', 'mne') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------
def test_sanity_figures(one_thread):
    from toolkit.plotting.sanity import invariance_grid, plot_randomization, randomization_grid

    invariance = sanity.input_invariance(mlp(), data(), data(4, seed=7), methods=["gradient", "patternnet"])
    figure = invariance_grid(invariance, index=1)
    assert len(figure.axes) == 3 * 3
    assert [ax.get_title() for ax in figure.axes[:3]] == [r"$f_1$ at $x$", r"$f_2$ at $x + c$", "difference"]
    net, x = conv_net(), images(3, seed=3)
    result = sanity.model_randomization(net, images(24), x, methods=["gradient", "patternnet"], n_resamples=100)
    grid = randomization_grid(result, "cascading", index=2, image=x[2])
    assert len(grid.axes) == 3 * (2 + 3)
    assert [ax.get_title() for ax in grid.axes[:5]] == ["input", "original", "fc", "conv2", "conv1"]
    curves = plot_randomization(result, "independent", variants=["gradient"])
    spearman = curves.axes[0].get_lines()[0].get_ydata()
    assert spearman[0] == 1.0
    np.testing.assert_allclose(spearman[1:], np.nanmean(result.similarity["independent"]["spearman"][:, 0], 1))


def test_an_explainer_takes_the_plan_of_its_own_model_only():
    from toolkit.layers import trace
    from toolkit.methods import Gradient

    net, x = conv_net(), images(2)
    plan = trace(net, x)
    torch.testing.assert_close(Gradient(net).use_plan(plan).attribute(x), Gradient(net).attribute(x))
    with pytest.raises(ValueError, match="another model"):
        Gradient(conv_net(seed=1)).use_plan(plan)
