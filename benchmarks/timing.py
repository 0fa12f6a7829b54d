"""Timing helpers shared by the benchmark scripts: dtypes by name, synchronising a
device, timing a call, interleaved repeats and the marginal cost per image.

The machines these benchmarks run on are shared and noisy, so every figure is a ratio
taken in one run: the steps are timed alternately, repeated, and the medians compared.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

#: Model and product dtypes by their command-line names.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def seconds(step: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``step``, the device synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device
                ) -> dict[str, list[float]]:
    """Seconds of every step, the steps called in turn ``repeats`` times (so drifting
    load hits all of them alike)."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds(step, device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median (min .. max, n)`` of a list of seconds."""
    if len(values) == 1:
        return f"{values[0]:.3f} s"
    return f"{median(values):.3f} s ({min(values):.3f} .. {max(values):.3f}, {len(values)} runs)"


def marginal(long: list[float], short: list[float], extra_images: int) -> float:
    """Seconds per image of the work that grows with the data: the median time over the
    long run minus over the short one, per image of the difference (so a one-off cost,
    such as the final pattern solve, does not count)."""
    return (median(long) - median(short)) / extra_images


def verdict(ratio: float, target: float) -> str:
    return f"{'meets' if ratio <= target else 'MISSES'} the target of {target:g}x"
