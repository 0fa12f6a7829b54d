"""Pattern files: the safetensors layout, its versions, and the checks at the door.

A patterns file (:meth:`toolkit.patterns.Patterns.save`) is a safetensors file: a JSON
header of plain tensors and text metadata, then raw bytes, so reading one runs no code.
Version 3, written today, holds per layer

==========================  =========================================================
``<layer>/<kind>``          the pattern of each fitted kind (``linear``, ``positive``,
                            ``negative``), shaped like the layer's weight, float32
                            (float64 for patterns held in float64)
``<layer>/n_pos``           float64 ``(J,)``: the samples on which each neuron was
                            active (not for a fit of the linear pattern alone)
``<layer>/stats/<key>``     only with ``save(..., statistics=True)``: the float64 sums
                            of :class:`toolkit.patterns.Statistics`
==========================  =========================================================

and the metadata ``format``, ``version``, ``fingerprint``, ``mean_y``, ``layers``,
``kinds``, ``counts``, ``samples`` (per layer, the number of samples seen) and ``mask``.
Versions 1 and 2 wrote every pattern in float64 with its statistics; they are read
too (:data:`READABLE_VERSIONS`): version 2's statistics as they are, version 1's (an
older layout) only for their sample counts.

This module reads and writes the bytes and checks single tensors; it knows nothing
of the classes built from them (:mod:`toolkit.patterns`). Every problem with a file
is a :class:`PatternFileError` that names the file and, where one is to blame, the
tensor; a file that cannot be written is an :class:`OSError` that names the file.
"""
from __future__ import annotations

import errno
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "FILE_FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "PatternFileError",
    "LayerRecord",
    "PatternFile",
    "write_patterns",
    "read_patterns",
    "read",
    "write",
    "check_tensor",
]

FILE_FORMAT = "patternnet-toolkit-patterns"
#: The version :meth:`toolkit.patterns.Patterns.save` writes: 3 since the files hold
#: the patterns alone by default (float32 for a float32 model) and the active counts.
FORMAT_VERSION = "3"
#: The versions that can be read: 1 (float64 patterns and statistics of an older
#: layout), 2 (float64 patterns and today's statistics), 3.
READABLE_VERSIONS = ("1", "2", "3")
#: The dtypes a pattern may be stored in.
PATTERN_DTYPES = (torch.float32, torch.float64)


class PatternFileError(ValueError):
    """A patterns file is missing, unreadable, malformed, of an unknown version, or holds
    a tensor of the wrong shape or dtype or with non-finite values."""


def read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and every tensor of a safetensors file, or a
    :class:`PatternFileError` that names it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types for bad files
        raise PatternFileError(f"{path} cannot be read as a safetensors file ({error})") from None


