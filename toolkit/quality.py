"""How good is a signal estimator? ``rho(S)`` for every neuron layer of a network.

For one neuron with filter ``w``, an estimator ``S`` splits each input ``x`` (for a
convolution: each receptive-field patch of the neuron's group of channels) into an
estimated signal ``S(x)`` and an estimated distractor ``d = x - S(x)``; the quality is::

    rho(S) = 1 - max_v corr(v^T d, y),    y = w^T x  (no bias)

``rho = 1``: no linear read-out of ``d`` predicts ``y``; lower is worse. The maximum is
computed in closed form from float64 second moments streamed in one pass
(:class:`LayerMoments`), per neuron with 2 x 2 matrices only and no loop over neurons,
for the estimators ``random``, ``filter`` (S_w), ``linear`` (S_a) and ``two_component``
(S_a+-); the identity estimator has no quality and raises
:class:`toolkit.linear.UndefinedQualityError`. :func:`layer_quality` measures every
layer of a model; :class:`QualityResult` holds the per-neuron values and the layer
means over the neurons whose value is defined.

Measure on data the patterns were not fitted on. The derivation of the closed form, the
eigenvalue floor ``rtol``, the option ``ridge``, undefined neurons and the sample-size
warning are in docs/math.md, section 4.

**Groups.** A neuron of a grouped or depthwise convolution reads only its group of the
input channels (:mod:`toolkit.layers.adapters`), so the moments of the inputs are kept
per group (``G`` groups, ``D`` inputs per neuron: ``sum_xx`` is ``G x D x D``), and the
closed form solves each group's neurons against its own input covariance, batched over
the groups. A layer of one group (Linear, an ordinary convolution) keeps the shapes
without a group axis.

**Layers without a quality.** A neuron with one input (a standalone BatchNorm, ``D = 1``)
has ``w^T a = 1`` for every estimator, so its signal is ``a y = x``, its distractor 0 and
``rho`` undefined, as for the identity estimator. :func:`layer_quality` skips such
layers (they are named in :attr:`QualityResult.skipped` and under its table) and refuses
them where ``layers=`` names them (docs/math.md, section 4.5).

Memory: the shared moment is ``G x D x D`` float64 per layer (``D`` the patch size of a
group): about 5 GB for the first dense layer of VGG16, 170 MB for a 512-channel 3 x 3
convolution. Groups make it ``G`` times smaller than the same layer without groups
(``G D^2 = (G D)^2 / G``): 21 MB for a ResNeXt 3 x 3 convolution of 32 groups of 32
channels (``D = 288``), 0.6 MB for MobileNetV2's 960-channel depthwise convolution
(``D = 9``). Per neuron the sums are ``J x D``; a batch is unfolded in pieces of
:data:`PATCH_CHUNK_ELEMENTS` numbers; the closed form holds up to four copies of the
shared moment. Use ``layers=`` to measure a subset and ``device=`` to compute on a GPU;
``benchmarks/layer_quality.py`` times a model.

``layer_quality(..., intervals="split_half")`` (or ``"bootstrap"``) also gives every layer
mean an interval, from moments kept per block of images (:class:`BlockMoments`):
:meth:`QualityResult.interval` and, for rankings, :meth:`QualityResult.difference`. The
split-half estimate evaluates ``rho`` on random halves of the blocks (twenty evaluations
per layer); the bootstrap resamples the blocks (some hundred evaluations), and since a
resample with repeated images acts like fewer samples, its ``rho`` is biased low and its
interval lies below the estimate.

``layer_quality(..., regime="active")`` measures each neuron only over the samples where
it is active (``z > 0``), from per-neuron active moments (:class:`ActiveLayerMoments`,
``K x D x D`` for ``K`` measured neurons; ``neurons=`` measures a reproducible subset of
a big layer): docs/math.md, section 4.6.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.distributed import broadcast_from_rank_0, sum_over_ranks
from toolkit.estimators import ESTIMATORS, MEASURABLE
from toolkit.layers import Layer, Plan, per_neuron
from toolkit.streaming import model_device_and_dtype, same_device, stream
from toolkit.linear import UndefinedQualityError

__all__ = [
    "MEASURABLE",
    "UndefinedQualityError",
    "LayerMoments",
    "QualityResult",
    "layer_quality",
    "random_pattern",
    "filter_pattern",
    "estimator_directions",
    "rho_from_moments",
    "rho_active_from_moments",
    "ActiveLayerMoments",
    "REGIMES",
    "ONE_INPUT",
    "inputs_per_neuron",
    "active_regime_neurons",
    "collect_moments",
    "unexplained_linear",
    "unexplained_two_sided",
    "INTERVAL_METHODS",
    "BlockMoments",
]

#: Over which samples each neuron is measured: all of them, or those where it is active.
REGIMES = ("all", "active")
#: The active regime's per-neuron moments of a layer may hold at most this many float64
#: numbers (``K D^2``, 1 GiB); beyond it ``layer_quality`` asks for ``neurons=``.
ACTIVE_MOMENT_ELEMENTS = 2 ** 27

#: At most this many float64 numbers of unfolded patches are held at a time.
PATCH_CHUNK_ELEMENTS = 2 ** 24
#: Neurons are processed in blocks of about this many float64 numbers (``J x D``).
NEURON_BLOCK_ELEMENTS = 2 ** 23
#: A variance below this fraction of its scale counts as zero (see module docstring).
ZERO_VARIANCE_RTOL = 1e-12
#: ``|1 - w^T a|`` below this times ``|w| |a|`` is round-off: ``w^T a = 1``.
KAPPA_RTOL = 1e-8
#: Why :func:`layer_quality` skips a layer whose neurons have one input each (a standalone
#: BatchNorm): docs/math.md, section 4.5.
ONE_INPUT = "one input per neuron: every estimator's signal is the input, its distractor 0, rho undefined"


def _kappa_rtol(*patterns: Tensor) -> float:
    """:data:`KAPPA_RTOL`, plus the round-off of patterns held in a narrower dtype than
    float64: rounding each entry of ``a`` to float32 moves ``w^T a`` by up to
    ``eps_32 / 2 * sum_i |w_i a_i| <= eps_32 / 2 |w| |a|``."""
    widest = max((torch.finfo(p.dtype).eps for p in patterns if p.dtype != torch.float64), default=0.0)
    return KAPPA_RTOL + widest


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------
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


def estimator_directions(name: str, weight: Tensor, layer_patterns=None, seed: int = 0
                         ) -> tuple[Tensor, Tensor]:
    """``(a_+, a_-)`` of the estimator ``name`` for one layer, float64 weight-shaped, as
    :data:`toolkit.estimators.ESTIMATORS` says where its pattern comes from.

    The linear-type estimators return the same tensor twice.
    """
    _check_measurable(name)
    estimator = ESTIMATORS[name]
    if estimator.pattern == "random":
        a = random_pattern(weight, seed).to(weight.device)
        return a, a
    if estimator.pattern == "filter":
        a = filter_pattern(weight)
        return a, a
    if layer_patterns is None:
        raise ValueError(f"the estimator {name!r} needs fitted patterns (toolkit.fit_patterns)")
    kinds = estimator.pattern_kinds
    return getattr(layer_patterns, kinds[0]), getattr(layer_patterns, kinds[-1])


def _check_measurable(name: str) -> None:
    """Raise for an estimator without a quality (the identity) or an unknown name."""
    if name in ESTIMATORS and not ESTIMATORS[name].measurable:
        raise UndefinedQualityError(
            "the identity estimator S_x(x) = x leaves the distractor d = x - S_x(x) = 0, so "
            "corr(v^T d, y) is 0/0 for every v and rho(S_x) is undefined; measure the "
            f"estimators {MEASURABLE}"
        )
    if name not in MEASURABLE:
        raise ValueError(f"unknown estimator {name!r}; choose from {MEASURABLE}")


# ----------------------------------------------------------------------------------
# streamed moments
# ----------------------------------------------------------------------------------
def _patch_chunks(layer: Layer, x: Tensor, z: Tensor, per_sample: int):
    """The batch in pieces of at most :data:`PATCH_CHUNK_ELEMENTS` patch numbers:
    ``(patches (S, G, D) float64, neuron values (S, J), samples per image)``."""
    images = x.shape[0]
    positions = layer.neuron_values(z[:1]).shape[0]
    chunk = max(1, PATCH_CHUNK_ELEMENTS // max(1, positions * per_sample))
    for start in range(0, images, chunk):
        yield (layer.group_patches(x[start:start + chunk].to(torch.float64)),
               layer.neuron_values(z[start:start + chunk].detach()), positions)


@dataclass
class LayerMoments:
    """Running float64 sums of one layer; everything ``rho`` is computed from.

    The inputs are shifted by ``shift`` (the mean input of the first image) before they
    are summed, which keeps ``Sigma_x = S_xx / n - m m^T`` accurate when the inputs'
    mean is large compared with their spread; covariances do not depend on the shift.

    Shapes (``D`` inputs per sample, ``J`` neurons, ``G`` groups: a neuron reads one
    group of the input channels, see :mod:`toolkit.layers.adapters`)::

        n          ()         samples (images x output positions)
        shift      (G, D)     subtracted from every input of the group
        sum_x      (G, D)     sum of x - shift
        sum_xx     (G, D, D)  sum of (x - shift)(x - shift)^T -- shared by a group's neurons
        n_pos      (J,)       samples with z > 0
        sum_y_pos  (J,)       sum of y_+ = y [z > 0]
        sum_y_pos2 (J,)       sum of y_+^2
        sum_y_neg  (J,)       sum of y_- = y - y_+
        sum_y_neg2 (J,)       sum of y_-^2
        sum_xy_pos (J, D)     sum of (x - shift) y_+, x the inputs of the neuron's group

    A layer of one group (a Linear layer, an ungrouped convolution) has no group axis:
    ``shift`` and ``sum_x`` are ``(D,)``, ``sum_xx`` is ``(D, D)``.
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
    def zeros(cls, dim: int, neurons: int, device=None, groups: int = 1) -> "LayerMoments":
        if groups < 1 or neurons % groups:
            raise ValueError(f"{neurons} neurons cannot be split into {groups} groups")
        kw = dict(dtype=torch.float64, device=device)
        lead = () if groups == 1 else (groups,)
        return cls(
            n=torch.zeros((), **kw), shift=torch.zeros(*lead, dim, **kw),
            sum_x=torch.zeros(*lead, dim, **kw), sum_xx=torch.zeros(*lead, dim, dim, **kw),
            n_pos=torch.zeros(neurons, **kw), sum_y_pos=torch.zeros(neurons, **kw),
            sum_y_pos2=torch.zeros(neurons, **kw), sum_y_neg=torch.zeros(neurons, **kw),
            sum_y_neg2=torch.zeros(neurons, **kw), sum_xy_pos=torch.zeros(neurons, dim, **kw),
        )

    @property
    def dim(self) -> int:
        """``D``, the inputs of one neuron."""
        return self.sum_x.shape[-1]

    @property
    def groups(self) -> int:
        """``G``, the groups of inputs."""
        return 1 if self.sum_x.dim() == 1 else self.sum_x.shape[0]

    def grouped(self, name: str) -> Tensor:
        """The shared sum ``name`` (``shift``, ``sum_x`` or ``sum_xx``) with its group
        axis, also for one group: a view, ``(G, D)`` or ``(G, D, D)``."""
        t = getattr(self, name)
        return t.view(self.groups, *t.shape[t.dim() - (2 if name == "sum_xx" else 1):])

    def update(self, layer: Layer, x: Tensor, z: Tensor, active: Tensor | None = None) -> None:
        """Add one batch: layer input ``x`` and layer output ``z`` (bias included).

        ``y = w^T x`` is recomputed in float64 from the patches (the model's own output
        may be float32); the activity mask is ``z > 0`` as in fitting, or ``active``
        (bool, shaped like ``z``) when given (:mod:`toolkit.layers.activity`).
        """
        z = z if active is None else active.to(z.dtype)   # only its sign is used below
        w = _rows(layer.weight()).to(self.sum_xx.device)
        for patches, values, positions in _patch_chunks(layer, x, z, self.groups * self.dim):
            if self.n == 0:
                self.shift = patches[:positions].mean(0).reshape(self.shift.shape)
            self._add(patches - self.grouped("shift"), values > 0, w)

    def reshift(self, shift: Tensor) -> None:
        """Express the sums relative to another ``shift`` (exactly: every sum is a
        polynomial in the shift), so that moments of different processes can be added."""
        delta = (self.shift - shift).view(self.groups, 1, -1)  # x - shift = (x - self.shift) + delta
        sum_x = self.grouped("sum_x")[:, None, :]
        self.grouped("sum_xx").baddbmm_(sum_x.mT, delta).baddbmm_(delta.mT, sum_x) \
            .baddbmm_(delta.mT, delta, alpha=float(self.n))
        self.sum_xy_pos += self.sum_y_pos[:, None] * per_neuron(delta[:, 0], self.sum_y_pos.shape[0])
        self.sum_x += self.n * delta.view(self.sum_x.shape)
        self.shift = shift.clone()

    # -- the accumulator interface of toolkit.streaming ----------------------------
    def flush(self) -> None:
        """Nothing is buffered: every batch is added at once."""

    def settings(self) -> dict:
        return {"moments": "LayerMoments"}

    def state(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        for name, t in tensors.items():
            setattr(self, name, t)

    def all_reduce(self) -> None:
        """Sum the moments of all ``torch.distributed`` ranks in place, after moving them
        to rank 0's shift."""
        self.reshift(broadcast_from_rank_0(self.shift.clone()))
        sum_over_ranks(getattr(self, f.name) for f in fields(self) if f.name != "shift")

    def _add(self, patches: Tensor, active: Tensor, w: Tensor) -> None:
        """Add the shifted ``patches`` ``(S, G, D)`` with the activity ``(S, J)``: one
        batched product per sum, the groups as the batch."""
        samples, neurons = active.shape
        groups = self.groups
        by_group = patches.transpose(0, 1)                           # (G, S, D)
        w_group = w.view(groups, neurons // groups, -1)              # (G, J / G, D)
        offset = w_group @ self.grouped("shift")[:, :, None]         # w^T shift
        y = torch.baddbmm(offset.mT, by_group, w_group.mT)           # w^T x, (G, S, J / G)
        y = y.transpose(0, 1).reshape(samples, neurons)
        y_pos = y * active
        y_neg = y - y_pos
        self.n += samples
        self.grouped("sum_x").add_(patches.sum(0))
        self.grouped("sum_xx").baddbmm_(by_group.mT, by_group)
        self.n_pos += active.sum(0)
        self.sum_y_pos += y_pos.sum(0)
        self.sum_y_pos2 += (y_pos * y_pos).sum(0)
        self.sum_y_neg += y_neg.sum(0)
        self.sum_y_neg2 += (y_neg * y_neg).sum(0)
        y_pos_group = y_pos.view(samples, groups, -1).permute(1, 2, 0)   # (G, J / G, S)
        self.sum_xy_pos.view(groups, neurons // groups, -1).baddbmm_(y_pos_group, by_group)


@dataclass
class ActiveLayerMoments(LayerMoments):
    """:class:`LayerMoments` plus, for selected neurons, the moments of their *active* samples.

    The active regime measures each neuron only on the samples where it is active
    (``z > 0``, bias included, the mask of fitting); each neuron has its own samples and
    so its own input covariance. Relative to the ``shift`` of the neuron's group::

        neurons     (K,)       indices of the neurons measured (int64, sorted)
        n_act       (K,)       samples with z_k > 0
        sum_x_act   (K, D)     sum over them of x - shift
        sum_xx_act  (K, D, D)  sum over them of (x - shift)(x - shift)^T

    ``sum_xx_act`` is ``8 K D^2`` bytes, which is why only ``K`` of the ``J`` neurons
    may be chosen (see :func:`layer_quality`'s ``neurons``). Per sample it costs
    ``D^2`` multiply-adds for every measured neuron that is active on it.
    The interface is that of :class:`LayerMoments`: ``update(layer, x, z)`` and
    ``all_reduce()``.
    """

    neurons: Tensor
    n_act: Tensor
    sum_x_act: Tensor
    sum_xx_act: Tensor

    @classmethod
    def zeros(cls, dim: int, neurons: int, device=None, measured: Tensor | None = None,
              groups: int = 1) -> "ActiveLayerMoments":
        """Empty sums; ``measured`` are the indices of the neurons measured (default all)."""
        shared = LayerMoments.zeros(dim, neurons, device, groups)
        index = torch.arange(neurons) if measured is None else torch.as_tensor(measured).long()
        k = index.numel()
        kw = dict(dtype=torch.float64, device=device)
        return cls(**{f.name: getattr(shared, f.name) for f in fields(LayerMoments)},
                   neurons=index.to(device), n_act=torch.zeros(k, **kw),
                   sum_x_act=torch.zeros(k, dim, **kw), sum_xx_act=torch.zeros(k, dim, dim, **kw))

    @property
    def neuron_groups(self) -> Tensor:
        """The group of each measured neuron, ``(K,)``."""
        return self.neurons // (self.n_pos.shape[0] // self.groups)

    def _add(self, patches: Tensor, active: Tensor, w: Tensor) -> None:
        """Add one piece to the shared sums and to the active sums of the measured
        neurons, each from the patches of its group."""
        super()._add(patches, active, w)
        active = active[:, self.neurons.to(active.device)]
        self.n_act += active.sum(0)
        for k, group in enumerate(self.neuron_groups.tolist()):
            rows = patches[:, group][active[:, k]]
            self.sum_x_act[k] += rows.sum(0)
            self.sum_xx_act[k].addmm_(rows.T, rows)

    def reshift(self, shift: Tensor) -> None:
        delta = (self.shift - shift).view(self.groups, -1)[self.neuron_groups]   # (K, D)
        outer = self.sum_x_act[:, :, None] * delta[:, None, :]
        self.sum_xx_act += outer + outer.transpose(1, 2) \
            + self.n_act[:, None, None] * delta[:, :, None] * delta[:, None, :]
        self.sum_x_act += self.n_act[:, None] * delta
        super().reshift(shift)

    def all_reduce(self) -> None:
        self.reshift(broadcast_from_rank_0(self.shift.clone()))
        sum_over_ranks(getattr(self, f.name) for f in fields(self)
                       if f.name not in ("shift", "neurons"))


@dataclass
class _Covariances:
    """Population covariances of one layer (see the module docstring for the names)."""

    n: int
    sigma_x: Tensor      # (G, D, D)
    mean_x: Tensor       # (G, D)  mean of x - shift
    n_pos: Tensor        # (J,)  samples with z > 0
    mean_pos: Tensor     # (J,)  E[y_+]
    mean_neg: Tensor     # (J,)  E[y_-]
    var_pos: Tensor      # (J,)
    var_neg: Tensor      # (J,)
    cov_pos_neg: Tensor  # (J,)  -E[y_+] E[y_-]
    c_pos: Tensor        # (J, D) cov(x, y_+), x the inputs of the neuron's group

    @classmethod
    def of(cls, m: LayerMoments) -> "_Covariances":
        n = float(m.n)
        mean_x = m.grouped("sum_x") / n
        sigma = (m.grouped("sum_xx") / n).baddbmm_(mean_x[:, :, None], mean_x[:, None, :],
                                                   alpha=-1)  # one copy of the sums
        mean_pos, mean_neg = m.sum_y_pos / n, m.sum_y_neg / n
        return cls(
            n=int(m.n), sigma_x=sigma, mean_x=mean_x, n_pos=m.n_pos,
            mean_pos=mean_pos, mean_neg=mean_neg,
            var_pos=m.sum_y_pos2 / n - mean_pos ** 2,
            var_neg=m.sum_y_neg2 / n - mean_neg ** 2,
            cov_pos_neg=-mean_pos * mean_neg,
            c_pos=m.sum_xy_pos / n - mean_pos[:, None] * per_neuron(mean_x, m.n_pos.shape[0]),
        )


# ----------------------------------------------------------------------------------
# the closed form
# ----------------------------------------------------------------------------------
@dataclass
class _Whitening:
    """``Sigma_f^-1/2`` through the Cholesky factors of ``Sigma_f = Sigma + jitter I``, for
    a batch of covariances ``(B, D, D)`` (one per group of a layer, or one per neuron).

    ``jitter = rtol * lambda_max + ridge * trace(Sigma) / D`` per matrix: the first term
    is a floor under the eigenvalues (directions in which the inputs are constant get a
    tiny variance instead of none), the second the optional Tikhonov term. If round-off
    still leaves ``Sigma_f`` indefinite its jitter is raised tenfold, with a warning. A
    matrix of zeros (every input constant: every neuron on it is undefined) gets
    ``Sigma_f = I``.
    """

    factor: Tensor  # (B, D, D) lower triangular, Sigma_f = L L^T
    jitter: Tensor  # (B,)

    @classmethod
    def of(cls, sigma: Tensor, ridge: float, rtol: float) -> "_Whitening":
        dim = sigma.shape[-1]
        trace = sigma.diagonal(dim1=1, dim2=2).sum(1)
        jitter = rtol * _largest_eigenvalues(sigma) + ridge * trace / dim
        jitter = torch.where(trace > 0, jitter, torch.ones_like(jitter))
        shifted = sigma.clone()
        diagonal = shifted.diagonal(dim1=1, dim2=2)
        diagonal.add_(jitter[:, None])
        for _ in range(8):
            factor, info = torch.linalg.cholesky_ex(shifted)
            bad = info != 0
            if not bad.any():
                return cls(factor, jitter)
            diagonal.add_(torch.where(bad, 9 * jitter, torch.zeros_like(jitter))[:, None])
            jitter = torch.where(bad, 10 * jitter, jitter)
            worst = float((jitter / torch.where(trace > 0, trace, torch.ones_like(trace)))[bad].max())
            warnings.warn(f"an input covariance is indefinite by round-off; raising its floor to "
                          f"{worst:.1e} of its trace", RuntimeWarning, stacklevel=4)
        raise RuntimeError("could not factorise an input covariance (is it finite?)")

    def whiten(self, rows: Tensor, batch: slice = slice(None)) -> Tensor:
        """``L^-1 u`` for every row ``u`` of ``rows`` ``(b, m, D)``, row block ``i`` with
        the factor ``batch`` of its matrix; then ``(L^-1 u)^T (L^-1 v) = u^T Sigma_f^-1 v``."""
        return torch.linalg.solve_triangular(self.factor[batch], rows.mT, upper=False).mT


#: Matrices up to this size get their largest eigenvalue from ``torch.linalg.eigvalsh``
#: (faster there than power iteration), larger ones from power iteration.
EXACT_EIGENVALUES_UP_TO = 64


def _largest_eigenvalues(sigma: Tensor, iterations: int = 30, rtol: float = 1e-6) -> Tensor:
    """``lambda_max`` of each PSD matrix of a batch ``(B, D, D)``: exact up to
    :data:`EXACT_EIGENVALUES_UP_TO`, above it an estimate (power iteration from a fixed
    start, at most ``iterations`` steps, stopped early once every Rayleigh quotient changes
    by less than ``rtol`` over five steps) never below the largest diagonal entry or the
    mean eigenvalue. It sets the scale of an eigenvalue floor, so a relative error far
    above round-off is harmless."""
    if sigma.shape[-1] <= EXACT_EIGENVALUES_UP_TO:  # small matrices: exact, and faster
        return torch.linalg.eigvalsh(sigma)[:, -1].clamp(min=0)
    v = torch.ones(sigma.shape[:2], dtype=sigma.dtype, device=sigma.device)
    v[:, 1::2] = 0.5  # not orthogonal to a dominant direction of alternating sign either
    v = v / v.norm(dim=1, keepdim=True)
    rayleigh = None
    for step in range(1, iterations + 1):
        sigma_v = (sigma @ v[:, :, None])[:, :, 0]
        if step % 5 == 0 or step == iterations:
            previous, rayleigh = rayleigh, (v * sigma_v).sum(1)  # v has unit norm
            if previous is not None and bool(((rayleigh - previous).abs() <= rtol * rayleigh.abs()).all()):
                break
        v = sigma_v / sigma_v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
    diagonal = sigma.diagonal(dim1=1, dim2=2)
    return torch.maximum(rayleigh, torch.maximum(diagonal.max(1).values, diagonal.mean(1)))


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

    A layer of several groups is solved group by group, each group's neurons against
    its own input covariance (batched over the groups).

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
    rho = {name: [] for name in patterns}
    defined = {name: [] for name in patterns}
    for groups, rows in _neuron_blocks(cov.sigma_x.shape[0], j, dim):
        r, ok = _rho_block(cov, whitening, groups, w_all[rows], rows, patterns, rtol)
        for name in patterns:
            rho[name].append(r[name].cpu())
            defined[name].append(ok[name].cpu())
    return {k: torch.cat(v) for k, v in rho.items()}, {k: torch.cat(v) for k, v in defined.items()}


def _neuron_blocks(groups: int, neurons: int, dim: int):
    """``(groups, rows)`` slices that cut the neurons into blocks of about
    :data:`NEURON_BLOCK_ELEMENTS` numbers (``J x D``): whole groups together, or the
    neurons of one large group in pieces."""
    per_group = neurons // groups
    size = max(1, NEURON_BLOCK_ELEMENTS // dim)
    if per_group <= size:
        step = size // per_group
        for first in range(0, groups, step):
            last = min(first + step, groups)
            yield slice(first, last), slice(first * per_group, last * per_group)
        return
    for group in range(groups):
        for start in range(0, per_group, size):
            yield (slice(group, group + 1),
                   slice(group * per_group + start, group * per_group + min(start + size, per_group)))


def _rho_block(cov: _Covariances, whitening: _Whitening, groups: slice, w: Tensor, rows: slice,
               patterns: dict[str, tuple[Tensor, Tensor]], rtol: float):
    """``rho`` of the neurons ``rows`` (one block, the same number from each of the
    ``groups``) for every estimator."""
    count = groups.stop - groups.start
    per_group = w.shape[0] // count

    def whiten(t: Tensor) -> Tensor:  # (B, ..., D), the neurons in group order
        return whitening.whiten(t.reshape(count, -1, t.shape[-1]), groups).reshape(t.shape)

    def each(t: Tensor) -> Tensor:    # one value per group -> one per neuron
        return t.repeat_interleave(per_group)

    sigma = cov.sigma_x[groups]
    c_y = (w.reshape(count, per_group, -1) @ sigma).reshape(w.shape)   # cov(x, y) = Sigma_x w
    var_y = (c_y * w).sum(1)
    var_f = var_y + each(whitening.jitter[groups]) * (w * w).sum(1)   # w^T Sigma_f w
    trace_x = each(sigma.diagonal(dim1=1, dim2=2).sum(1))
    y_constant = var_y <= ZERO_VARIANCE_RTOL * (w * w).sum(1) * trace_x
    # y_+ = y for a neuron that is always active, y_+ = 0 for one never active: there the
    # estimator is linear-type with a = a_+ (resp. a_-), and c_+ is known exactly
    n_pos = cov.n_pos[rows]
    always, never = n_pos == cov.n, n_pos == 0
    c_pos = torch.where(always[:, None], c_y, cov.c_pos[rows])
    c_pos = torch.where(never[:, None], torch.zeros_like(c_pos), c_pos)
    var_pos = torch.where(never, torch.zeros_like(var_y), cov.var_pos[rows])
    c_pos_white = whiten(c_pos)
    s = var_pos - (c_pos_white ** 2).sum(1)
    s = torch.maximum(s, rtol * var_pos).clamp(min=torch.finfo(s.dtype).tiny)
    cov_y = torch.stack([torch.stack([cov.var_pos[rows], cov.cov_pos_neg[rows]], 1),
                         torch.stack([cov.cov_pos_neg[rows], cov.var_neg[rows]], 1)], 1)

    rho, defined = {}, {}
    for name, (a_pos, a_neg) in patterns.items():
        linear_type = a_pos is a_neg
        a = torch.stack([_block_rows(a_pos, rows, w), _block_rows(a_neg, rows, w)], 1)
        a_white = whiten(a[:, :1] if linear_type else a)
        gram_a = _gram(a_white, a_white)
        w_dot_a = (a @ w[:, :, None])[:, :, 0]
        kappa = 1 - w_dot_a
        # w^T a = 1 up to round-off for every estimator here; only a fallback pattern differs
        round_off = _kappa_rtol(a_pos, a_neg) * a.norm(dim=2) * w.norm(dim=1)[:, None]
        kappa = torch.where(kappa.abs() <= round_off, torch.zeros_like(kappa), kappa)
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


def _block_rows(pattern: Tensor, rows: slice, like: Tensor) -> Tensor:
    """The rows ``rows`` of a weight-shaped pattern, float64 on ``like``'s device (only
    the block is converted)."""
    return pattern.detach().reshape(pattern.shape[0], -1)[rows].to(like.device, torch.float64)


def rho_active_from_moments(moments: ActiveLayerMoments, weight: Tensor,
                            patterns: dict[str, tuple[Tensor, Tensor]], *, ridge: float = 0.0,
                            rtol: float = 1e-12) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``rho`` of the measured neurons on their active samples, for every estimator.

    On the samples where neuron ``j`` is active every estimator of the table above is
    linear-type, ``S(x) = a_+ y``, so its distractor is ``d = (I - a_+ w^T) x`` and,
    with ``Sigma_j`` the covariance of the inputs over the neuron's active samples::

        1 - R^2 = (w^T a_+)^2 / ((a_+^T Sigma_j^-1 a_+) (w^T Sigma_j w))

    (0 if ``w^T a_+ != 1``). ``Sigma_j`` gets the same eigenvalue floor and optional
    ridge as ``Sigma_x`` in the all-samples regime, one batched Cholesky factorisation
    per neuron (``K D^3 / 3``). A neuron is undefined (NaN) where it has at most
    ``D + 1`` active samples (the read-out would fit ``y`` perfectly: ``rho = 0`` for any
    estimator), where ``y`` or the distractor has no variance on its active samples.

    Returns
    -------
    rho, defined : dict[str, Tensor]
        ``(J,)`` per estimator, on the CPU; neurons not in ``moments.neurons`` are NaN
        and not defined.
    """
    index = moments.neurons.cpu()
    j_all, dim = weight.shape[0], moments.dim
    n = moments.n_act
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    mean = moments.sum_x_act / safe_n[:, None]
    sigma = moments.sum_xx_act / safe_n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    w = _rows(weight).to(sigma.device)[index.to(sigma.device)]
    var_y = ((w[:, None, :] @ sigma @ w[:, :, None])[:, 0, 0])
    trace_x = sigma.diagonal(dim1=1, dim2=2).sum(1)
    enough = n > dim + 1
    # a neuron with too few active samples is undefined whatever its covariance, which may not
    # even factorise (one sample: zero up to round-off); it is whitened with the identity
    eye = torch.eye(dim, dtype=sigma.dtype, device=sigma.device)
    whitening = _Whitening.of(torch.where(enough[:, None, None], sigma, eye), ridge, rtol)
    var_f = var_y + whitening.jitter * (w * w).sum(1)
    y_constant = var_y <= ZERO_VARIANCE_RTOL * (w * w).sum(1) * trace_x
    rho, defined = {}, {}
    for name, (a_pos, _) in patterns.items():
        a = _rows(a_pos).to(sigma.device)[index.to(sigma.device)]
        a_white = whitening.whiten(a[:, None, :])[:, 0]
        gram = (a_white * a_white).sum(1)
        w_dot_a = (a * w).sum(1)
        kappa = 1 - w_dot_a
        on_plane = kappa.abs() <= _kappa_rtol(a_pos) * a.norm(dim=1) * w.norm(dim=1)
        e = unexplained_linear(gram, w_dot_a, var_f, on_plane)
        # trace(Sigma_d) with Sigma_d = (I - a w^T) Sigma (I - w a^T)
        sigma_w = (sigma @ w[:, :, None])[:, :, 0]
        signal = (a * a).sum(1) * var_y
        trace_d = trace_x - 2 * (a * sigma_w).sum(1) + signal
        ok = enough & ~y_constant & (trace_d > ZERO_VARIANCE_RTOL * (trace_x + signal))
        value = e / (1 + (1 - e).sqrt())
        full = torch.full((j_all,), math.nan, dtype=torch.float64)
        full[index] = torch.where(ok, value, torch.full_like(value, math.nan)).cpu()
        mask = torch.zeros(j_all, dtype=torch.bool)
        mask[index] = ok.cpu()
        rho[name], defined[name] = full, mask
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
    regime : {"all", "active"}
        Whether each neuron was measured over all samples or over its active ones.
    neurons : dict[str, Tensor]
        For the active regime, the indices of the neurons measured per layer (the others
        are NaN and not counted as undefined); empty for the all-samples regime.
    skipped : dict[str, str]
        Layers of the model that were not measured, with the reason (:data:`ONE_INPUT`:
        a standalone BatchNorm, whose rho is undefined); they are not in ``layers``, and
        :meth:`table` names them below its rows.
    interval_methods : dict[str, str]
        Per layer, how its intervals were found (``"bootstrap"`` or ``"split_half"``);
        empty unless :func:`layer_quality` was asked for ``intervals``.
    replicates : dict[str, numpy.ndarray]
        Per layer, the layer means of every estimator (last axis, in the order of
        ``estimators``) on resampled images: ``(R, E)`` bootstrap replicates, or
        ``(S, 2, E)`` for ``S`` splits into two halves.
    blocks : dict[str, int]
        Per layer, the number of blocks of images that were resampled or split.
    confidence : float
        The coverage of :meth:`interval` and :meth:`difference`.
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
    regime: str = "all"
    neurons: dict[str, Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    interval_methods: dict[str, str] = field(default_factory=dict)
    replicates: dict[str, np.ndarray] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    confidence: float = 0.95

    def undefined(self, layer: str) -> int:
        """The number of measured neurons of ``layer`` left out of the mean (any estimator)."""
        masks = list(self.defined[layer].values())
        if not masks:
            return 0
        missing = ~torch.stack(masks).all(0)
        if layer in self.neurons:
            missing = missing[self.neurons[layer]]
        return int(missing.sum())

    def interval(self, layer: str, estimator: str):
        """The layer's mean ``rho`` of ``estimator`` with its interval
        (:class:`toolkit.intervals.Interval`); needs ``layer_quality(..., intervals=...)``."""
        return self._interval(layer, self.mean[layer][estimator], self._replicates(layer, estimator))

    def difference(self, layer: str, a: str, b: str):
        """``rho(a) - rho(b)`` of the layer with the interval of the *paired* difference
        (the same resampled images for both estimators): the interval a ranking needs."""
        return self._interval(layer, self.mean[layer][a] - self.mean[layer][b],
                              self._replicates(layer, a) - self._replicates(layer, b))

    def _replicates(self, layer: str, estimator: str) -> np.ndarray:
        if layer not in self.replicates:
            raise ValueError(f"no intervals for layer {layer!r}: measure with "
                             "layer_quality(..., intervals='split_half' or 'bootstrap')")
        if estimator not in self.estimators:
            raise KeyError(f"no estimator {estimator!r}; measured: {self.estimators}")
        return self.replicates[layer][..., self.estimators.index(estimator)]

    def _interval(self, layer: str, estimate: float, replicates: np.ndarray):
        from toolkit.intervals import Interval, normal_interval

        blocks, kind = self.blocks[layer], self.interval_methods[layer]
        if kind == "bootstrap":
            tail = 50 * (1 - self.confidence)
            low, high = np.percentile(replicates, [tail, 100 - tail])
            return Interval(float(estimate), float(low), float(high), self.confidence,
                            f"bootstrap over {blocks} blocks of images, {len(replicates)} resamples")
        halves = replicates[:, 0] - replicates[:, 1]
        error = math.sqrt(float(np.mean(halves ** 2))) / 2  # var(half) = 2 var(all)
        return normal_interval(estimate, error, self.confidence,
                               f"split-half, {len(replicates)} random halves of {blocks} blocks of images")

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{layer: {estimator: mean rho}}``."""
        return {layer: dict(self.mean[layer]) for layer in self.layers}

    def ideal_rho(self) -> dict[str, float]:
        """Per layer, roughly what an ideal estimator scores on a finite sample:
        ``1 - sqrt(D / (n - 1))``.

        Even a distractor that holds no information about ``y`` correlates with it by
        chance, and the best of ``D`` read-outs does so by about ``sqrt(D / n)`` on ``n``
        samples (``D`` = the inputs of a neuron; ``E[R^2] = D / (n - 1)`` for independent
        Gaussian data). A layer whose values come near this level needs more samples, not
        a better estimator. It is a rough guide, not a bound: a measured value can exceed
        it a little.
        """
        ideal = {}
        for layer in self.layers:
            d, n = self.dims[layer], self.samples[layer]
            ideal[layer] = 1 - math.sqrt(d / (n - 1)) if n > d + 1 else 0.0
        return ideal

    def table(self, decimals: int = 4, ideal: bool = False, intervals: bool = False) -> str:
        """The means as a text table, one row per layer, with the samples and ``D``.

        Parameters
        ----------
        decimals : int
            Digits of ``rho`` after the point.
        ideal : bool
            False: wide columns and, last, the number of neurons left out of the mean
            (the report of ``toolkit quality``). True: narrow columns and, last, the
            level of :meth:`ideal_rho` -- a short table that stays stable when rounded.
        intervals : bool
            Follow every mean by its interval ``[low, high]`` (:meth:`interval`).

        Layers that were not measured (:attr:`skipped`) are named below the rows, one
        line per reason.
        """
        if ideal:  # column widths: estimator, samples, D, last
            col, n_col, d_col, last_col = max(9, max(len(e) for e in self.estimators) + 2), 11, 6, 9
            samples, last = "{:>11}", ("ideal", self.ideal_rho())
        else:
            col, n_col, d_col, last_col = 15, 12, 7, 11
            samples, last = "{:>12,}", ("undefined", {k: self.undefined(k) for k in self.layers})
        if intervals:
            col = max(col, 3 * decimals + 14)

        def number(v: float, width: int) -> str:  # rounded first: no "-0.00"
            return f"{np.round(v, decimals) + 0.0:>{width}.{decimals}f}"

        def cell(layer: str, estimator: str) -> str:
            if not intervals:
                return number(self.mean[layer][estimator], col)
            return f"{self.interval(layer, estimator).format(decimals):>{col}}"

        width = max([len("layer")] + [len(n) for n in self.layers]) + 2
        head = (f"{'layer':<{width}}" + "".join(f"{e:>{col}}" for e in self.estimators)
                + f"{'samples':>{n_col}}{'D':>{d_col}}{last[0]:>{last_col}}")
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            values = "".join(cell(layer, e) for e in self.estimators)
            tail = number(last[1][layer], last_col) if ideal else f"{last[1][layer]:>{last_col}}"
            lines.append(f"{layer:<{width}}{values}{samples.format(self.samples[layer])}"
                         f"{self.dims[layer]:>{d_col}}{tail}")
        for reason in dict.fromkeys(self.skipped.values()):
            names = [layer for layer, why in self.skipped.items() if why == reason]
            lines.append(f"not measured ({reason}): {', '.join(names)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------
def _check_estimators(estimators: Sequence[str], patterns) -> tuple[str, ...]:
    if isinstance(estimators, str):
        estimators = (estimators,)
    estimators = tuple(estimators)
    if not estimators:
        raise ValueError(f"give at least one estimator of {MEASURABLE}")
    for name in estimators:
        _check_measurable(name)
    if patterns is None and any(ESTIMATORS[e].pattern == "fitted" for e in estimators):
        raise ValueError("the estimators 'linear' and 'two_component' need fitted patterns: "
                         "pass patterns=toolkit.fit_patterns(model, fitting_data)")
    return estimators


def collect_moments(model: nn.Module, data, *, layers: Sequence[str] | None = None,
                    device=None, max_batches: int | None = None, progress: bool = True,
                    batch_size: int = 64, accumulator=None, mask: str | None = None
                    ) -> tuple[Plan, dict[str, LayerMoments]]:
    """Stream ``data`` through ``model`` once and accumulate :class:`LayerMoments` per layer
    (with :func:`toolkit.streaming.stream`).

    Returns the plan of the measured layers and their moments (of every layer named,
    also one of a single input per neuron, which :func:`layer_quality` skips). See
    :func:`layer_quality` for the parameters. ``accumulator(layer, device)``, if given, builds a layer's
    accumulator instead (anything with ``update(layer, x, z)`` and ``all_reduce()``, e.g.
    :class:`ActiveLayerMoments`).
    """
    target = _device(model, device)

    def moments(layer: Layer):
        if accumulator is not None:
            return accumulator(layer, target)
        return LayerMoments.zeros(inputs_per_neuron(layer), layer.out_features, target, layer.groups)

    result = stream(model, data, moments, desc="layer quality", device=device, max_batches=max_batches,
                    progress=progress, layers=layers, batch_size=batch_size, mask=mask)
    return result.plan, result.accumulators


def inputs_per_neuron(layer: Layer) -> int:
    """``D``, the inputs of one neuron of ``layer`` (the length of a weight row)."""
    return math.prod(layer.weight_shape[1:])


class _Unmeasured:
    """The accumulator of a layer that is not measured: it keeps nothing."""

    def update(self, layer, x, z, active=None) -> None:
        pass

    def flush(self) -> None:
        pass

    def all_reduce(self) -> None:
        pass

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        pass

    def settings(self) -> dict:
        return {"moments": "none"}


def _measurable(accumulator, layers):
    """``accumulator(layer, device)`` that keeps nothing for a layer of one input per
    neuron (:data:`ONE_INPUT`), and refuses such a layer where ``layers`` names it."""
    named = {layers} if isinstance(layers, str) else set(layers or ())

    def build(layer: Layer, device):
        if inputs_per_neuron(layer) == 1:
            if layer.name in named:
                raise UndefinedQualityError(f"layer {layer.name} has {ONE_INPUT}; leave it out of "
                                            "layers= (by default such layers are skipped)")
            return _Unmeasured()
        if accumulator is not None:
            return accumulator(layer, device)
        return LayerMoments.zeros(inputs_per_neuron(layer), layer.out_features, device, layer.groups)

    return build


def _device(model: nn.Module, device) -> torch.device:
    model_device = model_device_and_dtype(model)[0]
    return same_device(torch.device(device), model_device) if device is not None else model_device


def layer_quality(model: nn.Module, patterns, data, estimators: Sequence[str] = MEASURABLE, *,
                  layers: Sequence[str] | None = None, device=None, max_batches: int | None = None,
                  progress: bool = True, seed: int = 0, ridge: float = 0.0, rtol: float = 1e-12,
                  batch_size: int = 64, regime: str = "all", neurons=None,
                  mask: str | None = None, intervals: str | None = None, blocks: int = 10,
                  resamples: int | None = None, confidence: float = 0.95) -> QualityResult:
    """Measure ``rho(S)`` of signal estimators for every neuron layer of ``model``.

    A layer whose neurons have one input each (a standalone BatchNorm) has no quality
    (:data:`ONE_INPUT`): it is skipped, streamed at no cost and named in the result's
    ``skipped``; naming it in ``layers`` raises :class:`UndefinedQualityError`.

    Parameters
    ----------
    model : nn.Module
        A network of the supported modules (:data:`toolkit.layers.SUPPORTED_MODULES`),
        evaluated in eval mode; it is not changed.
    patterns : toolkit.patterns.Patterns, mapping of them, or None
        Patterns fitted for ``model`` (checked); needed for ``linear`` and
        ``two_component``, may be None for ``random`` and ``filter`` only. A mapping
        ``{label: patterns}`` (e.g. the two ``mean_y`` conventions) is measured on one
        pass over the data and gives ``{label: QualityResult}``.
    data : Tensor or iterable
        Inputs NOT used to fit the patterns: a tensor of inputs, or an iterable (e.g. a
        DataLoader) of tensors or ``(inputs, labels)`` pairs. The result does not depend
        on how the data is cut into batches (up to float64 round-off).
    estimators : sequence of str
        Any of :data:`toolkit.estimators.MEASURABLE`. ``"identity"`` raises
        :class:`toolkit.linear.UndefinedQualityError` (its distractor is 0).
    layers : sequence of str, optional
        Names of the layers to measure (default all but the skipped ones); the others
        cost nothing.
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
    regime : {"all", "active"}
        ``"all"`` (default): each neuron over all samples. ``"active"``: each neuron
        only over the samples where it is active (``z > 0``), the regime a ReLU passes
        on and the one the two-component estimator is built for; on it every estimator
        is ``S(x) = a_+ y`` (see :func:`rho_active_from_moments`). It streams, per
        measured neuron, the moments of its active inputs (``K x D x D`` float64 per
        layer); neurons with at most ``D + 1`` active samples are undefined.
    neurons : int or dict, optional
        Active regime only: which neurons to measure. None (default): all of them; an
        int ``k``: at most ``k`` per layer, drawn without replacement by
        ``torch.randperm(J, generator=torch.Generator().manual_seed(seed))`` and sorted
        (reproducible); a dict ``{layer: indices or count}``: those indices, or that many
        drawn as for an int (layers not in it: all). A
        layer whose active moments would exceed :data:`ACTIVE_MOMENT_ELEMENTS` numbers
        raises ``ValueError``: choose fewer neurons there.
    mask : {"output", "relu_input"}, optional
        The activity mask of a layer not followed directly by a ReLU (residual
        networks, :mod:`toolkit.layers.activity`); default: the mask the patterns were fitted
        with, else :data:`toolkit.layers.DEFAULT_MASK`.
    intervals : {None, "split_half", "bootstrap"}
        None (default): the layer means only. Otherwise the images are dealt into
        ``blocks`` blocks (a tensor: consecutive images; an iterable: its batches in
        turn), the moments are kept per block, and every layer mean gets an interval
        (:meth:`QualityResult.interval`, :meth:`QualityResult.difference`):
        ``"bootstrap"`` resamples the blocks with replacement
        (:func:`scipy.stats.bootstrap`, percentile method, ``resamples`` times, default
        200); ``"split_half"`` splits them ``resamples`` times (default 10) at random
        into two halves, evaluates both, and takes the standard error of the whole as
        half the root mean square difference of the halves (a normal interval). ``rho``
        has a closed form but no per-image terms, so every resample costs one evaluation
        of the layer (milliseconds for a small convolution, about a second for a dense
        layer with 1,568 inputs): the bootstrap where that is affordable, split-half where
        it is not. A half with no more samples than inputs has no defined ``rho``; its
        interval is NaN. The estimates do not change. Not under several processes.
    blocks : int
        The number of blocks of images (at least 2).
    resamples : int, optional
        Bootstrap resamples or random splits (see ``intervals``).
    confidence : float
        Coverage of the intervals.

    Returns
    -------
    QualityResult, or a dict of them for a mapping of patterns

    Raises
    ------
    UndefinedQualityError
        For the identity estimator, and for a layer of one input per neuron named in
        ``layers``.

    Warns
    -----
    RuntimeWarning
        For layers with ``n <= D + 1`` samples, where ``max_v corr = 1`` trivially.
    """
    several = isinstance(patterns, Mapping)
    pattern_sets = dict(patterns) if several else {None: patterns}
    if not pattern_sets:
        raise ValueError("patterns is an empty mapping: give at least one set of patterns")
    for p in pattern_sets.values():
        estimators = _check_estimators(estimators, p)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, not {ridge}")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    if neurons is not None and regime != "active":
        raise ValueError("neurons= chooses the neurons of the active regime; pass regime='active'")
    accumulator = _active_accumulator(neurons, seed) if regime == "active" else None
    if intervals is not None:
        data, owner = _dealt_into_blocks(data, intervals, blocks, batch_size)
        accumulator = _block_accumulator(accumulator, owner, blocks)
    accumulator = _measurable(accumulator, layers)
    if mask is None:  # the mask the patterns were fitted with
        masks = {getattr(p, "mask", None) for p in pattern_sets.values() if p is not None} - {None}
        mask = masks.pop() if len(masks) == 1 else None
    plan, moments = collect_moments(model, data, layers=layers, device=device,
                                    max_batches=max_batches, progress=progress, batch_size=batch_size,
                                    accumulator=accumulator, mask=mask)
    stacks = None
    if intervals is not None:
        if any(int(part.n) == 0 for m in moments.values() if isinstance(m, BlockMoments) for part in m.parts):
            raise ValueError(f"intervals over {blocks} blocks need at least {blocks} batches; the data "
                             "had fewer: give more batches or fewer blocks")
        stacks = {name: _StackedBlocks(m.parts) for name, m in moments.items() if isinstance(m, BlockMoments)}
        moments = {name: stacks[name].total() if name in stacks else m for name, m in moments.items()}
    for p in pattern_sets.values():
        if p is not None:
            p.check(model, plan)
    measured = [(layer.name, moments[layer.name]) for layer in plan if inputs_per_neuron(layer) > 1]
    few = [f"{name} (n={int(m.n)}, D={m.dim})" for name, m in measured if m.n <= m.dim + 1]
    if few and ridge == 0:
        warnings.warn(
            f"layers {', '.join(few)} have no more samples than inputs (n <= D + 1): the best "
            "linear read-out of the distractor fits y perfectly and rho is 0 whatever the "
            "estimator; measure on more data or set ridge > 0", RuntimeWarning, stacklevel=2)
    results = {label: _evaluate(plan, moments, p, estimators, regime, seed, ridge, rtol)
               for label, p in pattern_sets.items()}
    if stacks is not None:
        _add_intervals(results, plan, stacks, pattern_sets, intervals, resamples, confidence,
                       dict(regime=regime, seed=seed, ridge=ridge, rtol=rtol))
    return results if several else results[None]


# ----------------------------------------------------------------------------------
# intervals: the moments per block of images, resampled or split in halves
# ----------------------------------------------------------------------------------
INTERVAL_METHODS = ("split_half", "bootstrap")


def _dealt_into_blocks(data, intervals: str, blocks: int, batch_size: int) -> tuple[object, list | None]:
    """The data and, per batch, which rows go to which block. A tensor (or an iterable of
    fewer batches than ``blocks``, joined into one) is cut into ``blocks`` runs of
    consecutive images and streamed in batches of ``batch_size`` that may span two runs
    (each batch's rows are split between the blocks as they are added); any other iterable
    deals its batches in turn (``None``: the block of batch ``i`` is ``i % blocks``),
    without holding them. Joined batches are streamed again at the size they had."""
    from toolkit.distributed import rank_and_world
    from toolkit.streaming import input_batches

    if intervals not in INTERVAL_METHODS:
        raise ValueError(f"intervals must be one of {INTERVAL_METHODS} or None, not {intervals!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 2:
        raise ValueError(f"blocks must be an integer of at least 2, not {blocks!r}")
    if rank_and_world()[1] > 1:
        raise ValueError("intervals are not available under several processes: measure them "
                         "in one process")
    if not isinstance(data, Tensor) and hasattr(data, "__len__") and len(data) < blocks:
        given = list(input_batches(data, batch_size))
        data, batch_size = torch.cat(given), max(len(batch) for batch in given)  # batches as given
    if not isinstance(data, Tensor):
        return data, None
    if data.dim() < 2 or data.shape[0] < blocks:
        raise ValueError(f"intervals over {blocks} blocks need at least {blocks} images, "
                         f"got data of shape {tuple(data.shape)}")
    block_of = torch.cat([torch.full((len(rows),), k) for k, rows in
                          enumerate(torch.tensor_split(torch.arange(data.shape[0]), blocks))])
    owner = []
    for start in range(0, data.shape[0], batch_size):
        of_batch = block_of[start:start + batch_size]
        owner.append([(int(k), slice(int(first), int(first + count))) for k, first, count in
                      zip(*_runs(of_batch))])
    return list(data.split(batch_size)), owner


def _runs(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The runs of equal consecutive values: each run's value, first index and length."""
    value, count = torch.unique_consecutive(values, return_counts=True)
    return value, torch.cumsum(count, 0) - count, count


class BlockMoments:
    """The moments of one layer kept per block of images (for the intervals of
    :func:`layer_quality`); the interface of :class:`LayerMoments` for
    :func:`toolkit.streaming.stream`, each batch's rows added to their block's moments."""

    def __init__(self, parts: list, owner: list | None = None):
        self.parts, self.owner, self.batches = parts, owner, 0

    def update(self, layer: Layer, x: Tensor, z: Tensor, active: Tensor | None = None) -> None:
        if self.owner is None:  # whole batches dealt in turn
            self.parts[self.batches % len(self.parts)].update(layer, x, z, active)
        else:
            for block, rows in self.owner[self.batches]:
                self.parts[block].update(layer, x[rows], z[rows], None if active is None else active[rows])
        self.batches += 1

    def flush(self) -> None:
        for part in self.parts:
            part.flush()

    def settings(self) -> dict:
        return {"moments": "BlockMoments", "blocks": len(self.parts)}

    def state(self) -> dict[str, Tensor]:
        return {f"{k}.{name}": t for k, part in enumerate(self.parts) for name, t in part.state().items()}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        for k, part in enumerate(self.parts):
            part.load_state({name.split(".", 1)[1]: t for name, t in tensors.items()
                             if name.split(".", 1)[0] == str(k)})

    def all_reduce(self) -> None:
        raise ValueError("intervals are not available under several processes")

class _StackedBlocks:
    """The blocks of one layer, each re-expressed about the first block's shift (exactly,
    once) and stacked field by field: the moments of any subset of blocks are then one
    indexed sum per field (the many subsets of a bootstrap or of random halves)."""

    def __init__(self, parts: list):
        first = parts[0]
        self.template, self.count = first, len(parts)
        summed = [f.name for f in fields(first) if f.name not in ("shift", "neurons")]
        self.stacked = {name: torch.empty((len(parts),) + getattr(first, name).shape,
                                          dtype=getattr(first, name).dtype, device=getattr(first, name).device)
                        for name in summed}
        for k, part in enumerate(parts):
            if k:
                part = _copy(part)
                part.reshift(first.shift)
            for name in summed:
                self.stacked[name][k] = getattr(part, name)

    def total(self, which=None):
        """The moments of the blocks ``which`` (default all) added up, as one accumulator."""
        index = torch.arange(self.count) if which is None else torch.as_tensor(np.asarray(which), dtype=torch.long)
        return replace(self.template, **{name: t[index].sum(0) for name, t in self.stacked.items()})


def _copy(m):
    return replace(m, **{f.name: getattr(m, f.name).clone() for f in fields(m)})


def _block_accumulator(base, owner: list[int] | None, count: int):
    """``accumulator(layer, device)`` of :func:`collect_moments` that keeps ``count`` of
    ``base``'s accumulators (default :class:`LayerMoments`), one per block."""

    def build(layer: Layer, device) -> BlockMoments:
        if base is None:
            make = lambda: LayerMoments.zeros(inputs_per_neuron(layer), layer.out_features, device,  # noqa: E731
                                              layer.groups)
        else:
            make = lambda: base(layer, device)  # noqa: E731
        return BlockMoments([make() for _ in range(count)], owner)

    return build


def _layer_means(layer: Layer, moments, directions: dict, regime: str, ridge: float,
                 rtol: float) -> dict[str, float]:
    """The mean ``rho`` over the defined neurons for every entry of ``directions``."""
    weight = layer.weight().to(torch.float64)
    rho_of = rho_active_from_moments if regime == "active" else rho_from_moments
    rho, defined = rho_of(moments, weight, directions, ridge=ridge, rtol=rtol)
    return {key: _masked_mean(rho[key], defined[key]) for key in directions}


def _add_intervals(results: dict, plan: Plan, stacks: dict, pattern_sets: dict, intervals: str,
                   resamples: int | None, confidence: float, settings: dict) -> None:
    """Fill the intervals of every result: the layer means of every estimator and every
    set of patterns, on the same resampled (or halved) blocks (``stacks``: the
    :class:`_StackedBlocks` of every measured layer, each dropped once used)."""
    estimators = next(iter(results.values())).estimators
    count = resamples or (200 if intervals == "bootstrap" else 10)
    for layer in plan:
        if layer.name not in stacks:  # a layer of one input per neuron: not measured
            continue
        blocks = stacks.pop(layer.name)
        keys = [(label, e) for label in pattern_sets for e in estimators]
        if all(math.isnan(r.mean[layer.name][e]) for r in results.values() for e in estimators):
            # undefined on all the images, so on every subset of them: nothing to evaluate
            shape = (count, len(keys)) if intervals == "bootstrap" else (count, 2, len(keys))
            replicates = np.full(shape, math.nan)
        else:
            weight = layer.weight().to(torch.float64)
            directions = {(label, e): estimator_directions(e, weight, pattern_sets[label][layer.name]
                                                          if pattern_sets[label] is not None else None,
                                                          settings["seed"]) for label, e in keys}
            replicates = _replicates(layer, blocks, directions,
                                     intervals, count, confidence, settings)
        for label, result in results.items():
            columns = [keys.index((label, e)) for e in estimators]
            result.replicates[layer.name] = replicates[..., columns]
            result.interval_methods[layer.name] = intervals
            result.blocks[layer.name] = blocks.count
            result.confidence = confidence


def _replicates(layer: Layer, blocked: _StackedBlocks, directions: dict, intervals: str, count: int,
                confidence: float, settings: dict) -> np.ndarray:
    """The layer means of every entry of ``directions`` on resampled blocks ``(R, keys)``
    (bootstrap) or on both halves of random splits ``(S, 2, keys)`` (split-half)."""
    from scipy.stats import bootstrap

    keys = list(directions)

    def means(which) -> np.ndarray:
        m = blocked.total(which)
        if m.n <= m.dim + 1 and settings["ridge"] == 0:
            return np.full(len(keys), math.nan)  # rho is not defined on so few samples
        values = _layer_means(layer, m, directions, settings["regime"], settings["ridge"], settings["rtol"])
        return np.array([values[k] for k in keys])

    k = blocked.count
    rng = np.random.default_rng(settings["seed"])
    if intervals == "bootstrap":
        result = bootstrap((np.arange(k),), means, vectorized=False, n_resamples=count,
                           method="percentile", confidence_level=confidence, rng=rng)
        return np.asarray(result.bootstrap_distribution).T
    splits = []
    for _ in range(count):
        order = rng.permutation(k)
        splits.append([means(order[:k // 2]), means(order[k // 2:])])
    return np.asarray(splits)


def _evaluate(plan: Plan, moments: dict, patterns, estimators: tuple[str, ...], regime: str,
              seed: int, ridge: float, rtol: float) -> QualityResult:
    """``rho`` of every layer from its streamed moments, for one set of patterns; a layer
    of one input per neuron is skipped (:data:`ONE_INPUT`)."""
    values, defined, mean, samples, dims, measured, skipped = {}, {}, {}, {}, {}, {}, {}
    for layer in plan:
        if inputs_per_neuron(layer) == 1:
            skipped[layer.name] = ONE_INPUT
            continue
        weight = layer.weight().to(torch.float64)
        layer_patterns = patterns[layer.name] if patterns is not None else None
        directions = {name: estimator_directions(name, weight, layer_patterns, seed)
                      for name in estimators}
        m = moments[layer.name]
        if regime == "active":
            values[layer.name], defined[layer.name] = rho_active_from_moments(
                m, weight, directions, ridge=ridge, rtol=rtol)
            measured[layer.name] = m.neurons.cpu()
        else:
            values[layer.name], defined[layer.name] = rho_from_moments(
                m, weight, directions, ridge=ridge, rtol=rtol)
        mean[layer.name] = {name: _masked_mean(values[layer.name][name], defined[layer.name][name])
                            for name in estimators}
        samples[layer.name], dims[layer.name] = int(m.n), m.dim
    return QualityResult(list(values), estimators, values, defined, mean, samples, dims, ridge, seed,
                         regime, measured, skipped)


def _chosen_neurons(layer: Layer, neurons, seed: int) -> Tensor:
    """The indices of ``layer``'s neurons that the active regime measures (sorted)."""
    j = layer.out_features
    if neurons is None:
        return torch.arange(j)
    if isinstance(neurons, bool) or not isinstance(neurons, (int, dict)):
        raise TypeError(f"neurons must be None, an int or a dict {{layer: indices}}, not {neurons!r}")
    if isinstance(neurons, int):
        if neurons < 1:
            raise ValueError(f"neurons must be a positive count, not {neurons}")
        if neurons >= j:
            return torch.arange(j)
        order = torch.randperm(j, generator=torch.Generator().manual_seed(int(seed)))
        return order[:neurons].sort().values
    if layer.name not in neurons:
        return torch.arange(j)
    chosen = neurons[layer.name]
    if isinstance(chosen, int) and not isinstance(chosen, bool):
        return _chosen_neurons(layer, chosen, seed)
    index = torch.as_tensor(list(chosen), dtype=torch.long).unique()
    if index.numel() == 0 or index.min() < 0 or index.max() >= j:
        raise ValueError(f"neurons[{layer.name!r}] must be indices in [0, {j}), got {neurons[layer.name]}")
    return index


def _active_accumulator(neurons, seed: int):
    """``accumulator(layer, device)`` for :func:`collect_moments` in the active regime."""
    if isinstance(neurons, int) and not isinstance(neurons, bool) and neurons < 1:
        raise ValueError(f"neurons must be a positive count, not {neurons}")

    def build(layer: Layer, device) -> ActiveLayerMoments:
        index = _chosen_neurons(layer, neurons, seed)
        dim = inputs_per_neuron(layer)
        if index.numel() * dim * dim > ACTIVE_MOMENT_ELEMENTS:
            raise ValueError(
                f"layer {layer.name}: the active regime needs {index.numel()} x {dim} x {dim} "
                f"float64 moments ({8 * index.numel() * dim * dim / 2 ** 30:.1f} GiB), more than "
                f"{ACTIVE_MOMENT_ELEMENTS:,} numbers; measure fewer neurons there, e.g. "
                f"neurons={max(1, ACTIVE_MOMENT_ELEMENTS // (dim * dim))} or "
                f"neurons={{{layer.name!r}: [...]}}")
        return ActiveLayerMoments.zeros(dim, layer.out_features, device, index, layer.groups)

    return build


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


# ----------------------------------------------------------------------------------
# sizing the active regime
# ----------------------------------------------------------------------------------
def active_regime_neurons(model: nn.Module, inputs: Tensor, layers: Sequence[str], cap: int) -> dict[str, int]:
    """How many neurons of each layer ``layer_quality(..., regime="active")`` can measure.

    At most ``cap`` per layer and at most what fits into :data:`ACTIVE_MOMENT_ELEMENTS`
    float64 numbers (``K D^2``); layers where not even one neuron fits (VGG16's first
    dense layer, ``D = 25088``) are left out of the result, and so are layers of one input
    per neuron (:data:`ONE_INPUT`). Pass it as ``neurons=`` with ``layers=list(result)``.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor
        A batch the model takes (only its first sample is traced).
    layers : sequence of str
        Names of neuron layers.
    cap : int
        The most neurons measured in any layer.
    """
    from toolkit.layers import trace  # imported here: several functions above name a local "trace"

    counts = {}
    for layer in trace(model, inputs[:1]):
        if layer.name in layers:
            dim = inputs_per_neuron(layer)
            fit = ACTIVE_MOMENT_ELEMENTS // (dim * dim)
            if fit >= 1 and dim > 1:
                counts[layer.name] = min(cap, fit, layer.out_features)
    return counts
