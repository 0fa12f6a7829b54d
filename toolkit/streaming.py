"""Passing once over data: the one driver that streams a data set through a model.

Fitting patterns (:func:`toolkit.fit_patterns`) and measuring their quality
(:func:`toolkit.layer_quality`) are the same loop: move each batch to the model's
device and dtype, check it, trace the model on the first batch, route every
Conv2d/Linear layer's input and output into a per-layer *accumulator* of float64 sums,
and in the end add the sums of all ``torch.distributed`` processes. :func:`stream` is
that loop, written once; the accumulators plug in through :class:`Accumulator`.

Every statistic of the toolkit is a sum over samples, so a pass can be cut anywhere:
:func:`stream` saves the accumulators to a checkpoint every ``checkpoint_every``
batches and resumes from it. A checkpoint is bound to its run: the model's
fingerprint, the number of processes, the per-sample shape, the accumulator's settings
and a running fingerprint of the batches it has seen (:class:`BatchFingerprint`).
Resuming with anything else fails with :class:`CheckpointMismatchError`, which says
what differs.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor, nn

from toolkit.distributed import check_all_ranks_have_data, own_batches, rank_and_world
from toolkit.fingerprint import fingerprint
from toolkit.layers import Layer, Plan, evaluation_mode, observe, trace
from toolkit.memory import reuse_freed_memory

CHECKPOINT_FORMAT = "patternnet-toolkit-checkpoint"
CHECKPOINT_VERSION = "2"


class PatternMismatchError(ValueError):
    """Patterns or sums were made for another model (architecture or weights differ)."""


class CheckpointMismatchError(PatternMismatchError):
    """A checkpoint belongs to another run: other model, data, processes or settings."""


class Accumulator(Protocol):
    """What :func:`stream` needs from the per-layer sums it fills.

    ``update`` adds one batch (layer input ``x``, layer output ``z`` after the folded
    BatchNorm, bias included, and the activity mask ``active``, None for ``z > 0``); ``flush`` adds whatever ``update`` buffered (before a
    checkpoint, an all-reduce or the end); ``all_reduce`` sums over the processes;
    ``state`` / ``load_state`` are the float64 tensors a checkpoint holds, and
    ``settings`` what must match for a checkpoint to be resumed.
    """

    def update(self, layer: Layer, x: Tensor, z: Tensor, active: Tensor | None = None) -> None: ...
    def flush(self) -> None: ...
    def all_reduce(self) -> None: ...
    def state(self) -> dict[str, Tensor]: ...
    def load_state(self, tensors: dict[str, Tensor]) -> None: ...
    def settings(self) -> dict: ...


@dataclass
class Pass:
    """The result of :func:`stream`: the traced layers and their filled accumulators."""

    plan: Plan
    accumulators: dict[str, Accumulator]
    batches: int
    images: int
    model_fingerprint: str
    mask: str = "output"


# ----------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------
def input_batches(data, batch_size: int) -> Iterator[Tensor]:
    """The input tensors of ``data``: a tensor (cut into ``batch_size`` pieces along its
    first dimension), or an iterable of tensors or ``(inputs, labels)`` pairs."""
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"data must be a batch of inputs, not a tensor of shape {tuple(data.shape)}")
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


def check_batch(x: Tensor, index: int, expected: tuple[int, ...] | None) -> None:
    """Refuse a batch that is not floating point, empty, shaped unlike the first one, or
    not finite, with a message that names the batch."""
    if not x.is_floating_point():
        raise TypeError(f"batch {index}: inputs must be floating point, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"batch {index} holds no samples (inputs of shape {tuple(x.shape)})")
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise ValueError(f"batch {index}: inputs of shape {tuple(x.shape)} differ from the "
                         f"first batch's per-sample shape {expected}")
    if not torch.isfinite(x).all():
        raise ValueError(f"batch {index} contains NaN or Inf values")


class BatchFingerprint:
    """A cheap running hash of the batches a pass has seen: per batch its shape, its
    float64 sum and a strided sample of at most 4096 of its values (as float32). Equal
    data give equal fingerprints; other data, another order or other batches almost
    surely do not."""

    def __init__(self, hexdigest: str = ""):
        self.hexdigest = hexdigest

    def add(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        h = hashlib.sha256(self.hexdigest.encode())
        h.update(repr((tuple(x.shape), float(flat.sum(dtype=torch.float64)))).encode())
        h.update(sample.numpy().tobytes())
        self.hexdigest = h.hexdigest()


# ----------------------------------------------------------------------------------
# devices and the model
# ----------------------------------------------------------------------------------
def same_device(device: torch.device, model_device: torch.device) -> torch.device:
    """``device``, or the model's device when both name the same one ("cuda" vs "cuda:0")."""
    if device.type == model_device.type and device.index is None:
        return model_device
    return device


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), None
    return parameter.device, parameter.dtype if parameter.is_floating_point() else None


