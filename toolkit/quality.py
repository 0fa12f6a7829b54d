"""How good is a signal estimator? ``rho(S)`` for every Conv2d/Linear layer of a network.

For one neuron with filter ``w`` and inputs ``x`` (for a convolution: every
receptive-field patch of every image), an estimator ``S`` splits the input into an
estimated signal ``S(x)`` and an estimated distractor ``d = x - S(x)``. If any linear
read-out of ``d`` still correlates with the output ``y = w^T x`` (bias not included),
the estimator left part of the signal in the distractor (math.md, section 4)::

    rho(S) = 1 - max_v corr(v^T d, y)

``rho = 1``: no linear information about ``y`` is left in ``d``; lower is worse. The
maximum over ``v`` is the *multiple correlation* of ``y`` with ``d``, which has a closed
form, so no gradient descent is needed (the paper ran SGD for about a day on a GPU)::

    max_v corr(v^T d, y) = sqrt(c^T Sigma_d^+ c / var(y)),
    c = cov(d, y),  Sigma_d = cov(d).

The estimators
--------------
Every estimator measured here has the form ``S(x) = a_+ y_+ + a_- y_-`` with
``y_+ = y [z > 0]`` (``z`` the layer output, bias included: the same activity mask as
in fitting) and ``y_- = y - y_+``:

=================  ==============================  =====================================
name               ``a_+``                          ``a_-``
=================  ==============================  =====================================
``random``         ``r / (w^T r)``, ``r ~ N(0, I)`` ``a_+``   (:func:`random_pattern`)
``filter``         ``w / (w^T w)``                  ``a_+``   (S_w)
``linear``         the linear pattern ``a``         ``a_+``   (S_a)
``two_component``  the pattern ``a_+``              ``a_-``   (S_a+-)
=================  ==============================  =====================================

The identity estimator ``S_x(x) = x`` leaves ``d = 0``: its quality is undefined and
asking for it raises :class:`toolkit.linear.UndefinedQualityError`.

The closed form, from streamed second moments
---------------------------------------------
One pass over the data accumulates, in float64, per layer (:class:`LayerMoments`)
the *shared* moments of the inputs ``n, sum x, sum x x^T`` (``D x D``, ``D`` the patch
size ``C kh kw`` of a convolution) and per neuron the split moments ``n_+, sum y_+,
sum y_+^2, sum y_-, sum y_-^2`` and ``sum x y_+`` (weight-shaped). Since ``y = w^T x``,
``cov(x, y) = Sigma_x w`` and ``var(y) = w^T Sigma_x w`` follow from the shared moment.

As ``y_- = y - y_+``, every estimator's distractor is
``d = (I - a_- w^T) x - (a_+ - a_-) y_+``: linear in ``x`` and in one nonlinear
quantity, ``y_+``. Write ``x = mu + Sigma^1/2 u`` and
``y_+ = E[y_+] + c_+^T Sigma^-1/2 u + sqrt(s) e`` with ``(u, e)`` white,
``c_+ = cov(x, y_+)`` and ``s = var(y_+) - c_+^T Sigma^-1 c_+`` the variance of ``y_+``
that no linear function of ``x`` explains. Then ``d = F (u, e)`` and
``y = h^T (u, e)``, ``h = (Sigma^1/2 w, 0)``, and ``1 - max_v corr^2`` is the share of
``|h|^2`` in the null space of ``F``, which is (at most) two-dimensional:
``g = (Sigma^-1/2 A t, (t_1 - k^T t) / sqrt(s))``, ``t in R^2``, with
``A = [a_+, a_-]`` and ``k = A^T Sigma^-1 c_+``. Hence, per neuron, with 2 x 2
matrices only::

    1 - R^2 = (A^T w)^T Q^+ (A^T w) / var(y),
    Q = A^T Sigma^-1 A + r r^T / s,   r = e_1 - k.

Every estimator here has ``w^T a_+- = 1`` (so ``w^T d = 0``); a pattern off that plane
adds the constraint ``(1 - A^T w)^T t = 0``. A linear-type estimator (``a_+ = a_-``),
and the two-component one on a neuron that is always (never) active, reduce to::

    1 - R^2 = (w^T a)^2 / ((a^T Sigma^-1 a) (w^T Sigma w))      (Cauchy-Schwarz: <= 1)

(0 if ``w^T a != 1``), and ``rho = 1 - sqrt(1 - (1 - R^2))`` is evaluated so that it keeps
its precision near 0. The exact structure -- ``y_+ + y_- = y`` is linear in ``x``,
``w^T d = 0`` -- is built into the formula instead of being left to the tolerance of a
pseudo-inverse, and nothing is large that later cancels: in the tests the result agrees
with a least-squares regression on the samples to 1e-11 on well-conditioned layers and
to 3e-8 on a layer with ``n = 4 D`` samples and eigenvalues spread over 6 decades (the
floor below moves an eigenvalue ``lambda`` by ``epsilon / lambda``); where a pattern has
a component ``a_null`` on constant inputs the floor gives ``rho`` of about
``epsilon / (|a_null|^2 var(y))`` instead of exactly 0.

``Sigma^-1`` is applied through one Cholesky factorisation per layer of
``Sigma_x + epsilon I`` with ``epsilon = rtol * lambda_max`` (default ``rtol = 1e-12``;
``lambda_max`` from a few power iterations),
a floor under the eigenvalues: where the inputs are constant (a dead input channel)
``Sigma_x`` is singular, and a pattern with a component ``a_null`` there puts a copy of
``y`` into ``d`` (``rho = 0``, as least squares finds too); the floor turns that exact
limit into a penalty ``|a_null|^2 / epsilon`` and keeps round-off from counting. An
eigenvalue ``lambda`` of ``Sigma_x`` changes by the relative amount ``epsilon / lambda``.
Per layer this costs the factorisation (``D^3 / 3``) and, per estimator, one triangular
solve with the neurons' directions (``J D^2``); everything per neuron is a batched
2 x 2 problem. There is no loop over neurons.

Neurons without a value
-----------------------
``rho`` is a correlation and is undefined (0/0) for a neuron whose output ``y`` has
zero variance on the data (e.g. all-zero weights, or weights that only see constant
inputs), and for an estimator whose distractor has zero variance. Such neurons get
``NaN`` in :attr:`QualityResult.per_neuron` *and* ``False`` in
:attr:`QualityResult.defined`; layer means are taken over the defined neurons only,
and the number left out is shown by :meth:`QualityResult.table`. A relative variance
below ``1e-12`` counts as zero.

Data and sample size
--------------------
Measure on data the patterns were NOT fitted on: on the fitting data the linear
pattern leaves ``cov(d, y) = 0`` by construction, and rho(S_a) is 1 trivially. That is
the caller's responsibility; :func:`layer_quality` cannot check it.

``max_v`` is a regression of ``y`` on ``D`` regressors, so it overfits: with ``n <= D + 1``
samples a layer's maximal correlation is 1 whatever the estimator (rho = 0), and it is
biased upwards by about ``D / n`` while ``n`` is not much larger than ``D``. A warning
is issued for layers with ``n <= D + 1``. ``ridge > 0`` replaces ``Sigma_x`` by the
shrinkage estimate ``Sigma_x + ridge * trace(Sigma_x) / D * I`` everywhere in the closed
form (a Tikhonov term: directions the few samples never explored no longer come for
free), which tames the overfitting at the price of a biased measure; the default 0 is the
exact definition.

The exact measure is also unforgiving where an input is constant on the evaluation data
but not on the fitting data (a channel that is active only on a few images): the pattern
has a component ``a_k`` there, the distractor's coordinate ``-a_k y`` is a perfect copy
of ``y``, and ``rho`` drops towards 0 however small ``a_k`` is. Look for such layers
(``rho`` of the linear pattern far below that of its neighbours) and use more evaluation
data or ``ridge > 0``.

Memory and time
---------------
The shared moment is ``D x D`` float64: ``8 D^2`` bytes per layer, about 5 GB for the
first dense layer of VGG16 (``D = 25088``) and 170 MB for a 512-channel 3 x 3
convolution; at its peak the closed form holds four such matrices (the sums, the
covariance, a shifted copy and its Cholesky factor). Per layer, accumulation costs
``D^2 + 2 J D`` multiply-adds per sample (patches are unfolded in chunks of at most
:data:`PATCH_CHUNK_ELEMENTS` numbers) and the closed form ``D^3 / 3 + 7 J D^2``. Use
``layers=`` to measure a subset and ``device=`` to compute on a GPU;
``benchmarks/layer_quality.py`` times a torchvision model.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from toolkit.distributed import (broadcast_from_rank_0, check_all_ranks_have_data, is_sharded,
                                 own_batches, rank_and_world, sum_over_ranks)
from toolkit.streaming import progress_bar
from toolkit.layers import Layer, Plan, evaluation_mode, intercept, trace
from toolkit.linear import UndefinedQualityError
from toolkit.residual import DEFAULT_MASK, ActivityMasks

__all__ = [
    "ESTIMATORS",
    "UndefinedQualityError",
    "LayerMoments",
    "QualityResult",
    "layer_quality",
    "layer_patches",
    "random_pattern",
    "filter_pattern",
    "estimator_patterns",
    "rho_from_moments",
    "collect_moments",
    "unexplained_linear",
    "unexplained_two_sided",
]

#: Estimators ``layer_quality`` measures, in the order of the paper's figure.
ESTIMATORS = ("random", "filter", "linear", "two_component")

#: At most this many float64 numbers of unfolded patches are held at a time.
PATCH_CHUNK_ELEMENTS = 2 ** 24
#: Neurons are processed in blocks of about this many float64 numbers (``J x D``).
NEURON_BLOCK_ELEMENTS = 2 ** 23
#: A variance below this fraction of its scale counts as zero (see module docstring).
ZERO_VARIANCE_RTOL = 1e-12
#: ``|1 - w^T a|`` below this times ``|w| |a|`` is round-off: ``w^T a = 1``.
KAPPA_RTOL = 1e-8


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------
def _input_batches(data, batch_size: int) -> Iterator[Tensor]:
    """Yield the input tensors of ``data``: a tensor (cut into ``batch_size`` pieces),
    or an iterable of tensors or ``(inputs, labels)`` pairs."""
    if isinstance(data, Tensor):
        if data.dim() == 0:
            raise ValueError("data must be a batch of inputs, not a scalar tensor")
        yield from torch.split(data, batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor or an iterable of batches, not {type(data).__name__}")
    for index, batch in enumerate(data):
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"batch {index} is empty")
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"batch {index}: a batch must be a tensor or an (inputs, labels) "
                            f"pair, not {type(batch).__name__}")
        yield batch


def _check_inputs(x: Tensor, index: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"batch {index}: inputs must be floating point, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"batch {index}: inputs of shape {tuple(x.shape)} are not a batch")
    if not torch.isfinite(x).all():
        raise ValueError(f"batch {index} contains NaN or Inf values")


# ----------------------------------------------------------------------------------
# the estimators' directions a_+ and a_-
# ----------------------------------------------------------------------------------
def _rows(weight: Tensor) -> Tensor:
    return weight.detach().to(torch.float64).reshape(weight.shape[0], -1)


def random_pattern(weight: Tensor, seed: int = 0) -> Tensor:
    """The random baseline: per neuron ``a = r / (w^T r)`` with ``r ~ N(0, I)``.

    The directions are drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    (one ``(J, D)`` draw; the rare rows with ``|w^T r| <= 1e-6 |w| |r|`` are drawn
    again), so a layer's random pattern is reproducible from its weight and the seed.
    Neurons with ``w = 0`` get ``a = 0``.

    Returns
    -------
    Tensor
        float64, shaped like ``weight``, on the CPU.
    """
    w = _rows(weight).cpu()
    generator = torch.Generator().manual_seed(int(seed))
    r = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    live = w.norm(dim=1) > 0
    while True:
        bad = live & ((w * r).sum(1).abs() <= 1e-6 * w.norm(dim=1) * r.norm(dim=1))
        if not bad.any():
            break
        r[bad] = torch.randn((int(bad.sum()), w.shape[1]), generator=generator, dtype=torch.float64)
    denominator = torch.where(live, (w * r).sum(1), torch.ones(()))
    return (r / denominator[:, None] * live[:, None]).reshape(weight.shape)


def filter_pattern(weight: Tensor) -> Tensor:
    """``a = w / (w^T w)`` per neuron (the filter-based estimator S_w); 0 where ``w = 0``."""
    w = _rows(weight)
    norm2 = (w * w).sum(1)
    return (w / torch.where(norm2 > 0, norm2, torch.ones_like(norm2))[:, None]).reshape(weight.shape)


def estimator_patterns(name: str, weight: Tensor, layer_patterns=None, seed: int = 0
                       ) -> tuple[Tensor, Tensor]:
    """``(a_+, a_-)`` of the estimator ``name`` for one layer, float64 weight-shaped.

    The linear-type estimators return the same tensor twice.
    """
    if name == "identity":
        raise UndefinedQualityError(
            "the identity estimator S_x(x) = x leaves the distractor d = x - S_x(x) = 0, so "
            "corr(v^T d, y) is 0/0 for every v and rho(S_x) is undefined; measure the "
            f"estimators {ESTIMATORS}"
        )
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")
    if name == "random":
        a = random_pattern(weight, seed).to(weight.device)
        return a, a
    if name == "filter":
        a = filter_pattern(weight)
        return a, a
    if layer_patterns is None:
        raise ValueError(f"the estimator {name!r} needs fitted patterns (toolkit.fit_patterns)")
    if name == "linear":
        a = layer_patterns.linear
        return a, a
    return layer_patterns.positive, layer_patterns.negative


# ----------------------------------------------------------------------------------
# streamed moments
# ----------------------------------------------------------------------------------
def layer_patches(layer: Layer, x: Tensor) -> Tensor:
    """The layer's input samples as rows, ``(samples, D)``.

    For a Linear layer the inputs themselves; for a convolution every receptive-field
    patch (zero padding included), flattened like ``weight[j].reshape(-1)``, one row per
    image and output position in the order of :meth:`Layer.neuron_values`.
    """
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1])
    m = layer.module
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class LayerMoments:
    """Running float64 sums of one layer; everything ``rho`` is computed from.

    The inputs are shifted by ``shift`` (the mean input of the first image) before they
    are summed, which keeps ``Sigma_x = S_xx / n - m m^T`` accurate when the inputs'
    mean is large compared with their spread; covariances do not depend on the shift.

    Shapes (``D`` inputs per sample, ``J`` neurons)::

        n          ()      samples (images x output positions)
        shift      (D,)    subtracted from every input
        sum_x      (D,)    sum of x - shift
        sum_xx     (D, D)  sum of (x - shift)(x - shift)^T   -- shared by all neurons
        n_pos      (J,)    samples with z > 0
        sum_y_pos  (J,)    sum of y_+ = y [z > 0]
        sum_y_pos2 (J,)    sum of y_+^2
        sum_y_neg  (J,)    sum of y_- = y - y_+
        sum_y_neg2 (J,)    sum of y_-^2
        sum_xy_pos (J, D)  sum of (x - shift) y_+
    """

    n: Tensor
    shift: Tensor
    sum_x: Tensor
    sum_xx: Tensor
    n_pos: Tensor
    sum_y_pos: Tensor
    sum_y_pos2: Tensor
    sum_y_neg: Tensor
    sum_y_neg2: Tensor
    sum_xy_pos: Tensor

    @classmethod
    def zeros(cls, dim: int, neurons: int, device=None) -> "LayerMoments":
        kw = dict(dtype=torch.float64, device=device)
        return cls(
            n=torch.zeros((), **kw), shift=torch.zeros(dim, **kw), sum_x=torch.zeros(dim, **kw),
            sum_xx=torch.zeros(dim, dim, **kw), n_pos=torch.zeros(neurons, **kw),
            sum_y_pos=torch.zeros(neurons, **kw), sum_y_pos2=torch.zeros(neurons, **kw),
            sum_y_neg=torch.zeros(neurons, **kw), sum_y_neg2=torch.zeros(neurons, **kw),
            sum_xy_pos=torch.zeros(neurons, dim, **kw),
        )

    @property
    def dim(self) -> int:
        return self.sum_x.shape[0]

    def update(self, layer: Layer, x: Tensor, z: Tensor, active: Tensor | None = None) -> None:
        """Add one batch: layer input ``x`` and layer output ``z`` (bias included).

        ``y = w^T x`` is recomputed in float64 from the patches (the model's own output
        may be float32); the activity mask is ``z > 0`` as in fitting, or ``active``
        (bool, shaped like ``z``) when given (:mod:`toolkit.residual`).
        """
        mask_source = z if active is None else active.to(z.dtype)
        w = _rows(layer.weight()).to(self.sum_xx.device)
        images = x.shape[0]
        per_image = max(1, z[:1].numel() // z.shape[1] * self.dim)  # positions x D
        chunk = max(1, PATCH_CHUNK_ELEMENTS // per_image)
        for start in range(0, images, chunk):
            patches = layer_patches(layer, x[start:start + chunk].to(torch.float64))
            active = layer.neuron_values(mask_source[start:start + chunk].detach()) > 0
            if self.n == 0:
                positions = patches.shape[0] // min(chunk, images - start)
                self.shift = patches[:positions].mean(0)
            self._add(patches - self.shift, active, w)

    def reshift(self, shift: Tensor) -> None:
        """Express the sums relative to another ``shift`` (exactly: every sum is a
        polynomial in the shift), so that moments of different processes can be added."""
        delta = self.shift - shift  # x - shift = (x - self.shift) + delta
        self.sum_xx += torch.outer(self.sum_x, delta) + torch.outer(delta, self.sum_x) \
            + self.n * torch.outer(delta, delta)
        self.sum_xy_pos += torch.outer(self.sum_y_pos, delta)
        self.sum_x += self.n * delta
        self.shift = shift.clone()

    def all_reduce(self) -> None:
        """Sum the moments of all ``torch.distributed`` ranks in place, after moving them
        to rank 0's shift."""
        self.reshift(broadcast_from_rank_0(self.shift.clone()))
        sum_over_ranks(getattr(self, f.name) for f in fields(self) if f.name != "shift")

    def _add(self, patches: Tensor, active: Tensor, w: Tensor) -> None:
        y = torch.addmm(w @ self.shift, patches, w.T)  # w^T x with x = patches + shift
        y_pos = y * active
        y_neg = y - y_pos
        self.n += patches.shape[0]
        self.sum_x += patches.sum(0)
        self.sum_xx.addmm_(patches.T, patches)
        self.n_pos += active.sum(0)
        self.sum_y_pos += y_pos.sum(0)
        self.sum_y_pos2 += (y_pos * y_pos).sum(0)
        self.sum_y_neg += y_neg.sum(0)
        self.sum_y_neg2 += (y_neg * y_neg).sum(0)
        self.sum_xy_pos.addmm_(y_pos.T, patches)


