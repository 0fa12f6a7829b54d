"""Keeping freed memory for reuse while a data set streams through a model on the CPU.

Every batch of a fit allocates, per layer, buffers of tens to hundreds of megabytes: the
groups' values of :class:`toolkit.patterns.Statistics` (``3 J`` channels of the layer's
output) and the workspace of the weight-gradient product. glibc's ``malloc`` serves a
block above its *mmap threshold* (which it raises by itself to at most 32 MiB) with
fresh pages from the kernel and unmaps them when the block is freed, so every batch
pays again for the kernel to map and zero each page. On VGG16 at 224x224, batch 4, on
a 2-core CPU, that was about 480,000 page faults and 1.7-1.9 s of system time per
batch, and a batch took 6.9-8.9 s instead of 5.9-6.2 s.

:func:`reuse_freed_memory` raises the two thresholds (``mallopt``) while the data
streams, so freed blocks stay in the process and the next batch reuses their pages
(the peak memory is the same; it is only not handed back between batches). Afterwards
it sets them to the values glibc's own adjustment reaches for such blocks (32 MiB and
64 MiB) and hands the free memory back to the system (``malloc_trim``), also when the
streaming fails. It does nothing on another C library, on another device than the
CPU, inside another such block, or when the environment sets malloc's thresholds
itself (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``): the
user's setting wins. Setting ``TOOLKIT_KEEP_MALLOC`` (to anything) switches it off.

The sums a fit streams into are made while the thresholds are raised, so they lie in
the heap, where freeing a block does not hand its pages back. The final solve frees
them layer by layer; :func:`release_freed_memory` hands those pages back at once
(``malloc_trim``), so the memory the solve needs next comes from them.
"""
from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

__all__ = ["reuse_freed_memory", "release_freed_memory", "available"]

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: While streaming: the largest value mallopt takes (an ``int``), 2 GiB - 1.
WHILE_STREAMING = 2**31 - 1
#: Afterwards: where glibc's dynamic adjustment ends for blocks of 32 MiB and more.
AFTERWARDS = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                 "TOOLKIT_KEEP_MALLOC")

_active = False


@lru_cache(maxsize=1)
def _glibc():
    """The process's glibc, or None (another system or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def available() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything in this process."""
    return _glibc() is not None and not any(name in os.environ for name in USER_SETTINGS)


@contextmanager
def reuse_freed_memory(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Within the block, freed CPU memory stays in the process for the next batch.

    Yields whether it is in effect (see the module docstring for when it is not).
    """
    global _active
    libc = _glibc()
    if torch.device(device).type != "cpu" or _active or not available():
        yield False
        return
    _active = True
    try:
        for parameter in AFTERWARDS:
            libc.mallopt(parameter, WHILE_STREAMING)
        yield True
    finally:
        for parameter, value in AFTERWARDS.items():
            libc.mallopt(parameter, value)
        libc.malloc_trim(0)
        _active = False


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system now (glibc's ``malloc_trim``; a
    no-op on another C library, or inside :func:`reuse_freed_memory`)."""
    libc = _glibc()
    if libc is not None and not _active:
        libc.malloc_trim(0)
