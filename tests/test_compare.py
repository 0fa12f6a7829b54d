"""Tests of toolkit.compare: every method at once, estimator patterns, ground-truth scores.

What must hold:
* ``explain_all`` returns, for every method, exactly what the method's own explainer
  returns, in the order asked for, whatever the batch size and target form;
* pattern-based methods without patterns and unknown methods get clear errors;
* ``estimator_patterns`` gives the filter estimator ``S_w(x) = w w^T x / w^T w`` for one
  linear neuron, random patterns with ``w^T a = 1``, and the linear pattern as both
  components;
* ``ground_truth_scores`` gives the true signal perfect scores, the distractor a
  distractor correlation of 1, no correlations for attributions, and a stable table;
* ``merge_quality`` joins layer-quality results, ``QualityResult.table(ideal=True)`` rounds them.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from toolkit import compare
from toolkit.compare import (OUTPUTS, METHODS, PATTERN_METHODS, TITLES, ScoreTable, estimator_patterns,
                             explain_all, ground_truth_scores, make_explainers, merge_quality)
from toolkit.data import make_ground_truth_images
from toolkit.methods import (LRPZ, Absolute, DeconvNet, Gradient, GuidedBackprop, PatternAttribution,
                             PatternNet)
from toolkit.patterns import fit_patterns


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    return model.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def patterns(net, images):
    return fit_patterns(net, torch.split(images, 20), progress=False)


# ----------------------------------------------------------------------------------
# explainers
# ----------------------------------------------------------------------------------
def test_tables_cover_every_method():
    assert set(OUTPUTS) == set(METHODS) == set(TITLES)
    assert set(PATTERN_METHODS) <= set(METHODS)
    assert {OUTPUTS[m] for m in METHODS} == {"signal", "attribution"}


def test_make_explainers_types_and_kinds(net, patterns):
    explainers = make_explainers(net, patterns)
    assert list(explainers) == list(METHODS)
    expected = {"gradient": Gradient, "deconvnet": DeconvNet, "guided_backprop": GuidedBackprop,
                "patternnet_linear": PatternNet, "patternnet": PatternNet,
                "patternattribution_linear": PatternAttribution,
                "patternattribution": PatternAttribution, "lrp_z": LRPZ}
    for name, explainer in explainers.items():
        assert type(explainer) is expected[name]
    assert explainers["patternnet_linear"].kind == "linear"
    assert explainers["patternnet"].kind == "two_component"
    assert explainers["patternattribution_linear"].kind == "linear"
    assert explainers["patternattribution"].kind == "two_component"


def test_make_explainers_errors(net):
    with pytest.raises(ValueError, match="need patterns"):
        make_explainers(net, None, ("gradient", "patternnet"))
    with pytest.raises(ValueError, match="unknown methods"):
        make_explainers(net, None, ("gradient", "smoothgrad"))
    with pytest.raises(ValueError, match="twice"):
        make_explainers(net, None, ("gradient", "gradient"))
    # methods without patterns need none
    assert list(make_explainers(net, None, ("lrp_z", "gradient"))) == ["lrp_z", "gradient"]


def test_explain_all_equals_each_method(net, patterns, images):
    results = explain_all(net, patterns, images, batch_size=16)
    assert list(results) == list(METHODS)
    for name, explainer in make_explainers(net, patterns).items():
        expected = explainer.attribute(images, None)
        assert results[name].shape == images.shape
        torch.testing.assert_close(results[name], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", [2, "per_sample", "tensor"])
def test_explain_all_targets_and_batches(net, patterns, images, target):
    n = images.shape[0]
    # classes whose output neuron was active on the fitting data (the two-component
    # explainers refuse the others, whose a_+ is 0)
    active = [c for c in range(3) if c not in patterns.inactive_outputs()]
    if target == "per_sample":
        target = [active[i % len(active)] for i in range(n)]
    elif target == "tensor":
        target = torch.tensor(active)[torch.arange(n) % len(active)]
    methods = ("gradient", "patternattribution")
    whole = explain_all(net, patterns, images, target, methods, batch_size=n)
    split = explain_all(net, patterns, images, target, methods, batch_size=7)
    for name in methods:
        torch.testing.assert_close(whole[name], split[name], rtol=1e-10, atol=1e-12)


def test_explain_all_checks_targets(net, patterns, images):
    with pytest.raises(ValueError, match="targets"):
        explain_all(net, patterns, images, target=[0, 1], methods=("gradient",))


# ----------------------------------------------------------------------------------
# estimator patterns
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_neuron():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 1, bias=False)).double().eval()
    x = torch.randn(200, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    return model, x, fit_patterns(model, [x], progress=False)


def test_filter_patterns_give_filter_estimator(linear_neuron):
    model, x, patterns = linear_neuron
    filtered = estimator_patterns(model, patterns, "filter", x)
    w = model[0].weight.detach()[0]
    signal = PatternNet(model, filtered).attribute(x, 0)
    expected = (x @ w)[:, None] * w[None] / (w @ w)
    torch.testing.assert_close(signal, expected, rtol=1e-10, atol=1e-12)


def test_random_and_linear_estimator_patterns(net, patterns, images):
    rand = estimator_patterns(net, patterns, "random", images, seed=4)
    again = estimator_patterns(net, patterns, "random", images, seed=4)
    linear = estimator_patterns(net, patterns, "linear", images)
    from toolkit.layers import trace

    for layer in trace(net, images):
        w = layer.weight().reshape(layer.out_features, -1)
        a = rand[layer.name].positive.reshape(layer.out_features, -1)
        torch.testing.assert_close((w * a).sum(1), torch.ones(layer.out_features, dtype=w.dtype))
        torch.testing.assert_close(rand[layer.name].positive, again[layer.name].positive)
        torch.testing.assert_close(linear[layer.name].positive, patterns[layer.name].linear)
        torch.testing.assert_close(linear[layer.name].negative, patterns[layer.name].linear)
    # the explainers accept the new patterns for the same model
    PatternAttribution(net, rand).attribute(images[:2])
    assert estimator_patterns(net, patterns, "two_component", images) is patterns
    with pytest.raises(ValueError, match="estimator"):
        estimator_patterns(net, patterns, "identity", images)


# ----------------------------------------------------------------------------------
# ground-truth scores
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truth():
    return make_ground_truth_images(12, size=16, seed=0)


def test_true_signal_scores_perfectly(truth):
    table = ground_truth_scores({"truth": truth.signal, "distractor": truth.distractor}, truth,
                                kinds={"truth": "signal", "distractor": "signal"})
    mean = table.mean
    assert mean["truth"]["signal corr"] == pytest.approx(1.0)
    assert mean["truth"]["mass in signal"] == pytest.approx(1.0)
    assert mean["truth"]["mass on distractor"] == pytest.approx(0.0)
    assert mean["truth"]["precision@k"] == pytest.approx(1.0)
    assert mean["distractor"]["distractor corr"] == pytest.approx(1.0)
    assert table.ranking("signal corr") == ["truth", "distractor"]
    assert table.per_image["truth"]["signal corr"].shape == (12,)


def test_attributions_get_no_correlation(truth):
    table = ground_truth_scores({"patternattribution": truth.signal.abs()}, truth)
    assert math.isnan(table.mean["patternattribution"]["signal corr"])
    assert table.column("signal corr") == {}
    row = table.table().splitlines()[2]
    assert row.startswith(TITLES["patternattribution"])
    assert row.split()[-5:-3] == ["-", "-"]
    with pytest.raises(KeyError):
        table.column("accuracy")


def test_score_table_rounds_stably():
    table = ScoreTable(("a", "b"), {"m": {"a": np.array([-1e-9, 0.0]), "b": np.array([0.126, 0.124])}},
                       {"m": "method m"})
    lines = table.table().splitlines()
    assert lines[2].split() == ["method", "m", "0.00", "0.12"]
    assert "-0.00" not in table.table()
    assert str(table) == table.table()


def test_scores_check_shapes(truth):
    with pytest.raises(ValueError, match="do not match"):
        ground_truth_scores({"gradient": truth.signal[:5]}, truth)


# ----------------------------------------------------------------------------------
# layer quality helpers
# ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:layers .* have no more samples")
def test_merge_quality_and_table(net, patterns, images):
    from toolkit.quality import layer_quality

    convs = ["0", "3"]
    dense = ["6", "8"]
    whole = layer_quality(net, patterns, images, progress=False)
    a = layer_quality(net, patterns, images, layers=convs, progress=False)
    b = layer_quality(net, patterns, images, layers=dense, progress=False)
    merged = merge_quality(a, b)
    assert merged.layers == convs + dense
    for layer in merged.layers:
        for estimator in merged.estimators:
            assert merged.mean[layer][estimator] == pytest.approx(whole.mean[layer][estimator], abs=1e-9)
        assert merged.samples[layer] == whole.samples[layer]
    text = merged.table(decimals=2, ideal=True)
    assert len(text.splitlines()) == 2 + len(merged.layers)
    assert "ideal" in text.splitlines()[0]
    ideal = merged.ideal_rho()
    assert all(0.0 <= c < 1.0 for c in ideal.values())
    with pytest.raises(ValueError, match="more than one"):
        merge_quality(a, a)
    with pytest.raises(ValueError, match="at least one"):
        merge_quality()


def test_module_exports():
    for name in compare.__all__:
        assert hasattr(compare, name)


# ----------------------------------------------------------------------------------
# per-estimator explanations and perturbation of every method
# ----------------------------------------------------------------------------------
def test_explain_estimators(net, patterns, images):
    x = images[:5]
    out = compare.explain_estimators(net, patterns, x)
    assert list(out) == [f"{e} {k}" for e in compare.ESTIMATOR_NAMES for k in ("signal", "attribution")]
    torch.testing.assert_close(out["identity signal"], x)
    torch.testing.assert_close(out["identity attribution"], LRPZ(net).attribute(x))
    torch.testing.assert_close(out["two_component signal"], PatternNet(net, patterns).attribute(x))
    torch.testing.assert_close(out["linear attribution"],
                               PatternAttribution(net, patterns, kind="linear").attribute(x))
    filtered = estimator_patterns(net, patterns, "filter", x)
    torch.testing.assert_close(out["filter signal"], PatternNet(net, filtered).attribute(x))
    kinds = compare.estimator_kinds(out)
    assert kinds["filter signal"] == "signal" and kinds["filter attribution"] == "attribution"
    assert compare.estimator_titles(out)["two_component signal"] == r"signal $S_{a\pm}$"
    with pytest.raises(ValueError, match="unknown estimator"):
        compare.explain_estimators(net, patterns, x, estimators=("random",))


def test_absolute_and_perturb_all(net, patterns, images):
    gradient = Gradient(net)
    absolute = Absolute(gradient)
    torch.testing.assert_close(absolute.attribute(images[:3], 1), gradient.attribute(images[:3], 1).abs())
    explainers = {"gradient": gradient, "abs": absolute}
    results = compare.perturb_all(net, explainers, images[:6], patch=4, steps=3, random_repeats=2,
                                  batch_size=4)
    assert list(results) == ["gradient", "abs", "random"]
    assert results["random"].order == "random" and results["random"].repeats == 2
    assert all(r.curve.shape == (4,) and r.patch == 4 for r in results.values())
    text = compare.perturbation_table(results, at=(1, 3), titles={"abs": "|Gradient|"})
    lines = text.splitlines()
    assert lines[0].split() == ["method", "AOPC", "p", "@", "1", "p", "@", "3"]
    assert len(lines) == 5 and any(line.startswith("random order") for line in lines)
    aopcs = [float(line.split()[-3]) for line in lines[2:]]
    assert aopcs == sorted(aopcs, reverse=True)
    assert "random" not in compare.perturb_all(net, {"gradient": gradient}, images[:2], patch=4,
                                               steps=1, random_name=None)


def test_estimator_figure_helpers(net, patterns, images):
    explainers = compare.estimator_explainers(net, patterns, images)
    assert list(explainers) == list(compare.ESTIMATOR_METHODS.values())
    x = images[:4]
    filtered = estimator_patterns(net, patterns, "filter", x)
    torch.testing.assert_close(explainers["patternattribution_filter"].attribute(x),
                               PatternAttribution(net, filtered).attribute(x))
    torch.testing.assert_close(explainers["lrp_z"].attribute(x), LRPZ(net).attribute(x))
    results = compare.perturb_all(net, explainers, images[:6], patch=4, steps=3, random_repeats=2)
    text = compare.estimator_aopc_table(results)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["S_x", "S_w", "S_a", "S_a+-", "random"]
    assert float(lines[5].split()[1]) == pytest.approx(results["patternattribution"].aopc, abs=5e-4)
    orders = compare.estimator_orderings(results)
    aopc = {k: r.aopc for k, r in results.items()}
    assert orders["random order slowest"] == (aopc["random"] == min(aopc.values()))
    assert orders["S_x above S_w"] == (aopc["lrp_z"] > aopc["patternattribution_filter"])


@pytest.mark.filterwarnings("ignore:layers .* have no more samples")
def test_regime_table_and_mean_y(net, patterns, images):
    from toolkit.quality import layer_quality

    everything = layer_quality(net, patterns, images, progress=False, layers=["0", "3"])
    active = layer_quality(net, patterns, images, progress=False, layers=["0"], regime="active")
    text = compare.regime_table({"all samples": everything, "active samples": active})
    lines = text.splitlines()
    assert "all samples" in lines[0] and "active samples" in lines[0]
    assert len(lines) == 3 + 2 and lines[-1].rstrip().endswith("-")  # layer 3: not measured active
    m = active.mean["0"]
    assert lines[3].split()[-1] == ("yes" if m["two_component"] > m["linear"] else "no")
    with pytest.raises(ValueError, match="different regimes"):
        merge_quality(everything, active)
    assert patterns.mean_y == "masked"  # the default
    with pytest.raises(ValueError, match=r"no statistics.*keep_statistics=True"):
        compare.with_mean_y(net, patterns, "global", images)  # the fit freed them
    kept = fit_patterns(net, torch.split(images, 20), progress=False, keep_statistics=True)
    authors = compare.with_mean_y(net, kept, "global", images)
    assert authors.mean_y == "global"
    torch.testing.assert_close(authors["0"].linear, patterns["0"].linear)
    assert not torch.allclose(authors["0"].positive, patterns["0"].positive)
