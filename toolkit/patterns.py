"""Learning the signal estimators for every neuron of a network: the *patterns*.

For a Conv2d or Linear layer with (BatchNorm-folded) weight ``W`` and bias ``b``, every
output neuron ``j`` sees samples ``x`` (for a convolution: the receptive-field patch at
every spatial position of every image) and computes ``y_j = w_j^T x``. The neuron is
*active* on a sample when the layer output ``z_j = y_j + b_j`` is positive. The
estimators of :mod:`toolkit.linear` then read, per neuron (math.md, sections 2-3):

* linear           ``a   = cov[x, y] / (w^T cov[x, y])``
* two-component    ``a_+ = (E_+[x y] - E_+[x] E[y]) / (w^T (E_+[x y] - E_+[x] E[y]))``
                   and ``a_-`` likewise on the inactive samples.

``E_+`` is the mean over the samples where the neuron is active. Following the authors'
code, ``E[y]`` is the UNMASKED mean over all samples (``mean_y="global"``, the default);
``mean_y="masked"`` uses ``E_+[y]`` as written in the seminar text.

Every expectation above is a ratio of running sums, so one pass over the data collects,
per layer and in float64 (:class:`Statistics`)::

    n, sum x, sum y, sum x y^T, n_+, sum_+ x, sum_+ y, sum_+ x y^T

The products ``sum x y^T`` are weight-shaped: for a convolution they are weight
gradients, so one batch costs one ``conv2d_weight`` call per layer, whatever the number
of neurons. Sums do not depend on how the data is cut into batches, can be saved and
resumed (checkpoints), and add up across processes (``torch.distributed`` all-reduce).

Neurons that are never active get ``a_+ = 0``; a neuron whose denominator
``w^T cov`` is exactly zero gets the raw covariance as its pattern, as in the authors'
code. :meth:`Patterns.report` counts both. No pattern is ever NaN.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.distributed import check_all_ranks_have_data, own_batches, rank_and_world, sum_over_ranks
from toolkit.streaming import progress_bar
from toolkit.layers import Layer, Plan, evaluation_mode, intercept, trace
from toolkit.residual import DEFAULT_MASK, ActivityMasks

__all__ = [
    "Statistics",
    "LayerPatterns",
    "Patterns",
    "PatternMismatchError",
    "fit_patterns",
    "fingerprint",
    "estimate_patterns",
]

FORMAT_VERSION = "1"
MEAN_Y_CONVENTIONS = ("global", "masked")


class PatternMismatchError(ValueError):
    """Patterns were fitted for another model (architecture or weights differ)."""


# ----------------------------------------------------------------------------------
# streamed statistics
# ----------------------------------------------------------------------------------
@dataclass
class Statistics:
    """Running float64 sums of one layer; everything the patterns are computed from.

    Shapes (``W`` is the layer's weight shape, ``J = W[0]`` the number of neurons)::

        n          ()         samples seen (images x output positions)
        sum_x      (1, *W[1:]) sum of inputs, shared by all neurons
        sum_y      (J,)       sum of y_j = w_j^T x
        sum_xy     W          sum of x y_j
        n_pos      (J,)       samples with z_j > 0
        sum_x_pos  W          sum of x over active samples
        sum_y_pos  (J,)       sum of y_j over active samples
        sum_xy_pos W          sum of x y_j over active samples
    """

    n: Tensor
    sum_x: Tensor
    sum_y: Tensor
    sum_xy: Tensor
    n_pos: Tensor
    sum_x_pos: Tensor
    sum_y_pos: Tensor
    sum_xy_pos: Tensor

    @classmethod
    def zeros(cls, weight_shape: torch.Size, device=None) -> "Statistics":
        kw = dict(dtype=torch.float64, device=device)
        j = weight_shape[0]
        return cls(
            n=torch.zeros((), **kw),
            sum_x=torch.zeros((1, *weight_shape[1:]), **kw),
            sum_y=torch.zeros(j, **kw),
            sum_xy=torch.zeros(weight_shape, **kw),
            n_pos=torch.zeros(j, **kw),
            sum_x_pos=torch.zeros(weight_shape, **kw),
            sum_y_pos=torch.zeros(j, **kw),
            sum_xy_pos=torch.zeros(weight_shape, **kw),
        )

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "Statistics":
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    def to(self, device) -> "Statistics":
        return Statistics(**{k: v.to(device) for k, v in self.tensors().items()})

    def update(self, layer: Layer, x: Tensor, z: Tensor, dtype=torch.float64,
               active: Tensor | None = None) -> None:
        """Add one batch: layer input ``x`` and layer output ``z`` (bias included).

        ``active`` (bool, shaped like ``z``) is the activity mask; None means ``z > 0``.
        A residual network's layers may take it from the ReLU after an addition
        (:mod:`toolkit.residual`).

        The per-batch products are computed in ``dtype`` and added to the float64 sums.
        A convolution costs one ``conv2d_weight`` call: the four weight-shaped sums share
        one unfolding of the input, their output gradients ``(1, active, y active, y)``
        are written into one buffer of ``3 J + 1`` channels. A Linear layer costs four
        in-place ``addmm``.
        """
        x = x.detach().to(dtype)
        z = z.detach()
        active_mask = active
        bias = layer.bias().to(dtype)
        j = self.sum_y.shape[0]
        if layer.is_conv:
            g = torch.empty((z.shape[0], 3 * j + 1, *z.shape[2:]), dtype=dtype, device=z.device)
            g[:, 0].fill_(1)
            active, y_active, y = g[:, 1:1 + j], g[:, 1 + j:1 + 2 * j], g[:, 1 + 2 * j:]
            y.copy_(z).sub_(bias[:, None, None])
            active.copy_(z > 0 if active_mask is None else active_mask)
            torch.mul(y, active, out=y_active)
            sums = layer.patch_sums(x, g)
            self.sum_x.add_(sums[:1])
            self.sum_x_pos.add_(sums[1:1 + j])
            self.sum_xy_pos.add_(sums[1 + j:1 + 2 * j])
            self.sum_xy.add_(sums[1 + 2 * j:])
            per_neuron = g.sum((0, 2, 3), dtype=torch.float64)
            self.n += z.numel() // j
            self.n_pos += per_neuron[1:1 + j]
            self.sum_y_pos += per_neuron[1 + j:1 + 2 * j]
            self.sum_y += per_neuron[1 + 2 * j:]
            return
        z = z.to(dtype)
        y = z - bias
        active = (z > 0 if active_mask is None else active_mask).to(dtype)
        y_active = y * active
        layer.patch_sums(x, torch.ones_like(z.narrow(-1, 0, 1)), out=self.sum_x)
        layer.patch_sums(x, active, out=self.sum_x_pos)
        layer.patch_sums(x, y_active, out=self.sum_xy_pos)
        layer.patch_sums(x, y, out=self.sum_xy)
        samples = tuple(range(z.dim() - 1))
        self.n += z.numel() // j
        self.n_pos += active.sum(samples, dtype=torch.float64)
        self.sum_y_pos += y_active.sum(samples, dtype=torch.float64)
        self.sum_y += y.sum(samples, dtype=torch.float64)

    def all_reduce(self) -> None:
        """Sum the statistics of all ``torch.distributed`` ranks, in place."""
        sum_over_ranks(self.tensors().values())


# ----------------------------------------------------------------------------------
# from statistics to patterns
# ----------------------------------------------------------------------------------
@dataclass
class LayerPatterns:
    """The patterns of one layer, each shaped like the layer's weight (float64).

    ``linear`` is ``a`` of the linear estimator S_a; ``positive`` and ``negative`` are
    ``a_+`` and ``a_-`` of the two-component estimator S_a+-.
    """

    linear: Tensor
    positive: Tensor
    negative: Tensor

    def tensors(self) -> dict[str, Tensor]:
        return {"linear": self.linear, "positive": self.positive, "negative": self.negative}


def _row_dots(w: Tensor, a: Tensor) -> Tensor:
    """``(w * a).sum(1)`` in float64 for CPU matrices ``w`` (float32 or float64) and ``a``
    (float64), ``(J, D)`` or ``a`` of shape ``(D,)``: one pass without a ``(J, D)``
    temporary or a float64 copy of ``w`` (NumPy's einsum casts in small buffers, and is
    about twice as fast here as torch's batched matrix product)."""
    w, a = w.contiguous().numpy(), a.contiguous().numpy()
    return torch.from_numpy(np.einsum("ij,ij->i" if a.ndim == 2 else "ij,j->i", w, a,
                                      dtype=np.float64))


def _scales(denominator: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, what the unnormalised covariance ``C = sum_c x y - mean_y sum_c x`` is
    multiplied by to give the pattern: ``1 / (w^T C)``; ``1 / count`` (the raw
    covariance, the authors' fallback) where ``w^T C`` is exactly zero; 0 where
    ``count`` is 0 (no samples: the zero pattern). Also returns the zero-denominator mask.
    """
    zero = denominator == 0
    one = torch.ones_like(denominator)
    scale = torch.where(zero, one / count.clamp(min=1), one / torch.where(zero, one, denominator))
    return torch.where(count > 0, scale, torch.zeros_like(scale)), zero


def estimate_patterns(stats: Statistics, weight: Tensor, mean_y: str = "global"
                      ) -> tuple[LayerPatterns, dict[str, int]]:
    """Compute a layer's patterns from its statistics (math.md section 2).

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
        On the CPU, float64.
    counts : dict
        Neurons never active (``dead``), always active, and with a zero denominator.

    Notes
    -----
    With ``C = sum_c x y - m sum_c x`` the unnormalised covariance of the samples ``c``
    of a component, the pattern is ``C / (w^T C)``. The denominators follow from per-row
    dot products of ``w`` with the sums (``w^T C`` is linear in them), so each pattern is
    written in one allocation and two to four in-place passes: for the 4096 x 25088
    first classifier layer of VGG16 this is what the whole computation costs.
    """
    if mean_y not in MEAN_Y_CONVENTIONS:
        raise ValueError(f"mean_y must be one of {MEAN_Y_CONVENTIONS}, not {mean_y!r}")
    if stats.n <= 0:
        raise ValueError("the statistics hold no samples: fit on at least one batch")
    j, shape = weight.shape[0], weight.shape
    w = weight.detach().to("cpu")
    if w.dtype not in (torch.float32, torch.float64):
        w = w.to(torch.float64)
    w = w.reshape(j, -1)
    s = stats.to("cpu")
    n = s.n.to(torch.float64)
    n_pos = s.n_pos
    n_neg = n - n_pos
    sum_x = s.sum_x.reshape(-1)                      # (D,), shared by all neurons
    sum_x_pos = s.sum_x_pos.reshape(j, -1)
    sum_xy, sum_xy_pos = s.sum_xy.reshape(j, -1), s.sum_xy_pos.reshape(j, -1)

    # w_j^T of every sum: the denominators are linear combinations of these
    w_xy, w_xy_pos, w_x_pos = _row_dots(w, sum_xy), _row_dots(w, sum_xy_pos), _row_dots(w, sum_x_pos)
    w_x = _row_dots(w, sum_x)
    mean_y_all = s.sum_y / n

    def side_mean_y(total, count):
        if mean_y == "global":
            return mean_y_all
        return total / count.clamp(min=1) * (count > 0)

    # linear: C = sum_xy - m sum_x
    m = mean_y_all
    scale, zero_linear = _scales(w_xy - m * w_x, n.expand(j))
    linear = torch.mul(sum_xy, scale[:, None])
    linear.addr_(m * scale, sum_x, alpha=-1)
    # positive: C = sum_xy_pos - m_+ sum_x_pos
    m = side_mean_y(s.sum_y_pos, n_pos)
    scale, zero_pos = _scales(w_xy_pos - m * w_x_pos, n_pos)
    positive = torch.mul(sum_xy_pos, scale[:, None])
    positive.addcmul_(sum_x_pos, (m * scale)[:, None], value=-1)
    # negative: C = (sum_xy - sum_xy_pos) - m_- (sum_x - sum_x_pos)
    m = side_mean_y(s.sum_y - s.sum_y_pos, n_neg)
    scale, zero_neg = _scales((w_xy - w_xy_pos) - m * (w_x - w_x_pos), n_neg)
    negative = torch.mul(sum_xy, scale[:, None])
    negative.addcmul_(sum_xy_pos, scale[:, None], value=-1)
    negative.addr_(m * scale, sum_x, alpha=-1)
    negative.addcmul_(sum_x_pos, (m * scale)[:, None])

    patterns = LayerPatterns(linear.reshape(shape), positive.reshape(shape), negative.reshape(shape))
    degenerate = zero_linear | (zero_pos & (n_pos > 0)) | (zero_neg & (n_neg > 0))
    counts = {
        "dead": int((n_pos == 0).sum()),
        "always_active": int((n_neg == 0).sum()),
        "zero_denominator": int(degenerate.sum()),
    }
    return patterns, counts


# ----------------------------------------------------------------------------------
# fingerprint of a model
# ----------------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture and weights.

    Covers every module's qualified name and type, and every tensor of the state dict
    (names, shapes and values rounded to float32, so a model cast to float64 keeps its
    fingerprint).
    """
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point():
            t = t.detach().to("cpu", torch.float32)
        h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()[:32]


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
        The sums the patterns were computed from (kept so they can be recomputed, with
        another ``mean_y`` convention for instance, and saved).
    mean_y : str
        The convention used for the two-component patterns.
    counts : dict[str, dict], optional
        Per layer, the neurons counted by :func:`estimate_patterns`.
    """

    def __init__(self, layers: dict[str, LayerPatterns], fingerprint: str,
                 statistics: dict[str, Statistics] | None = None, mean_y: str = "global",
                 counts: dict[str, dict] | None = None):
        self.layers = dict(layers)
        self.fingerprint = fingerprint
        self.statistics = dict(statistics or {})
        self.mean_y = mean_y
        self.counts = dict(counts or {})

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
        return f"Patterns({len(self)} layers, mean_y={self.mean_y!r}, model {self.fingerprint[:8]})"

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

    # -- report --------------------------------------------------------------------
    def report(self) -> str:
        """A table of the fit: per layer, samples seen, neurons, dead and degenerate ones."""
        head = f"{'layer':<24}{'neurons':>8}{'samples':>14}{'dead':>7}{'always on':>10}{'zero den.':>10}"
        lines = [head, "-" * len(head)]
        for name, p in self.layers.items():
            c = self.counts.get(name, {})
            n = int(self.statistics[name].n) if name in self.statistics else 0
            lines.append(f"{name:<24}{p.linear.shape[0]:>8}{n:>14,}{c.get('dead', 0):>7}"
                         f"{c.get('always_active', 0):>10}{c.get('zero_denominator', 0):>10}")
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
            "format": "patternnet-toolkit-patterns",
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "mean_y": self.mean_y,
            "layers": json.dumps(self.names),
            "counts": json.dumps(self.counts),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Patterns":
        """Read patterns written by :meth:`save`; with ``model``, check they belong to it.

        The file format (safetensors) holds only tensors and text: loading runs no code.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no patterns file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "patternnet-toolkit-patterns":
                raise ValueError(f"{path} is not a patterns file written by Patterns.save")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        layers, statistics = {}, {}
        for name in json.loads(meta["layers"]):
            layers[name] = LayerPatterns(*(tensors[f"{name}/{k}"] for k in ("linear", "positive", "negative")))
            prefix = f"{name}/stats/"
            stats = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if stats:
                statistics[name] = Statistics.from_tensors(stats)
        patterns = cls(layers, meta["fingerprint"], statistics, meta["mean_y"],
                       json.loads(meta.get("counts", "{}")))
        if model is not None:
            patterns.check(model)
        return patterns


# ----------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------
def _inputs(batch) -> Tensor:
    """The input tensor of a batch: the batch itself or the first item of a pair."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch")
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"a batch must be a tensor or an (inputs, labels) pair, not {type(batch).__name__}")
    return batch


def _check_batch(x: Tensor, index: int, expected: tuple[int, ...] | None) -> None:
    if not x.is_floating_point():
        raise TypeError(f"batch {index}: inputs must be floating point, got {x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"batch {index} holds no samples (inputs of shape {tuple(x.shape)})")
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise ValueError(f"batch {index}: inputs of shape {tuple(x.shape)} differ from the "
                         f"first batch's per-sample shape {expected}")
    if not torch.isfinite(x).all():
        raise ValueError(f"batch {index} contains NaN or Inf values")


def _checkpoint_path(checkpoint, rank: int, world: int) -> Path:
    path = Path(checkpoint)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _save_checkpoint(path: Path, statistics: dict[str, Statistics], batches: int,
                     model_fingerprint: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}/{k}": t.cpu().contiguous() for name, s in statistics.items()
               for k, t in s.tensors().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"batches": str(batches), "fingerprint": model_fingerprint})
    os.replace(tmp, path)


def _load_checkpoint(path: Path, plan: Plan, model_fingerprint: str, device
                     ) -> tuple[dict[str, Statistics], int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != model_fingerprint or "batches" not in meta:
            raise PatternMismatchError(
                f"checkpoint {path} was written for another model (or is not a checkpoint of "
                "fit_patterns); delete it or give another checkpoint path")
        statistics = {}
        stored = set(f.keys())
        keys = [k.name for k in fields(Statistics)]
        for layer in plan:
            missing = [k for k in keys if f"{layer.name}/{k}" not in stored]
            if missing:
                raise PatternMismatchError(f"checkpoint {path} lacks the statistics of layer '{layer.name}'")
            statistics[layer.name] = Statistics.from_tensors(
                {k: f.get_tensor(f"{layer.name}/{k}").to(device) for k in keys})
    return statistics, int(meta["batches"])


def fit_patterns(model: nn.Module, data: Iterable, *, device=None, max_batches: int | None = None,
                 progress: bool = True, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 100, mean_y: str = "global",
                 compute_dtype: torch.dtype = torch.float64, mask: str = DEFAULT_MASK) -> Patterns:
    """Fit the linear and two-component patterns of every Conv2d/Linear layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        A network of the supported modules (:data:`toolkit.layers.SUPPORTED_MODULES`).
        It is evaluated in eval mode (Dropout off, BatchNorm with running statistics)
        and each module's own mode is restored afterwards; the model is never changed.
    data : iterable
        A DataLoader or any iterable of input tensors or ``(inputs, labels)`` pairs
        (not a bare tensor: wrap one batch as ``[inputs]``). Floating-point inputs are
        cast to the dtype of the model's parameters; every batch must have the first
        batch's per-sample shape and hold only finite values.
    device : torch.device or str, optional
        Where to compute. Defaults to the model's device. If it differs, a copy of the
        model is moved there (the user's model stays where it is).
    max_batches : int, optional
        Stop after this many batches (of the whole data, before sharding).
    progress : bool
        Show a tqdm progress bar with batches and images per second.
    checkpoint : path, optional
        Save the statistics to this file every ``checkpoint_every`` batches. If the file
        exists, the fit resumes from it: the batches it holds are skipped, so a resumed
        fit over the same sequence of batches ends with the same patterns. Under
        ``torch.distributed`` each rank writes ``<stem>.rank<r><suffix>``.
    mean_y : {"global", "masked"}
        The E[y] convention of the two-component patterns (see module docstring).
    compute_dtype : torch.dtype
        Dtype of the per-batch products; the sums are always accumulated in float64.
        float64 (default) is exact; float32 is faster on GPUs.
    mask : {"output", "relu_input"}
        The activity mask of a layer whose output is not followed directly by a ReLU
        (in a residual block: the last convolution and the downsample): its own output
        ``z > 0``, or the input of the ReLU after the addition
        (:mod:`toolkit.residual`). The same for every layer of a chain.

    Returns
    -------
    Patterns

    Notes
    -----
    When ``torch.distributed`` is initialised every rank fits its share of the batches
    -- the batches of a DataLoader with a DistributedSampler, otherwise every
    world-size-th batch -- and the statistics are all-reduced, so all ranks return
    identical patterns.
    """
    if mean_y not in MEAN_Y_CONVENTIONS:
        raise ValueError(f"mean_y must be one of {MEAN_Y_CONVENTIONS}, not {mean_y!r}")
    if isinstance(data, Tensor):
        raise TypeError("data must be an iterable of batches (a DataLoader, or a list such as "
                        "[inputs] or torch.split(inputs, 64)), not a single tensor: iterating "
                        "over a tensor gives single samples")
    rank, world = rank_and_world()
    parameter = next(model.parameters(), None)
    model_device = parameter.device if parameter is not None else torch.device("cpu")
    input_dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
    device = _same_device(torch.device(device), model_device) if device is not None else model_device
    if device != model_device:
        import copy

        model = copy.deepcopy(model).to(device)
    ckpt = _checkpoint_path(checkpoint, rank, world) if checkpoint is not None else None

    plan, statistics, skip, batches_done, expected = None, None, 0, 0, None
    bar = progress_bar(data, max_batches, progress and rank == 0, "fitting patterns")
    started, images = time.perf_counter(), 0
    try:
        with evaluation_mode(model), torch.no_grad():
            for index, batch in own_batches(data, rank, world):
                if max_batches is not None and index >= max_batches:
                    break
                x = _inputs(batch)
                if x.is_floating_point() and input_dtype is not None:
                    x = x.to(device, input_dtype, non_blocking=True)
                else:
                    x = x.to(device, non_blocking=True)
                _check_batch(x, index, expected)
                if plan is None:
                    plan, expected = _start(model, x), tuple(x.shape[1:])
                    model_fp = fingerprint(model)
                    statistics = {layer.name: Statistics.zeros(layer.weight_shape, device) for layer in plan}
                    masks = ActivityMasks(model, plan, mask)
                    if ckpt is not None and ckpt.exists():
                        statistics, skip = _load_checkpoint(ckpt, plan, model_fp, device)
                batches_done += 1
                bar.update(1)
                if batches_done <= skip:
                    continue

                def observe(layer, layer_input, output, active):
                    statistics[layer.name].update(layer, layer_input, output, compute_dtype, active)

                with masks.observe(model, observe):
                    model(x)
                images += x.shape[0]
                bar.set_postfix_str(f"{images / (time.perf_counter() - started):,.1f} img/s")
                if ckpt is not None and batches_done % checkpoint_every == 0:
                    _save_checkpoint(ckpt, statistics, batches_done, model_fp)
    finally:
        bar.close()

    if world > 1:
        check_all_ranks_have_data(plan is not None, device)
    if plan is None:
        raise ValueError("data holds no batches: nothing to fit the patterns on")
    if ckpt is not None:
        _save_checkpoint(ckpt, statistics, batches_done, model_fp)
    if world > 1:
        for s in statistics.values():
            s.all_reduce()
    return Patterns.from_statistics(plan, statistics, model_fp, mean_y)


def _same_device(device: torch.device, model_device: torch.device) -> torch.device:
    """``device``, or the model's device when both name the same one ("cuda" vs "cuda:0")."""
    if device.type == model_device.type and device.index is None:
        return model_device
    return device


def _start(model: nn.Module, x: Tensor) -> Plan:
    """Trace the model on the first batch, turning shape errors into clear messages."""
    try:
        return trace(model, x)
    except RuntimeError as error:
        raise ValueError(f"the model cannot run on inputs of shape {tuple(x.shape)}: {error}") from error
