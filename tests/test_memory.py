"""Freed memory is kept for reuse while data streams through a model on the CPU
(``toolkit.memory``), and the process's malloc settings are put back afterwards."""
import resource

import pytest
import torch
from torch import nn

from toolkit import memory
from toolkit.patterns import fit_patterns

BLOCK = (96 * 2**20) // 4          # a 96 MiB float32 tensor: above glibc's largest mmap threshold
PAGES = 96 * 2**20 // resource.getpagesize()

needs_glibc = pytest.mark.skipif(not memory.available(), reason="glibc malloc only")


def _faults_per_block(blocks: int = 8, last: int = 3) -> float:
    """Page faults of allocating, filling and freeing a large block, averaged over the
    ``last`` of ``blocks`` rounds (the first rounds settle the heap)."""
    counts = []
    for _ in range(blocks):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(BLOCK).fill_(1.0)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[-last:]) / last


@needs_glibc
def test_freed_blocks_are_reused_within():
    with memory.reuse_freed_memory("cpu") as active:
        assert active
        within = _faults_per_block()
    assert within < 0.05 * PAGES          # the same pages again: no fresh ones from the kernel


class RecordingLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_thresholds_are_raised_within_and_set_back_after_even_on_errors(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError), memory.reuse_freed_memory("cpu"):
        assert libc.calls == [("mallopt", memory.M_MMAP_THRESHOLD, 2**31 - 1),
                              ("mallopt", memory.M_TRIM_THRESHOLD, 2**31 - 1)]
        raise RuntimeError("a batch failed")
    assert libc.calls[2:] == [("mallopt", memory.M_MMAP_THRESHOLD, 32 * 2**20),
                              ("mallopt", memory.M_TRIM_THRESHOLD, 64 * 2**20),
                              ("malloc_trim", 0)]
    assert not memory._active


def test_leaves_other_devices_nested_blocks_and_user_settings_alone(monkeypatch):
    with memory.reuse_freed_memory("cuda") as active:
        assert not active
    if memory.available():
        with memory.reuse_freed_memory("cpu") as outer, memory.reuse_freed_memory("cpu") as inner:
            assert outer and not inner
    for name in memory.USER_SETTINGS:
        with monkeypatch.context() as m:
            m.setenv(name, "1")
            assert not memory.available()
            with memory.reuse_freed_memory("cpu") as active:
                assert not active


@needs_glibc
@pytest.mark.filterwarnings("ignore:output neurons")
def test_a_fit_streams_with_freed_memory_kept_and_ends_without_it():
    seen = []
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda *_: seen.append(memory._active))
    fit_patterns(model, torch.randn(8, 3), batch_size=4, progress=False)
    assert len(seen) >= 2 and all(seen)      # every batch (and the first batch's trace)
    assert not memory._active