def _start(model: nn.Module, x: Tensor, layers) -> Plan:
    """Trace the model on the first batch, turning shape errors into clear messages."""
    try:
        plan = trace(model, x)
    except RuntimeError as error:
        raise ValueError(f"the model cannot run on inputs of shape {tuple(x.shape)}: {error}") from error
    return plan if layers is None else select_layers(plan, layers)


def select_layers(plan: Plan, layers) -> Plan:
    """The plan restricted to the named layers (in the model's order)."""
    if isinstance(layers, str):
        layers = [layers]
    unknown = [name for name in layers if name not in plan.names]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; the model's layers are {plan.names}")
    chosen = [layer for layer in plan if layer.name in set(layers)]
    return dataclasses.replace(plan, layers=chosen, _activities=plan.activities)


# ----------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Where a pass saves its sums, and what it must find there to resume."""

    path: Path
    rank: int
    world: int
    every: int

    @classmethod
    def at(cls, path, rank: int, world: int, every: int, model_fingerprint: str
           ) -> "Checkpoint | None":
        """The checkpoint of this rank, with the metadata of its file if it exists;
        refuses, before any batch is read, a file of another model or process count."""
        if path is None:
            return None
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of batches, not {every!r}")
        path = Path(path)
        own = path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        other = path.with_name(f"{path.stem}.rank0{path.suffix}") if world == 1 else path
        ckpt = cls(own, rank, world, every)
        if not own.exists() and other.exists():
            raise ckpt._refuse(f"was not found, but {other} was written by a fit with "
                               f"{'several processes' if world == 1 else 'one process'} and this "
                               f"fit has {world}: resume with the same number of processes")
        if own.exists():
            ckpt.meta = ckpt._metadata()
            ckpt._check_run(model_fingerprint)
        return ckpt

    meta: dict | None = None

    def _refuse(self, what: str) -> "CheckpointMismatchError":
        return CheckpointMismatchError(f"checkpoint {self.path} {what}; delete it or give "
                                       "another checkpoint path")

    def _metadata(self) -> dict:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.metadata() or {}
        except Exception as error:  # safetensors raises its own types for bad files
            raise self._refuse(f"cannot be read ({error})") from error

    def _check_run(self, model_fingerprint: str) -> None:
        meta = self.meta
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise self._refuse("is not a checkpoint of this toolkit (or of an older version)")
        if meta.get("fingerprint") != model_fingerprint:
            raise self._refuse("was written for another model (the architecture or the weights differ)")
        if meta.get("world") != str(self.world):
            raise self._refuse(f"was written by a fit with {meta.get('world')} processes, this "
                               f"fit has {self.world}: resume with the same number of processes")

    def save(self, run: "_Run", finished: bool) -> None:
        from safetensors.torch import save_file

        for accumulator in run.accumulators.values():
            accumulator.flush()
        tensors = {f"{name}/{key}": t.detach().cpu().contiguous()
                   for name, acc in run.accumulators.items() for key, t in acc.state().items()}
        metadata = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "fingerprint": run.model_fingerprint, "world": str(self.world), "rank": str(self.rank),
            "batches": str(run.batches), "images": str(run.images),
            "sample_shape": json.dumps(list(run.sample_shape)),
            "data_fingerprint": run.data.hexdigest, "finished": "1" if finished else "0",
            "layers": json.dumps(list(run.accumulators)), "settings": json.dumps(run.settings),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, self.path)

    def load(self, run: "_Run") -> None:
        """Fill ``run``'s accumulators from the file, after checking that it was written
        for the same inputs, layers and settings."""
        from safetensors import safe_open

        meta = self.meta
        if json.loads(meta.get("sample_shape", "null")) != list(run.sample_shape):
            raise self._refuse(f"holds inputs of per-sample shape "
                               f"{tuple(json.loads(meta['sample_shape']))}, this data has {run.sample_shape}")
        if json.loads(meta.get("layers", "null")) != list(run.accumulators):
            raise self._refuse("holds other layers than this pass measures")
        if json.loads(meta.get("settings", "null")) != run.settings:
            raise self._refuse(f"was written with the settings {json.loads(meta['settings'])}, "
                               f"this pass uses {run.settings}")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                stored = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:
            raise self._refuse(f"cannot be read ({error})") from error
        for name, accumulator in run.accumulators.items():
            prefix = f"{name}/"
            accumulator.load_state({k[len(prefix):]: v.to(run.device) for k, v in stored.items()
                                    if k.startswith(prefix)})


