"""Intervals of the comparisons' tables (toolkit.intervals itself: tests/test_intervals.py).

What must hold:
* the AOPC, estimator and score tables print the intervals; the paper's orderings are
  judged by them;
* rho's intervals leave the estimates unchanged, and every split-half replicate equals
  rho measured directly on the images of that half (the block sums are exact).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from toolkit import compare, intervals
from toolkit.compare import ScoreTable
from toolkit.patterns import fit_patterns
from toolkit.perturbation import PerturbationResult
from toolkit.quality import layer_quality
from toolkit.intervals import bootstrap_mean


def _result(per_image_aopc, predicted=None) -> PerturbationResult:
    """A perturbation result with the given per-image AOPC (the curves are made up to match)."""
    aopc = torch.as_tensor(per_image_aopc, dtype=torch.float64)
    n = aopc.shape[0]
    start = torch.full((n, 1), 0.9, dtype=torch.float64)
    per_image = torch.cat([start, start - 2 * aopc[:, None]], 1)   # two steps: mean drop = aopc
    return PerturbationResult(
        curve=per_image.mean(0), per_image=per_image, per_ordering=per_image[:, None],
        per_image_aopc=aopc, aopc=float(aopc.mean()),
        predicted=torch.zeros(n, dtype=torch.long) if predicted is None else predicted,
        order="most_relevant", replace="mean", patch=4, steps=1, repeats=1, grid=(1, 2))


def test_aopc_interval_difference_and_tables():
    rng = np.random.default_rng(5)
    base = rng.uniform(0.05, 0.3, 50)
    results = {"lrp_z": _result(base + 0.01), "patternattribution_filter": _result(base + 0.05),
               "patternattribution_linear": _result(base + 0.011),
               "patternattribution": _result(base + 0.1), "random": _result(base)}
    pa = results["patternattribution"]
    assert pa.aopc_interval() == bootstrap_mean(pa.per_image_aopc)
    assert pa.aopc_difference(results["random"]).low == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same images"):
        pa.aopc_difference(_result(base[:10]))
    with pytest.raises(ValueError, match="same images"):
        pa.aopc_difference(_result(base, predicted=torch.ones(50, dtype=torch.long)))
    claims = compare.estimator_orderings(results, intervals=True)
    assert claims == {"S_a+- drops fastest": "holds", "random order slowest": "holds",
                      "S_x above S_w": "does not hold", "S_a below S_x and S_w": "does not hold"}
    assert compare.estimator_orderings(results) == {
        "S_a+- drops fastest": True, "random order slowest": True, "S_x above S_w": False,
        "S_a below S_x and S_w": False}
    table = compare.estimator_aopc_table(results, intervals=True).splitlines()
    low, high = pa.aopc_interval().low, pa.aopc_interval().high
    assert table[0].split() == ["estimator", "AOPC", "95%", "interval", "p", "@", "1"]
    assert table[5].split()[2:4] == [f"[{low:.3f},", f"{high:.3f}]"]
    rows = compare.perturbation_table(results, at=(1,), intervals=True).splitlines()
    assert rows[2].startswith("PattAttr S_a+-") and f"[{low:.2f}, {high:.2f}]" in rows[2]
    assert "95% interval" not in compare.perturbation_table(results, at=(1,))
    text = compare.aopc_ordering(results)
    assert text.startswith("PattAttr S_a+- > PattAttr S_w > ") and text.endswith("> random order")


def test_score_table_intervals():
    rng = np.random.default_rng(6)
    base = rng.uniform(0, 1, 40)
    table = ScoreTable(("mass in signal",), {"a": {"mass in signal": base + 0.1},
                                              "b": {"mass in signal": base}}, {"a": "A", "b": "B"})
    assert table.interval("a", "mass in signal") == bootstrap_mean(base + 0.1)
    assert table.difference("mass in signal", "a", "b").estimate == pytest.approx(0.1)
    assert table.ordering("mass in signal") == "A > B"
    text = table.table(intervals=True).splitlines()
    assert text[2].split()[0] == "A" and text[2].split()[2].startswith("[")
    with pytest.raises(KeyError, match="does not apply"):
        ScoreTable(("x", "y"), {"a": {"x": base}}).interval("a", "y")


# ----------------------------------------------------------------------------------
# rho per layer
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quality_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 16, 4)).double().eval()
    g = torch.Generator().manual_seed(1)
    fit = torch.randn(200, 1, 8, 8, generator=g, dtype=torch.float64) + 0.3
    held_out = torch.randn(120, 1, 8, 8, generator=g, dtype=torch.float64) + 0.3
    with warnings.catch_warnings():  # an output of the random network is never active
        warnings.simplefilter("ignore", UserWarning)
        patterns = fit_patterns(model, fit.split(50), progress=False)
    return model, patterns, held_out


def test_split_half_replicates_equal_rho_on_each_half(quality_setup):
    model, patterns, data = quality_setup
    plain = layer_quality(model, patterns, data, layers=["0"], progress=False, batch_size=7)
    result = layer_quality(model, patterns, data, layers=["0"], progress=False, batch_size=7,
                           intervals="split_half", blocks=6, resamples=3)
    for e in plain.estimators:
        assert result.mean["0"][e] == pytest.approx(plain.mean["0"][e], abs=1e-12)
    assert result.replicates["0"].shape == (3, 2, len(plain.estimators))
    order = np.random.default_rng(0).permutation(6)         # the first split of seed 0
    chunks = torch.tensor_split(data, 6)
    for half, blocks in enumerate((order[:3], order[3:])):
        direct = layer_quality(model, patterns, torch.cat([chunks[k] for k in blocks]), layers=["0"],
                               progress=False)
        expected = [direct.mean["0"][e] for e in plain.estimators]
        np.testing.assert_allclose(result.replicates["0"][0, half], expected, atol=1e-10)
    interval = result.interval("0", "two_component")
    halves = result.replicates["0"][:, 0, -1] - result.replicates["0"][:, 1, -1]
    error = np.sqrt(np.mean(halves ** 2)) / 2
    assert interval.high - interval.estimate == pytest.approx(1.959964 * error, rel=1e-5)
    assert interval.method == "split-half, 3 random halves of 6 blocks of images"
    difference = result.difference("0", "two_component", "filter")
    assert difference.estimate == pytest.approx(result.mean["0"]["two_component"] - result.mean["0"]["filter"])


def test_bootstrap_intervals_and_the_table(quality_setup):
    model, patterns, data = quality_setup
    results = layer_quality(model, {"m": patterns}, list(data.split(10)), layers=["0"], progress=False,
                            intervals="bootstrap", blocks=4, resamples=30)
    again = layer_quality(model, {"m": patterns}, list(data.split(10)), layers=["0"], progress=False,
                          intervals="bootstrap", blocks=4, resamples=30)
    result = results["m"]
    assert result.replicates["0"].shape == (30, len(result.estimators))
    np.testing.assert_array_equal(result.replicates["0"], again["m"].replicates["0"])
    interval = result.interval("0", "linear")
    reps = result.replicates["0"][:, result.estimators.index("linear")]
    assert (interval.low, interval.high) == tuple(np.percentile(reps, [2.5, 97.5]))
    assert "[" in result.table(decimals=2, intervals=True).splitlines()[2]
    assert compare.regime_table({"x": result}).splitlines()[3].split()[-1] in ("yes", "no", "~")
    merged = compare.merge_quality(result)
    assert merged.interval("0", "linear") == interval


def test_interval_settings_are_checked(quality_setup):
    model, patterns, data = quality_setup
    with pytest.raises(ValueError, match="intervals must be one of"):
        layer_quality(model, patterns, data, progress=False, intervals="jackknife")
    with pytest.raises(ValueError, match="blocks must be"):
        layer_quality(model, patterns, data, progress=False, intervals="split_half", blocks=1)
    with pytest.raises(ValueError, match="at least 200 images"):
        layer_quality(model, patterns, data, progress=False, intervals="split_half", blocks=200)
    with pytest.raises(ValueError, match="need at least 4 batches"):
        layer_quality(model, patterns, iter(data.split(40)), layers=["0"], progress=False,
                      intervals="split_half", blocks=4)
    few = layer_quality(model, patterns, list(data.split(40)), layers=["0"], progress=False,
                        intervals="split_half", blocks=4, resamples=2)   # 3 batches, joined and cut in 4
    assert few.replicates["0"].shape == (2, 2, len(few.estimators))
    with pytest.raises(ValueError, match="no intervals"):
        layer_quality(model, patterns, data, layers=["0"], progress=False).interval("0", "linear")


def test_halves_too_small_for_rho_give_no_interval(quality_setup):
    model, patterns, data = quality_setup
    with pytest.warns(RuntimeWarning, match="no more samples than inputs"):
        result = layer_quality(model, patterns, data[:40], layers=["4"], progress=False,
                               intervals="split_half", blocks=2, resamples=2)
    assert np.isnan(result.interval("4", "linear").low)
    assert result.interval("4", "linear").sign == "~"
    assert intervals.RELATIONS["~"] == "indistinguishable here"


@pytest.mark.parametrize("method, shape", [("split_half", (3, 2, 4)), ("bootstrap", (5, 4))])
def test_a_layer_undefined_on_all_images_is_not_resampled(quality_setup, monkeypatch, method, shape):
    # the dense layer's neurons 1 and 2 are active on 27 and 1 of the first 100 images, no more
    # than its D + 1 = 49 inputs: their rho is undefined on all the images and on every subset of
    # them, though every half holds more than 49 samples; the intervals say so without
    # evaluating a single subset
    import toolkit.quality as quality

    model, patterns, data = quality_setup
    assert (model(data[:100])[:, 1:3] > 0).sum(0).tolist() == [27, 1]
    evaluated = []
    original = quality._layer_means
    monkeypatch.setattr(quality, "_layer_means", lambda layer, *a, **k: evaluated.append(layer.name)
                        or original(layer, *a, **k))
    result = layer_quality(model, patterns, data[:100], layers=["0", "4"], progress=False, regime="active",
                           neurons={"0": 2, "4": [1, 2]}, intervals=method, blocks=4, resamples=shape[0])
    assert all(np.isnan(result.mean["4"][e]) for e in result.estimators)
    assert result.replicates["4"].shape == shape and np.isnan(result.replicates["4"]).all()
    assert result.interval("4", "linear").sign == "~"
    assert "4" not in evaluated and "0" in evaluated      # the defined layer is still resampled
    assert np.isfinite(result.replicates["0"]).all()
