"""Tests of toolkit.linear: the linear signal/distractor toy, its estimators and rho(S).

References are independent of the code under test: closed-form values derived by hand
for the 2-D model, data built so that sample statistics are exact, and a brute-force
least-squares regression for rho.
"""
import numpy as np
import pytest

from toolkit import linear
from toolkit.linear import (
    ESTIMATORS,
    FilterEstimator,
    IdentityEstimator,
    LinearEstimator,
    NotFittedError,
    RandomEstimator,
    TwoComponentEstimator,
    UndefinedQualityError,
    direction,
    explore,
    fit_filter,
    make_data,
    make_estimator,
    max_correlation,
    quality,
)

A_S = np.array([1.0, 0.0])
A_D = np.array([1.0, 1.0])


def fitted(name, x, w, **kwargs):
    if name == "random":
        kwargs.setdefault("seed", 0)
    return make_estimator(name, **kwargs).fit(x, w)


def rho_two_d(t, sigma):
    """Exact rho of ``S(x) = a y`` in the 2-D toy with ``y ~ U[-1, 1]``.

    With ``w^T a = 1`` the difference ``a_s - a`` is orthogonal to ``w``, so in 2-D it
    is ``t a_d`` and the distractor estimate is ``d = x - a y = a_d (t y + eps)``. Its
    correlation with ``y`` is ``|t| var(y) / sqrt(var(y) (t^2 var(y) + sigma^2))``
    with ``var(y) = 1/3``.
    """
    var_y = 1.0 / 3.0
    return 1.0 - abs(t) * np.sqrt(var_y) / np.sqrt(t * t * var_y + sigma * sigma)


def brute_force_rho(estimator, x, w):
    """1 - corr(fitted, y) of the least-squares regression of centred y on centred d."""
    d = x - estimator.signal(x)
    y = x @ w
    d_centred, y_centred = d - d.mean(axis=0), y - y.mean()
    coefficients = np.linalg.lstsq(d_centred, y_centred, rcond=None)[0]
    fitted_values = d_centred @ coefficients
    norm = np.linalg.norm(fitted_values)
    if norm == 0:
        return 1.0
    return 1.0 - fitted_values @ y_centred / (norm * np.linalg.norm(y_centred))


def exact_data(rng, n, a_s, a_d):
    """Toy data whose noise is exactly uncorrelated with y, in the sample, on each side.

    On the samples with ``y > 0`` and on the others separately, eps is projected off
    ``span{1, y}``; then ``E_+[eps] = E_+[eps y] = 0`` (and likewise for ``E_-``), the
    population identities behind "the pattern is a_s" hold exactly in the sample.
    """
    y = rng.uniform(-1.0, 1.0, size=n)
    eps = rng.normal(size=n)
    for side in (y > 0, y <= 0):
        basis = np.column_stack([np.ones(side.sum()), y[side]])
        eps[side] -= basis @ np.linalg.lstsq(basis, eps[side], rcond=None)[0]
    return np.outer(y, a_s) + np.outer(eps, a_d), y


# ---------------------------------------------------------------------------
# The seed example: a_s = (1, 0), a_d = (1, 1)
# ---------------------------------------------------------------------------

def test_make_data_builds_the_model():
    data = make_data(500, A_S, A_D, noise_mean=0.5, noise_std=2.0, seed=3)
    assert data.x.shape == (500, 2) and data.y.shape == (500,)
    np.testing.assert_array_equal(data.x, data.s + data.d)
    np.testing.assert_allclose(data.s, np.outer(data.y, A_S))
    eps = data.d[:, 0]
    np.testing.assert_allclose(data.d, np.outer(eps, A_D))
    assert data.y.min() >= -1 and data.y.max() <= 1
    assert abs(eps.mean() - 0.5) < 0.3 and abs(eps.std() - 2.0) < 0.2


def test_make_data_accepts_a_generator_and_is_reproducible():
    first = make_data(50, A_S, A_D, seed=np.random.default_rng(7))
    second = make_data(50, A_S, A_D, seed=7)
    np.testing.assert_array_equal(first.x, second.x)


