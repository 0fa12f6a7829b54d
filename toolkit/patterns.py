"""Learning the signal estimators for every neuron of a network: the *patterns*.

For every Conv2d/Linear layer (a following BatchNorm folded in) and every output neuron,
:func:`fit_patterns` learns the linear pattern ``a`` and the two-component patterns
``a_+``, ``a_-`` of :mod:`toolkit.linear` from float64 sums streamed over a DataLoader
in one pass (:class:`Statistics`). A neuron's samples are the layer's inputs (for a
convolution: every receptive-field patch), its output is ``y = w^T x`` without the
bias, and it is active where the layer output with the bias is positive.

Sums do not depend on how the data is cut into batches, can be checkpointed and resumed,
and add up across processes (``torch.distributed``). ``mean_y="masked"`` (default: the
mean over the component's own samples, the seminar text) or ``"global"`` (the mean over
all samples, the paper's formula and the authors' code) chooses the mean of ``y`` in the
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
from toolkit.layers import Layer, Plan, per_neuron
from toolkit.layers.adapters import adapter_for
from toolkit.linear import DEFAULT_MEAN_Y, MEAN_Y_CONVENTIONS
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
    the first batch) and the outputs ``y = w^T x`` by a reference per neuron and side
    (``shift_y`` over all samples, ``shift_y.y_pos`` over the active and ``shift_y.y_neg``
    over the inactive ones: the first batch's means), so every sum is of quantities near
    zero: no ``E[x y] - E[x] E[y]`` ever cancels, whether ``E[y]`` is taken over all samples
    or over a side, and the per-batch products can run in float32 (docs/math.md,
    section 3.2). For a convolution
    the zero padding makes the shifted patch differ from the shifted input's patch; the
    *cover* sums (the same products with an all-ones image) give the exact correction.

    One batch costs one weight-gradient-shaped product per layer
    (``torch.nn.grad.conv2d_weight``, or one matrix product for a Linear layer, whose
    rows are gathered over several batches first) with one output channel per group of
    :func:`output_groups` and neuron: ``3 J`` for all three patterns, ``2 J`` for the
    positive one alone (the ``ones`` group, the plain input sums, needs no product).

    A layer whose neurons read groups of its input channels (a grouped or depthwise
    convolution, a standalone BatchNorm: :mod:`toolkit.layers.adapters`) keeps the sums
    of the input side (``shift_x``, ``x.ones``) once per group; the buffer of one batch
    is laid out group by group, so that the grouped weight-gradient product reads each
    group's channels.

    Stored tensors (``W`` the weight shape, ``J = W[0]``, ``G`` the groups, ``R`` a
    group's rows: ``G`` for ``ones``, ``J`` otherwise)::

        n             ()              samples seen (images x output positions)
        shift_x       (G, *W[1:])     per input channel, kernel positions broadcast
        shift_y       (J,)            and shift_y.y_pos, shift_y.y_neg (J,) of the two sides
        sum_y         (J,)            sum of y - shift_y over all samples
        x.<group>     (R, *W[1:])     sum of group value x (x - shift_x), patch by patch;
                                      the value of y_pos is (y - shift_y.y_pos) on the
                                      active samples, 0 elsewhere, and so on
        cover.<group> (1 or J, 1, *kernel), (1 or J, 1) or (1 or J,): the same with an
                                      all-ones input
        total.<group> (1 or J,)       sum of the group value
    """

    def __init__(self, layer: Layer, kinds: Sequence[str] = KINDS, dtype=None,
                 gather_rows: int = 1024, mean_y: str = DEFAULT_MEAN_Y):
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.mean_y = mean_y
        self.groups = output_groups(self.kinds)
        self.dtype = dtype
        self.gather_rows = gather_rows
        self.weight_shape = tuple(layer.weight_shape)
        self.input_groups = layer.groups
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
        stats.mean_y = "masked" if "shift_y.y_pos" in tensors else "global"
        stats.kinds = tuple(k for k in KINDS if k in kinds)
        stats.groups, stats.dtype, stats.gather_rows = output_groups(stats.kinds), None, 1024
        stats.weight_shape = (tensors["sum_y"].shape[0], *tensors["x.ones"].shape[1:])
        stats.input_groups = tensors["x.ones"].shape[0]
        stats.tensors_, stats._rows = dict(tensors), []
        return stats

    @staticmethod
    def shapes(weight_shape: Sequence[int], kinds: Sequence[str] = KINDS, groups: int = 1,
               side_shifts: bool = False) -> dict[str, tuple[int, ...]]:
        """The stored tensors (the table above) and their shapes, for a layer of weight
        shape ``weight_shape`` whose neurons read ``groups`` groups of input channels,
        fitted for ``kinds``, with the shifts of each side of ``y`` (a fit with
        ``mean_y="masked"``) or without: what a file's statistics must hold."""
        j, rest = weight_shape[0], tuple(weight_shape[1:])
        fitted = output_groups(tuple(k for k in KINDS if k in kinds))
        cover = (1, *rest[1:]) if rest else ()
        shapes = {"n": (), "shift_x": (groups, *rest[:1], *[1] * (len(rest) - 1)), "shift_y": (j,),
                  "sum_y": (j,)}
        if side_shifts and "active" in fitted:
            shapes.update({"shift_y.y_pos": (j,), "shift_y.y_neg": (j,)})
        for group in fitted:
            shapes.update({f"x.{group}": (groups if group == "ones" else j, *rest),
                           f"cover.{group}": (1 if group == "ones" else j, *cover),
                           f"total.{group}": (1 if group == "ones" else j,)})
        return shapes

    @staticmethod
    def stored_shapes(weight_shape: Sequence[int], kinds: Sequence[str], stored: Sequence[str],
                      groups: int = 1) -> dict[str, tuple[int, ...]]:
        """:meth:`shapes` for the statistics of a file: with the side shifts if it holds
        either of them, and ``groups`` read from its input sums (1 where they do not
        give a divisor of the neurons: the checks then name the wrong tensor)."""
        j = weight_shape[0]
        groups = groups if groups > 0 and j % groups == 0 else 1
        return Statistics.shapes(weight_shape, kinds, groups,
                                 any(key.startswith("shift_y.") for key in stored))

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
        activity mask ``active`` (bool, shaped like ``z``; None: ``z > 0``; a layer may
        take it from the activation after an addition or a concatenation, see
        :mod:`toolkit.layers.activity`)."""
        dtype = _product_dtype(self.dtype, x)
        x, z = x.detach(), z.detach()
        if not self.tensors_:
            self._start(layer, x, z, dtype, active)
        elif "shift_y.y_pos" in self.tensors_:
            self._anchor_sides(layer, z, active, dtype)
        t = self.tensors_
        x_shifted = x.to(dtype) - layer.ops.along_channels(t["shift_x"].to(dtype), x)
        bias = layer.bias().double()
        offsets = {stat: (bias + self._shift(stat)).to(dtype) for stat in ("y_all", "y_pos", "y_neg")}
        with _tf32(self.dtype == "tf32"):
            sum_y = self._add(layer.ops, x_shifted, z.to(dtype), offsets, active)
        t["n"] += z.numel() // z.shape[layer.ops.neuron_dim]
        t["sum_y"] += sum_y

    def _shift(self, group: str) -> Tensor:
        """The shift of ``y`` a group's values use (files of an older version kept one
        ``shift_y`` for every group)."""
        t = self.tensors_
        return t.get(f"shift_y.{group}", t["shift_y"]) if group != "y_all" else t["shift_y"]

    def flush(self) -> None:
        """Add the gathered rows of a Linear layer to the sums: one matrix product per
        group, in the products' dtype (the first one becomes the float64 sum itself), so
        that no product is larger than one sum (VGG16's first dense layer: 0.4 GB of
        float32 at a time, not 1.2)."""
        if not self._rows:
            return
        xs = torch.cat([r[0] for r in self._rows])
        gs = torch.cat([r[1] for r in self._rows])
        self._rows = []
        with _tf32(self.dtype == "tf32"):
            for group, rows in self._split(gs.T).items():
                self._accumulate(f"x.{group}", rows @ xs)

    def all_reduce(self) -> None:
        """Sum the statistics of all ``torch.distributed`` ranks in place, after moving
        every rank's sums to rank 0's shifts (exactly)."""
        self.flush()
        t = self.tensors_
        shifts = {k: broadcast_from_rank_0(v.clone()) for k, v in t.items() if k.startswith("shift_y")}
        self.reshift(broadcast_from_rank_0(t["shift_x"].clone()), shifts)
        sum_over_ranks(v for k, v in self.tensors_.items() if not k.startswith("shift"))

    def to(self, device) -> "Statistics":
        self.flush()
        return Statistics.from_tensors({k: v.to(device) for k, v in self.tensors_.items()}, self.kinds)

    # -- the sums of one batch -----------------------------------------------------
    def _start(self, layer: Layer, x: Tensor, z: Tensor, dtype, active: Tensor | None) -> None:
        """Empty sums; the shifts are the first batch's means, rounded to the products'
        dtype so that the shifted values and the exact corrections use the same ones.
        The sums of the groups are made by the first batch (:meth:`_accumulate`)."""
        kw = dict(dtype=torch.float64, device=z.device)
        bias = layer.bias().double()
        mean = layer.ops.neuron_means(z).to(dtype).double()     # b + shift_y, exactly representable
        self.tensors_ = {"n": torch.zeros((), **kw),
                         "shift_x": layer.ops.input_shift(x).to(dtype).double(),
                         "shift_y": mean - bias,
                         "sum_y": torch.zeros(self.weight_shape[0], **kw)}
        if "active" in self.groups and self.mean_y == "masked":
            for stat in ("y_pos", "y_neg"):
                self.tensors_[f"shift_y.{stat}"] = mean - bias
            self._anchor_sides(layer, z, active, dtype, torch.ones_like(mean, dtype=torch.bool))

    def _anchor_sides(self, layer: Layer, z: Tensor, active: Tensor | None, dtype,
                      empty: Tensor | None = None) -> None:
        """Move the shift of each side of ``y`` to this batch's mean over that side, for
        the neurons whose side has had no sample yet (their sums are all 0, so this is
        exact): a rare side is then summed around its own values, not around the other
        side's, and its covariance about its own mean (``mean_y="masked"``) does not cancel
        in float32. (For ``mean_y="global"`` every side is shifted by ``shift_y``, near the
        mean over all samples that convention subtracts.)"""
        t = self.tensors_
        if empty is not None:
            missing = {"y_pos": empty, "y_neg": empty}
        else:
            missing = {"y_pos": t["total.active"] == 0, "y_neg": t["n"] - t["total.active"] == 0}
        if not any(bool(m.any()) for m in missing.values()):
            return  # every side has its shift (the usual case after the first batch)
        dim = layer.ops.neuron_dim % z.dim()
        samples = [d for d in range(z.dim()) if d != dim]
        on = active if active is not None else z > 0
        count_on = on.sum(samples)
        bias = layer.bias().double()
        for stat, count in (("y_pos", count_on), ("y_neg", z.numel() // z.shape[dim] - count_on)):
            moved = (missing[stat] & (count > 0)).nonzero().squeeze(1)
            if not len(moved):
                continue
            side = on.index_select(dim, moved)          # only the neurons whose shift moves
            side = side if stat == "y_pos" else ~side
            values = z.index_select(dim, moved).double()
            side_mean = ((values * side).sum(samples) / count[moved]).to(dtype).double()
            shift = t[f"shift_y.{stat}"].clone()
            shift[moved] = side_mean - bias[moved]
            t[f"shift_y.{stat}"] = shift

    def _fill(self, g: Tensor, z: Tensor, offsets: dict[str, Tensor], channel: int, groups: int,
              active: Tensor | None) -> Tensor | None:
        """Write the groups' values into ``g`` (``channel`` is the dimension of the
        neurons, laid out group by group) with few passes: the mask, then ``y`` minus each
        side's shift on that side. Returns, for a fit of one side only, the sum of that
        side's shifted ``y`` over all samples (for the sum of ``y``), else None."""
        stats = self._stats()
        per_group = self.weight_shape[0] // groups
        buffer = g.unflatten(channel, (groups, len(stats), per_group))
        parts = {stat: buffer.select(channel + 1, i) for i, stat in enumerate(stats)}
        z = z.unflatten(channel, (groups, per_group))
        shape = [1] * z.dim()
        shape[channel:channel + 2] = groups, per_group
        offsets = {stat: offset.reshape(shape) for stat, offset in offsets.items()}
        samples = tuple(d for d in range(z.dim()) if d not in (channel, channel + 1))
        if "y_all" in parts:
            torch.sub(z, offsets["y_all"], out=parts["y_all"])
            return None
        if active is None:
            torch.gt(z, 0, out=parts["active"])
        else:
            parts["active"].copy_(active.unflatten(channel, (groups, per_group)))
        direct = None
        for stat in ("y_pos", "y_neg"):
            side = parts.get(stat)
            if side is None:
                continue
            torch.sub(z, offsets[stat], out=side)
            if ("y_pos" in parts) != ("y_neg" in parts):   # one side only: its shifted y over all
                direct = side.sum(samples).double().reshape(-1)
            if stat == "y_pos":
                side.mul_(parts["active"])
            else:
                side.sub_(side * parts["active"])
        return direct

    def _sum_y(self, totals: dict[str, Tensor], direct: Tensor | None, samples: int) -> Tensor:
        """The batch's sum of ``y - shift_y`` per neuron, exactly, from the groups' totals
        (each side's values are shifted by its own reference)."""
        if "y_all" in totals:
            return totals["y_all"]
        shift = self.tensors_["shift_y"]
        if direct is not None:
            stat = "y_pos" if "y_pos" in totals else "y_neg"
            return direct + samples * (self._shift(stat) - shift)
        counts = {"y_pos": totals["active"], "y_neg": samples - totals["active"]}
        return sum(totals[stat] + counts[stat] * (self._shift(stat) - shift) for stat in ("y_pos", "y_neg"))

    def _stats(self) -> list[str]:
        """The groups the buffer of one batch holds (every group but ``ones``, whose sums
        need no buffer), in the buffer's order within each input group."""
        return [group for group in self.groups if group != "ones"]

    def _split(self, t: Tensor) -> dict[str, Tensor]:
        """A tensor with one row per buffer channel as one ``J``-row tensor per group of
        :meth:`_stats`, neurons in their order."""
        stats, rows, groups = self._stats(), self.weight_shape[0], self.input_groups
        blocks = t.reshape(groups, len(stats), rows // groups, *t.shape[1:])
        return {stat: blocks[:, i].reshape(rows, *t.shape[1:]) for i, stat in enumerate(stats)}

    def _add(self, ops, x: Tensor, z: Tensor, offsets: dict[str, Tensor], active: Tensor | None) -> Tensor:
        """Add one batch's sums: the plain input sums (group ``ones``), the other groups'
        values ``g`` (one buffer), their patch sums with the shifted input (gathered
        first where the layer type wants it), their cover sums and totals. Returns the
        batch's sum of ``y - shift_y``."""
        channel = ops.neuron_dim % z.dim()
        shape = list(z.shape)
        shape[channel] = len(self._stats()) * self.weight_shape[0]
        g = torch.empty(shape, dtype=z.dtype, device=z.device)
        direct = self._fill(g, z, offsets, channel, ops.groups, active)
        self._add_input_sums(ops, x, z, channel)
        per_position = g.sum(0, keepdim=True)
        totals = self._split(ops.neuron_values(per_position).sum(0).double())  # counts exact below 2**24
        cover = self._split(ops.cover_sums(x.shape, per_position).double())
        sums = None
        if ops.gathers_rows:
            self._rows.append((ops.patches(x), ops.neuron_values(g)))
            if sum(r[0].shape[0] for r in self._rows) >= self.gather_rows:
                self.flush()
        else:
            sums = self._split(ops.patch_sums(x, g))
        for group in self._stats():
            if sums is not None:
                self._accumulate(f"x.{group}", sums[group])
            self._accumulate(f"cover.{group}", cover[group])
            self._accumulate(f"total.{group}", totals[group])
        return self._sum_y(totals, direct, z.numel() // z.shape[channel])

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
    def reshift(self, shift_x: Tensor, shift_y: Tensor | dict[str, Tensor]) -> None:
        """Express the sums relative to other shifts, exactly (every sum is a polynomial
        in the shifts), so that sums of different processes can be added. ``shift_y`` is
        the new ``shift_y`` of every group, or a dict of the stored shifts by name."""
        t, neurons = dict(self.tensors_), self.weight_shape[0]
        new_y = shift_y if isinstance(shift_y, dict) else {k: shift_y for k in t if k.startswith("shift_y")}
        dx = t["shift_x"] - shift_x                 # x - new = (x - old) + dx on covered positions
        dx_neurons = per_neuron(dx, neurons)
        new = dict(t)
        for group in self.groups:
            shift = dx if group == "ones" else dx_neurons
            new[f"x.{group}"] = t[f"x.{group}"] + shift * t[f"cover.{group}"]
        side = {"y_pos": "active", "y_neg": None, "y_all": "ones"}
        for group in ("y_pos", "y_neg", "y_all"):
            if group not in self.groups:
                continue
            key = "shift_y" if group == "y_all" or f"shift_y.{group}" not in t else f"shift_y.{group}"
            dy = t[key] - new_y[key]                # y - new = (y - old) + dy
            x_side, cover_side, total_side = self._side(t, side[group], neurons)
            d = dy.reshape(-1, *([1] * (x_side.dim() - 1)))
            new[f"x.{group}"] = new[f"x.{group}"] + d * (x_side + dx_neurons * cover_side)
            new[f"cover.{group}"] = t[f"cover.{group}"] + d * cover_side
            new[f"total.{group}"] = t[f"total.{group}"] + dy * total_side
        new["sum_y"] = t["sum_y"] + t["n"] * (t["shift_y"] - new_y["shift_y"])
        new["shift_x"] = shift_x.clone()
        new.update({k: v.clone() for k, v in new_y.items()})
        self.tensors_ = new

    @staticmethod
    def _side(t: dict, group: str | None, neurons: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sums of x, cover and count over the samples of one side (None: inactive), one
        row per neuron."""
        if group is not None:
            return per_neuron(t[f"x.{group}"], neurons), t[f"cover.{group}"], t[f"total.{group}"]
        return (per_neuron(t["x.ones"], neurons) - t["x.active"], t["cover.ones"] - t["cover.active"],
                t["total.ones"] - t["total.active"])

    def unshifted(self) -> dict[str, Tensor]:
        """The plain sums, ``sum x``, ``sum x y``, ``sum_+ x y``, ... (float64), computed
        exactly from the shifted ones: for checks, and to compare with other code. ``sum_x``
        has one row per input group, the others one per neuron."""
        t, neurons = self.tensors_, self.weight_shape[0]
        mu = t["shift_x"]

        def x_sum(group):      # sum over the group of h x  (h = the group's value)
            shift = mu if group == "ones" else per_neuron(mu, neurons)
            return t[f"x.{group}"] + shift * t[f"cover.{group}"]

        def col(group):
            return self._shift(group).reshape(-1, *([1] * (t["x.ones"].dim() - 1)))

        out = {"n": t["n"], "sum_x": x_sum("ones"), "sum_y": t["sum_y"] + t["n"] * t["shift_y"]}
        every = per_neuron(out["sum_x"], neurons)
        if "active" in self.groups:
            out["n_pos"] = t["total.active"]
            out["sum_x_pos"] = x_sum("active")
            if "y_pos" in self.groups:
                out["sum_y_pos"] = t["total.y_pos"] + t["total.active"] * self._shift("y_pos")
                out["sum_xy_pos"] = x_sum("y_pos") + col("y_pos") * out["sum_x_pos"]
            if "y_neg" in self.groups:
                out["sum_xy_neg"] = x_sum("y_neg") + col("y_neg") * (every - out["sum_x_pos"])
            if "y_pos" in self.groups and "y_neg" in self.groups:
                out["sum_xy"] = out["sum_xy_pos"] + out["sum_xy_neg"]
        else:
            out["sum_xy"] = x_sum("y_all") + col("y_all") * every
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
class _Part:
    """The sums of one group of a layer's samples, each ``y`` shifted by ``shift``:
    ``xy`` the sum of ``x~ (y - shift)``, ``x`` a list of ``(sign, tensor)`` adding up to
    the sum of ``x~``, and their cover sums (``x~`` the shifted input)."""

    xy: Tensor
    x: list
    cover_y: Tensor
    cover: Tensor
    shift: Tensor


@dataclass
class _Side:
    """One component of a layer (all samples, active, inactive): its parts, its number of
    samples and its exact mean of ``y`` per neuron."""

    parts: list
    count: Tensor
    mean_y: Tensor


def _sides(stats: "Statistics") -> dict[str, _Side]:
    t, groups, j = stats.tensors_, stats.groups, stats.weight_shape[0]
    n = t["n"].expand(j)
    ones = per_neuron(t["x.ones"], j)
    mean = t["shift_y"] + t["sum_y"] / t["n"]
    if "y_all" in groups:
        part = _Part(t["x.y_all"], [(1, ones)], t["cover.y_all"], t["cover.ones"], stats._shift("y_all"))
        return {"all": _Side([part], n, mean)}
    sides = {}
    n_pos, n_neg = t["total.active"], n - t["total.active"]
    positive = negative = None
    if "y_pos" in groups:
        positive = _Part(t["x.y_pos"], [(1, t["x.active"])], t["cover.y_pos"], t["cover.active"],
                         stats._shift("y_pos"))
        sides["positive"] = _Side([positive], n_pos, positive.shift + t["total.y_pos"] / n_pos.clamp(min=1))
    if "y_neg" in groups:
        negative = _Part(t["x.y_neg"], [(1, ones), (-1, t["x.active"])], t["cover.y_neg"],
                         t["cover.ones"] - t["cover.active"], stats._shift("y_neg"))
        sides["negative"] = _Side([negative], n_neg, negative.shift + t["total.y_neg"] / n_neg.clamp(min=1))
    if positive is not None and negative is not None:
        sides["all"] = _Side([positive, negative], n, mean)
    return sides


def _pattern(side: _Side, w: Tensor, mu: Tensor, m: Tensor, vanishing: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
    """``C / (w^T C)`` of one side, with the unnormalised covariance, part by part,

        C = sum_c x (y - m) = sum_parts [sum x~ y~ + mu cover_y - (m - shift) (sum x~ + mu cover)]

    (``x~``, ``y~`` the shifted values; docs/math.md, section 3.2), written in one
    allocation and in-place passes. ``vanishing`` marks the rows whose ``C`` is exactly 0
    by construction (a covariance around the side's own mean of ``y`` over one sample),
    set to 0 instead of the rounding noise of the sums. Returns the pattern and the
    zero-denominator mask.
    """
    j = w.shape[0]
    col = (j, *([1] * (side.parts[0].xy.dim() - 1)))
    c = None
    for part in side.parts:
        c = part.xy.clone() if c is None else c.add_(part.xy)
        c.addcmul_(part.cover_y, mu)
        d = (m - part.shift).reshape(col)
        for sign, t in part.x:
            c.addcmul_(t, d, value=-sign)
        c.addcmul_(part.cover * d, mu, value=-1)
    if vanishing is not None:
        c[vanishing] = 0
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


def _rows_of(t, rows: slice, j: int):
    """``t`` for the neurons ``rows`` only, if it has one row per neuron (a view); a tensor
    shared by the neurons, such as the input sums of one group, stays whole."""
    return t[rows] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == j else t


def _side_rows(side: _Side, rows: slice, j: int) -> _Side:
    """The sums of ``side`` for the neurons ``rows`` only (views)."""
    def cut(t):
        return _rows_of(t, rows, j)

    parts = [_Part(cut(p.xy), [(sign, cut(t)) for sign, t in p.x], cut(p.cover_y), cut(p.cover), cut(p.shift))
             for p in side.parts]
    return _Side(parts, cut(side.count), cut(side.mean_y))


def estimate_patterns(stats: Statistics, weight: Tensor, mean_y: str = DEFAULT_MEAN_Y, *, dtype=None,
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
    mean_y : {"masked", "global"}
        Which mean of ``y`` the two-component covariances subtract: the mean over the
        samples of the component (the default, the seminar text) or over all samples
        (the paper's formula and the authors' code).
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
    sides = _sides(s)
    m_global = sides["all"].mean_y if "all" in sides else t["shift_y"] + t["sum_y"] / t["n"]
    mu = per_neuron(t["shift_x"], j)
    if free:
        s.tensors_ = t = {}  # from here on only the sides hold the sums
    kind_side = {"linear": "all", "positive": "positive", "negative": "negative"}
    block = max(1, SOLVE_BLOCK_ELEMENTS // max(1, w[0].numel()))
    result, zeros = {}, {}
    for kind in s.kinds:
        side = sides.pop(kind_side[kind])
        own_mean = kind != "linear" and mean_y == "masked"
        m = side.mean_y if own_mean else m_global
        pattern, zero = torch.empty(w.shape, dtype=dtype), torch.empty(j, dtype=torch.bool)
        for start in range(0, j, block):
            rows = slice(start, start + block)
            vanishing = (side.count[rows] == 1) if own_mean else None
            values, zero[rows] = _pattern(_side_rows(side, rows, j), w[rows], _rows_of(mu, rows, j), m[rows],
                                          vanishing)
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
        The activity mask the fit used (:mod:`toolkit.layers.activity`); None if unknown.
    """

    def __init__(self, layers: dict[str, LayerPatterns], fingerprint: str,
                 statistics: dict[str, Statistics] | None = None, mean_y: str = DEFAULT_MEAN_Y,
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
                        mean_y: str = DEFAULT_MEAN_Y, *, dtype=None, keep: bool = True) -> "Patterns":
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
            lines.append(f"output neurons never active on the fitting data: {_listed(inactive)}")
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
        contents = read_patterns(path, KINDS, Statistics.stored_shapes)
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
        ops = None if module is None else adapter_for(module)
        if ops is None:
            raise PatternMismatchError(f"{path} holds patterns for a layer '{name}' that this model "
                                       "does not have: they were fitted for another model")
        shape = tuple(ops(module).weight_shape)
        for kind, t in p.tensors().items():
            if tuple(t.shape) != shape:
                raise PatternMismatchError(
                    f"{path}: the {kind} pattern of layer '{name}' has shape {tuple(t.shape)}, the "
                    f"layer's weight {shape}: fitted for another model")


# ----------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------
def _listed(indices: list[int], shown: int = 10) -> str:
    """``[0, 2, 3]``, or the first ``shown`` of a long list and how many in all."""
    if len(indices) <= shown:
        return str(list(indices))
    return "[" + ", ".join(map(str, indices[:shown])) + f", ... ({len(indices)} in all)]"


def fit_patterns(model: nn.Module, data: Iterable, *, kinds: Sequence[str] = KINDS,
                 device=None, max_batches: int | None = None, progress: bool = True,
                 checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
                 mean_y: str = DEFAULT_MEAN_Y, compute_dtype=None, batch_size: int = 64,
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
    mean_y : {"masked", "global"}
        The E[y] convention of the two-component patterns (docs/math.md, section 3.3):
        ``"masked"`` (default, :data:`toolkit.linear.DEFAULT_MEAN_Y`) subtracts the mean of
        ``y`` over the component's own samples, which keeps the patterns unchanged when a
        constant is added to the inputs; ``"global"`` subtracts the mean over all samples,
        as the paper's formula and the authors' code (iNNvestigate 1.0.9) do.
    compute_dtype : torch.dtype or "tf32", optional
        Dtype of the per-batch products; None (default) is the model's own dtype. The
        sums are float64 and the products run on shifted values, so float32 products
        agree with float64 ones to about 1e-6 (relative, Frobenius). On CUDA ``"tf32"``
        and ``torch.bfloat16`` are an opt-in (documented in docs/math.md, section 3.2).
    mask : {"output", "relu_input"}, optional
        The activity mask of a layer whose output is not followed directly by a ReLU
        (in a residual block: the last convolution and the downsample): its own output
        ``z > 0``, or the input of the ReLU after the addition. Default
        :data:`toolkit.layers.DEFAULT_MASK`; the same for every layer of a chain
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
    result = stream(model, data, lambda layer: Statistics(layer, kinds, compute_dtype, mean_y=mean_y),
                    desc="fitting patterns", device=device, max_batches=max_batches,
                    progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    batch_size=batch_size, mask=mask)
    patterns = Patterns.from_statistics(result.plan, result.accumulators, result.model_fingerprint, mean_y,
                                        dtype=pattern_dtype, keep=keep_statistics)
    patterns.mask = result.mask
    inactive = patterns.inactive_outputs()
    if inactive:
        shown = _listed(inactive)
        warnings.warn(
            f"output neurons {shown} of layer '{patterns.names[-1]}' were never active "
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
