"""Learning the signal estimators for every neuron of a network: the *patterns*.

For every Conv2d/Linear layer (a following BatchNorm folded in) and every output neuron,
:func:`fit_patterns` learns the linear pattern ``a`` and the two-component patterns
``a_+``, ``a_-`` of :mod:`toolkit.linear` from float64 sums streamed over a DataLoader
in one pass (:class:`Statistics`). A neuron's samples are the layer's inputs (for a
convolution: every receptive-field patch), its output is ``y = w^T x`` without the
bias, and it is active where the layer output with the bias is positive.

Sums do not depend on how the data is cut into batches, can be checkpointed and resumed,
and add up across processes (``torch.distributed``). ``mean_y="global"`` (default, the
authors' code) or ``"masked"`` (the seminar text) chooses the mean of ``y`` in the
two-component patterns. No pattern is ever NaN: never-active neurons and zero
denominators have defined fallbacks, counted by :meth:`Patterns.report`.
:class:`Patterns` saves and loads the result and refuses patterns of another model.

The formulas, the sums and the conventions are in docs/math.md, sections 2-3.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.distributed import broadcast_from_rank_0, sum_over_ranks
from toolkit.fingerprint import fingerprint
from toolkit.layers import Layer, Plan
from toolkit.precision import tf32
from toolkit.streaming import CheckpointMismatchError, PatternMismatchError, stream

__all__ = [
    "KINDS",
    "Statistics",
    "LayerPatterns",
    "Patterns",
    "PatternMismatchError",
    "PatternFileError",
    "CheckpointMismatchError",
    "MissingPatternsError",
    "fit_patterns",
    "fingerprint",
    "estimate_patterns",
]

FORMAT_VERSION = "2"
MEAN_Y_CONVENTIONS = ("global", "masked")


# ----------------------------------------------------------------------------------
# streamed statistics
# ----------------------------------------------------------------------------------
#: The kinds of pattern a fit can give: ``a`` of S_a, ``a_+`` and ``a_-`` of S_a+-.
KINDS = ("linear", "positive", "negative")

#: The dtypes the per-batch products may run in; ``"tf32"`` and bfloat16 only on CUDA.
PRODUCT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, "tf32")


def output_groups(kinds: Sequence[str]) -> tuple[str, ...]:
    """Which channels the output-side buffer of a layer holds, for the patterns ``kinds``.

    ``ones`` gives the sums of inputs (made without a product, by
    ``NeuronOps.input_sums``); ``active`` (the mask ``z > 0``) the sums of the inputs of
    active samples; ``y_pos`` / ``y_neg`` the products of the inputs with
    ``y`` on the active / inactive samples; ``y_all`` with ``y`` on every sample (when
    only the linear pattern is asked for). The inactive side is summed directly, never
    as a difference of two large sums.
    """
    kinds = set(kinds)
    if kinds == {"linear"}:
        return ("ones", "y_all")
    groups = ["ones", "active"]
    if kinds & {"positive", "linear"}:
        groups.append("y_pos")
    if kinds & {"negative", "linear"}:
        groups.append("y_neg")
    return tuple(groups)


class Statistics:
    """Running float64 sums of one layer; everything its patterns are computed from.

    The inputs are *shifted* by a reference ``shift_x`` (per input channel: the mean of
    the first batch) and the outputs ``y = w^T x`` by ``shift_y`` (per neuron), so every
    sum is of quantities near zero: no ``E[x y] - E[x] E[y]`` ever cancels, and the
    per-batch products can run in float32 (docs/math.md, section 3.2). For a convolution
    the zero padding makes the shifted patch differ from the shifted input's patch; the
    *cover* sums (the same products with an all-ones image) give the exact correction.

    One batch costs one weight-gradient-shaped product per layer
    (``torch.nn.grad.conv2d_weight``, or one matrix product for a Linear layer, whose
    rows are gathered over several batches first) with one output channel per group of
    :func:`output_groups` and neuron: ``3 J`` for all three patterns, ``2 J`` for the
    positive one alone (the ``ones`` group, the plain input sums, needs no product).

    Stored tensors (``W`` the weight shape, ``J = W[0]``, ``R`` a group's rows: 1 for
    ``ones``, ``J`` otherwise)::

        n             ()              samples seen (images x output positions)
        shift_x       (1, C, 1, 1) or (1, D)
        shift_y       (J,)
        sum_y         (J,)            sum of y - shift_y over all samples
        x.<group>     (R, *W[1:])     sum of group value x (x - shift_x), patch by patch
        cover.<group> (R, 1, kh, kw) or (R, 1): the same with an all-ones input
        total.<group> (R,)            sum of the group value
    """

    def __init__(self, layer: Layer, kinds: Sequence[str] = KINDS, dtype=None,
                 gather_rows: int = 1024):
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.groups = output_groups(self.kinds)
        self.dtype = dtype
        self.gather_rows = gather_rows
        self.weight_shape = tuple(layer.weight_shape)
        self.tensors_: dict[str, Tensor] = {}
        self._rows: list[tuple[Tensor, Tensor]] = []

    # -- the accumulator interface of toolkit.streaming ----------------------------
    def settings(self) -> dict:
        return {"kinds": list(self.kinds)}

    def state(self) -> dict[str, Tensor]:
        self.flush()
        return dict(self.tensors_)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.tensors_ = dict(tensors)

    def tensors(self) -> dict[str, Tensor]:
        return self.state()

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], kinds: Sequence[str] = KINDS) -> "Statistics":
        """Statistics from the tensors of :meth:`tensors` (a file, a checkpoint)."""
        stats = cls.__new__(cls)
        stats.kinds = tuple(k for k in KINDS if k in kinds)
        stats.groups, stats.dtype, stats.gather_rows = output_groups(stats.kinds), None, 1024
        stats.weight_shape = (tensors["sum_y"].shape[0], *tensors["x.ones"].shape[1:])
        stats.tensors_, stats._rows = dict(tensors), []
        return stats

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors_[key]

    @property
    def n(self) -> Tensor:
        return self.tensors_["n"]

    @property
    def n_pos(self) -> Tensor:
        """Samples on which each neuron was active."""
        if "total.active" in self.tensors_:
            return self.tensors_["total.active"]
        raise MissingPatternsError("these statistics were collected for the linear pattern "
                                   "only, which does not count active samples")

    def update(self, layer: Layer, x: Tensor, z: Tensor, active: Tensor | None = None) -> None:
        """Add one batch: layer input ``x``, layer output ``z`` (bias included) and the
        activity mask ``active`` (bool, shaped like ``z``; None: ``z > 0``; a residual
        network's layers may take it from the ReLU after an addition, see
        :mod:`toolkit.residual`)."""
        dtype = _product_dtype(self.dtype, x)
        x, z = x.detach(), z.detach()
        if not self.tensors_:
            self._start(layer, x, z, dtype)
        t = self.tensors_
        x_shifted = x.to(dtype) - t["shift_x"].to(dtype)
        offset = (layer.bias().double() + t["shift_y"]).to(dtype)
        with _tf32(self.dtype == "tf32"):
            sum_y = self._add(layer.ops, x_shifted, z.to(dtype), offset, active)
        t["n"] += z.numel() // z.shape[layer.ops.neuron_dim]
        t["sum_y"] += sum_y

    def flush(self) -> None:
        """Add the gathered rows of a Linear layer to the sums: one matrix product per
        group, in the products' dtype (the first one becomes the float64 sum itself)."""
        if not self._rows:
            return
        xs = torch.cat([r[0] for r in self._rows])
        gs = torch.cat([r[1] for r in self._rows])
        self._rows = []
        with _tf32(self.dtype == "tf32"):
            for group, part in self._buffer_slices().items():
                self._accumulate(f"x.{group}", gs[:, part].T @ xs)

    def all_reduce(self) -> None:
        """Sum the statistics of all ``torch.distributed`` ranks in place, after moving
        every rank's sums to rank 0's shifts (exactly)."""
        self.flush()
        t = self.tensors_
        self.reshift(broadcast_from_rank_0(t["shift_x"].clone()), broadcast_from_rank_0(t["shift_y"].clone()))
        sum_over_ranks(v for k, v in self.tensors_.items() if not k.startswith("shift"))

    def to(self, device) -> "Statistics":
        self.flush()
        return Statistics.from_tensors({k: v.to(device) for k, v in self.tensors_.items()}, self.kinds)

    # -- the sums of one batch -----------------------------------------------------
    def _start(self, layer: Layer, x: Tensor, z: Tensor, dtype) -> None:
        """Empty sums; the shifts are the first batch's means, rounded to the products'
        dtype so that the shifted values and the exact corrections use the same ones.
        The sums of the groups are made by the first batch (:meth:`_accumulate`)."""
        kw = dict(dtype=torch.float64, device=z.device)
        offset = layer.ops.neuron_means(z).to(dtype).double()   # b + shift_y, exactly representable
        self.tensors_ = {"n": torch.zeros((), **kw),
                         "shift_x": layer.ops.input_shift(x).to(dtype).double(),
                         "shift_y": offset - layer.bias().double(),
                         "sum_y": torch.zeros(self.weight_shape[0], **kw)}

    def _fill(self, g: Tensor, z: Tensor, offset: Tensor, channel: int, active: Tensor | None
              ) -> Tensor | None:
        """Write the groups' values into ``g`` (``channel`` is the dimension of the
        neurons) with few passes: the mask, then ``y - shift_y`` and its two sides.
        Returns the sums of ``y - shift_y`` over the samples where no group holds them
        (a fit of one side only), else None."""
        parts = {group: g.narrow(channel, part.start, part.stop - part.start)
                 for group, part in self._buffer_slices().items()}
        shape = [1] * z.dim()
        shape[channel] = self.weight_shape[0]
        offset = offset.reshape(shape)
        samples = tuple(d for d in range(z.dim()) if d != channel)
        if "y_all" in parts:
            torch.sub(z, offset, out=parts["y_all"])
            return None
        if active is None:
            torch.gt(z, 0, out=parts["active"])
        else:
            parts["active"].copy_(active)
        y_pos, y_neg = parts.get("y_pos"), parts.get("y_neg")
        if y_pos is not None and y_neg is not None:
            torch.sub(z, offset, out=y_neg)
            torch.mul(y_neg, parts["active"], out=y_pos)
            y_neg.sub_(y_pos)
            return None
        side = y_pos if y_pos is not None else y_neg
        torch.sub(z, offset, out=side)
        total = side.sum(samples).double()
        if y_pos is not None:
            side.mul_(parts["active"])
        else:
            side.sub_(side * parts["active"])
        return total

    def _sum_y(self, totals: Tensor, direct: Tensor | None) -> Tensor:
        """The batch's sum of ``y - shift_y`` per neuron, from the groups' totals."""
        if direct is not None:
            return direct
        part = self._buffer_slices()
        if "y_all" in part:
            return totals[part["y_all"]]
        return totals[part["y_pos"]] + totals[part["y_neg"]]

    def _buffer_slices(self) -> dict[str, slice]:
        """Where each group's ``J`` rows lie in the buffer of one batch (every group but
        ``ones``, whose sums need no buffer)."""
        groups = [group for group in self.groups if group != "ones"]
        J = self.weight_shape[0]
        return {group: slice(i * J, (i + 1) * J) for i, group in enumerate(groups)}

    def _add(self, ops, x: Tensor, z: Tensor, offset: Tensor, active: Tensor | None) -> Tensor:
        """Add one batch's sums: the plain input sums (group ``ones``), the other groups'
        values ``g`` (one buffer), their patch sums with the shifted input (gathered
        first where the layer type wants it), their cover sums and totals. Returns the
        batch's sum of ``y - shift_y``."""
        channel = ops.neuron_dim % z.dim()
        shape = list(z.shape)
        shape[channel] = sum(part.stop - part.start for part in self._buffer_slices().values())
        g = torch.empty(shape, dtype=z.dtype, device=z.device)
        direct = self._fill(g, z, offset, channel, active)
        self._add_input_sums(ops, x, z, channel)
        per_position = g.sum(0, keepdim=True)
        totals = ops.neuron_values(per_position).sum(0).double()  # counts exact below 2**24
        cover = ops.cover_sums(x.shape, per_position).double()
        sums = None
        if ops.gathers_rows:
            self._rows.append((ops.patches(x), ops.neuron_values(g)))
            if sum(r[0].shape[0] for r in self._rows) >= self.gather_rows:
                self.flush()
        else:
            sums = ops.patch_sums(x, g)
        for group, part in self._buffer_slices().items():
            if sums is not None:
                self._accumulate(f"x.{group}", sums[part])
            self._accumulate(f"cover.{group}", cover[part])
            self._accumulate(f"total.{group}", totals[part])
        return self._sum_y(totals, direct)

    def _add_input_sums(self, ops, x: Tensor, z: Tensor, channel: int) -> None:
        """The group ``ones``: the plain sums of the shifted patches, their cover sums and
        the number of samples, none of which needs the buffer or a product."""
        shape = list(z.shape)
        shape[channel] = 1
        ones = torch.ones((), dtype=z.dtype, device=z.device).expand(shape)
        self._accumulate("x.ones", ops.input_sums(x, z.shape))
        self._accumulate("cover.ones", ops.cover_sums(x.shape, ones).double())
        self._accumulate("total.ones", torch.full((1,), float(ones.numel()), dtype=torch.float64,
                                                  device=z.device))

    def _accumulate(self, key: str, value: Tensor) -> None:
        """Add ``value`` to the float64 sum ``key``; the first value becomes the sum."""
        if key in self.tensors_:
            self.tensors_[key].add_(value)
        else:
            self.tensors_[key] = value.to(torch.float64, copy=True)

    # -- exact re-expression -------------------------------------------------------
    def reshift(self, shift_x: Tensor, shift_y: Tensor) -> None:
        """Express the sums relative to other shifts, exactly (every sum is a polynomial
        in the shifts), so that sums of different processes can be added."""
        t = dict(self.tensors_)
        dx = t["shift_x"] - shift_x                 # x - new = (x - old) + dx on covered positions
        dy = (t["shift_y"] - shift_y)               # y - new = (y - old) + dy
        new = dict(t)
        for group in self.groups:
            new[f"x.{group}"] = t[f"x.{group}"] + dx * t[f"cover.{group}"]
        side = {"y_pos": "active", "y_neg": None, "y_all": "ones"}
        for group in ("y_pos", "y_neg", "y_all"):
            if group not in self.groups:
                continue
            x_side, cover_side, total_side = self._side(t, side[group])
            d = dy.reshape(-1, *([1] * (x_side.dim() - 1)))
            new[f"x.{group}"] = new[f"x.{group}"] + d * (x_side + dx * cover_side)
            new[f"cover.{group}"] = t[f"cover.{group}"] + d * cover_side
            new[f"total.{group}"] = t[f"total.{group}"] + dy * total_side
        new["sum_y"] = t["sum_y"] + t["n"] * dy
        new["shift_x"], new["shift_y"] = shift_x.clone(), shift_y.clone()
        self.tensors_ = new

    @staticmethod
    def _side(t: dict, group: str | None) -> tuple[Tensor, Tensor, Tensor]:
        """Sums of x, cover and count over the samples of one side (None: inactive)."""
        if group is not None:
            return t[f"x.{group}"], t[f"cover.{group}"], t[f"total.{group}"]
        return (t["x.ones"] - t["x.active"], t["cover.ones"] - t["cover.active"],
                t["total.ones"] - t["total.active"])

    def unshifted(self) -> dict[str, Tensor]:
        """The plain sums, ``sum x``, ``sum x y``, ``sum_+ x y``, ... (float64), computed
        exactly from the shifted ones: for checks, and to compare with other code."""
        t = self.tensors_
        mu, nu = t["shift_x"], t["shift_y"]

        def x_sum(group):      # sum over the group of h x  (h = the group's value)
            return t[f"x.{group}"] + mu * t[f"cover.{group}"]

        out = {"n": t["n"], "sum_x": x_sum("ones"), "sum_y": t["sum_y"] + t["n"] * nu}
        if "active" in self.groups:
            col = nu.reshape(-1, *([1] * (t["x.active"].dim() - 1)))
            out["n_pos"] = t["total.active"]
            out["sum_x_pos"] = x_sum("active")
            if "y_pos" in self.groups:
                out["sum_y_pos"] = t["total.y_pos"] + t["total.active"] * nu
                out["sum_xy_pos"] = x_sum("y_pos") + col * out["sum_x_pos"]
            if "y_neg" in self.groups:
                sum_x_neg = out["sum_x"] - out["sum_x_pos"]
                out["sum_xy_neg"] = x_sum("y_neg") + col * sum_x_neg
            if "y_pos" in self.groups and "y_neg" in self.groups:
                out["sum_xy"] = out["sum_xy_pos"] + out["sum_xy_neg"]
        else:
            col = nu.reshape(-1, *([1] * (t["x.y_all"].dim() - 1)))
            out["sum_xy"] = x_sum("y_all") + col * out["sum_x"]
        return out