def test_seed_example_filter_is_one_minus_one():
    data = make_data(10_000, A_S, A_D, seed=0)
    w = fit_filter(data.x, data.y)
    np.testing.assert_allclose(w, [1.0, -1.0], atol=1e-6)
    # the reason least squares is exact despite the noise: w cancels the distractor
    np.testing.assert_allclose(data.d @ w, 0.0, atol=1e-9)
    np.testing.assert_allclose(data.x @ w, data.y, atol=1e-9)


def test_seed_example_patterns_recover_the_signal():
    # The patterns' sampling error lies along a_d with standard error about
    # sigma * sqrt(3 / n) (linear) and sigma * 3 * sqrt(1 / (3 n_+)) (each side of S_a+-):
    # 0.017 and 0.025 for sigma = 1. Tolerance 0.02 needs sigma = 0.25 (> 3 standard errors).
    data = make_data(10_000, A_S, A_D, noise_std=0.25, seed=0)
    w = fit_filter(data.x, data.y)
    linear = LinearEstimator().fit(data.x, w)
    two = TwoComponentEstimator().fit(data.x, w)
    print(f"\nsigma=0.25: a = {linear.pattern_}, a+ = {two.pattern_positive_}, "
          f"a- = {two.pattern_negative_}")
    for pattern in (linear.pattern_, two.pattern_positive_, two.pattern_negative_):
        np.testing.assert_allclose(pattern, A_S, atol=0.02)


def test_seed_example_patterns_at_unit_noise_within_four_standard_errors():
    data = make_data(10_000, A_S, A_D, noise_std=1.0, seed=0)
    w = fit_filter(data.x, data.y)
    two = TwoComponentEstimator().fit(data.x, w)
    np.testing.assert_allclose(LinearEstimator().fit(data.x, w).pattern_, A_S, atol=4 * 0.017)
    np.testing.assert_allclose(two.pattern_positive_, A_S, atol=4 * 0.025)
    np.testing.assert_allclose(two.pattern_negative_, A_S, atol=4 * 0.025)


def test_filter_pattern_follows_the_filter():
    data = make_data(1000, A_S, A_D, seed=0)
    w = fit_filter(data.x, data.y)
    np.testing.assert_allclose(FilterEstimator().fit(data.x, w).pattern_, [0.5, -0.5], atol=1e-6)


def test_seed_example_quality():
    sigma = 1.0
    train = make_data(10_000, A_S, A_D, noise_std=sigma, seed=0)
    test = make_data(10_000, A_S, A_D, noise_std=sigma, seed=1)
    w = fit_filter(train.x, train.y)
    rho = {name: quality(fitted(name, train.x, w), test.x, w)
           for name in ("filter", "linear", "two_component", "random")}
    print("\nseed example rho(S) on held-out data:",
          {name: round(value, 4) for name, value in rho.items()})
    assert rho["linear"] > 0.98
    assert rho["two_component"] > 0.98
    assert rho["filter"] < 0.8
    assert rho["random"] < 0.9
    # independent closed forms: S_w leaves t = 0.5 (a_s - w / 2 = 0.5 a_d)
    assert rho["filter"] == pytest.approx(rho_two_d(0.5, sigma), abs=0.02)
    random_pattern = fitted("random", train.x, w).pattern_
    t = (A_S - random_pattern)[1] / A_D[1]
    assert rho["random"] == pytest.approx(rho_two_d(t, sigma), abs=0.02)


def test_linear_and_two_component_reach_rho_one_on_their_fitting_data():
    # a = cov[x, y] / var(y) makes cov[x - S(x), y] = 0 exactly; with the global E[y]
    # (the authors' convention, not the default) the two halves of S_a+- together do the same.
    data = make_data(2000, A_S, A_D, noise_mean=0.7, seed=5)
    w = fit_filter(data.x, data.y)
    assert quality(fitted("linear", data.x, w), data.x, w) == pytest.approx(1.0, abs=1e-9)
    authors = fitted("two_component", data.x, w, mean_y="global")
    assert quality(authors, data.x, w) == pytest.approx(1.0, abs=1e-9)
    # the default E_+[y] leaves a little of y in the distractor here (noise with a mean)
    assert quality(fitted("two_component", data.x, w), data.x, w) < 1 - 1e-4