@dataclass
class _Covariances:
    """Population covariances of one layer (see the module docstring for the names)."""

    n: int
    sigma_x: Tensor      # (D, D)
    mean_x: Tensor       # (D,)  mean of x - shift
    shift: Tensor        # (D,)
    n_pos: Tensor        # (J,)  samples with z > 0
    mean_pos: Tensor     # (J,)  E[y_+]
    mean_neg: Tensor     # (J,)  E[y_-]
    var_pos: Tensor      # (J,)
    var_neg: Tensor      # (J,)
    cov_pos_neg: Tensor  # (J,)  -E[y_+] E[y_-]
    c_pos: Tensor        # (J, D) cov(x, y_+)

    @classmethod
    def of(cls, m: LayerMoments) -> "_Covariances":
        n = float(m.n)
        mean_x = m.sum_x / n
        sigma = (m.sum_xx / n).addr_(mean_x, mean_x, alpha=-1)  # one D x D copy
        mean_pos, mean_neg = m.sum_y_pos / n, m.sum_y_neg / n
        return cls(
            n=int(m.n), sigma_x=sigma, mean_x=mean_x, shift=m.shift, n_pos=m.n_pos,
            mean_pos=mean_pos, mean_neg=mean_neg,
            var_pos=m.sum_y_pos2 / n - mean_pos ** 2,
            var_neg=m.sum_y_neg2 / n - mean_neg ** 2,
            cov_pos_neg=-mean_pos * mean_neg,
            c_pos=m.sum_xy_pos / n - torch.outer(mean_pos, mean_x),
        )


