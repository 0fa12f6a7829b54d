"""The linear signal/distractor model of PatternNet, in NumPy.

An input ``x`` in ``D >= 2`` dimensions is a signal ``a_s y`` plus a distractor
``a_d eps``; the filter ``w`` that recovers ``y = w^T x`` is orthogonal to the
distractor, so it shows how the model removes the distractor, not where the signal is.
This module makes such data (:func:`make_data`), fits the filter (:func:`fit_filter`),
implements the signal estimators

=====================  ======  ==================================================
class                  name    estimated signal
=====================  ======  ==================================================
IdentityEstimator      S_x     ``x``
FilterEstimator        S_w     ``w (w^T x) / (w^T w)``
LinearEstimator        S_a     ``a (w^T x)``, ``a = cov[x, y] / (w^T cov[x, y])``
TwoComponentEstimator  S_a+-   ``a_+ (w^T x)`` if ``w^T x > 0`` else ``a_- (w^T x)``
RandomEstimator        S_rand  ``a (w^T x)``, ``a`` a random direction, ``w^T a = 1``
=====================  ======  ==================================================

and their quality ``rho(S)`` (:func:`quality`). Everything is vectorised over samples:
``x`` is always an ``(n, D)`` array with one sample per row. The model, the closed forms
and rho(S) are in docs/math.md, sections 1, 2 and 4.

Examples
--------
>>> import numpy as np
>>> from toolkit.linear import make_data, fit_filter, LinearEstimator, quality
>>> data = make_data(1000, a_s=[1, 0], a_d=[1, 1], seed=0)
>>> w = fit_filter(data.x, data.y)
>>> np.round(w, 6)
array([ 1., -1.])
>>> est = LinearEstimator().fit(data.x, w)
>>> bool(np.allclose(est.pattern_, [1, 0], atol=0.1))
True
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "ToyData",
    "make_data",
    "make_two_sided_data",
    "fit_filter",
    "direction",
    "SignalEstimator",
    "IdentityEstimator",
    "FilterEstimator",
    "LinearEstimator",
    "TwoComponentEstimator",
    "MEAN_Y_CONVENTIONS",
    "DEFAULT_MEAN_Y",
    "RandomEstimator",
    "ESTIMATORS",
    "make_estimator",
    "quality",
    "REGIMES",
    "max_correlation",
    "Exploration",
    "explore",
    "NotFittedError",
    "UndefinedQualityError",
]

#: The two conventions for the mean of ``y`` in the two-component estimator's ``a_+`` and
#: ``a_-``: over the component's own samples (``E_+[y]``) or over all samples (``E[y]``).
MEAN_Y_CONVENTIONS = ("masked", "global")
#: The convention used unless told otherwise, here and in :func:`toolkit.fit_patterns`:
#: ``E_+[y]``, which keeps the estimator unchanged under a constant input shift
#: (docs/math.md, section 3.3). ``"global"`` is the paper's formula and the authors' code.
DEFAULT_MEAN_Y = "masked"

# A direction whose squared sine with another is below this is called parallel.
_PARALLEL_TOL = 1e-12
# lstsq must reproduce y to this relative accuracy when x is rank-deficient.
_RECOVERY_RTOL = 1e-6
# Variances below this fraction of the data's variance count as exactly zero
# (a standard deviation ratio of 1e-10: far above round-off, far below any real signal).
_ZERO_VARIANCE_RTOL = 1e-20
# Eigenvalues of cov(d) below this fraction of the largest are treated as zero.
_EIGENVALUE_RTOL = 1e-12


class NotFittedError(RuntimeError):
    """An estimator was asked for a signal before :meth:`SignalEstimator.fit` was called."""


class UndefinedQualityError(ValueError):
    """``rho(S)`` has no value for this estimator on this data.

    ``rho(S) = 1 - max_v corr(v^T d, y)`` needs a distractor ``d = x - S(x)`` and an
    output ``y = w^T x`` that both vary: a correlation with a constant is ``0 / 0``.

    * The identity estimator ``S_x(x) = x`` leaves ``d = 0`` by construction, so its
      quality is *always* undefined -- the measure cannot judge an estimator that
      claims there is no distractor at all.
    * Any other estimator can leave a distractor that is constant across samples, e.g.
      the linear estimator on noise-free data (``sigma = 0``): the distractor really is
      gone (or a constant offset). A constant carries no information about ``y``, but
      rather than silently choosing a value (1? NaN?) :func:`quality` raises this error
      for that case too, with a message that says which variance vanished.
    * If ``y`` itself is constant there is nothing to explain; this error is raised too.

    It subclasses :class:`ValueError`, so ``except ValueError`` also catches it.
    """


# ---------------------------------------------------------------------------
# Input validation: every public function checks its inputs at the door.
# ---------------------------------------------------------------------------

def _check_finite(values, name):
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s); all entries must be finite")


def _as_samples(x, name="x"):
    """Return ``x`` as a finite float array of shape ``(n, D)`` with ``D >= 2``."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n, D), one sample per row; got shape {x.shape}"
        )
    if x.shape[1] < 2:
        raise ValueError(
            f"{name} has D={x.shape[1]} column(s), but the signal/distractor model needs "
            "D >= 2: with one dimension signal and distractor cannot be separated"
        )
    _check_finite(x, name)
    return x