def test_identity_quality_raises_the_documented_error():
    data = make_data(100, A_S, A_D, seed=0)
    w = fit_filter(data.x, data.y)
    estimator = IdentityEstimator().fit(data.x, w)
    np.testing.assert_array_equal(estimator.distractor(data.x), 0.0)
    with pytest.raises(UndefinedQualityError, match="zero variance"):
        quality(estimator, data.x, w)
    assert issubclass(UndefinedQualityError, ValueError)


def test_constant_distractor_raises_too():
    # noise_std = 0: the linear estimator removes the (constant) distractor completely
    data = make_data(100, A_S, A_D, noise_mean=0.3, noise_std=0.0, seed=0)
    w = fit_filter(data.x, data.y)
    with pytest.raises(UndefinedQualityError, match="distractor"):
        quality(LinearEstimator().fit(data.x, w), data.x, w)


def test_constant_output_raises():
    x = np.column_stack([np.ones(20), np.linspace(-1, 1, 20)])
    w = np.array([1.0, 0.0])  # y = 1 for every sample
    with pytest.raises(UndefinedQualityError, match="y = w\\^T x has zero variance"):
        quality(FilterEstimator().fit(x, w), x, w)


# ---------------------------------------------------------------------------
# Estimator interface
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_interface(name):
    data = make_data(300, A_S, A_D, seed=2)
    w = fit_filter(data.x, data.y)
    estimator = make_estimator(name)
    assert estimator.fit(data.x, w) is estimator
    signal = estimator.signal(data.x)
    assert signal.shape == data.x.shape
    np.testing.assert_allclose(estimator.distractor(data.x), data.x - signal)
    np.testing.assert_allclose(estimator.attribution(data.x), w * signal)
    for pattern in estimator.patterns_.values():
        assert w @ pattern == pytest.approx(1.0)
    if name != "identity":
        # r sums to the output: sum_i w_i a_i y = y
        np.testing.assert_allclose(estimator.attribution(data.x).sum(axis=1), data.y, atol=1e-9)


def test_pattern_attribute_names():
    data = make_data(300, A_S, A_D, seed=2)
    w = fit_filter(data.x, data.y)
    for cls in (FilterEstimator, LinearEstimator, RandomEstimator):
        estimator = cls().fit(data.x, w)
        assert estimator.patterns_ == {"a": estimator.pattern_}
    two = TwoComponentEstimator().fit(data.x, w)
    assert set(two.patterns_) == {"a+", "a-"}
    assert two.patterns_["a+"] is two.pattern_positive_
    assert IdentityEstimator().fit(data.x, w).patterns_ == {}


def test_two_component_signal_switches_on_the_sign_of_the_output():
    data = make_data(400, A_S, A_D, seed=1)
    w = fit_filter(data.x, data.y)
    two = TwoComponentEstimator().fit(data.x, w)
    y = data.x @ w
    expected = np.where((y > 0)[:, None], np.outer(y, two.pattern_positive_),
                        np.outer(y, two.pattern_negative_))
    np.testing.assert_allclose(two.signal(data.x), expected)


def test_two_component_means_by_hand():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(50, 3))
    w = np.array([0.5, -1.0, 2.0])
    y = x @ w
    for convention in ("global", "masked"):
        two = TwoComponentEstimator(mean_y=convention).fit(x, w)
        for side, pattern in ((y > 0, two.pattern_positive_), (y <= 0, two.pattern_negative_)):
            m = y.mean() if convention == "global" else y[side].mean()
            numerator = sum(x[i] * y[i] for i in np.flatnonzero(side)) / side.sum() \
                - x[side].mean(axis=0) * m
            np.testing.assert_allclose(pattern, numerator / (w @ numerator))


