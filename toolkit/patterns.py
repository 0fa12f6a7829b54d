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

Memory: the sums are float64 and, for a layer with ``J`` neurons of ``D`` inputs, two
or three ``J x D`` tensors. The final solve turns them into patterns layer by layer, a
block of neurons at a time, and frees each layer's sums once its patterns are made,
unless ``fit_patterns(..., keep_statistics=True)`` keeps them (to recompute the patterns
with the other ``mean_y``, or to save them with the patterns). :class:`Patterns` holds
the patterns in the model's dtype (at least float32) unless float64 is asked for, saves
and loads them (:mod:`toolkit.pattern_files`) and refuses patterns of another model.

The formulas, the sums and the conventions are in docs/math.md, sections 2-3.
"""
from __future__ import annotations

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
from toolkit.memory import release_freed_memory
from toolkit.pattern_files import (PATTERN_DTYPES, LayerRecord, PatternFile, PatternFileError, read_patterns,
                                   write_patterns)
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

    @staticmethod
    def shapes(weight_shape: Sequence[int], kinds: Sequence[str] = KINDS) -> dict[str, tuple[int, ...]]:
        """The stored tensors (the table above) and their shapes, for a layer of weight
        shape ``weight_shape`` fitted for ``kinds``: what a file's statistics must hold."""
        j, rest = weight_shape[0], tuple(weight_shape[1:])
        shapes = {"n": (), "shift_x": (1, rest[0], *[1] * (len(rest) - 1)), "shift_y": (j,), "sum_y": (j,)}
        for group in output_groups(tuple(k for k in KINDS if k in kinds)):
            rows = 1 if group == "ones" else j
            shapes.update({f"x.{group}": (rows, *rest), f"cover.{group}": (rows, 1, *rest[1:]),
                           f"total.{group}": (rows,)})
        return shapes

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
    """The patterns of one layer, each shaped like the layer's weight, and the numbers of
    samples they were estimated from.

    ``linear`` is ``a`` of the linear estimator S_a; ``positive`` and ``negative`` are
    ``a_+`` and ``a_-`` of the two-component estimator S_a+-. A fit with ``kinds``
    holds only those; asking for another raises :class:`MissingPatternsError`. ``n`` is
    the number of samples (images x output positions), ``n_pos`` (float64, ``(J,)``)
    the samples on which each neuron was active; None where unknown (patterns made by
    hand, or a fit of the linear pattern alone for ``n_pos``).
    """

    def __init__(self, linear: Tensor | None = None, positive: Tensor | None = None,
                 negative: Tensor | None = None, layer: str = "", n: int | None = None,
                 n_pos: Tensor | None = None):
        self._tensors = {k: t for k, t in zip(KINDS, (linear, positive, negative)) if t is not None}
        self.layer = layer
        self.n = None if n is None else int(n)
        self.n_pos = n_pos

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the patterns (None if there are none)."""
        return next((t.dtype for t in self._tensors.values()), None)

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


#: The solve makes the patterns of this many float64 numbers of a layer at a time (64
#: MiB): a block of neurons, so that its temporaries stay small next to the sums.
SOLVE_BLOCK_ELEMENTS = 2 ** 23


def _pattern_dtype(dtype, model_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype patterns are held in: ``dtype`` (float32 or float64) if given, else the
    model's dtype, at least float32 (None when neither is known)."""
    if dtype is None:
        if model_dtype is None:
            return None
        return torch.float64 if model_dtype == torch.float64 else torch.float32
    if dtype not in PATTERN_DTYPES:
        raise ValueError(f"patterns are held in torch.float32 or torch.float64, not {dtype!r}")
    return dtype


def _side_rows(side: _Side, rows: slice, j: int) -> _Side:
    """The sums of ``side`` for the neurons ``rows`` only (views; a row shared by all
    neurons, such as the plain input sums, stays whole)."""
    def cut(t):
        return t[rows] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == j else t

    return _Side([(sign, cut(t)) for sign, t in side.xy], [(sign, cut(t)) for sign, t in side.x],
                 cut(side.cover_y), cut(side.cover), cut(side.count), cut(side.sum_y))