def write(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file, or raise an :class:`OSError` (of the subclass its
    ``errno`` gives: :class:`PermissionError`, :class:`FileNotFoundError`, ...) that
    names ``path``.

    safetensors writes a temporary file next to ``path`` and renames it (an interrupted
    write leaves the old file whole); its own errors name that temporary file, which
    the user never asked for.
    """
    from safetensors.torch import save_file

    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as error:  # SafetensorError, OSError
        raise _write_error(path, error) from None


def _write_error(path: Path, error: Exception) -> OSError:
    """``error`` of writing ``path`` as an OSError that names ``path``."""
    if isinstance(error, OSError) and error.errno is not None:
        number, reason = error.errno, error.strerror or str(error)
    else:
        found = re.search(r"(?:I/O error: )?([^:]*?) \(os error (\d+)\)", str(error))
        number = int(found.group(2)) if found else errno.EIO
        reason = found.group(1) if found else re.sub(r' at path "[^"]*"', "", str(error))
    return OSError(number, f"cannot write the patterns file: {reason}", str(path))


def check_tensor(path: Path, key: str, t: Tensor, *, shape: Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] = (torch.float64,), dims: int | None = None,
                 nonnegative: bool = False) -> Tensor:
    """Return ``t`` if it has one of ``dtypes``, the ``shape`` (or the number of
    ``dims``) and only finite (and, with ``nonnegative``, no negative) values; else
    raise a :class:`PatternFileError` that names the file and the tensor ``key``."""
    where = f"{path}: the tensor '{key}'"
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise PatternFileError(f"{where} is {str(t.dtype).replace('torch.', '')}, not {allowed}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise PatternFileError(f"{where} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dims is not None and t.dim() != dims:
        raise PatternFileError(f"{where} has shape {tuple(t.shape)}, expected {dims} dimensions")
    if not torch.isfinite(t).all():
        raise PatternFileError(f"{where} holds NaN or Inf")
    if nonnegative and (t < 0).any():
        raise PatternFileError(f"{where} holds negative values")
    return t


def _json(path: Path, meta: dict[str, str], key: str, kind: type, default=None):
    """The JSON metadata entry ``key`` of type ``kind`` (``default`` when absent and a
    default is given), or a :class:`PatternFileError` naming the file and the entry."""
    if key not in meta:
        if default is not None:
            return default
        raise PatternFileError(f"{path} has missing or malformed metadata (no '{key}')")
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as error:
        raise PatternFileError(f"{path} has missing or malformed metadata ('{key}': {error})") from None
    if not isinstance(value, kind):
        raise PatternFileError(f"{path} has malformed metadata ('{key}' is not a {kind.__name__})")
    return value


# ----------------------------------------------------------------------------------
# the contents of a file
# ----------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """What a file holds for one layer: its patterns by kind, the number of samples
    ``n``, the active samples per neuron ``n_pos`` and, optionally, the statistics (the
    tensors of :class:`toolkit.patterns.Statistics`)."""

    patterns: dict[str, Tensor]
    n: int | None = None
    n_pos: Tensor | None = None
    statistics: dict[str, Tensor] | None = None


@dataclass
class PatternFile:
    """The contents of a patterns file, checked."""

    fingerprint: str
    mean_y: str
    layers: dict[str, LayerRecord]
    counts: dict = field(default_factory=dict)
    mask: str | None = None


def write_patterns(path: str | os.PathLike, contents: PatternFile) -> None:
    """Write ``contents`` in today's layout (version :data:`FORMAT_VERSION`)."""
    tensors = {}
    for name, layer in contents.layers.items():
        for kind, t in layer.patterns.items():
            tensors[f"{name}/{kind}"] = t.detach().cpu().contiguous()
        if layer.n_pos is not None:
            tensors[f"{name}/n_pos"] = layer.n_pos.detach().to("cpu", torch.float64).contiguous()
        for key, t in (layer.statistics or {}).items():
            tensors[f"{name}/stats/{key}"] = t.detach().cpu().contiguous()
    layers = contents.layers
    metadata = {
        "format": FILE_FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": contents.fingerprint,
        "mean_y": contents.mean_y,
        "layers": json.dumps(list(layers)),
        "kinds": json.dumps({name: list(layer.patterns) for name, layer in layers.items()}),
        "counts": json.dumps(contents.counts),
        "samples": json.dumps({name: layer.n for name, layer in layers.items() if layer.n is not None}),
        **({"mask": contents.mask} if contents.mask else {}),
    }
    write(path, tensors, metadata)


def read_patterns(path: Path, kinds: Sequence[str],
                  statistics_shapes: Callable[[tuple, list, list, int], dict]) -> PatternFile:
    """Read and check a patterns file of any readable version.

    ``kinds`` are the pattern kinds a layer may hold (:data:`toolkit.patterns.KINDS`;
    all of them where a file of version 1 does not say), ``statistics_shapes(weight_shape,
    kinds, stored, groups)`` the statistics a layer must hold and their shapes, given the
    keys it stores and the rows of its input sums ``x.ones``, one per group of input
    channels (:meth:`toolkit.patterns.Statistics.stored_shapes`). Every tensor is checked: patterns
    float32 or float64, all kinds of a layer of one shape; counts and statistics float64
    of their shapes; all finite, counts not negative; and no tensor that no layer of the
    metadata claims. ``mean_y`` is read as it is (its values are the caller's concept).
    """
    meta, tensors = read(path)
    if meta.get("format") != FILE_FORMAT:
        raise PatternFileError(f"{path} is not a patterns file written by Patterns.save")
    version = meta.get("version")
    if version not in READABLE_VERSIONS:
        raise PatternFileError(f"{path} has the format version {version!r}; this toolkit reads "
                               f"versions {', '.join(READABLE_VERSIONS)} (a newer file needs a newer toolkit)")
    names = _json(path, meta, "layers", list)
    layer_kinds = _json(path, meta, "kinds", dict, default={n: list(kinds) for n in names})
    samples = _json(path, meta, "samples", dict, default={})
    fingerprint, mean_y = meta.get("fingerprint"), meta.get("mean_y")
    if not isinstance(fingerprint, str) or not isinstance(mean_y, str):
        raise PatternFileError(f"{path} has missing or malformed metadata (fingerprint or mean_y)")
    unread = set(tensors)
    layers = {}
    for name in names:
        fitted = layer_kinds.get(name)
        if not isinstance(fitted, list) or not fitted or any(k not in kinds for k in fitted):
            raise PatternFileError(f"{path} has malformed metadata (the kinds of layer '{name}')")
        reader = _LayerReader(path, name, tensors, unread)
        layers[name] = reader.layer(fitted, samples.get(name), version, statistics_shapes)
    if unread:
        raise PatternFileError(f"{path} holds tensors of no layer its metadata lists: {sorted(unread)[:5]}")
    return PatternFile(fingerprint, mean_y, layers, _json(path, meta, "counts", dict, default={}),
                       meta.get("mask"))


@dataclass
class _LayerReader:
    """Reads the tensors of one layer, checking each and ticking it off ``unread``."""

    path: Path
    name: str
    tensors: dict[str, Tensor]
    unread: set

    def take(self, key: str, **checks) -> Tensor:
        if key not in self.tensors:
            raise PatternFileError(f"{self.path} lacks the tensor '{key}' of layer '{self.name}'")
        self.unread.discard(key)
        return check_tensor(self.path, key, self.tensors[key], **checks)

    def layer(self, kinds: list[str], n, version: str, statistics_shapes) -> LayerRecord:
        name, path = self.name, self.path
        first = self.take(f"{name}/{kinds[0]}", dtypes=PATTERN_DTYPES)
        shape = tuple(first.shape)
        if len(shape) < 1:
            raise PatternFileError(f"{path}: the tensor '{name}/{kinds[0]}' has shape {shape}, "
                                   "not the shape of a layer's weight")
        patterns = {k: self.take(f"{name}/{k}", dtypes=PATTERN_DTYPES, shape=shape) for k in kinds}
        prefix = f"{name}/stats/"
        stored = sorted(k[len(prefix):] for k in self.tensors if k.startswith(prefix))
        statistics, n_pos = None, None
        if version == "1" and stored:  # an older layout: its counts are read, its sums left out
            n = float(self.take(prefix + "n", shape=(), nonnegative=True))
            n_pos = self.take(prefix + "n_pos", shape=shape[:1], nonnegative=True)
            self.unread.difference_update(prefix + key for key in stored)
            warnings.warn(f"{path} was written by an older version: its patterns and sample counts are "
                          "read, its statistics (in an older layout) are left out", UserWarning)
        elif stored:
            ones = self.tensors.get(prefix + "x.ones")
            groups = ones.shape[0] if ones is not None and ones.dim() > 0 else 1
            expected = statistics_shapes(shape, kinds, stored, groups)
            extra = [key for key in stored if key not in expected]
            if extra:
                raise PatternFileError(f"{path}: the tensor '{prefix}{extra[0]}' is not a statistic of "
                                       f"a fit of {kinds}")
            statistics = {key: self.take(prefix + key, shape=size, nonnegative=key in ("n", "total.ones", "total.active"))
                          for key, size in expected.items()}
            n, n_pos = float(statistics["n"]), statistics.get("total.active")
        if f"{name}/n_pos" in self.tensors:
            n_pos = self.take(f"{name}/n_pos", shape=shape[:1], nonnegative=True)
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0):
            raise PatternFileError(f"{path} has malformed metadata (the samples of layer '{name}': {n!r})")
        if n_pos is not None and n is not None and bool((n_pos > n).any()):
            raise PatternFileError(f"{path}: the tensor '{name}/n_pos' counts more active samples than "
                                   f"the layer's {int(n)}")
        return LayerRecord(patterns, None if n is None else int(n), n_pos, statistics)
