"""Confidence intervals for the comparisons of the course: how sure is a ranking?

Every comparison of the toolkit is a mean over images (AOPC, the scores against a known
signal) or a statistic of the images as a whole (``rho(S)`` per layer). A difference of
0.01 between two methods measured on 200 images means nothing until its spread is known.
This module holds the one notion of an interval the comparisons share:

* :class:`Interval`: an estimate with its lower and upper bound and how they were found;
* :func:`mean_interval`: the mean of per-image values with a bootstrap interval over the
  images (:func:`scipy.stats.bootstrap`, percentile method, a fixed seed);
* :func:`difference_interval`: the same for the *paired* difference of two methods
  measured on the same images (the interval a ranking needs: two overlapping intervals
  can still be separated by their paired difference);
* :func:`compare`, :func:`ordering` and :func:`format_ordering`: a ranking that claims
  ``A > B`` only where the interval of the paired difference excludes 0, and says
  ``A ~ B`` ("indistinguishable here") otherwise.

``rho(S)`` is not a mean over images; :func:`toolkit.quality.layer_quality` with
``intervals=`` resamples blocks of images (``"bootstrap"``) or splits them in halves
(``"split_half"``) and returns the same :class:`Interval` objects.

Examples
--------
>>> import numpy as np
>>> a = np.array([0.30, 0.25, 0.28, 0.31, 0.27, 0.29])
>>> b = a - 0.05
>>> compare(a, b)
'>'
>>> compare(a, a + np.array([0.01, -0.01, 0.01, -0.01, 0.01, -0.01]))
'~'
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "CONFIDENCE",
    "RESAMPLES",
    "SEED",
    "Interval",
    "mean_interval",
    "difference_interval",
    "normal_interval",
    "compare",
    "ordering",
    "format_ordering",
    "RELATIONS",
]

#: The confidence level of every interval unless told otherwise.
CONFIDENCE = 0.95
#: Bootstrap resamples of a mean over images (cheap: the per-image values are resampled).
RESAMPLES = 2000
#: The seed of every bootstrap unless told otherwise: the same data give the same interval.
SEED = 0
#: What :func:`compare` returns, and what it means in words.
RELATIONS = {">": "larger", "<": "smaller", "~": "indistinguishable here"}


@dataclass(frozen=True)
class Interval:
    """An estimate with a confidence interval.

    Attributes
    ----------
    estimate : float
        The statistic on all the data (a mean over images, a layer's mean ``rho``, a
        difference of two of them).
    low, high : float
        The bounds of the interval.
    confidence : float
        Its nominal coverage, e.g. 0.95.
    method : str
        How it was found, in words (``"bootstrap over 200 images"``,
        ``"split-half over 10 splits of 500 images"``).
    """

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE
    method: str = ""

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval (for a difference: a ranking holds)."""
        return value < self.low or value > self.high

    @property
    def sign(self) -> str:
        """``">"`` if the interval lies above 0, ``"<"`` below, ``"~"`` if it holds 0."""
        return ">" if self.low > 0 else "<" if self.high < 0 else "~"

    def format(self, decimals: int = 3) -> str:
        """``"0.202 [0.180, 0.225]"``: the estimate and the bounds, rounded (no ``-0.000``)."""
        def number(v: float) -> str:
            return f"{np.round(v, decimals) + 0.0:.{decimals}f}"
        return f"{number(self.estimate)} [{number(self.low)}, {number(self.high)}]"

    def __str__(self) -> str:
        return self.format()


def _rng_keyword() -> str:
    """``rng`` (SciPy >= 1.15) or ``random_state`` (older SciPy) for the bootstrap's seed."""
    from scipy.stats import bootstrap

    return "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"


def _as_values(values, name: str = "values") -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name} is empty: an interval needs at least one image")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return v


def mean_interval(values, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
                  seed: int = SEED, what: str = "images") -> Interval:
    """The mean of per-image values with a bootstrap interval over the images.

    Parameters
    ----------
    values : array-like or Tensor, (N,)
        One value per image (an AOPC, a score).
    confidence : float
        Coverage of the interval.
    n_resamples : int
        Bootstrap resamples (:func:`scipy.stats.bootstrap`, percentile method).
    seed : int
        Seed of the resampling: the same values give the same interval.
    what : str
        What one value is, for :attr:`Interval.method`.

    Returns
    -------
    Interval
        A single image, or values that are all equal, give the zero-width interval.
    """
    from scipy.stats import bootstrap

    _check_confidence(confidence)
    v = _as_values(values)
    method = f"bootstrap over {v.size} {what}"
    if v.size == 1 or np.ptp(v) == 0:
        return Interval(float(v.mean()), float(v.mean()), float(v.mean()), confidence, method)
    result = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                       method="percentile", vectorized=True,
                       **{_rng_keyword(): np.random.default_rng(seed)})
    ci = result.confidence_interval
    return Interval(float(v.mean()), float(ci.low), float(ci.high), confidence, method)


def difference_interval(a, b, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES,
                        seed: int = SEED, what: str = "images") -> Interval:
    """``mean(a) - mean(b)`` with a bootstrap interval over *pairs*: ``a[i]`` and ``b[i]``
    were measured on the same image ``i``, and an image is resampled with both values.

    Raises
    ------
    ValueError
        If ``a`` and ``b`` hold different numbers of images.
    """
    va, vb = _as_values(a, "a"), _as_values(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"a paired difference needs the same images: got {va.size} and {vb.size} values")
    interval = mean_interval(va - vb, confidence, n_resamples, seed, what)
    return Interval(interval.estimate, interval.low, interval.high, confidence,
                    f"paired {interval.method}")


def normal_interval(estimate: float, standard_error: float, confidence: float = CONFIDENCE,
                    method: str = "") -> Interval:
    """``estimate +- z * standard_error`` with ``z`` the normal quantile of ``confidence``
    (the split-half intervals of :mod:`toolkit.quality`)."""
    from scipy.stats import norm

    half = float(norm.ppf(0.5 + confidence / 2)) * float(standard_error)
    return Interval(float(estimate), float(estimate) - half, float(estimate) + half, confidence, method)


def compare(a, b, confidence: float = CONFIDENCE, n_resamples: int = RESAMPLES, seed: int = SEED) -> str:
    """``">"`` if ``a`` is larger than ``b`` with the paired interval of the difference
    above 0, ``"<"`` if below, ``"~"`` (indistinguishable here) if it holds 0."""
    return difference_interval(a, b, confidence, n_resamples, seed).sign


def ordering(per_image: Mapping[str, object], confidence: float = CONFIDENCE,
             n_resamples: int = RESAMPLES, seed: int = SEED) -> list[tuple[str, str]]:
    """Rank methods by their mean, claiming only what the intervals separate.

    Parameters
    ----------
    per_image : mapping name -> (N,) values
        Every method measured on the same ``N`` images, larger is better.

    Returns
    -------
    list of (name, relation)
        Best mean first. ``relation`` compares the method with the *next* one: ``">"``
        where the paired interval of their difference lies above 0, ``"~"`` where it
        holds 0 (indistinguishable here); ``""`` for the last.
    """
    if not per_image:
        raise ValueError("give at least one method")
    values = {name: _as_values(v, name) for name, v in per_image.items()}
    names = sorted(values, key=lambda n: -values[n].mean())
    relations = [compare(values[a], values[b], confidence, n_resamples, seed)
                 for a, b in zip(names, names[1:])]
    return [(name, relation.replace("<", "~")) for name, relation in zip(names, relations + [""])]


def format_ordering(ranked: Sequence[tuple[str, str]], titles: Mapping[str, str] | None = None) -> str:
    """``"A > B ~ C > D"`` from :func:`ordering` (``~``: indistinguishable here)."""
    titles = dict(titles or {})
    text = ""
    for name, relation in ranked:
        text += titles.get(name, name) + (f" {relation} " if relation else "")
    return text


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1 or math.isnan(confidence):
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    return confidence