def _as_vector(v, name, dim=None):
    """Return ``v`` as a finite 1-D float array (of length ``dim`` if given)."""
    v = np.asarray(v, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector; got shape {v.shape}")
    if dim is not None and v.size != dim:
        raise ValueError(f"{name} has length {v.size}, but x has D={dim} columns; they must match")
    _check_finite(v, name)
    return v


def _as_outputs(y, n, rows_of="x"):
    y = np.asarray(y, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of n outputs; got shape {y.shape}")
    if y.size != n:
        raise ValueError(
            f"{rows_of} has {n} rows (samples) but y has length {y.size}; they must match"
        )
    _check_finite(y, "y")
    return y


def _as_filter(w, dim):
    w = _as_vector(w, "w", dim)
    if not np.any(w):
        raise ValueError("w is the zero vector; a filter must be non-zero")
    return w


def _check_enough_samples(n, dim):
    if n < dim + 1:
        raise ValueError(
            f"too few samples: n={n} with D={dim}; need n >= D + 1 = {dim + 1} samples to "
            "estimate a filter and the covariances"
        )


def _as_count(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"n must be an integer number of samples; got {n!r}")
    if n < 1:
        raise ValueError(f"n must be a positive number of samples; got n={n}")
    return int(n)


def _check_not_parallel(a_s, a_d):
    """Refuse models in which no filter can separate the signal from the distractor."""
    norm_s, norm_d = a_s @ a_s, a_d @ a_d
    if norm_s == 0:
        raise ValueError("a_s is the zero vector: the model has no signal to recover")
    if norm_d == 0:
        return  # no distractor at all: any w with w^T a_s = 1 works
    sine_squared = 1.0 - (a_s @ a_d) ** 2 / (norm_s * norm_d)
    if sine_squared <= _PARALLEL_TOL:
        raise ValueError(
            "a_s is parallel to a_d: signal and distractor share one direction, so no "
            "filter w can satisfy w^T a_s = 1 and w^T a_d = 0 (no filter exists)"
        )


# ---------------------------------------------------------------------------
# The model and its filter
# ---------------------------------------------------------------------------

class ToyData(NamedTuple):
    """Samples of the linear model ``x = s + d``.

    Attributes
    ----------
    x : ndarray, shape (n, D)
        The inputs, ``x = s + d``.
    y : ndarray, shape (n,)
        The signal amplitude, the quantity a model should recover.
    s : ndarray, shape (n, D)
        The signal ``a_s * y``.
    d : ndarray, shape (n, D)
        The distractor ``a_d * eps``.
    """

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    d: np.ndarray


def make_data(n, a_s, a_d, noise_mean=0.0, noise_std=1.0, seed=None):
    """Draw ``n`` samples of the linear signal/distractor model.

    ``x = a_s * y + a_d * eps`` with ``y ~ U[-1, 1]`` and ``eps ~ N(noise_mean,
    noise_std^2)`` drawn independently, so the distractor carries no information about
    ``y``.

    Parameters
    ----------
    n : int
        Number of samples.
    a_s, a_d : array_like, shape (D,)
        Signal and distractor directions, ``D >= 2``. They must not be parallel,
        otherwise no linear filter can separate them. ``a_d`` may be zero (no
        distractor).
    noise_mean, noise_std : float
        Mean ``nu`` and standard deviation ``sigma >= 0`` of the distractor amplitude.
    seed : None, int or numpy.random.Generator
        Seed for :func:`numpy.random.default_rng`; a ``Generator`` is used as is (and
        advanced).

    Returns
    -------
    ToyData
        Named tuple ``(x, y, s, d)``.

    Raises
    ------
    ValueError
        If the directions have different lengths, ``D < 2``, they are parallel, or a
        parameter is not finite / out of range.
    """
    a_s = _as_vector(a_s, "a_s")
    a_d = _as_vector(a_d, "a_d")
    if a_s.size != a_d.size:
        raise ValueError(
            f"a_s has length {a_s.size} but a_d has length {a_d.size}; both must have length D"
        )
    if a_s.size < 2:
        raise ValueError(f"the model needs D >= 2 dimensions; a_s and a_d have D={a_s.size}")
    _check_not_parallel(a_s, a_d)
    n = _as_count(n)
    _check_finite(np.array([noise_mean, noise_std], dtype=float), "noise_mean/noise_std")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std}")

    rng = np.random.default_rng(seed)
    y = rng.uniform(-1.0, 1.0, size=n)
    eps = rng.normal(noise_mean, noise_std, size=n)
    s = np.outer(y, a_s)
    d = np.outer(eps, a_d)
    return ToyData(x=s + d, y=y, s=s, d=d)


def make_two_sided_data(n, a_pos, a_neg, a_d, noise_mean=0.0, noise_std=1.0, seed=None):
    """Samples of a toy whose signal is *nonlinear* in ``y``: it turns at ``y = 0``.

    ``x = a_+ y + a_d eps`` for ``y > 0`` and ``x = a_- y + a_d eps`` otherwise, with
    ``y ~ U[-1, 1]`` and ``eps ~ N(nu, sigma^2)`` as in :func:`make_data`. No single
    pattern describes both halves; the two-component estimator, one pattern per side of
    ``w^T x = 0``, can. The filter learned by least squares recovers ``y`` only
    approximately.

    Returns
    -------
    ToyData
    """
    a_pos, a_neg, a_d = (_as_vector(v, name) for v, name in
                         ((a_pos, "a_pos"), (a_neg, "a_neg"), (a_d, "a_d")))
    if not a_pos.size == a_neg.size == a_d.size:
        raise ValueError(f"a_pos, a_neg and a_d must have one length D; got {a_pos.size}, "
                         f"{a_neg.size}, {a_d.size}")
    n = _as_count(n)
    rng = np.random.default_rng(seed)
    y = rng.uniform(-1.0, 1.0, size=n)
    eps = rng.normal(noise_mean, noise_std, size=n)
    s = np.where((y > 0)[:, None], np.outer(y, a_pos), np.outer(y, a_neg))
    d = np.outer(eps, a_d)
    return ToyData(x=s + d, y=y, s=s, d=d)


def direction(angle):
    """Unit vector in the plane at ``angle`` degrees from the first axis.

    >>> direction(90).round(12)
    array([0., 1.])
    """
    theta = np.deg2rad(float(angle))
    return np.array([np.cos(theta), np.sin(theta)])


def fit_filter(x, y):
    """Learn the filter ``w`` with ``y ~= w^T x`` by least squares (no intercept).

    In the toy model ``w^T x = (w^T a_s) y + (w^T a_d) eps`` recovers ``y`` exactly
    when ``w^T a_s = 1`` and ``w^T a_d = 0``, so least squares finds that ``w`` with
    zero residual, whatever the noise. When ``x`` spans fewer than ``D`` dimensions
    (e.g. ``D > 2`` with one signal and one distractor direction) the minimum-norm
    solution is returned; it still satisfies both conditions.

    Parameters
    ----------
    x : array_like, shape (n, D)
        Inputs, ``n >= D + 1``.
    y : array_like, shape (n,)
        Targets.

    Returns
    -------
    w : ndarray, shape (D,)

    Raises
    ------
    ValueError
        On shape mismatches, NaN/Inf, too few samples, or when ``x`` is rank-deficient
        and ``y`` is not a linear function of it -- the signature of a signal direction
        parallel to the distractor, where no filter exists.
    """
    x = _as_samples(x)
    n, dim = x.shape
    y = _as_outputs(y, n)
    _check_enough_samples(n, dim)
    w, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    if rank < dim:
        misfit = np.linalg.norm(y - x @ w)
        if misfit > _RECOVERY_RTOL * max(np.linalg.norm(y), np.finfo(float).tiny):
            raise ValueError(
                f"no filter recovers y: x has rank {rank} < D={dim} and y is not a linear "
                "function of x (relative residual "
                f"{misfit / np.linalg.norm(y):.3g}); is the signal direction a_s parallel "
                "to the distractor a_d?"
            )
    return w


# ---------------------------------------------------------------------------
# Signal estimators
# ---------------------------------------------------------------------------

def _normalise_pattern(direction_, w):
    """Scale ``direction_`` so that ``w^T a = 1``.

    When ``w^T direction_`` is (numerically) zero the direction is returned unscaled:
    the authors' code falls back to the raw covariance instead of dividing by zero.
    """
    denominator = w @ direction_
    if abs(denominator) <= 1e-12 * np.linalg.norm(w) * np.linalg.norm(direction_):
        return direction_.copy()
    return direction_ / denominator


class SignalEstimator:
    """Base class of the signal estimators ``S``, scikit-learn style.

    ``fit(x, w)`` learns whatever the estimator needs from inputs ``x`` and the
    filter ``w`` (the output is ``y = w^T x``) and returns the estimator. Then

    * :meth:`signal` gives ``S(x)``,
    * :meth:`distractor` gives ``x - S(x)``,
    * :meth:`attribution` gives ``w * S(x)`` (elementwise), how much of ``y`` each
      input dimension contributes.

    Fitted attributes end in an underscore: ``w_`` and the pattern(s) of the
    estimator; :attr:`patterns_` collects the patterns in a dictionary.

    Subclasses implement ``_fit(x, w, y)`` and ``_signal(x, y)``.
    """

    name = "base"
    symbol = "S"

    def fit(self, x, w):
        """Learn the estimator from inputs ``x`` (shape ``(n, D)``) and filter ``w``.

        Returns
        -------
        self
        """
        x = _as_samples(x)
        n, dim = x.shape
        w = _as_filter(w, dim)
        _check_enough_samples(n, dim)
        self._fit(x, w, x @ w)
        self.w_ = w
        return self

    def signal(self, x):
        """Estimated signal ``S(x)``, shape ``(n, D)``."""
        w = self._fitted_filter()
        x = _as_samples(x)
        if x.shape[1] != w.size:
            raise ValueError(
                f"x has D={x.shape[1]} columns but the estimator was fitted with D={w.size}"
            )
        return self._signal(x, x @ w)

    def distractor(self, x):
        """Estimated distractor ``x - S(x)``, shape ``(n, D)``."""
        return np.asarray(x, dtype=float) - self.signal(x)

    def attribution(self, x):
        """Attribution ``r = w * S(x)`` (elementwise), shape ``(n, D)``.

        Summed over dimensions it returns the output: for the estimators of the form
        ``S(x) = a y`` with ``w^T a = 1``, ``sum_i r_i = w^T a y = y``.
        """
        return self._fitted_filter() * self.signal(x)

    @property
    def patterns_(self):
        """The fitted pattern(s) by label (``"a"`` or ``"a+"``/``"a-"``); empty for S_x."""
        self._fitted_filter()
        return {}

    def _fitted_filter(self):
        try:
            return self.w_
        except AttributeError:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(x, w) before "
                "asking for signal, distractor or attribution"
            ) from None

    def _fit(self, x, w, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _signal(self, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class IdentityEstimator(SignalEstimator):
    """``S_x(x) = x``: the whole input is taken to be signal.

    Its attribution ``w * x`` is what the gradient times the input gives; it mixes the
    signal contribution ``w * s`` with the distractor contribution ``w * d``, which in
    the toy is as large as the signal's. The distractor estimate is ``0``, so
    :func:`quality` is undefined for it (:class:`UndefinedQualityError`).
    """

    name = "identity"
    symbol = "S_x"

    def _fit(self, x, w, y):
        pass

    def _signal(self, x, y):
        return x.copy()


class _PatternEstimator(SignalEstimator):
    """Estimators of the form ``S(x) = a (w^T x)`` with one pattern ``a``."""

    def _fit(self, x, w, y):
        self.pattern_ = self._fit_pattern(x, w, y)

    def _signal(self, x, y):
        return y[:, None] * self.pattern_

    @property
    def patterns_(self):
        self._fitted_filter()
        return {"a": self.pattern_}


class FilterEstimator(_PatternEstimator):
    """``S_w(x) = w (w^T x) / (w^T w)``: the signal is assumed to lie along the filter.

    This is the estimator DeconvNet and Guided Backprop imply. In the toy it is wrong
    whenever ``w`` is not parallel to ``a_s``, i.e. whenever the distractor is not
    orthogonal to the signal: the pattern ``w / (w^T w)`` follows the distractor.
    """

    name = "filter"
    symbol = "S_w"

    def _fit_pattern(self, x, w, y):
        return w / (w @ w)


class LinearEstimator(_PatternEstimator):
    """``S_a(x) = a (w^T x)`` with ``a = cov[x, y] / (w^T cov[x, y])``.

    Derivation: a good estimator leaves a distractor uncorrelated with the output,
    ``cov[x - S(x), y] = 0``. With ``S(x) = a y`` this reads ``cov[x, y] = a var(y)``,
    and since ``y = w^T x``, ``w^T cov[x, y] = var(y)``. In the toy
    ``cov[x, y] = a_s var(y)`` because the distractor is independent of ``y``, so the
    learned pattern is the signal direction ``a_s`` whatever ``a_d`` is.
    """

    name = "linear"
    symbol = "S_a"

    def _fit_pattern(self, x, w, y):
        cov_xy = (x * y[:, None]).mean(axis=0) - x.mean(axis=0) * y.mean()
        return _normalise_pattern(cov_xy, w)


class TwoComponentEstimator(SignalEstimator):
    """``S_a+-``: one pattern for active outputs (``w^T x > 0``), one for the rest.

    A ReLU network only passes on the part of the input with ``w^T x > 0``, so each
    half gets its own pattern::

        S(x) = a_+ (w^T x)  if w^T x > 0,   a_- (w^T x)  otherwise,
        a_+ = (E_+[x y] - E_+[x] m) / (w^T (E_+[x y] - E_+[x] m)),

    where ``E_+`` averages over the active samples (``a_-`` likewise over the others).

    Parameters
    ----------
    mean_y : {"masked", "global"}
        What ``m`` is. ``"masked"`` (default, :data:`DEFAULT_MEAN_Y`) uses ``m = E_+[y]``
        (resp. ``E_-[y]``), as written in the seminar, which makes each half's numerator
        the covariance ``cov_+[x, y]``: it recovers ``a_s`` exactly in the toy even when
        the noise has a non-zero mean, and it is unchanged when a constant is added to
        the input (docs/math.md, section 3.3). ``"global"`` uses ``m = E[y]`` over *all*
        samples, as the paper's formula and the authors' code do; the two halves then
        together satisfy ``cov[x - S(x), y] = 0`` exactly on the fitting data, but a
        constant shift ``c`` of the input moves the numerator by ``c (E_+[y] - E[y])``.

    Notes
    -----
    A side without samples gets the zero pattern; a side whose denominator vanishes
    keeps its raw (unnormalised) covariance, as in the authors' code. Neither gives NaN.
    """

    name = "two_component"
    symbol = "S_a+-"

    def __init__(self, mean_y=None):
        mean_y = DEFAULT_MEAN_Y if mean_y is None else mean_y
        if mean_y not in MEAN_Y_CONVENTIONS:
            raise ValueError(f'mean_y must be "masked" or "global"; got {mean_y!r}')
        self.mean_y = mean_y

    def _fit(self, x, w, y):
        active = y > 0
        self.pattern_positive_ = self._side_pattern(x, y, w, active)
        self.pattern_negative_ = self._side_pattern(x, y, w, ~active)

    def _side_pattern(self, x, y, w, side):
        if not np.any(side):
            return np.zeros(x.shape[1])
        x_side, y_side = x[side], y[side]
        mean_xy = (x_side * y_side[:, None]).mean(axis=0)
        mean_y = y_side.mean() if self.mean_y == "masked" else y.mean()
        return _normalise_pattern(mean_xy - x_side.mean(axis=0) * mean_y, w)

    def _signal(self, x, y):
        pattern = np.where((y > 0)[:, None], self.pattern_positive_, self.pattern_negative_)
        return y[:, None] * pattern

    @property
    def patterns_(self):
        self._fitted_filter()
        return {"a+": self.pattern_positive_, "a-": self.pattern_negative_}

    def __repr__(self):
        return f"{type(self).__name__}(mean_y={self.mean_y!r})"


class RandomEstimator(_PatternEstimator):
    """``S(x) = a (w^T x)`` with ``a`` a random direction scaled so that ``w^T a = 1``.

    The baseline of the paper's layer-quality figure: any estimator worth its name
    should beat it.

    Parameters
    ----------
    seed : None, int or numpy.random.Generator
        Seed of the direction; with an int, every ``fit`` draws the same direction.
    """

    name = "random"
    symbol = "S_rand"

    def __init__(self, seed=None):
        self.seed = seed

    def _fit_pattern(self, x, w, y):
        rng = np.random.default_rng(self.seed)
        while True:  # redraw the (probability zero) directions orthogonal to w
            candidate = rng.standard_normal(w.size)
            if abs(w @ candidate) > 1e-6 * np.linalg.norm(w) * np.linalg.norm(candidate):
                return candidate / (w @ candidate)

    def __repr__(self):
        return f"{type(self).__name__}(seed={self.seed!r})"


ESTIMATORS = {
    cls.name: cls
    for cls in (IdentityEstimator, FilterEstimator, LinearEstimator, TwoComponentEstimator,
                RandomEstimator)
}
"""Estimator classes by name: identity, filter, linear, two_component, random."""


def make_estimator(name, **kwargs):
    """Construct the estimator called ``name`` (a key of :data:`ESTIMATORS`)."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}"
        ) from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------
# Quality rho(S)
# ---------------------------------------------------------------------------

def _total_variance(samples):
    """``trace(cov(samples))``, the summed variance of all dimensions."""
    centred = samples - samples.mean(axis=0)
    return np.einsum("ij,ij->", centred, centred) / len(samples)


def max_correlation(d, y, variance_scale=None):
    """``max_v corr(v^T d, y)``: the multiple correlation of ``y`` with ``d``.

    The best read-out ``v`` is the least-squares regression of ``y`` on ``d``; its
    correlation with ``y`` has the closed form ``sqrt(c^T pinv(Sigma_d) c / var(y))``
    with ``c = cov(d, y)`` and ``Sigma_d = cov(d)``. Directions in which ``d`` does not
    vary cannot correlate with anything and drop out through the pseudo-inverse
    (eigenvalues below ``1e-12`` of the largest count as zero).

    Parameters
    ----------
    d : array_like, shape (n, D) or (n,)
    y : array_like, shape (n,)
    variance_scale : float, optional
        Total variance that counts as "large" for ``d`` (default: that of ``d`` itself);
        a total variance of ``d`` below ``1e-20`` times it counts as zero.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    UndefinedQualityError
        If ``y`` or ``d`` has zero variance, where the correlation is ``0 / 0``.
    ValueError
        On shape mismatches or NaN/Inf.
    """
    d = np.asarray(d, dtype=float)
    d = d[:, None] if d.ndim == 1 else d
    if d.ndim != 2:
        raise ValueError(f"d must be a 2-D array of shape (n, D); got shape {d.shape}")
    _check_finite(d, "d")
    y = _as_outputs(y, len(d), rows_of="d")
    y_centred = y - y.mean()
    d_centred = d - d.mean(axis=0)
    n = y.size
    var_y = y_centred @ y_centred / n
    sigma_d = d_centred.T @ d_centred / n
    c = d_centred.T @ y_centred / n
    scale = np.trace(sigma_d) if variance_scale is None else variance_scale
    if var_y <= _ZERO_VARIANCE_RTOL * np.mean(y * y):
        raise UndefinedQualityError(
            "y = w^T x has zero variance on these samples, so no correlation with y is defined"
        )
    if np.trace(sigma_d) <= _ZERO_VARIANCE_RTOL * scale:
        raise UndefinedQualityError(
            "the distractor d = x - S(x) has zero variance (it is exactly 0 for the identity "
            "estimator S_x, constant when the estimator removed all noise), so corr(v^T d, y) "
            "is 0/0 for every v and rho(S) is undefined"
        )
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_d)
    keep = eigenvalues > _EIGENVALUE_RTOL * eigenvalues[-1]
    c_whitened = (eigenvectors[:, keep].T @ c) / np.sqrt(eigenvalues[keep])
    r_squared = c_whitened @ c_whitened / var_y
    return float(np.sqrt(np.clip(r_squared, 0.0, 1.0)))


#: Over which samples :func:`quality` measures: all, or those with ``w^T x > 0``.
REGIMES = ("all", "active")


def quality(estimator, x, w, regime="all"):
    """Signal-estimator quality ``rho(S) = 1 - max_v corr(v^T d, y)``.

    With ``d = x - S(x)`` and ``y = w^T x``: if any linear read-out of the estimated
    distractor still correlates with the output, the estimator left part of the signal
    in the distractor. ``rho = 1`` means no linear information about ``y`` is left;
    lower is worse. The maximum over ``v`` is computed in closed form
    (:func:`max_correlation`), not by gradient descent. The paper evaluates it on data
    not used for fitting the estimator.

    Parameters
    ----------
    estimator : SignalEstimator
        A fitted estimator.
    x : array_like, shape (n, D)
        Inputs, ``n >= D + 1``.
    w : array_like, shape (D,)
        The filter the estimator was fitted with.
    regime : {"all", "active"}
        ``"all"`` (default): over all samples of ``x``. ``"active"``: only over the
        samples with ``y = w^T x > 0``, the ones a ReLU after the neuron passes on and
        the ones the two-component estimator's ``a_+`` is fitted for (the toy has no
        bias, so active means ``y > 0``).

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    UndefinedQualityError
        For the identity estimator (its distractor is 0), and whenever the distractor or
        the output has zero variance on the samples measured.
    NotFittedError
        If the estimator is not fitted.
    ValueError
        On shape mismatches, NaN/Inf, too few samples, or a ``w`` other than the one the
        estimator was fitted with.
    """
    fitted_w = estimator._fitted_filter()
    x = _as_samples(x)
    n, dim = x.shape
    w = _as_filter(w, dim)
    _check_enough_samples(n, dim)
    if w.shape != fitted_w.shape or not np.allclose(w, fitted_w, rtol=1e-10, atol=0):
        raise ValueError("w differs from the filter the estimator was fitted with")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    if regime == "active":
        x = x[x @ w > 0]
        if len(x) < dim + 1:
            raise UndefinedQualityError(
                f"only {len(x)} of the samples have w^T x > 0; the active regime needs at "
                f"least D + 1 = {dim + 1}")
    y = x @ w
    x_variance = _total_variance(x)
    if np.var(y) <= _ZERO_VARIANCE_RTOL * (w @ w) * x_variance:
        raise UndefinedQualityError(
            "y = w^T x has zero variance on these samples, so no correlation with y is defined"
        )
    signal = estimator.signal(x)
    # round-off in d = x - S(x) scales with both terms
    scale = x_variance + _total_variance(signal)
    return 1.0 - max_correlation(x - signal, y, variance_scale=scale)


# ---------------------------------------------------------------------------
# The explorer's computation: one pure function from slider values to numbers
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Exploration:
    """Everything the toy explorer shows for one setting of its controls.

    Attributes
    ----------
    a_s, a_d : ndarray, shape (2,)
        Signal and distractor directions (unit vectors).
    data : ToyData
        The samples the filter and the estimators were fitted on.
    held_out : ToyData
        Fresh samples of the same model on which ``rho`` is measured.
    w : ndarray, shape (2,)
        The least-squares filter.
    estimators : dict[str, SignalEstimator]
        Every fitted estimator by name (see :data:`ESTIMATORS`).
    patterns : dict[str, dict[str, ndarray]]
        Each estimator's pattern(s) (``{}`` for the identity).
    rho : dict[str, float or None]
        ``rho(S)`` per estimator; ``None`` where it is undefined.
    notes : dict[str, str]
        Why ``rho`` is ``None``, for the estimators where it is.
    selected : str
        The estimator the explorer highlights.
    """

    a_s: np.ndarray
    a_d: np.ndarray
    data: ToyData
    held_out: ToyData
    w: np.ndarray
    estimators: dict
    patterns: dict
    rho: dict
    notes: dict
    selected: str


def explore(signal_angle=0.0, distractor_angle=45.0, noise_mean=0.0, noise_std=1.0, n=1000,
            estimator="two_component", seed=0, mean_y=None, n_held_out=5000):
    """Fit the toy model for one setting of the explorer's controls.

    Draws ``n`` training samples of the 2-D model with unit directions at the given
    angles, learns ``w``, fits every estimator on them and measures ``rho`` on
    ``n_held_out`` fresh samples.

    On the fitting samples the linear and two-component estimators reach ``rho = 1``
    by construction (their patterns are defined by ``cov[x - S(x), y] = 0``), so the
    paper measures on other data. There even the true pattern ``a_s`` scores only
    about ``1 - 0.8 / sqrt(n_held_out)``: the sample correlation of the independent
    noise with ``y`` is not exactly zero. A large held-out set keeps that floor small.

    Parameters
    ----------
    signal_angle, distractor_angle : float
        Directions of ``a_s`` and ``a_d`` in degrees; they must not be parallel.
    noise_mean, noise_std : float
        Mean and standard deviation of the distractor amplitude.
    n : int
        Number of training samples, ``n >= 3``.
    estimator : str
        Name of the estimator to highlight (a key of :data:`ESTIMATORS`).
    seed : int or numpy.random.Generator
        Seed of the samples and of the random estimator.
    mean_y : {"masked", "global"}, optional
        Convention of the two-component estimator (see :class:`TwoComponentEstimator`);
        default :data:`DEFAULT_MEAN_Y`.
    n_held_out : int
        Number of held-out samples on which ``rho`` is measured (the default keeps the
        finite-sample floor near 0.01 and an explorer update fast).

    Returns
    -------
    Exploration
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    rng = np.random.default_rng(seed)
    a_s, a_d = direction(signal_angle), direction(distractor_angle)
    data = make_data(n, a_s, a_d, noise_mean, noise_std, seed=rng)
    held_out = make_data(n_held_out, a_s, a_d, noise_mean, noise_std, seed=rng)
    w = fit_filter(data.x, data.y)

    options = {"two_component": {"mean_y": DEFAULT_MEAN_Y if mean_y is None else mean_y}, "random": {"seed": rng}}
    estimators = {name: make_estimator(name, **options.get(name, {})).fit(data.x, w)
                  for name in ESTIMATORS}
    rho, notes = {}, {}
    for name, fitted in estimators.items():
        try:
            rho[name] = quality(fitted, held_out.x, w)
        except UndefinedQualityError as error:
            rho[name], notes[name] = None, str(error)
    return Exploration(
        a_s=a_s, a_d=a_d, data=data, held_out=held_out, w=w, estimators=estimators,
        patterns={name: fitted.patterns_ for name, fitted in estimators.items()},
        rho=rho, notes=notes, selected=estimator,
    )