# ----------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """The state of one pass while it runs."""

    device: torch.device
    model_fingerprint: str = ""
    plan: Plan | None = None
    accumulators: dict | None = None
    settings: dict | None = None
    sample_shape: tuple = ()
    batches: int = 0
    images: int = 0
    data: BatchFingerprint | None = None
    mask: str = "output"


def stream(model: nn.Module, data, accumulator: Callable[[Layer], Accumulator], *, desc: str,
           device=None, max_batches: int | None = None, progress: bool = True,
           layers=None, batch_size: int = 64, checkpoint=None, checkpoint_every: int = 100,
           mask: str | None = None) -> Pass:
    """Stream ``data`` through ``model`` once, filling ``accumulator(layer)`` per layer.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode (each module's own mode is restored afterwards), never changed.
    data : Tensor or iterable
        A tensor of inputs (cut into ``batch_size`` pieces), or an iterable (a
        DataLoader, a list) of input tensors or ``(inputs, labels)`` pairs. Inputs are
        cast to the model's dtype; every batch must have the first batch's per-sample
        shape and hold only finite values.
    accumulator : callable
        ``accumulator(layer)`` makes the (empty) accumulator of one layer.
    desc : str
        The progress bar's title.
    device : torch.device or str, optional
        Where to compute; defaults to the model's device. If it differs, a copy of the
        model is moved there.
    max_batches : int, optional
        Stop after this many batches (of the whole data, before they are dealt to the
        processes).
    progress : bool
        A tqdm bar with images per second and the time left (on rank 0).
    layers : sequence of str, optional
        Measure only these layers.
    mask : {"output", "relu_input"}, optional
        The activity mask of a layer whose output is not followed directly by a ReLU
        (:mod:`toolkit.layers.activity`; default :data:`toolkit.layers.DEFAULT_MASK`). The
        accumulators get it as ``update(layer, x, z, active)``, ``active`` None where
        the layer's own ``z > 0`` is the mask.
    checkpoint : path, optional
        Save the sums here every ``checkpoint_every`` batches and at the end; resume
        from the file if it exists (see the module docstring). Under
        ``torch.distributed`` each rank writes ``<stem>.rank<r><suffix>``.

    Returns
    -------
    Pass
        With the sums of all processes added up, so every rank holds the same.
    """
    rank, world = rank_and_world()
    model_device, model_dtype = model_device_and_dtype(model)
    device = same_device(torch.device(device), model_device) if device is not None else model_device
    if device != model_device:
        model = copy.deepcopy(model).to(device)
    from toolkit.layers import DEFAULT_MASK, check_mask

    run = _Run(device, model_fingerprint=fingerprint(model), data=BatchFingerprint(),
               mask=check_mask(DEFAULT_MASK if mask is None else mask))
    ckpt = _agree(lambda: Checkpoint.at(checkpoint, rank, world, checkpoint_every,
                                        run.model_fingerprint), world, device)
    skip = int(ckpt.meta["batches"]) if ckpt is not None and ckpt.meta else 0
    bar = progress_bar(data, max_batches, progress and rank == 0, desc, batch_size)
    started = time.perf_counter()
    try:
        with evaluation_mode(model), torch.no_grad(), reuse_freed_memory(device):
            for index, batch in own_batches(input_batches(data, batch_size), rank, world,
                                            _sharded(data)):
                if max_batches is not None and index >= max_batches:
                    break
                x = batch.to(device, model_dtype, non_blocking=True) \
                    if batch.is_floating_point() and model_dtype is not None else batch.to(device)
                check_batch(x, index, run.sample_shape if run.plan is not None else None)
                if x is batch:
                    x = x.clone()  # an inplace first module must not overwrite the caller's data
                if run.plan is None:
                    _begin(run, model, x, accumulator, layers, ckpt)
                bar.update(1)
                if ckpt is not None:
                    run.data.add(x)
                if run.batches < skip:
                    run.batches += 1
                    if run.batches == skip and run.data.hexdigest != ckpt.meta["data_fingerprint"]:
                        raise CheckpointMismatchError(
                            f"checkpoint {ckpt.path} was written for other data: its first {skip} "
                            "batches differ from this data's; delete it or give another checkpoint path")
                    continue
                _observe(model, run, x)
                _show_rate(bar, run.images, started)
                if ckpt is not None and run.batches % ckpt.every == 0:
                    ckpt.save(run, finished=False)
    finally:
        bar.close()
    return _finish(run, ckpt, skip, world)