# ----------------------------------------------------------------------------------
# the closed form
# ----------------------------------------------------------------------------------
@dataclass
class _Whitening:
    """``Sigma_f^-1/2`` through the Cholesky factor of ``Sigma_f = Sigma_x + jitter I``.

    ``jitter = rtol * lambda_max + ridge * trace(Sigma_x) / D``: the first term is a
    floor under the eigenvalues (directions in which the inputs are constant get a tiny
    variance instead of none), the second the optional Tikhonov term. If round-off still
    leaves ``Sigma_f`` indefinite the jitter is raised tenfold, with a warning.
    """

    factor: Tensor  # (D, D) lower triangular, Sigma_f = L L^T
    jitter: float

    @classmethod
    def of(cls, sigma: Tensor, ridge: float, rtol: float) -> "_Whitening":
        dim = sigma.shape[0]
        trace = float(sigma.diagonal().sum())
        if trace <= 0:  # every input constant: every neuron is undefined
            return cls(torch.eye(dim, dtype=sigma.dtype, device=sigma.device), 1.0)
        jitter = rtol * _largest_eigenvalue(sigma) + ridge * trace / dim
        shifted = sigma.clone()
        shifted.diagonal().add_(jitter)
        for _ in range(8):
            factor, info = torch.linalg.cholesky_ex(shifted)
            if int(info) == 0:
                return cls(factor, jitter)
            shifted.diagonal().add_(9 * jitter)
            jitter *= 10
            warnings.warn(f"the input covariance is indefinite by round-off; raising its floor to "
                          f"{jitter / trace:.1e} of its trace", RuntimeWarning, stacklevel=4)
        raise RuntimeError("could not factorise the input covariance (is it finite?)")

    def whiten(self, rows: Tensor) -> Tensor:
        """``L^-1 u`` for every row ``u``: ``(..., D) -> (..., D)``; then
        ``(L^-1 u)^T (L^-1 v) = u^T Sigma_f^-1 v``."""
        flat = rows.reshape(-1, rows.shape[-1])
        solved = torch.linalg.solve_triangular(self.factor, flat.T, upper=False)
        return solved.T.reshape(rows.shape)

    def variance_added(self, w: Tensor) -> Tensor:
        """``w^T (Sigma_f - Sigma_x) w`` per row of ``w``."""
        return self.jitter * (w * w).sum(1)


