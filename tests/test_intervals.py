"""toolkit.intervals against independent references: a bootstrap written out as a loop,
and the normal approximation of the mean's sampling distribution."""
import numpy as np
import pytest
import torch

from toolkit.intervals import Interval, bootstrap_difference, bootstrap_mean, ordering, verdict


def test_agrees_with_a_bootstrap_written_out():
    values = np.random.default_rng(0).exponential(size=200)
    ours = bootstrap_mean(values, resamples=20_000)
    rng = np.random.default_rng(1)
    means = [np.mean(rng.choice(values, size=values.size, replace=True)) for _ in range(20_000)]
    low, high = np.percentile(means, [2.5, 97.5])
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.low == pytest.approx(low, abs=0.03 * (high - low))
    assert ours.high == pytest.approx(high, abs=0.03 * (high - low))


def test_close_to_the_normal_approximation_for_many_images():
    values = np.random.default_rng(1).normal(size=2000)
    interval = bootstrap_mean(values, confidence=0.9)
    half = 1.6449 * values.std(ddof=1) / np.sqrt(values.size)
    assert interval.low == pytest.approx(values.mean() - half, abs=0.05 * half)
    assert interval.high == pytest.approx(values.mean() + half, abs=0.05 * half)
    assert interval.confidence == 0.9


def test_seeded_and_paired():
    rng = np.random.default_rng(2)
    shared = rng.normal(size=100) * 5  # a large per-image effect both methods share
    a, b = shared + 0.3 + 0.1 * rng.normal(size=100), shared + 0.1 * rng.normal(size=100)
    assert bootstrap_mean(a, seed=3) == bootstrap_mean(a, seed=3)
    assert bootstrap_mean(a, seed=3) != bootstrap_mean(a, seed=4)
    difference = bootstrap_difference(a, b)
    assert difference.excludes(0) and 0.25 < difference.low < difference.high < 0.35
    # unpaired, the shared effect would hide the difference: the two means' intervals overlap
    assert bootstrap_mean(a).low < bootstrap_mean(b).high
    assert ordering(a, b, ("S_a+-", "S_a")) == "S_a+- > S_a"
    assert ordering(b, a) == "A < B"
    assert ordering(a, a + rng.normal(size=100) * 1e-3 - 5e-5) == "A ~ B"
    assert bootstrap_mean(torch.tensor(a)).estimate == pytest.approx(a.mean())


def test_interval_text_and_bad_input():
    interval = Interval(0.12345, -0.00001, 0.2)
    assert interval.format(3) == "0.123 [0.000, 0.200]" and str(interval) == interval.format()
    assert not interval.excludes(0.0) and interval.excludes(0.3)
    with pytest.raises(ValueError, match="one value per image"):
        bootstrap_mean([1.0])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, np.nan])
    with pytest.raises(ValueError, match="same images"):
        bootstrap_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean([1.0, 2.0], resamples=10)


def test_verdict_of_a_claim():
    rng = np.random.default_rng(5)
    shared = rng.normal(size=150)
    values = {"best": shared + 1.0 + 0.05 * rng.normal(size=150),
              "middle": shared + 0.5 + 0.05 * rng.normal(size=150),
              "twin": shared + 0.5 + 0.05 * rng.normal(size=150),
              "worst": shared + 0.05 * rng.normal(size=150)}
    assert verdict(values, ["best"], ["middle", "twin", "worst"]) == "holds"
    assert verdict(values, ["middle", "twin"], ["worst"]) == "holds"
    assert verdict(values, ["middle"], ["twin"]) == "undecided"
    assert verdict(values, ["worst"], ["middle"]) == "fails"
    assert verdict(values, ["middle"], ["twin", "best"]) == "fails"  # one opposite ordering is enough
    with pytest.raises(ValueError, match="missing"):
        verdict(values, ["best"], ["nowhere"])