def _sharded(data) -> bool:
    from toolkit.distributed import is_sharded

    return is_sharded(data)


def _agree(step: Callable, world: int, device: torch.device):
    """Run ``step`` on every rank; if it fails on any, raise on all (instead of leaving
    the others waiting in a collective)."""
    error = None
    try:
        result = step()
    except (ValueError, OSError) as caught:
        error, result = caught, None
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([0 if error else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if error is None and not int(flag):
            raise CheckpointMismatchError("another process refused its checkpoint (see its error)")
    if error is not None:
        raise error
    return result


def _begin(run: _Run, model, x: Tensor, accumulator, layers, ckpt: Checkpoint | None) -> None:
    """Trace on the first batch, make the accumulators, resume from a checkpoint."""
    run.plan = _start(model, x, layers)
    run.sample_shape = tuple(x.shape[1:])
    run.accumulators = {layer.name: accumulator(layer) for layer in run.plan}
    run.settings = {"mask": run.mask, **{name: acc.settings() for name, acc in run.accumulators.items()}}
    if run.mask == "relu_input" and not run.plan.forward_verified:
        warnings.warn("torch.fx cannot trace the model, so the activation after each layer is "
                      "not known; every layer is masked by its own output z > 0 (for a network "
                      "without additions that is the same mask)", RuntimeWarning, stacklevel=4)
    if ckpt is not None and ckpt.meta:
        ckpt.load(run)
        run.images = int(ckpt.meta.get("images", 0))


def _observe(model: nn.Module, run: _Run, x: Tensor) -> None:
    def accumulate(layer, layer_input, output, active):
        run.accumulators[layer.name].update(layer, layer_input, output, active)

    observe(model, run.plan, x, run.mask, run.plan.activities, accumulate)
    run.batches += 1
    run.images += x.shape[0]


def _finish(run: _Run, ckpt: Checkpoint | None, skip: int, world: int) -> Pass:
    if world > 1:
        check_all_ranks_have_data(run.plan is not None, run.device)
    if run.plan is None:
        raise ValueError("data holds no batches: nothing to stream through the model")
    if run.batches < skip:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt.path} holds {skip} batches, but this data has only {run.batches}: "
            "it was written for other data; delete it or give another checkpoint path")
    for accumulator in run.accumulators.values():
        accumulator.flush()
    if ckpt is not None:
        ckpt.save(run, finished=True)
    if world > 1:
        for accumulator in run.accumulators.values():
            accumulator.all_reduce()
    return Pass(run.plan, run.accumulators, run.batches, run.images, run.model_fingerprint, run.mask)


# ----------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------
def progress_bar(data, max_batches: int | None, enabled: bool, desc: str, batch_size: int = 64):
    """A tqdm bar over the batches of ``data`` (its length when known, capped by
    ``max_batches``), so it shows the time left; :func:`stream` adds images per second."""
    from tqdm.auto import tqdm

    try:
        total = -(-len(data) // batch_size) if isinstance(data, Tensor) else len(data)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(total=total, unit="batch", desc=desc, disable=not enabled)


def _show_rate(bar, images: int, started: float) -> None:
    if not bar.disable:
        bar.set_postfix_str(f"{images / max(time.perf_counter() - started, 1e-9):,.1f} img/s")
