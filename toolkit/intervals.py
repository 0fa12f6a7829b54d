"""Orderings over images, claimed only where a bootstrap interval says they hold.

A table of AOPC or of ground-truth scores gives one mean per method, over a few hundred
images; two methods whose means differ by 0.01 may or may not differ. The course claims
an ordering only where the interval of the *difference* excludes zero:

* :func:`bootstrap_mean` -- the mean of per-image values with its percentile bootstrap
  interval (:func:`toolkit.similarity.mean_interval`: images drawn with replacement, a
  seeded generator), as an :class:`Interval`;
* :func:`bootstrap_difference` -- the same for ``a - b`` on the same images (a paired
  bootstrap: each resample draws images, and both methods are read on them);
* :func:`ordering` -- ``"A > B"``, ``"A < B"`` or ``"A ~ B"`` (indistinguishable here)
  from that interval;
* :func:`verdict` -- whether a claim such as "S_a+- above every other estimator" holds,
  fails, or is undecided on these images.

Per-image values from torch (``PerturbationResult.per_image_aopc``) are converted; NaN or
Inf values are refused, not dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "bootstrap_difference", "ordering", "verdict", "VERDICTS"]

#: Resamples per interval: enough for the 2.5 % and 97.5 % percentiles to be stable to
#: about a hundredth of the interval's width.
RESAMPLES = 4000


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval.

    Attributes
    ----------
    estimate : float
        The mean over all images.
    low, high : float
        The percentile interval at ``confidence``.
    confidence : float
    """

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval."""
        return value < self.low or value > self.high

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


def bootstrap_mean(values, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
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

    Returns
    -------
    Interval
    """
    from toolkit.similarity import mean_interval

    v = _per_image(values, "values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, not {resamples!r}")
    mean, low, high, _ = mean_interval(v, n_resamples=int(resamples), confidence_level=confidence, seed=seed)
    return Interval(mean, low, high, confidence)


def bootstrap_difference(a, b, confidence: float = 0.95, resamples: int = RESAMPLES,
                         seed: int = 0) -> Interval:
    """``mean(a - b)`` over the same images, with a paired bootstrap interval.

    ``a`` and ``b`` hold one value per image, in the same order (two methods measured on
    the same images); resampling the images keeps the pairs together.
    """
    a, b = _per_image(a, "a"), _per_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same images; got {a.size} and {b.size} values")
    return bootstrap_mean(a - b, confidence, resamples, seed)


def ordering(a, b, names: tuple[str, str] = ("A", "B"), **options) -> str:
    """``"A > B"`` or ``"A < B"`` where the interval of ``mean(a - b)`` excludes zero,
    ``"A ~ B"`` (indistinguishable here) where it does not; keyword options as for
    :func:`bootstrap_difference`."""
    difference = bootstrap_difference(a, b, **options)
    if not difference.excludes(0.0):
        return f"{names[0]} ~ {names[1]}"
    return f"{names[0]} {'>' if difference.estimate > 0 else '<'} {names[1]}"


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