def _product_dtype(requested, x: Tensor) -> torch.dtype:
    if requested is None:
        return x.dtype
    return torch.float32 if requested == "tf32" else requested


def _tf32(enabled: bool):
    """TF32 for the products of a fit with ``compute_dtype="tf32"``; any other fit leaves
    the caller's settings as they are (e.g. a ``with tf32(...)`` around the fit)."""
    return tf32(True) if enabled else nullcontext()


def check_product_dtype(dtype, device: torch.device):
    """Validate ``compute_dtype``: None (the model's dtype), float32, float64, or on CUDA
    ``"tf32"`` and bfloat16; float16 and integer dtypes are refused."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in ("tf32", torch.bfloat16):
        if device.type != "cuda":
            raise ValueError(f"compute_dtype={dtype!r} is for CUDA devices only; on {device.type} "
                             "use torch.float32 or torch.float64")
        return dtype
    raise ValueError(f"compute_dtype must be None (the model's dtype), torch.float32, "
                     f"torch.float64, or on CUDA 'tf32' or torch.bfloat16, not {dtype!r}: "
                     "float16 loses too many digits for the sums' products")


# ----------------------------------------------------------------------------------
# from statistics to patterns
# ----------------------------------------------------------------------------------
class MissingPatternsError(ValueError):
    """A Patterns object lacks a kind of pattern that a computation needs."""


class LayerPatterns:
    """The patterns of one layer, each shaped like the layer's weight (float64).

    ``linear`` is ``a`` of the linear estimator S_a; ``positive`` and ``negative`` are
    ``a_+`` and ``a_-`` of the two-component estimator S_a+-. A fit with ``kinds``
    holds only those; asking for another raises :class:`MissingPatternsError`.
    """

    def __init__(self, linear: Tensor | None = None, positive: Tensor | None = None,
                 negative: Tensor | None = None, layer: str = ""):
        self._tensors = {k: t for k, t in zip(KINDS, (linear, positive, negative)) if t is not None}
        self.layer = layer

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def get(self, kind: str) -> Tensor:
        try:
            return self._tensors[kind]
        except KeyError:
            where = f" of layer '{self.layer}'" if self.layer else ""
            raise MissingPatternsError(
                f"the patterns{where} hold only {list(self.kinds)}, not the {kind!r} pattern: fit "
                f"them with fit_patterns(..., kinds=(..., {kind!r}))") from None

    linear = property(lambda self: self.get("linear"))
    positive = property(lambda self: self.get("positive"))
    negative = property(lambda self: self.get("negative"))

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._tensors)


def _row_dots(w: Tensor, a: Tensor) -> Tensor:
    """``(w * a).sum(1)`` in float64 for CPU matrices ``w`` (float32 or float64) and ``a``
    (float64), ``(J, D)`` or ``a`` of shape ``(D,)``: one pass without a ``(J, D)``
    temporary or a float64 copy of ``w`` (NumPy's einsum casts in small buffers, and is
    about twice as fast here as torch's batched matrix product)."""
    w, a = w.contiguous().numpy(), a.contiguous().numpy()
    return torch.from_numpy(np.einsum("ij,ij->i" if a.ndim == 2 else "ij,j->i", w, a,
                                      dtype=np.float64))


#: A denominator ``w^T C`` below this share of ``|w| |C|`` counts as zero: the filter is
#: orthogonal to the covariance up to rounding, and the pattern ``C / (w^T C)`` would be
#: rounding noise scaled up by at least a million.
ZERO_DENOMINATOR = 1e-6


def _scales(denominator: Tensor, size: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, what the unnormalised covariance ``C`` is multiplied by to give the
    pattern: ``1 / (w^T C)``; ``1 / count`` (the raw covariance, the authors' fallback)
    where ``w^T C`` is zero (below ``ZERO_DENOMINATOR * size``, ``size = |w| |C|``); 0
    where ``count`` is 0 (no samples: the zero pattern). Also returns the zero mask.
    """
    zero = denominator.abs() <= ZERO_DENOMINATOR * size
    one = torch.ones_like(denominator)
    scale = torch.where(zero, one / count.clamp(min=1), one / torch.where(zero, one, denominator))
    return torch.where(count > 0, scale, torch.zeros_like(scale)), zero


@dataclass
class _Side:
    """The sums of one component (all samples, active, inactive) of a layer, in the
    terms of ``Statistics``: ``xy`` and ``x`` are lists of ``(sign, tensor)``."""

    xy: list
    x: list
    cover_y: Tensor
    cover: Tensor
    count: Tensor
    sum_y: Tensor


def _sides(t: dict, groups: Sequence[str]) -> dict[str, _Side]:
    j = t["sum_y"].shape[0]
    n = t["n"].expand(j)
    sides = {}
    if "y_all" in groups:
        sides["all"] = _Side([(1, t["x.y_all"])], [(1, t["x.ones"])], t["cover.y_all"],
                             t["cover.ones"], n, t["sum_y"])
        return sides
    if "y_pos" in groups:
        sides["positive"] = _Side([(1, t["x.y_pos"])], [(1, t["x.active"])], t["cover.y_pos"],
                                  t["cover.active"], t["total.active"], t["total.y_pos"])
    if "y_neg" in groups:
        sides["negative"] = _Side([(1, t["x.y_neg"])], [(1, t["x.ones"]), (-1, t["x.active"])],
                                  t["cover.y_neg"], t["cover.ones"] - t["cover.active"],
                                  n - t["total.active"], t["total.y_neg"])
    if "y_pos" in groups and "y_neg" in groups:
        sides["all"] = _Side([(1, t["x.y_pos"]), (1, t["x.y_neg"])], [(1, t["x.ones"])],
                             t["cover.y_pos"] + t["cover.y_neg"], t["cover.ones"], n, t["sum_y"])
    return sides


def _pattern(side: _Side, w: Tensor, mu: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """``C / (w^T C)`` of one side, with the unnormalised covariance

        C = sum_c x (y - m) = sum_c x~ y~ + mu cover_y - m~ (sum_c x~ + mu cover)

    (``x~``, ``y~`` the shifted values, ``m~ = m - shift_y``; docs/math.md, section 3.2),
    written in one allocation and a few in-place passes. Returns the pattern and the
    zero-denominator mask.
    """
    j = w.shape[0]
    col = (j, *([1] * (side.xy[0][1].dim() - 1)))
    m = m.reshape(col)
    first, rest = side.xy[0][1], side.xy[1:]
    c = torch.add(first, rest[0][1], alpha=rest[0][0]) if rest else first.clone()
    for sign, t in rest[1:]:
        c.add_(t, alpha=sign)
    c.addcmul_(side.cover_y, mu)
    for sign, t in side.x:
        c.addcmul_(t, m, value=-sign)
    c.addcmul_(side.cover * m, mu, value=-1)
    rows = c.reshape(j, -1)
    w2 = w.reshape(j, -1)
    denominator = _row_dots(w2, rows)
    size = torch.linalg.vector_norm(w2, dim=1).double() * torch.linalg.vector_norm(rows, dim=1)
    scale, zero = _scales(denominator, size, side.count)
    return c.mul_(scale.reshape(col)), zero


def estimate_patterns(stats: Statistics, weight: Tensor, mean_y: str = "global"
                      ) -> tuple[LayerPatterns, dict[str, int]]:
    """Compute a layer's patterns from its statistics (docs/math.md, section 3).

    Parameters
    ----------
    stats : Statistics
    weight : Tensor
        The layer's folded weight ``W``.
    mean_y : {"global", "masked"}
        Which mean of ``y`` the two-component covariances subtract: the mean over all
        samples (the authors' code) or over the samples of the component (the seminar).

    Returns
    -------
    patterns : LayerPatterns
        On the CPU, float64; the kinds the statistics were collected for.
    counts : dict
        Neurons never active (``dead``), always active, and with a zero denominator.
    """
    if mean_y not in MEAN_Y_CONVENTIONS:
        raise ValueError(f"mean_y must be one of {MEAN_Y_CONVENTIONS}, not {mean_y!r}")
    if not stats.tensors_ or stats.n <= 0:
        raise ValueError("the statistics hold no samples: fit on at least one batch")
    s = stats.to("cpu")
    t = s.tensors_
    w = weight.detach().to("cpu")
    if w.dtype not in (torch.float32, torch.float64):
        w = w.to(torch.float64)
    sides = _sides(t, s.groups)
    m_global = t["sum_y"] / t["n"]
    kind_side = {"linear": "all", "positive": "positive", "negative": "negative"}
    result, zeros = {}, {}
    for kind in s.kinds:
        side = sides[kind_side[kind]]
        m = m_global if kind == "linear" or mean_y == "global" else \
            side.sum_y / side.count.clamp(min=1) * (side.count > 0)
        result[kind], zero = _pattern(side, w, t["shift_x"], m)
        zeros[kind] = zero & (side.count > 0)
    degenerate = torch.zeros(w.shape[0], dtype=torch.bool)
    for zero in zeros.values():
        degenerate |= zero
    counts = {"zero_denominator": int(degenerate.sum())}
    if "active" in s.groups:
        n_pos = t["total.active"]
        counts.update(dead=int((n_pos == 0).sum()), always_active=int((n_pos == t["n"]).sum()))
    patterns = LayerPatterns(**{k: v.reshape(weight.shape) for k, v in result.items()})
    return patterns, counts


# ----------------------------------------------------------------------------------
# Patterns: the fitted result
# ----------------------------------------------------------------------------------
class PatternFileError(ValueError):
    """A patterns file is missing, unreadable, malformed, or holds non-finite values."""


class Patterns:
    """The fitted patterns of a model, keyed by the qualified names of its layers.

    Parameters
    ----------
    layers : dict[str, LayerPatterns]
    fingerprint : str
        :func:`fingerprint` of the model the patterns belong to.
    statistics : dict[str, Statistics], optional
        The sums the patterns were computed from (kept so they can be recomputed, with
        another ``mean_y`` convention for instance, and saved).
    mean_y : str
        The convention used for the two-component patterns.
    counts : dict[str, dict], optional
        Per layer, the neurons counted by :func:`estimate_patterns`.
    mask : str, optional
        The activity mask the fit used (:mod:`toolkit.residual`); None if unknown.
    """

    def __init__(self, layers: dict[str, LayerPatterns], fingerprint: str,
                 statistics: dict[str, Statistics] | None = None, mean_y: str = "global",
                 counts: dict[str, dict] | None = None, mask: str | None = None):
        self.layers = dict(layers)
        for name, p in self.layers.items():
            p.layer = name
        self.fingerprint = fingerprint
        self.statistics = dict(statistics or {})
        self.mean_y = mean_y
        self.counts = dict(counts or {})
        self.mask = mask

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_statistics(cls, plan: Plan, statistics: dict[str, Statistics], fingerprint: str,
                        mean_y: str = "global") -> "Patterns":
        layers, counts = {}, {}
        for layer in plan:
            layers[layer.name], counts[layer.name] = estimate_patterns(
                statistics[layer.name], layer.weight(), mean_y)
        return cls(layers, fingerprint, statistics, mean_y, counts)

    # -- access --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of pattern every layer holds (``linear``, ``positive``, ``negative``)."""
        kinds = [set(p.kinds) for p in self.layers.values()]
        common = set.intersection(*kinds) if kinds else set()
        return tuple(k for k in KINDS if k in common)

    def require(self, kinds: Sequence[str], purpose: str) -> None:
        """Raise :class:`MissingPatternsError` unless every layer holds ``kinds``."""
        missing = [k for k in kinds if k not in self.kinds]
        if missing:
            raise MissingPatternsError(
                f"{purpose} needs the {missing} patterns, but these patterns hold only "
                f"{list(self.kinds)}: fit them with fit_patterns(..., kinds={tuple(KINDS)})")

    def __getitem__(self, name: str) -> LayerPatterns:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no patterns for layer '{name}'; layers: {self.names}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"Patterns({len(self)} layers, kinds={list(self.kinds)}, mean_y={self.mean_y!r}, "
                f"model {self.fingerprint[:8]})")

    def check(self, model: nn.Module, plan: Plan | None = None) -> None:
        """Raise :class:`PatternMismatchError` unless these patterns belong to ``model``."""
        if self.fingerprint != fingerprint(model):
            raise PatternMismatchError(
                f"these patterns were fitted for another model (fingerprint "
                f"{self.fingerprint[:8]}, this model has {fingerprint(model)[:8]}): the "
                "architecture or the weights differ; fit patterns for this model with "
                "toolkit.fit_patterns(model, data)"
            )
        if plan is not None:
            missing = [name for name in plan.names if name not in self.layers]
            if missing:
                raise PatternMismatchError(f"no patterns for the layers {missing}")

    def inactive_outputs(self) -> list[int]:
        """The output neurons (classes) of the last layer that were never active
        (``z > 0``) on the fitting data: their positive pattern is 0."""
        if not self.layers:
            return []
        last = self.names[-1]
        stats = self.statistics.get(last)
        if stats is not None and "total.active" in stats.tensors_:
            return torch.nonzero(stats.n_pos == 0).flatten().tolist()
        if "positive" in self[last].kinds:
            rows = self[last].positive.reshape(self[last].positive.shape[0], -1)
            return torch.nonzero((rows == 0).all(1)).flatten().tolist()
        return []

    # -- report --------------------------------------------------------------------
    def report(self) -> str:
        """A table of the fit: per layer, samples seen, neurons, dead and degenerate ones;
        then the output neurons that were never active."""
        head = f"{'layer':<24}{'neurons':>8}{'samples':>14}{'dead':>7}{'always on':>10}{'zero den.':>10}"
        lines = [head, "-" * len(head)]
        for name, p in self.layers.items():
            c = self.counts.get(name, {})
            n = int(self.statistics[name].n) if name in self.statistics else 0
            neurons = next(iter(p.tensors().values())).shape[0]
            lines.append(f"{name:<24}{neurons:>8}{n:>14,}{c.get('dead', 0):>7}"
                         f"{c.get('always_active', 0):>10}{c.get('zero_denominator', 0):>10}")
        inactive = self.inactive_outputs()
        if inactive:
            lines.append(f"output neurons never active on the fitting data: {inactive}")
        return "\n".join(lines)

    # -- save / load ---------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the patterns and their statistics to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {}
        for name, p in self.layers.items():
            for kind, t in p.tensors().items():
                tensors[f"{name}/{kind}"] = t.detach().cpu().contiguous()
        for name, s in self.statistics.items():
            for key, t in s.tensors().items():
                tensors[f"{name}/stats/{key}"] = t.detach().cpu().contiguous()
        metadata = {
            "format": FILE_FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "mean_y": self.mean_y,
            "layers": json.dumps(self.names),
            "kinds": json.dumps({name: list(p.kinds) for name, p in self.layers.items()}),
            "counts": json.dumps(self.counts),
            **({"mask": self.mask} if self.mask else {}),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Patterns":
        """Read patterns written by :meth:`save`; with ``model``, check they belong to it.

        The file format (safetensors) holds only tensors and text: loading runs no code.
        Every problem with the file is a :class:`PatternFileError` (or
        :class:`FileNotFoundError`) that names it: unreadable, not a patterns file,
        missing or malformed metadata, missing tensors, non-finite values, or (with
        ``model``) patterns shaped unlike the model's layers.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no patterns file at {path}")
        meta, tensors = _read_safetensors(path)
        if meta.get("format") != FILE_FORMAT:
            raise PatternFileError(f"{path} is not a patterns file written by Patterns.save")
        try:
            names = json.loads(meta["layers"])
            kinds = json.loads(meta["kinds"]) if "kinds" in meta else {n: list(KINDS) for n in names}
            counts = json.loads(meta.get("counts", "{}"))
            model_fp, mean_y = meta["fingerprint"], meta["mean_y"]
        except (KeyError, json.JSONDecodeError) as error:
            raise PatternFileError(f"{path} has missing or malformed metadata ({error!r})") from None
        if not isinstance(names, list) or mean_y not in MEAN_Y_CONVENTIONS or not isinstance(kinds, dict):
            raise PatternFileError(f"{path} has malformed metadata (layers, kinds or mean_y)")
        layers, statistics = {}, {}
        for name in names:
            try:
                found = {k: tensors[f"{name}/{k}"] for k in kinds[name]}
            except KeyError as error:
                raise PatternFileError(f"{path} lacks the tensor {error} of layer '{name}'") from None
            for kind, t in found.items():
                if not torch.isfinite(t).all():
                    raise PatternFileError(f"{path}: the {kind} pattern of layer '{name}' holds NaN or Inf")
            layers[name] = LayerPatterns(**found)
            prefix = f"{name}/stats/"
            stats = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if stats and meta.get("version") == "1":
                warnings.warn(f"{path} was written by an older version: its patterns are read, "
                              "its statistics (in an older layout) are left out", UserWarning)
            elif stats:
                try:
                    statistics[name] = Statistics.from_tensors(stats, kinds[name])
                except KeyError as error:
                    raise PatternFileError(f"{path}: the statistics of layer '{name}' lack {error}") from None
        patterns = cls(layers, model_fp, statistics, mean_y, counts, meta.get("mask"))
        if model is not None:
            _check_shapes(patterns, model, path)
            patterns.check(model)
        return patterns


FILE_FORMAT = "patternnet-toolkit-patterns"


def _read_safetensors(path: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types for bad files
        raise PatternFileError(f"{path} cannot be read as a safetensors file ({error})") from None


def _check_shapes(patterns: Patterns, model: nn.Module, path: Path) -> None:
    modules = dict(model.named_modules())
    for name, p in patterns.layers.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise PatternMismatchError(f"{path} holds patterns for a layer '{name}' that this model "
                                       "does not have: they were fitted for another model")
        for kind, t in p.tensors().items():
            if tuple(t.shape) != tuple(module.weight.shape):
                raise PatternMismatchError(
                    f"{path}: the {kind} pattern of layer '{name}' has shape {tuple(t.shape)}, the "
                    f"layer's weight {tuple(module.weight.shape)}: fitted for another model")


# ----------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------
def fit_patterns(model: nn.Module, data: Iterable, *, kinds: Sequence[str] = KINDS,
                 device=None, max_batches: int | None = None, progress: bool = True,
                 checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
                 mean_y: str = "global", compute_dtype=None, batch_size: int = 64,
                 mask: str | None = None) -> Patterns:
    """Fit the linear and two-component patterns of every Conv2d/Linear layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        A network of the supported modules (:data:`toolkit.layers.SUPPORTED_MODULES`).
        It is evaluated in eval mode (Dropout off, BatchNorm with running statistics)
        and each module's own mode is restored afterwards; the model is never changed.
    data : Tensor or iterable
        A tensor of inputs (cut into batches of ``batch_size``), or a DataLoader or any
        iterable of input tensors or ``(inputs, labels)`` pairs. Floating-point inputs
        are cast to the dtype of the model's parameters; every batch must have the
        first batch's per-sample shape and hold only finite values.
    kinds : sequence of {"linear", "positive", "negative"}
        Which patterns to fit; all three by default. PatternNet and PatternAttribution
        with the two-component estimator need only ``("positive",)``, which costs a
        product with ``2 J`` output channels per layer instead of ``3 J``.
    device : torch.device or str, optional
        Where to compute. Defaults to the model's device. If it differs, a copy of the
        model is moved there (the user's model stays where it is).
    max_batches : int, optional
        Stop after this many batches (of the whole data, before sharding).
    progress : bool
        Show a tqdm progress bar with images per second and the time left.
    checkpoint : path, optional
        Save the statistics to this file every ``checkpoint_every`` batches and at the
        end. If the file exists the fit resumes from it, after checking that it belongs
        to this model, this number of processes, these kinds and this data (its batches
        are read again, and compared by a running fingerprint); anything else is a
        :class:`toolkit.streaming.CheckpointMismatchError`. Under ``torch.distributed``
        each rank writes ``<stem>.rank<r><suffix>``.
    mean_y : {"global", "masked"}
        The E[y] convention of the two-component patterns (docs/math.md, section 3.3).
    compute_dtype : torch.dtype or "tf32", optional
        Dtype of the per-batch products; None (default) is the model's own dtype. The
        sums are float64 and the products run on shifted values, so float32 products
        agree with float64 ones to about 1e-6 (relative, Frobenius). On CUDA ``"tf32"``
        and ``torch.bfloat16`` are an opt-in (documented in docs/math.md, section 3.2).
    mask : {"output", "relu_input"}, optional
        The activity mask of a layer whose output is not followed directly by a ReLU
        (in a residual block: the last convolution and the downsample): its own output
        ``z > 0``, or the input of the ReLU after the addition. Default
        :data:`toolkit.residual.DEFAULT_MASK`; the same for every layer of a chain
        (docs/math.md, section 6).

    Returns
    -------
    Patterns

    Notes
    -----
    When ``torch.distributed`` is initialised every rank fits its share of the batches
    -- the batches of a DataLoader with a DistributedSampler, otherwise every
    world-size-th batch -- and the statistics are all-reduced, so all ranks return
    identical patterns. Output neurons never active on the data are warned about (and
    listed by :meth:`Patterns.report`).
    """
    if mean_y not in MEAN_Y_CONVENTIONS:
        raise ValueError(f"mean_y must be one of {MEAN_Y_CONVENTIONS}, not {mean_y!r}")
    kinds = _check_kinds(kinds)
    parameter = next(model.parameters(), None)
    target = torch.device(device) if device is not None else (
        parameter.device if parameter is not None else torch.device("cpu"))
    compute_dtype = check_product_dtype(compute_dtype, target)
    result = stream(model, data, lambda layer: Statistics(layer, kinds, compute_dtype),
                    desc="fitting patterns", device=device, max_batches=max_batches,
                    progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    batch_size=batch_size, mask=mask)
    patterns = Patterns.from_statistics(result.plan, result.accumulators, result.model_fingerprint, mean_y)
    patterns.mask = result.mask
    inactive = patterns.inactive_outputs()
    if inactive:
        shown = ", ".join(map(str, inactive[:10])) + (f", ... ({len(inactive)} in all)" if len(inactive) > 10 else "")
        warnings.warn(
            f"output neurons [{shown}] of layer '{patterns.names[-1]}' were never active "
            "(z > 0) on the fitting data: their positive pattern is 0, so PatternNet and "
            "PatternAttribution with the two-component estimator cannot explain these classes; "
            "fit on data where they are predicted, or use the linear estimator for them",
            UserWarning, stacklevel=2)
    return patterns


def _check_kinds(kinds) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, not {kinds!r}")
    return tuple(k for k in KINDS if k in kinds)