def test_two_component_conventions_with_a_noise_mean():
    # masked E_+[y] recovers a_s; the authors' global E[y] adds nu (E_+[y] - E[y]) /
    # (E_+[y^2] - E_+[y] E[y]) a_d = 1.5 nu a_d for y ~ U[-1, 1]
    nu = 0.4
    data = make_data(100_000, A_S, A_D, noise_mean=nu, noise_std=0.1, seed=4)
    w = fit_filter(data.x, data.y)
    masked = TwoComponentEstimator(mean_y="masked").fit(data.x, w)
    authors = TwoComponentEstimator(mean_y="global").fit(data.x, w)
    assert TwoComponentEstimator().mean_y == "masked"  # the default
    np.testing.assert_allclose(masked.pattern_positive_, A_S, atol=0.01)
    np.testing.assert_allclose(authors.pattern_positive_, A_S + 1.5 * nu * A_D, atol=0.02)
    np.testing.assert_allclose(authors.pattern_negative_, A_S - 1.5 * nu * A_D, atol=0.02)


def test_two_component_empty_side_gets_zero_pattern():
    data = make_data(200, A_S, A_D, seed=0)
    w = fit_filter(data.x, data.y)
    positive = data.x[data.y > 0]
    two = TwoComponentEstimator().fit(positive, w)
    np.testing.assert_array_equal(two.pattern_negative_, 0.0)
    assert np.all(np.isfinite(two.signal(data.x)))


def test_two_component_zero_denominator_keeps_raw_covariance():
    # inactive samples all have y = 0 exactly: w^T (E_-[x y] - E_-[x] E[y]) = 0
    w = np.array([1.0, 0.0])
    active = np.column_stack([np.linspace(0.1, 1.0, 10), np.linspace(-1, 1, 10)])
    inactive = np.column_stack([np.zeros(6), np.arange(6.0)])
    x = np.vstack([active, inactive])
    y = x @ w
    two = TwoComponentEstimator(mean_y="global").fit(x, w)
    raw = -inactive.mean(axis=0) * y.mean()
    np.testing.assert_allclose(two.pattern_negative_, raw)
    assert np.all(np.isfinite(two.pattern_positive_))


def test_linear_zero_covariance_gives_finite_pattern():
    x = np.column_stack([np.ones(20), np.linspace(-1, 1, 20)])
    pattern = LinearEstimator().fit(x, [1.0, 0.0]).pattern_  # y constant: cov[x, y] = 0
    np.testing.assert_array_equal(pattern, 0.0)


def test_random_estimator_is_seeded_and_scaled():
    data = make_data(300, A_S, A_D, seed=2)
    w = fit_filter(data.x, data.y)
    first = RandomEstimator(seed=5).fit(data.x, w).pattern_
    np.testing.assert_array_equal(first, RandomEstimator(seed=5).fit(data.x, w).pattern_)
    assert not np.allclose(first, RandomEstimator(seed=6).fit(data.x, w).pattern_)
    assert w @ first == pytest.approx(1.0)


def test_signal_before_fit_raises():
    with pytest.raises(NotFittedError, match="not fitted yet; call fit"):
        LinearEstimator().signal(np.zeros((3, 2)))
    with pytest.raises(NotFittedError):
        quality(TwoComponentEstimator(), np.zeros((3, 2)), [1.0, 0.0])


# ---------------------------------------------------------------------------
# Properties over random models, D = 2..8
# ---------------------------------------------------------------------------

