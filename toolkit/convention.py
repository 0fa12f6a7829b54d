"""Which mean of ``y``? The toy's evidence for the two conventions of ``a_+``.

The two-component estimator's pattern ``a_+`` subtracts a mean ``m`` of ``y`` in its
numerator, ``E_+[x y] - E_+[x] m``: the mean over the active samples, ``E_+[y]``
(``mean_y="masked"``, the default, :data:`toolkit.linear.DEFAULT_MEAN_Y`), or over all
samples, ``E[y]`` (``mean_y="global"``, the paper's formula and the authors' code). In
the 2-D toy two measurements tell them apart (docs/math.md, section 3.3):

* :func:`toy_shift`: a distractor with a non-zero mean ``nu`` *is* a constant shift of
  the input, ``x + nu a_d``. The masked ``a_+`` is the same with and without it (a
  covariance does not see a constant); the global one moves by
  ``c (E_+[y] - E[y])`` in its numerator, ``c = nu a_d``, and no longer points along the
  signal.
* :func:`sample_size_study`: with zero-mean noise both find the signal, but the global
  ``a_+`` needs fewer samples: its numerator holds ``E_+[y (y - E[y])]`` of the signal,
  the masked one only the covariance ``var_+(y)`` over half the range of ``y`` (a quarter
  as much for ``y ~ U[-1, 1]``), so the masked pattern's error is about twice as large
  at a given ``n``: both shrink as ``1/sqrt(n)``, and the masked pattern needs about four
  times as many samples for the same error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit import linear
from toolkit.similarity import fixed, mean_interval, span

__all__ = ["ToyShift", "toy_shift", "SampleSizeStudy", "sample_size_study"]


@dataclass
class ToyShift:
    """The 2-D toy without and with a distractor mean (:func:`toy_shift`).

    Attributes
    ----------
    a_s, a_d : ndarray, shape (2,)
    noise_means : tuple of float
    data : dict
        Per noise mean, the :class:`toolkit.linear.ToyData`; the samples of one noise mean
        are those of the first plus ``(nu - nu_0) a_d``, exactly.
    w : dict
        Per noise mean, the least-squares filter (the same for all: ``w^T a_d = 0``).
    patterns : dict
        ``patterns[nu][mean_y]``: ``a_+`` of the two-component estimator.
    """

    a_s: np.ndarray
    a_d: np.ndarray
    noise_means: tuple
    data: dict
    w: dict
    patterns: dict


def toy_shift(noise_means=(0.0, 1.0), n: int = 2000, signal_angle: float = 0.0,
              distractor_angle: float = 45.0, noise_std: float = 1.0, seed: int = 0) -> ToyShift:
    """Fit ``a_+`` with both conventions on the same samples, shifted by each noise mean.

    The samples are drawn once (``y`` and the noise with mean 0) and moved by
    ``nu a_d`` for every ``nu`` of ``noise_means``: the distractor's mean is a constant
    shift of the input.
    """
    a_s, a_d = linear.direction(signal_angle), linear.direction(distractor_angle)
    base = linear.make_data(n, a_s, a_d, noise_mean=0.0, noise_std=noise_std, seed=seed)
    data, w, patterns = {}, {}, {}
    for nu in noise_means:
        d = base.d + nu * a_d
        data[nu] = linear.ToyData(x=base.s + d, y=base.y, s=base.s, d=d)
        w[nu] = linear.fit_filter(data[nu].x, data[nu].y)
        patterns[nu] = {c: linear.TwoComponentEstimator(c).fit(data[nu].x, w[nu]).pattern_positive_
                        for c in linear.MEAN_Y_CONVENTIONS}
    return ToyShift(a_s, a_d, tuple(noise_means), data, w, patterns)


@dataclass
class SampleSizeStudy:
    """How ``a_+`` of each convention improves with the number of fitting samples.

    Attributes
    ----------
    sizes : tuple of int
    seeds : int
        Fits per size (each on fresh samples).
    noise_mean : float
    rho : dict
        ``rho[mean_y][regime]``: ``(len(sizes), seeds)``, ``rho(S_a+-)`` on held-out
        samples, over all of them or only the active ones (:data:`toolkit.linear.REGIMES`).
    error : dict
        ``error[mean_y]``: ``(len(sizes), seeds)``, ``|a_+ - a_s|`` (``a_s`` scaled to
        ``w^T a_s = 1``, which it is in the toy).
    """

    sizes: tuple
    seeds: int
    noise_mean: float
    rho: dict
    error: dict

    def summary(self, mean_y: str, what: str = "error", seed: int = 0) -> list[tuple]:
        """Per size, ``(mean, low, high, n)`` of ``what`` (``"error"``, ``"all"`` or
        ``"active"``: rho in that regime) over the fits, with a bootstrap interval."""
        values = self.error[mean_y] if what == "error" else self.rho[mean_y][what]
        return [mean_interval(row, seed=seed) for row in values]

    def table(self, decimals: int = 3) -> str:
        """Per size and convention: the mean pattern error and ``rho`` in both regimes,
        each with its 95% bootstrap interval."""
        columns = [(c, what) for what in ("error", "all", "active") for c in linear.MEAN_Y_CONVENTIONS]
        titles = {"error": "|a+ - a_s|", "all": "rho, all", "active": "rho, active"}
        width = 3 * decimals + 12
        head = f"{'n':>7}" + "".join(f"{titles[what] + ' ' + c:>{width}}" for c, what in columns)
        lines = [head, "-" * len(head)]
        summaries = {key: self.summary(*key) for key in columns}
        for i, size in enumerate(self.sizes):
            cells = [f"{fixed(summaries[key][i][0], decimals)} {span(summaries[key][i][1:3], decimals)}"
                     for key in columns]
            lines.append(f"{size:>7}" + "".join(f"{cell:>{width}}" for cell in cells))
        return "\n".join(lines)


def sample_size_study(sizes=(100, 300, 1000, 3000, 10000), seeds: int = 30, noise_mean: float = 0.0,
                      noise_std: float = 1.0, signal_angle: float = 0.0, distractor_angle: float = 45.0,
                      n_held_out: int = 20000, seed: int = 0) -> SampleSizeStudy:
    """Fit ``a_+`` with both conventions ``seeds`` times per sample size; measure each.

    Every fit draws its own samples (one generator seeded with ``seed``, so the study is
    reproducible), learns the filter, fits both conventions on the same samples and
    measures ``rho(S_a+-)`` on one held-out set of ``n_held_out`` samples.
    """
    a_s, a_d = linear.direction(signal_angle), linear.direction(distractor_angle)
    rng = np.random.default_rng(seed)
    held_out = linear.make_data(n_held_out, a_s, a_d, noise_mean, noise_std, seed=rng)
    shape = (len(sizes), seeds)
    rho = {c: {r: np.empty(shape) for r in linear.REGIMES} for c in linear.MEAN_Y_CONVENTIONS}
    error = {c: np.empty(shape) for c in linear.MEAN_Y_CONVENTIONS}
    for i, n in enumerate(sizes):
        for k in range(seeds):
            data = linear.make_data(n, a_s, a_d, noise_mean, noise_std, seed=rng)
            w = linear.fit_filter(data.x, data.y)
            for convention in linear.MEAN_Y_CONVENTIONS:
                estimator = linear.TwoComponentEstimator(convention).fit(data.x, w)
                error[convention][i, k] = np.linalg.norm(estimator.pattern_positive_ - a_s / (w @ a_s))
                for regime in linear.REGIMES:
                    rho[convention][regime][i, k] = linear.quality(estimator, held_out.x, w, regime=regime)
    return SampleSizeStudy(tuple(sizes), seeds, noise_mean, rho, error)
