"""How similar are two explanations, and how sure is a mean over images?

The randomisation check (:mod:`toolkit.sanity`) compares each image's explanation of a
randomised network with the original one, as Adebayo et al. (2018, *Sanity checks for
saliency maps*) do: by the Spearman rank correlation of the absolute relevance ``|r|``
(:func:`spearman_similarity`) and by the structural similarity of the two maps
(:func:`ssim_similarity`, scikit-image's SSIM, imported when it is called). A mean over
images comes with a percentile bootstrap interval from :func:`scipy.stats.bootstrap`
with a seeded generator (:func:`mean_interval`).
"""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

__all__ = ["SIMILARITIES", "SIMILARITY_FUNCTIONS", "spearman_similarity", "ssim_similarity",
           "mean_interval", "fixed", "span"]

#: How an explanation of a changed network is compared with the original one.
SIMILARITIES = ("spearman", "ssim")


def _relevance_maps(explanations: Tensor) -> np.ndarray:
    """``|r|`` summed over the channels: ``(N, H, W)`` (or ``(N, features)``), float64."""
    r = explanations.detach().double().abs().cpu()
    return (r.sum(1) if r.dim() == 4 else r).numpy()


def spearman_similarity(first: Tensor, second: Tensor) -> np.ndarray:
    """Per image, the Spearman rank correlation of ``|r|`` (summed over channels) of two
    explanations; NaN where one of them is constant (the correlation is 0/0)."""
    from scipy.stats import rankdata

    a, b = (_relevance_maps(t).reshape(len(t), -1) for t in (first, second))
    ra, rb = (rankdata(m, axis=1) for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    norms = np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (ra * rb).sum(1) / np.where(norms > 0, norms, 1), np.nan)


def ssim_similarity(first: Tensor, second: Tensor) -> np.ndarray:
    """Per image, the structural similarity (SSIM, scikit-image) of the two maps ``|r|``
    (summed over channels), each divided by its largest value; NaN where one of them is
    all zero. Needs images of at least 7 x 7 pixels (SSIM's window)."""
    from skimage.metrics import structural_similarity

    a, b = _relevance_maps(first), _relevance_maps(second)
    if a.ndim != 3:
        raise ValueError("SSIM compares images: the explanations must be shaped (N, C, H, W)")
    out = np.full(len(a), np.nan)
    for i, (p, q) in enumerate(zip(a, b)):
        if p.max() > 0 and q.max() > 0:
            out[i] = structural_similarity(p / p.max(), q / q.max(), data_range=1.0)
    return out


SIMILARITY_FUNCTIONS = {"spearman": spearman_similarity, "ssim": ssim_similarity}


def mean_interval(values, n_resamples: int = 1000, confidence_level: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float, int]:
    """The mean of the finite ``values`` and its percentile bootstrap interval.

    Uses :func:`scipy.stats.bootstrap` with a generator seeded with ``seed``, so the
    interval is reproducible. Returns ``(mean, low, high, n)``; with fewer than two
    values the interval is ``(mean, mean)`` for one value and NaN for none, and with all
    values equal it is that value.
    """
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if len(v) == 1 or np.all(v == v[0]):
        return mean, mean, mean, len(v)
    result = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence_level,
                       method="percentile", rng=np.random.default_rng(seed))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high), len(v)


def fixed(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals (``-0.00`` printed as ``0.00``), ``-`` if not finite."""
    return "-" if not math.isfinite(value) else f"{np.round(value, decimals) + 0.0:.{decimals}f}"


def span(bounds, decimals: int) -> str:
    """An interval as ``[low, high]`` with ``decimals`` decimals, ``-`` if not finite."""
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{fixed(low, decimals)}, {fixed(high, decimals)}]"