def estimate_patterns(stats: Statistics, weight: Tensor, mean_y: str = "global", *, dtype=None,
                      free: bool = False) -> tuple[LayerPatterns, dict[str, int]]:
    """Compute a layer's patterns from its statistics (docs/math.md, section 3).

    The patterns are made a block of neurons at a time (:data:`SOLVE_BLOCK_ELEMENTS`), in
    float64, and stored in ``dtype``: the float64 temporaries of a block stay small next
    to the sums (VGG16's first dense layer: 64 MiB against 0.8 GiB per sum).

    Parameters
    ----------
    stats : Statistics
    weight : Tensor
        The layer's folded weight ``W``.
    mean_y : {"global", "masked"}
        Which mean of ``y`` the two-component covariances subtract: the mean over all
        samples (the authors' code) or over the samples of the component (the seminar).
    dtype : torch.dtype, optional
        The dtype of the patterns: float32 or float64; default the weight's dtype, at
        least float32.
    free : bool
        Release the sums as soon as no remaining pattern needs them: ``stats`` is left
        empty (what :func:`fit_patterns` does unless it keeps the statistics).

    Returns
    -------
    patterns : LayerPatterns
        On the CPU; the kinds the statistics were collected for, with the sample counts.
    counts : dict
        Neurons never active (``dead``), always active, and with a zero denominator.
    """
    if mean_y not in MEAN_Y_CONVENTIONS:
        raise ValueError(f"mean_y must be one of {MEAN_Y_CONVENTIONS}, not {mean_y!r}")
    if not stats.tensors_ or stats.n <= 0:
        raise ValueError("the statistics hold no samples: fit on at least one batch")
    dtype = _pattern_dtype(dtype, weight.dtype)
    s = stats.to("cpu")
    if free:
        stats.tensors_ = {}
    t = s.tensors_
    w = weight.detach().to("cpu")
    if w.dtype not in (torch.float32, torch.float64):
        w = w.to(torch.float64)
    j = w.shape[0]
    n, n_pos = t["n"], t.get("total.active")
    sides = _sides(t, s.groups)
    m_global = t["sum_y"] / t["n"]
    mu = t["shift_x"]
    if free:
        s.tensors_ = t = {}  # from here on only the sides hold the sums
    kind_side = {"linear": "all", "positive": "positive", "negative": "negative"}
    block = max(1, SOLVE_BLOCK_ELEMENTS // max(1, w[0].numel()))
    result, zeros = {}, {}
    for kind in s.kinds:
        side = sides.pop(kind_side[kind])
        m = m_global if kind == "linear" or mean_y == "global" else \
            side.sum_y / side.count.clamp(min=1) * (side.count > 0)
        pattern, zero = torch.empty(w.shape, dtype=dtype), torch.empty(j, dtype=torch.bool)
        for start in range(0, j, block):
            rows = slice(start, start + block)
            values, zero[rows] = _pattern(_side_rows(side, rows, j), w[rows], mu, m[rows])
            pattern[rows] = values
            del values
        result[kind], zeros[kind] = pattern, zero & (side.count > 0)
        del side  # its sums go unless a pattern still to be made reads them
    sides.clear()
    degenerate = torch.zeros(j, dtype=torch.bool)
    for zero in zeros.values():
        degenerate |= zero
    counts = {"zero_denominator": int(degenerate.sum())}
    if n_pos is not None:
        counts.update(dead=int((n_pos == 0).sum()), always_active=int((n_pos == n).sum()))
    patterns = LayerPatterns(**{k: v.reshape(weight.shape) for k, v in result.items()},
                             n=int(n), n_pos=None if n_pos is None else n_pos.clone())
    return patterns, counts


# ----------------------------------------------------------------------------------
# Patterns: the fitted result
# ----------------------------------------------------------------------------------
class Patterns:
    """The fitted patterns of a model, keyed by the qualified names of its layers.

    Parameters
    ----------
    layers : dict[str, LayerPatterns]
    fingerprint : str
        :func:`fingerprint` of the model the patterns belong to.
    statistics : dict[str, Statistics], optional
        The sums the patterns were computed from, where they were kept
        (``fit_patterns(..., keep_statistics=True)``, or a file saved with them): to
        recompute the patterns with the other ``mean_y`` convention, or to save them.
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
                        mean_y: str = "global", *, dtype=None, keep: bool = True) -> "Patterns":
        """The patterns of every layer of ``plan`` from its statistics
        (:func:`estimate_patterns`), in ``dtype`` (default: the model's, at least
        float32). With ``keep=False`` each layer's statistics are freed as soon as its
        patterns are made (and taken out of ``statistics``), the smallest layers first:
        when the largest is solved, the others' sums have become their smaller patterns.
        Otherwise the result keeps them."""
        made = {}
        order = list(plan) if keep else sorted(plan, key=lambda layer: layer.weight_shape.numel())
        for layer in order:
            stats = statistics[layer.name] if keep else statistics.pop(layer.name)
            made[layer.name] = estimate_patterns(stats, layer.weight(), mean_y, dtype=dtype, free=not keep)
            del stats
            if not keep:
                release_freed_memory()  # sums streamed into the heap: their pages go back now
        layers = {layer.name: made[layer.name][0] for layer in plan}
        counts = {layer.name: made[layer.name][1] for layer in plan}
        return cls(layers, fingerprint, statistics if keep else None, mean_y, counts)

    # -- access --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the patterns (float32 or float64; None if there are none)."""
        return next((p.dtype for p in self.layers.values() if p.dtype is not None), None)

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
        dtype = str(self.dtype).replace("torch.", "")
        return (f"Patterns({len(self)} layers, kinds={list(self.kinds)}, mean_y={self.mean_y!r}, "
                f"{dtype}, model {self.fingerprint[:8]})")

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
        (``z > 0``) on the fitting data: their positive pattern is 0. Read from the
        active counts (``n_pos``), else from the statistics, else from the all-zero rows
        of ``a_+`` (patterns made by hand)."""
        if not self.layers:
            return []
        last = self.names[-1]
        n_pos = self[last].n_pos
        stats = self.statistics.get(last)
        if n_pos is None and stats is not None and "total.active" in stats.tensors_:
            n_pos = stats.n_pos
        if n_pos is not None:
            return torch.nonzero(n_pos == 0).flatten().tolist()
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
            n = p.n if p.n is not None else int(self.statistics[name].n) if name in self.statistics else 0
            neurons = next(iter(p.tensors().values())).shape[0]
            lines.append(f"{name:<24}{neurons:>8}{n:>14,}{c.get('dead', 0):>7}"
                         f"{c.get('always_active', 0):>10}{c.get('zero_denominator', 0):>10}")
        inactive = self.inactive_outputs()
        if inactive:
            lines.append(f"output neurons never active on the fitting data: {inactive}")
        return "\n".join(lines)

    # -- save / load ---------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, statistics: bool = False, dtype=None) -> None:
        """Write the patterns to a safetensors file (:mod:`toolkit.pattern_files`).

        By default the file holds the patterns alone, in the dtype they are held in
        (float32 for a float32 model: about the size of the model's weights per pattern
        kind), with the sample counts and the fit's settings.

        Parameters
        ----------
        path : path
            The file; written whole or not at all. If it cannot be written, an
            :class:`OSError` (such as :class:`PermissionError`) names it.
        statistics : bool
            Also write the float64 statistics the patterns were computed from (two to
            four times the patterns' size). They are needed to recompute the patterns
            with the other ``mean_y`` convention (:func:`toolkit.compare.with_mean_y`),
            or to add them to another fit's; a fit's ``checkpoint`` holds them too and
            resumes an interrupted fit. Requires patterns that kept them
            (``fit_patterns(..., keep_statistics=True)``).
        dtype : torch.dtype, optional
            Write the patterns in float32 or float64 instead.
        """
        if statistics and set(self.statistics) != set(self.names):
            raise ValueError("these patterns keep no statistics to save: fit them with "
                             "fit_patterns(..., keep_statistics=True), or save without statistics")
        dtype = _pattern_dtype(dtype)
        layers = {name: LayerRecord({k: t.to(dtype or t.dtype) for k, t in p.tensors().items()}, p.n, p.n_pos,
                                    self.statistics[name].tensors() if statistics else None)
                  for name, p in self.layers.items()}
        write_patterns(path, PatternFile(self.fingerprint, self.mean_y, layers, self.counts, self.mask))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, *, dtype=None) -> "Patterns":
        """Read patterns written by :meth:`save`; with ``model``, check they belong to it.

        Files of every readable version (:data:`toolkit.pattern_files.READABLE_VERSIONS`)
        load: version 3 as written; versions 1 and 2 (float64 patterns with their
        statistics) with version 2's statistics, and version 1's sample counts only. The
        file format (safetensors) holds only tensors and text: loading runs no code.
        Every tensor read is checked (dtype, shape, finite values), and every problem
        with the file is a :class:`PatternFileError` (or :class:`FileNotFoundError`) that
        names it, and the tensor where one is to blame: unreadable, not a patterns file,
        another version, missing or malformed metadata, missing, extra or malformed
        tensors, or (with ``model``) patterns shaped unlike the model's layers.

        Parameters
        ----------
        path : path
        model : nn.Module, optional
        dtype : torch.dtype, optional
            Hold the patterns in float32 or float64; default the file's dtype.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no patterns file at {path}")
        contents = read_patterns(path, KINDS, Statistics.shapes)
        if contents.mean_y not in MEAN_Y_CONVENTIONS:
            raise PatternFileError(f"{path} has malformed metadata (mean_y {contents.mean_y!r})")
        dtype = _pattern_dtype(dtype)
        layers = {name: LayerPatterns(**{k: t.to(dtype or t.dtype) for k, t in r.patterns.items()},
                                      n=r.n, n_pos=r.n_pos)
                  for name, r in contents.layers.items()}
        statistics = {name: Statistics.from_tensors(r.statistics, list(r.patterns))
                      for name, r in contents.layers.items() if r.statistics is not None}
        patterns = cls(layers, contents.fingerprint, statistics, contents.mean_y, contents.counts,
                       contents.mask)
        if model is not None:
            _check_shapes(patterns, model, path)
            patterns.check(model)
        return patterns


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
                 mask: str | None = None, keep_statistics: bool = False,
                 pattern_dtype=None) -> Patterns:
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
    keep_statistics : bool
        Keep the float64 sums in ``Patterns.statistics`` (two to four times the size of
        the patterns): to recompute the patterns with the other ``mean_y``
        (:func:`toolkit.compare.with_mean_y`), or to save them with the patterns
        (``save(..., statistics=True)``). By default each layer's sums are freed as soon
        as its patterns are made, so the fit needs little more memory than its sums.
    pattern_dtype : torch.dtype, optional
        The dtype the patterns are held in: float32 or float64. Default: the model's
        dtype, at least float32. The patterns are always computed in float64.

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
    patterns = Patterns.from_statistics(result.plan, result.accumulators, result.model_fingerprint, mean_y,
                                        dtype=pattern_dtype, keep=keep_statistics)
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