def test_filter_and_patterns_over_random_models():
    rng = np.random.default_rng(2018)
    for case in range(150):
        dim = int(rng.integers(2, 9))
        a_s, a_d = rng.normal(size=dim), rng.normal(size=dim) * rng.uniform(0.1, 5)
        data = make_data(int(rng.integers(dim + 20, 400)), a_s, a_d,
                         noise_mean=rng.normal(), noise_std=rng.uniform(0.1, 3), seed=rng)
        w = fit_filter(data.x, data.y)
        scale = np.linalg.norm(w) * np.linalg.norm(a_d)
        assert abs(w @ a_d) <= 1e-8 * scale, (case, dim)
        assert w @ a_s == pytest.approx(1.0, abs=1e-8), (case, dim)
        if dim > 2:  # x spans two dimensions: the minimum-norm w lies in span{a_s, a_d}
            basis = np.linalg.qr(np.column_stack([a_s, a_d]))[0]
            np.testing.assert_allclose(basis @ (basis.T @ w), w, atol=1e-8)

        # with noise exactly uncorrelated with y in the sample, the patterns are a_s
        x, y = exact_data(rng, 200, a_s, a_d)
        w = fit_filter(x, y)
        np.testing.assert_allclose(LinearEstimator().fit(x, w).pattern_, a_s, atol=1e-9)
        for convention in ("global", "masked"):
            two = TwoComponentEstimator(mean_y=convention).fit(x, w)
            np.testing.assert_allclose(two.pattern_positive_, a_s, atol=1e-9)
            np.testing.assert_allclose(two.pattern_negative_, a_s, atol=1e-9)


def test_pattern_ignores_the_distractor_direction():
    rng = np.random.default_rng(0)
    for angle in np.linspace(5, 175, 18):
        x, y = exact_data(rng, 300, A_S, direction(angle))
        w = fit_filter(x, y)
        assert w @ direction(angle) == pytest.approx(0.0, abs=1e-9)
        np.testing.assert_allclose(LinearEstimator().fit(x, w).pattern_, A_S, atol=1e-9)


# ---------------------------------------------------------------------------
# rho(S) in closed form equals a brute-force regression
# ---------------------------------------------------------------------------

def _quality_cases():
    """(label, fitting inputs, held-out inputs, filter) for three kinds of data."""
    def toy(a_s, a_d, seeds, **noise):
        train, test = (make_data(500, a_s, a_d, seed=seed, **noise) for seed in seeds)
        return train.x, test.x, fit_filter(train.x, train.y)

    rng = np.random.default_rng(1)
    yield ("seed example", *toy(A_S, A_D, (1, 2)))
    yield ("toy D=5", *toy(rng.normal(size=5), rng.normal(size=5), (3, 4), noise_mean=0.5))
    mixing = rng.normal(size=(4, 4))  # generic correlated Gaussian inputs, any filter
    yield ("gaussian D=4", rng.normal(size=(600, 4)) @ mixing, rng.normal(size=(600, 4)) @ mixing,
           rng.normal(size=4))


@pytest.mark.parametrize("name", ["filter", "linear", "two_component", "random"])
def test_quality_matches_brute_force_regression(name):
    for label, train_x, test_x, w in _quality_cases():
        estimator = fitted(name, train_x, w)
        for x in (train_x, test_x):
            expected = brute_force_rho(estimator, x, w)
            assert quality(estimator, x, w) == pytest.approx(expected, abs=1e-8), label


# ---------------------------------------------------------------------------
# Bad input is refused at the door, with a message naming the problem
# ---------------------------------------------------------------------------

GOOD = make_data(50, A_S, A_D, seed=0)
GOOD_W = fit_filter(GOOD.x, GOOD.y)


def test_bad_directions():
    with pytest.raises(ValueError, match="a_s has length 2 but a_d has length 3"):
        make_data(10, [1, 0], [1, 1, 0])
    with pytest.raises(ValueError, match="D >= 2"):
        make_data(10, [1.0], [0.5])
    with pytest.raises(ValueError, match="a_s is parallel to a_d"):
        make_data(10, [1, 2], [-2, -4])
    with pytest.raises(ValueError, match="a_s is the zero vector"):
        make_data(10, [0, 0], [1, 1])
    with pytest.raises(ValueError, match="a_d contains 1 NaN or Inf"):
        make_data(10, [1, 0], [np.nan, 1])
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        make_data(10, A_S, A_D, noise_std=-1)
    with pytest.raises(ValueError, match="n must be a positive number"):
        make_data(0, A_S, A_D)