def _largest_eigenvalue(sigma: Tensor, iterations: int = 30) -> float:
    """An estimate of ``lambda_max`` of a PSD matrix (power iteration from a fixed start),
    never below the largest diagonal entry or the mean eigenvalue."""
    v = torch.ones(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    v[1::2] = 0.5  # not orthogonal to a dominant direction of alternating sign either
    for _ in range(iterations):
        v = sigma @ v
        norm = v.norm()
        if norm == 0:
            break
        v = v / norm
    diagonal = sigma.diagonal()
    return max(float(v @ sigma @ v), float(diagonal.max()), float(diagonal.mean()))


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """Batched inner products of rows: ``(J, p, D), (J, q, D) -> (J, p, q)``."""
    return a @ b.transpose(1, 2)


def _safe(t: Tensor) -> Tensor:
    return torch.where(t > 0, t, torch.ones_like(t))


def unexplained_linear(gram_a: Tensor, w_dot_a: Tensor, var_y: Tensor,
                       on_plane: Tensor) -> Tensor:
    """``1 - R^2`` for a linear-type estimator ``S(x) = a y``, batched over neurons.

    ``d = (I - a w^T) x``. If ``w^T a = 1`` (``on_plane``) the only direction of ``x``
    that ``d`` loses is ``a``, and the unexplained fraction of ``var(y)`` is::

        1 - R^2 = (w^T a)^2 / ((a^T Sigma^-1 a) (w^T Sigma w))       (gram_a = a^T Sigma^-1 a)

    (Cauchy-Schwarz: at most 1; exactly 0 for the linear pattern on the data it was
    fitted on). If ``w^T a != 1`` then ``w^T d = (1 - w^T a) y`` and ``R^2 = 1``.
    """
    e = w_dot_a ** 2 / (_safe(gram_a) * _safe(var_y))
    return torch.where(on_plane & (gram_a > 0), e, torch.zeros_like(e)).clamp(0.0, 1.0)


def unexplained_two_sided(gram_a: Tensor, cross: Tensor, s: Tensor, w_dot_a: Tensor,
                          kappa: Tensor, var_y: Tensor) -> Tensor:
    """``1 - R^2`` for ``S(x) = a_+ y_+ + a_- y_-`` and a neuron that is sometimes active.

    Parameters
    ----------
    With ``A = [a_+, a_-]`` and ``Sigma = Sigma_x``:

    gram_a : (J, 2, 2)   ``A^T Sigma^-1 A``
    cross : (J, 2)       ``A^T Sigma^-1 c_+``,  ``c_+ = cov(x, y_+)``
    s : (J,)             ``var(y_+) - c_+^T Sigma^-1 c_+ > 0``, the variance of ``y_+``
                         that no linear function of ``x`` explains
    w_dot_a : (J, 2)     ``A^T w``
    kappa : (J, 2)       ``1 - A^T w`` with round-off set to 0
    var_y : (J,)

    Notes
    -----
    Write ``x = mu + Sigma^1/2 u`` and ``y_+ = E[y_+] + c_+^T Sigma^-1/2 u + sqrt(s) e`` with
    ``(u, e)`` white; ``y = w^T x`` and ``d = x - a_- y - (a_+ - a_-) y_+ = F (u, e)`` are
    linear in them, ``y = h^T (u, e)`` with ``h = (Sigma^1/2 w, 0)``. The best read-out of
    ``d`` recovers the part of ``h`` in the row space of ``F``; the rest, ``1 - R^2``, is
    the part in the null space of ``F``. Solving ``F g = 0``: ``g = (Sigma^-1/2 A t,
    (t_1 - cross^T t) / sqrt(s))`` for every ``t`` in R^2 with ``kappa^T t = 0``. Its
    squared length is ``t^T Q t`` with ``Q = gram_a + r r^T / s``, ``r = e_1 - cross``, and
    ``h^T g = (A^T w)^T t``, so::

        1 - R^2 = max_t ((A^T w)^T t)^2 / (t^T Q t) / var(y)   over {t : kappa^T t = 0}
                = (A^T w)^T Q^+ (A^T w) / var(y)                if kappa = 0 (w^T a_+- = 1).
    """
    r = torch.stack([1 - cross[:, 0], -cross[:, 1]], 1)
    q = gram_a + r[:, :, None] * r[:, None, :] / s[:, None, None]
    free = _quadratic_form_pinv(q, w_dot_a)
    # with a constraint, t runs along kappa's perpendicular only
    t = torch.stack([kappa[:, 1], -kappa[:, 0]], 1)
    qt = (t[:, None, :] @ q @ t[:, :, None])[:, 0, 0]
    constrained = torch.where(qt > 0, (w_dot_a * t).sum(1) ** 2 / _safe(qt), torch.zeros_like(qt))
    e = torch.where((kappa != 0).any(1), constrained, free)
    return (e / _safe(var_y)).clamp(0.0, 1.0)


def _quadratic_form_pinv(q: Tensor, b: Tensor, rtol: float = 1e-14) -> Tensor:
    """``b^T Q^+ b`` for PSD ``(J, k, k)``; ``Q`` is equilibrated (unit diagonal) first,
    so the tolerance does not depend on the units of the coordinates."""
    d = _safe(q.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt())
    qs = q / d[:, :, None] / d[:, None, :]
    bs = b / d
    e, v = torch.linalg.eigh((qs + qs.transpose(1, 2)) / 2)
    keep = e > rtol * e[:, -1:].clamp(min=0)
    along = (v.transpose(1, 2) @ bs[:, :, None])[:, :, 0]
    return torch.where(keep, along ** 2 / _safe(e), torch.zeros_like(e)).sum(1)


def rho_from_moments(moments: LayerMoments, weight: Tensor,
                     patterns: dict[str, tuple[Tensor, Tensor]], *, ridge: float = 0.0,
                     rtol: float = 1e-12) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``rho`` of every neuron of one layer, for every estimator, in closed form.

    Parameters
    ----------
    moments : LayerMoments
    weight : Tensor
        The layer's folded weight ``W`` (``J`` rows of length ``D``).
    patterns : dict
        Estimator name -> ``(a_+, a_-)``, each weight-shaped; pass the same tensor twice
        for a linear-type estimator.
    ridge : float
        Relative Tikhonov term for ``Sigma_x`` (see the module docstring).
    rtol : float
        Floor under the eigenvalues of ``Sigma_x``, relative to the largest.

    Returns
    -------
    rho : dict[str, Tensor]
        ``(J,)`` float64 on the CPU; NaN where undefined.
    defined : dict[str, Tensor]
        ``(J,)`` bool: where ``rho`` is defined.
    """
    cov = _Covariances.of(moments)
    whitening = _Whitening.of(cov.sigma_x, ridge, rtol)
    w_all = _rows(weight).to(cov.sigma_x.device)
    j, dim = w_all.shape
    block = max(1, NEURON_BLOCK_ELEMENTS // dim)
    rho = {name: [] for name in patterns}
    defined = {name: [] for name in patterns}
    for start in range(0, j, block):
        rows = slice(start, start + block)
        r, ok = _rho_block(cov, whitening, w_all[rows], rows, patterns, rtol)
        for name in patterns:
            rho[name].append(r[name].cpu())
            defined[name].append(ok[name].cpu())
    return {k: torch.cat(v) for k, v in rho.items()}, {k: torch.cat(v) for k, v in defined.items()}


def _rho_block(cov: _Covariances, whitening: _Whitening, w: Tensor, rows: slice,
               patterns: dict[str, tuple[Tensor, Tensor]], rtol: float):
    """``rho`` of the neurons ``rows`` (one block) for every estimator."""
    c_y = w @ cov.sigma_x                                  # cov(x, y) = Sigma_x w
    var_y = (c_y * w).sum(1)
    var_f = var_y + whitening.variance_added(w)            # w^T Sigma_f w
    trace_x = cov.sigma_x.diagonal().sum()
    y_constant = var_y <= ZERO_VARIANCE_RTOL * (w * w).sum(1) * trace_x
    # y_+ = y for a neuron that is always active, y_+ = 0 for one never active: there the
    # estimator is linear-type with a = a_+ (resp. a_-), and c_+ is known exactly
    n_pos = cov.n_pos[rows]
    always, never = n_pos == cov.n, n_pos == 0
    c_pos = torch.where(always[:, None], c_y, cov.c_pos[rows])
    c_pos = torch.where(never[:, None], torch.zeros_like(c_pos), c_pos)
    var_pos = torch.where(never, torch.zeros_like(var_y), cov.var_pos[rows])
    c_pos_white = whitening.whiten(c_pos)
    s = var_pos - (c_pos_white ** 2).sum(1)
    s = torch.maximum(s, rtol * var_pos).clamp(min=torch.finfo(s.dtype).tiny)
    cov_y = torch.stack([torch.stack([cov.var_pos[rows], cov.cov_pos_neg[rows]], 1),
                         torch.stack([cov.cov_pos_neg[rows], cov.var_neg[rows]], 1)], 1)

    rho, defined = {}, {}
    for name, (a_pos, a_neg) in patterns.items():
        linear_type = a_pos is a_neg
        a = torch.stack([_rows(a_pos)[rows].to(w.device), _rows(a_neg)[rows].to(w.device)], 1)
        a_white = whitening.whiten(a[:, :1] if linear_type else a)
        gram_a = _gram(a_white, a_white)
        w_dot_a = (a @ w[:, :, None])[:, :, 0]
        kappa = 1 - w_dot_a
        # w^T a = 1 up to round-off for every estimator here; only a fallback pattern differs
        kappa = torch.where(kappa.abs() <= KAPPA_RTOL * a.norm(dim=2) * w.norm(dim=1)[:, None],
                            torch.zeros_like(kappa), kappa)
        if linear_type:
            e = unexplained_linear(gram_a[:, 0, 0], w_dot_a[:, 0], var_f, kappa[:, 0] == 0)
        else:
            one_sided = torch.where(
                always, unexplained_linear(gram_a[:, 0, 0], w_dot_a[:, 0], var_f, kappa[:, 0] == 0),
                unexplained_linear(gram_a[:, 1, 1], w_dot_a[:, 1], var_f, kappa[:, 1] == 0))
            cross = (a_white @ c_pos_white[:, :, None])[:, :, 0]
            two_sided = unexplained_two_sided(gram_a, cross, s, w_dot_a, kappa, var_f)
            e = torch.where(always | never, one_sided, two_sided)
        c = torch.stack([c_pos, c_y - c_pos], 1)
        ok = ~(y_constant | _distractor_constant(trace_x, a, c, cov_y))
        value = e / (1 + (1 - e).sqrt())  # = 1 - sqrt(1 - e), accurate for small e
        rho[name] = torch.where(ok, value, torch.full_like(value, math.nan))
        defined[name] = ok
    return rho, defined


def _distractor_constant(trace_x: Tensor, a: Tensor, c: Tensor, cov_y: Tensor) -> Tensor:
    """``trace(Sigma_d) <= ZERO_VARIANCE_RTOL * (trace(Sigma_x) + trace(cov(S(x))))``.

    ``Sigma_d = Sigma_x - A C^T - C A^T + A cov((y_+, y_-)) A^T`` with ``A = [a_+, a_-]``
    and ``C = [c_+, c_-]``.
    """
    signal = (cov_y * _gram(a, a)).sum((1, 2))
    trace_d = trace_x - 2 * _gram(a, c).diagonal(dim1=1, dim2=2).sum(1) + signal
    return trace_d <= ZERO_VARIANCE_RTOL * (trace_x + signal.abs())


# ----------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------
@dataclass
class QualityResult:
    """``rho(S)`` per layer and estimator.

    Attributes
    ----------
    layers : list[str]
        Layer names in forward order.
    estimators : tuple[str, ...]
    per_neuron : dict[str, dict[str, Tensor]]
        ``per_neuron[layer][estimator]``: ``(J,)`` float64, NaN where undefined.
    defined : dict[str, dict[str, Tensor]]
        ``defined[layer][estimator]``: ``(J,)`` bool.
    mean : dict[str, dict[str, float]]
        Mean ``rho`` over the defined neurons (NaN only if none is defined).
    samples : dict[str, int]
        Samples per layer (images x output positions).
    dims : dict[str, int]
        Inputs per sample ``D``.
    ridge, seed : float, int
        The settings used.
    """

    layers: list[str]
    estimators: tuple[str, ...]
    per_neuron: dict[str, dict[str, Tensor]]
    defined: dict[str, dict[str, Tensor]]
    mean: dict[str, dict[str, float]]
    samples: dict[str, int]
    dims: dict[str, int]
    ridge: float = 0.0
    seed: int = 0

    def undefined(self, layer: str) -> int:
        """The number of neurons of ``layer`` left out of the mean (any estimator)."""
        masks = list(self.defined[layer].values())
        return int((~torch.stack(masks).all(0)).sum()) if masks else 0

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{layer: {estimator: mean rho}}``."""
        return {layer: dict(self.mean[layer]) for layer in self.layers}

    def table(self) -> str:
        """The means as a text table, one row per layer."""
        width = max([len("layer")] + [len(n) for n in self.layers]) + 2
        head = f"{'layer':<{width}}" + "".join(f"{e:>15}" for e in self.estimators) \
            + f"{'samples':>12}{'D':>7}{'undefined':>11}"
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            values = "".join(f"{self.mean[layer][e]:>15.4f}" for e in self.estimators)
            lines.append(f"{layer:<{width}}{values}{self.samples[layer]:>12,}"
                         f"{self.dims[layer]:>7}{self.undefined(layer):>11}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------
def _select(plan: Plan, layers: Sequence[str] | None) -> Plan:
    if layers is None:
        return plan
    if isinstance(layers, str):
        layers = [layers]
    unknown = [name for name in layers if name not in plan.names]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; the model's layers are {plan.names}")
    return Plan([layer for layer in plan if layer.name in set(layers)], plan.input_shape)


def _check_estimators(estimators: Sequence[str], patterns) -> tuple[str, ...]:
    if isinstance(estimators, str):
        estimators = (estimators,)
    estimators = tuple(estimators)
    if not estimators:
        raise ValueError(f"give at least one estimator of {ESTIMATORS}")
    for name in estimators:
        if name == "identity":
            estimator_patterns(name, torch.zeros(1, 1))  # raises UndefinedQualityError
        if name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")
    if patterns is None and {"linear", "two_component"} & set(estimators):
        raise ValueError("the estimators 'linear' and 'two_component' need fitted patterns: "
                         "pass patterns=toolkit.fit_patterns(model, fitting_data)")
    return estimators


def collect_moments(model: nn.Module, data, *, layers: Sequence[str] | None = None,
                    device=None, max_batches: int | None = None, progress: bool = True,
                    batch_size: int = 64, mask: str = DEFAULT_MASK
                    ) -> tuple[Plan, dict[str, LayerMoments]]:
    """Stream ``data`` through ``model`` once and accumulate :class:`LayerMoments` per layer.

    Returns the plan of the measured layers and their moments. See :func:`layer_quality`
    for the parameters.
    """
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    if device != model_device:
        model = copy.deepcopy(model).to(device)
    plan, moments, shape = None, None, None
    rank, world = rank_and_world()
    bar = progress_bar(data, max_batches, progress and rank == 0, "layer quality")
    with evaluation_mode(model), torch.no_grad():
        for index, x in own_batches(_input_batches(data, batch_size), rank, world, is_sharded(data)):
            if max_batches is not None and index >= max_batches:
                break
            _check_inputs(x, index)
            x = x.to(device)
            if plan is None:
                try:
                    plan = _select(trace(model, x), layers)
                except RuntimeError as error:
                    raise ValueError(f"the model cannot run on inputs of shape {tuple(x.shape)}: "
                                     f"{error}") from error
                shape = tuple(x.shape[1:])
                moments = {layer.name: LayerMoments.zeros(layer.weight()[0].numel(), layer.out_features,
                                                          device)
                           for layer in plan}
                masks = ActivityMasks(model, plan, mask)
            elif tuple(x.shape[1:]) != shape:
                raise ValueError(f"batch {index}: inputs of shape {tuple(x.shape)} differ from the "
                                 f"first batch's per-sample shape {shape}")

            def observe(layer, layer_input, output, active):
                moments[layer.name].update(layer, layer_input, output, active)

            with masks.observe(model, observe):
                model(x)
            bar.update(1)
    bar.close()
    if world > 1:
        check_all_ranks_have_data(plan is not None, device)
    if plan is None:
        raise ValueError("data holds no batches: nothing to measure the quality on")
    if world > 1:
        for m in moments.values():
            m.all_reduce()
    return plan, moments


def layer_quality(model: nn.Module, patterns, data, estimators: Sequence[str] = ESTIMATORS, *,
                  layers: Sequence[str] | None = None, device=None, max_batches: int | None = None,
                  progress: bool = True, seed: int = 0, ridge: float = 0.0, rtol: float = 1e-12,
                  batch_size: int = 64, mask: str = DEFAULT_MASK) -> QualityResult:
    """Measure ``rho(S)`` of signal estimators for every Conv2d/Linear layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        A network of the supported modules (:data:`toolkit.layers.SUPPORTED_MODULES`),
        evaluated in eval mode; it is not changed.
    patterns : toolkit.patterns.Patterns or None
        Patterns fitted for ``model`` (checked); needed for ``linear`` and
        ``two_component``, may be None for ``random`` and ``filter`` only.
    data : Tensor or iterable
        Inputs NOT used to fit the patterns: a tensor of inputs, or an iterable (e.g. a
        DataLoader) of tensors or ``(inputs, labels)`` pairs. The result does not depend
        on how the data is cut into batches (up to float64 round-off).
    estimators : sequence of str
        Any of :data:`ESTIMATORS`. ``"identity"`` raises
        :class:`toolkit.linear.UndefinedQualityError` (its distractor is 0).
    layers : sequence of str, optional
        Names of the layers to measure (default all); the others cost nothing.
    device : torch.device or str, optional
        Where to compute (default: the model's device; otherwise a copy of the model is
        moved there).
    max_batches : int, optional
        Stop after this many batches.
    progress : bool
        Show a tqdm progress bar.
    seed : int
        Seed of the random baseline's directions (:func:`random_pattern`; the same seed
        for every layer).
    ridge : float
        Relative Tikhonov term: ``ridge * trace(Sigma_x) / D`` is added to ``Sigma_x``
        (default 0: the exact measure).
    rtol : float
        Floor under the eigenvalues of ``Sigma_x``, relative to the largest (see the
        module docstring).
    batch_size : int
        Batch size when ``data`` is a tensor.
    mask : {"output", "relu_input"}
        The activity mask of the two-sided estimators (``y_+ = y [mask]``); give the one
        the patterns were fitted with (:func:`toolkit.fit_patterns`, ``mask``).

    Returns
    -------
    QualityResult

    Warns
    -----
    RuntimeWarning
        For layers with ``n <= D + 1`` samples, where ``max_v corr = 1`` trivially.
    """
    estimators = _check_estimators(estimators, patterns)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, not {ridge}")
    plan, moments = collect_moments(model, data, layers=layers, device=device,
                                    max_batches=max_batches, progress=progress, batch_size=batch_size,
                                    mask=mask)
    if patterns is not None:
        patterns.check(model, plan)
    few = [f"{layer.name} (n={int(moments[layer.name].n)}, D={moments[layer.name].dim})"
           for layer in plan if moments[layer.name].n <= moments[layer.name].dim + 1]
    if few and ridge == 0:
        warnings.warn(
            f"layers {', '.join(few)} have no more samples than inputs (n <= D + 1): the best "
            "linear read-out of the distractor fits y perfectly and rho is 0 whatever the "
            "estimator; measure on more data or set ridge > 0", RuntimeWarning, stacklevel=2)

    per_neuron, defined, mean, samples, dims = {}, {}, {}, {}, {}
    for layer in plan:
        weight = layer.weight().to(torch.float64)
        layer_patterns = patterns[layer.name] if patterns is not None else None
        directions = {name: estimator_patterns(name, weight, layer_patterns, seed)
                      for name in estimators}
        m = moments[layer.name]
        per_neuron[layer.name], defined[layer.name] = rho_from_moments(
            m, weight, directions, ridge=ridge, rtol=rtol)
        mean[layer.name] = {name: _masked_mean(per_neuron[layer.name][name], defined[layer.name][name])
                            for name in estimators}
        samples[layer.name], dims[layer.name] = int(m.n), m.dim
    return QualityResult(plan.names, estimators, per_neuron, defined, mean, samples, dims, ridge, seed)


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan
