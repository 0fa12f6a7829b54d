"""Intervals for the comparisons of the toolkit: orderings claimed only where they hold.

Every comparison of the toolkit is a mean over images (AOPC, the scores against a known
signal, an accuracy) or a statistic of the images as a whole (``rho(S)`` per layer). Two
methods whose means differ by 0.01 on a few hundred images may or may not differ; this
module holds the one notion of an interval the comparisons share, and claims an ordering
only where the interval of the *difference* excludes zero:

* :class:`Interval` -- an estimate with its bounds, its confidence and how it was found;
* :func:`bootstrap_mean` -- the mean of per-image values with its percentile bootstrap
  interval (:func:`toolkit.similarity.mean_interval`: images drawn with replacement, a
  seeded generator);
* :func:`bootstrap_difference` -- the same for ``a - b`` on the same images (a paired
  bootstrap: each resample draws images, and both methods are read on them; two
  overlapping intervals can still be separated by their paired difference);
* :func:`normal_interval` -- ``estimate +- z * standard error`` (the split-half intervals
  of ``rho``, :func:`toolkit.quality.layer_quality` with ``intervals=``);
* :func:`ordering` -- ``"A > B"``, ``"A < B"`` or ``"A ~ B"`` (indistinguishable here)
  for two methods; :func:`ranking` and :func:`format_ranking` -- several methods ranked
  by their means, ``>`` only between neighbours the intervals separate;
* :func:`verdict` -- whether a claim such as "S_a+- above every other estimator" holds,
  fails, or is undecided on these images.

Per-image values from torch (``PerturbationResult.per_image_aopc``) are converted; NaN or
Inf values are refused, not dropped.

Examples
--------
>>> import numpy as np
>>> a = np.array([0.30, 0.25, 0.28, 0.31, 0.27, 0.29])
>>> ordering(a, a - 0.05)
'A > B'
>>> ordering(a, a + np.array([0.01, -0.01, 0.01, -0.01, 0.01, -0.01]))
'A ~ B'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["CONFIDENCE", "RESAMPLES", "SEED", "RELATIONS", "VERDICTS", "Interval", "bootstrap_mean",
           "bootstrap_difference", "normal_interval", "ordering", "ranking", "format_ranking", "verdict"]

#: The confidence level of every interval unless told otherwise.
CONFIDENCE = 0.95
#: Resamples per interval: enough for the 2.5 % and 97.5 % percentiles to be stable to
#: about a hundredth of the interval's width.
RESAMPLES = 4000
#: The seed of every bootstrap unless told otherwise: the same data give the same interval.
SEED = 0
#: What :attr:`Interval.sign` says, in words.
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
        """Whether ``value`` lies outside the interval (for a difference: an ordering holds)."""
        return value < self.low or value > self.high

    @property
    def sign(self) -> str:
        """``">"`` if the interval lies above 0, ``"<"`` below, ``"~"`` if it holds 0."""
        return ">" if self.low > 0 else "<" if self.high < 0 else "~"

    def format(self, decimals: int = 3) -> str:
        """``"0.123 [0.101, 0.144]"``, rounded (a negative zero printed as 0)."""
        def number(v):
            return f"{np.round(v, decimals) + 0.0:.{decimals}f}"
        return f"{number(self.estimate)} [{number(self.low)}, {number(self.high)}]"

    def __str__(self) -> str:
        return self.format()


def _per_image(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"{name} must be one value per image, at least two; got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return v


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")


def bootstrap_mean(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED,
                   what: str = "images") -> Interval:
    """The mean of per-image ``values`` with a percentile bootstrap interval.

    Parameters
    ----------
    values : array or tensor, (n,)
        One value per image (n >= 2).
    confidence : float
        In (0, 1).
    resamples : int
        Bootstrap resamples, each ``n`` images drawn with replacement.
    seed : int
        Seed of the generator: the same seed, the same interval.
    what : str
        What one value is, for :attr:`Interval.method`.

    Returns
    -------
    Interval
        Values that are all equal give the zero-width interval.
    """
    from toolkit.similarity import mean_interval

    v = _per_image(values, "values")
    _check_confidence(confidence)
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, not {resamples!r}")
    mean, low, high, _ = mean_interval(v, n_resamples=int(resamples), confidence_level=confidence, seed=seed)
    return Interval(mean, low, high, confidence, f"bootstrap over {v.size} {what}")


def bootstrap_difference(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                         seed: int = SEED, what: str = "images") -> Interval:
    """``mean(a - b)`` over the same images, with a paired bootstrap interval.

    ``a`` and ``b`` hold one value per image, in the same order (two methods measured on
    the same images); resampling the images keeps the pairs together.
    """
    a, b = _per_image(a, "a"), _per_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same images; got {a.size} and {b.size} values")
    interval = bootstrap_mean(a - b, confidence, resamples, seed, what)
    return Interval(interval.estimate, interval.low, interval.high, confidence, f"paired {interval.method}")


def normal_interval(estimate: float, standard_error: float, confidence: float = CONFIDENCE,
                    method: str = "") -> Interval:
    """``estimate +- z * standard_error`` with ``z`` the normal quantile of ``confidence``
    (the split-half intervals of :mod:`toolkit.quality`)."""
    from scipy.stats import norm

    _check_confidence(confidence)
    half = float(norm.ppf(0.5 + confidence / 2)) * float(standard_error)
    return Interval(float(estimate), float(estimate) - half, float(estimate) + half, confidence, method)


def ordering(a, b, names: tuple[str, str] = ("A", "B"), **options) -> str:
    """``"A > B"`` or ``"A < B"`` where the interval of ``mean(a - b)`` excludes zero,
    ``"A ~ B"`` (indistinguishable here) where it does not; keyword options as for
    :func:`bootstrap_difference`."""
    sign = bootstrap_difference(a, b, **options).sign
    return f"{names[0]} {sign} {names[1]}"


def ranking(per_image: Mapping[str, object], **options) -> list[tuple[str, str]]:
    """Rank methods by their mean, claiming only what the intervals separate.

    Parameters
    ----------
    per_image : mapping name -> (N,) values
        Every method measured on the same ``N`` images, larger is better.
    **options
        As for :func:`bootstrap_difference`.

    Returns
    -------
    list of (name, relation)
        Best mean first. ``relation`` compares the method with the *next* one: ``">"``
        where the paired interval of their difference lies above 0, ``"~"`` where it
        holds 0 (indistinguishable here); ``""`` for the last.
    """
    if not per_image:
        raise ValueError("give at least one method")
    values = {name: _per_image(v, name) for name, v in per_image.items()}
    names = sorted(values, key=lambda n: -values[n].mean())
    relations = [bootstrap_difference(values[a], values[b], **options).sign.replace("<", "~")
                 for a, b in zip(names, names[1:])]
    return list(zip(names, relations + [""]))


def format_ranking(ranked: Sequence[tuple[str, str]], titles: Mapping[str, str] | None = None) -> str:
    """``"A > B ~ C > D"`` from :func:`ranking` (``~``: indistinguishable here)."""
    titles = dict(titles or {})
    return "".join(titles.get(name, name) + (f" {relation} " if relation else "") for name, relation in ranked)


#: The answers of :func:`verdict`.
VERDICTS = ("holds", "fails", "undecided")


def verdict(values, above, below, **options) -> str:
    """Whether every method of ``above`` scores higher than every method of ``below``.

    Parameters
    ----------
    values : mapping name -> per-image values
        Measured on the same images, in the same order.
    above, below : sequence of str
        Names of ``values``.
    **options
        As for :func:`bootstrap_difference`.

    Returns
    -------
    str
        ``"holds"`` where the interval of every difference ``above - below`` lies above
        zero; ``"fails"`` where at least one lies below zero (the opposite ordering is
        shown); ``"undecided"`` otherwise.
    """
    missing = [name for name in (*above, *below) if name not in values]
    if missing or not above or not below:
        raise ValueError(f"above and below must name values; missing {missing}" if missing
                         else "above and below must each name at least one method")
    differences = [bootstrap_difference(values[a], values[b], **options) for a in above for b in below]
    if any(d.high < 0 for d in differences):
        return "fails"
    return "holds" if all(d.low > 0 for d in differences) else "undecided"