def test_bad_samples():
    with pytest.raises(ValueError, match="x has 50 rows .* y has length 49"):
        fit_filter(GOOD.x, GOOD.y[:-1])
    with pytest.raises(ValueError, match="x has D=1 column"):
        fit_filter(GOOD.x[:, :1], GOOD.y)
    with pytest.raises(ValueError, match="x must be a 2-D array"):
        fit_filter(GOOD.x[:, 0], GOOD.y)
    with pytest.raises(ValueError, match="too few samples: n=2 with D=2"):
        fit_filter(GOOD.x[:2], GOOD.y[:2])
    x = GOOD.x.copy()
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="x contains 1 NaN or Inf"):
        fit_filter(x, GOOD.y)
    y = GOOD.y.copy()
    y[[0, 5]] = np.nan
    with pytest.raises(ValueError, match="y contains 2 NaN or Inf"):
        fit_filter(GOOD.x, y)
    with pytest.raises(ValueError, match="x contains 1 NaN or Inf"):
        LinearEstimator().fit(x, GOOD_W)


def test_parallel_data_has_no_filter():
    rng = np.random.default_rng(0)
    y, eps = rng.uniform(-1, 1, 100), rng.normal(size=100)
    x = np.outer(y, A_S) + np.outer(eps, 3 * A_S)
    with pytest.raises(ValueError, match="no filter recovers y.*parallel"):
        fit_filter(x, y)


def test_bad_filter():
    with pytest.raises(ValueError, match="w has length 3, but x has D=2"):
        LinearEstimator().fit(GOOD.x, [1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="w is the zero vector"):
        LinearEstimator().fit(GOOD.x, [0.0, 0.0])
    with pytest.raises(ValueError, match="too few samples"):
        LinearEstimator().fit(GOOD.x[:2], GOOD_W)
    estimator = LinearEstimator().fit(GOOD.x, GOOD_W)
    with pytest.raises(ValueError, match="x has D=3 columns but the estimator was fitted with D=2"):
        estimator.signal(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="w differs from the filter the estimator was fitted"):
        quality(estimator, GOOD.x, [1.0, 1.0])
    with pytest.raises(ValueError, match="w has length 3"):
        quality(estimator, GOOD.x, [1.0, 1.0, 1.0])


def test_bad_names():
    with pytest.raises(ValueError, match="unknown estimator 'pattern'"):
        make_estimator("pattern")
    with pytest.raises(ValueError, match='mean_y must be "masked" or "global"'):
        TwoComponentEstimator(mean_y="positive")
    with pytest.raises(ValueError, match="unknown estimator"):
        explore(estimator="lrp")


# ---------------------------------------------------------------------------
# The explorer's pure computation
# ---------------------------------------------------------------------------

def test_explore_numbers():
    result = explore(signal_angle=0, distractor_angle=45, noise_mean=0, noise_std=1, n=2000,
                     seed=0, mean_y="global")
    np.testing.assert_allclose(result.a_s, [1, 0], atol=1e-12)
    np.testing.assert_allclose(result.a_d, [np.sqrt(0.5)] * 2)
    np.testing.assert_allclose(result.w, [1.0, -1.0], atol=1e-9)
    assert set(result.rho) == set(result.patterns) == set(ESTIMATORS)
    assert result.patterns["identity"] == {}
    np.testing.assert_allclose(result.patterns["filter"]["a"], [0.5, -0.5], atol=1e-9)
    np.testing.assert_allclose(result.patterns["linear"]["a"], A_S, atol=0.05)
    assert set(result.patterns["two_component"]) == {"a+", "a-"}
    assert result.rho["identity"] is None
    assert "identity" in result.notes["identity"] and "zero variance" in result.notes["identity"]
    # S_w leaves a_s - w / 2 = (0.5, 0.5) = t a_d with t = 1 / sqrt(2)
    assert result.rho["filter"] == pytest.approx(rho_two_d(np.sqrt(0.5), 1.0), abs=0.02)
    assert result.rho["linear"] > 0.97 and result.rho["two_component"] > 0.97
    # rho is measured on the held-out samples
    for name in ("filter", "linear", "two_component", "random"):
        estimator = result.estimators[name]
        assert result.rho[name] == quality(estimator, result.held_out.x, result.w)
    assert result.selected == "two_component"


def test_explore_is_reproducible_and_rejects_parallel_directions():
    first, second = explore(seed=3, n=100), explore(seed=3, n=100)
    np.testing.assert_array_equal(first.data.x, second.data.x)
    assert first.rho == second.rho
    with pytest.raises(ValueError, match="parallel"):
        explore(signal_angle=30, distractor_angle=210)


def test_explore_without_noise_reports_undefined_quality():
    result = explore(noise_std=0.0, n=200)
    assert result.rho["linear"] is None and "zero variance" in result.notes["linear"]
    assert result.rho["random"] == pytest.approx(0.0, abs=1e-9)  # d = (a_s - a) y


def test_max_correlation_is_the_multiple_correlation():
    rng = np.random.default_rng(8)
    d = rng.normal(size=(300, 3))
    y = d @ [1.0, -2.0, 0.5] + rng.normal(size=300)
    fitted_values = d @ np.linalg.lstsq(np.column_stack([d, np.ones(300)]), y, rcond=None)[0][:3]
    assert max_correlation(d, y) == pytest.approx(abs(np.corrcoef(fitted_values, y)[0, 1]))
    assert max_correlation(d[:, 0], y) == pytest.approx(abs(np.corrcoef(d[:, 0], y)[0, 1]))
    with pytest.raises(ValueError, match="d has 300 rows .* y has length 299"):
        max_correlation(d, y[:-1])


# ---------------------------------------------------------------------------
# rho on the active regime
# ---------------------------------------------------------------------------
def _lstsq_rho(d, y):
    """1 - corr of the least-squares read-out of centred y from centred d."""
    d = d - d.mean(0)
    yc = y - y.mean()
    v, *_ = np.linalg.lstsq(d, yc, rcond=None)
    readout = d @ v
    return 1 - readout @ yc / np.sqrt((readout @ readout) * (yc @ yc))


def test_quality_on_the_active_regime_is_least_squares_on_the_active_samples():
    data = linear.make_two_sided_data(4000, linear.direction(0), linear.direction(60),
                                      linear.direction(135), seed=0)
    test = linear.make_two_sided_data(4000, linear.direction(0), linear.direction(60),
                                      linear.direction(135), seed=1)
    w = linear.fit_filter(data.x, data.y)
    active = test.x @ w > 0
    for name in ("filter", "linear", "two_component", "random"):
        est = linear.make_estimator(name, **({"seed": 0} if name == "random" else {})).fit(data.x, w)
        x = test.x[active]
        expected = _lstsq_rho(x - est.signal(x), x @ w)
        assert linear.quality(est, test.x, w, regime="active") == pytest.approx(expected, abs=1e-10)
        everything = _lstsq_rho(test.x - est.signal(test.x), test.x @ w)
        assert linear.quality(est, test.x, w) == pytest.approx(everything, abs=1e-10)
    # a signal that turns at y = 0: over all samples S_a looks as good as S_a+-,
    # on the active samples it is clearly worse
    lin = linear.LinearEstimator().fit(data.x, w)
    two = linear.TwoComponentEstimator(mean_y="global").fit(data.x, w)
    assert abs(linear.quality(lin, test.x, w) - linear.quality(two, test.x, w)) < 0.01
    assert linear.quality(two, test.x, w, regime="active") > \
        linear.quality(lin, test.x, w, regime="active") + 0.1


def test_quality_regime_errors():
    data = linear.make_data(200, [1, 0], [1, 1], seed=0)
    w = linear.fit_filter(data.x, data.y)
    est = linear.LinearEstimator().fit(data.x, w)
    with pytest.raises(ValueError, match="unknown regime 'positive'"):
        linear.quality(est, data.x, w, regime="positive")
    few = data.x[data.x @ w <= 0][:50]
    few = np.vstack([few, data.x[data.x @ w > 0][:2]])
    with pytest.raises(linear.UndefinedQualityError, match="only 2 of the samples"):
        linear.quality(est, few, w, regime="active")
    with pytest.raises(ValueError, match="one length D"):
        linear.make_two_sided_data(10, [1, 0], [1, 0, 0], [0, 1])
