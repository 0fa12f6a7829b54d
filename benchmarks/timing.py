"""Helpers shared by the benchmark scripts: the common options, the model and its random
inputs, dtypes by name, synchronising a device, timing a call or a block, interleaved
repeats, the marginal cost per image of fitting, and the error between two fits.

The machines these benchmarks run on are shared and noisy, so every figure is a ratio
taken in one run: the steps are timed alternately, repeated, and the medians compared.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

#: Model and product dtypes by their command-line names.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------
# options, model, inputs
# ----------------------------------------------------------------------------------
def parser(doc: str, *, model: str, size: int, batch: int, models: tuple[str, ...] | None = None,
           repeats: int | None = None, device: str | None = None,
           dtypes: tuple[str, ...] = ("float32", "float64")) -> argparse.ArgumentParser:
    """The options every benchmark shares, with the script's defaults: ``--model``
    (a ``torchvision.models`` constructor), ``--size``, ``--batch``, ``--device``,
    ``--dtype`` (unless ``dtypes`` is empty), ``--repeats`` (if given) and ``--threads``.
    The description is the first paragraph of ``doc``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, choices=models,
                   help=f"torchvision model name (default {model})")
    p.add_argument("--size", type=int, default=size, help=f"image height and width (default {size})")
    p.add_argument("--batch", type=int, default=batch, help=f"images per batch (default {batch})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--device", default=device, help=f"cuda or cpu (default {device})")
    if dtypes:
        p.add_argument("--dtype", choices=dtypes, default="float32",
                       help="dtype of the model and its inputs (default float32)")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats,
                       help=f"interleaved repeats, medians compared (default {repeats})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def prepare(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check that ``--device`` exists and silence the warning about
    never-active output neurons (random weights: many never fire); returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    warnings.filterwarnings("ignore", message="output neurons")
    return device


def torchvision_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      memory_format: torch.memory_format = torch.contiguous_format, **kwargs) -> nn.Module:
    """The torchvision architecture ``name`` with random weights seeded by
    ``torch.manual_seed(0)`` (nothing is downloaded), on ``device`` in ``dtype``, in eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    return model.to(device, dtype, memory_format=memory_format).eval()


def random_batches(images: int, batch: int, size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 1,
                   channels_last: bool = False) -> Iterator[torch.Tensor]:
    """``images`` random normal 3 x ``size`` x ``size`` images in batches of ``batch``
    (the last one may be short), drawn on ``device`` one batch at a time from a generator
    seeded with ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, images, batch):
        x = torch.randn(min(batch, images - start), 3, size, size, generator=generator, device=device,
                        dtype=dtype)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


def compute_dtype(name: str):
    """The ``compute_dtype`` of ``fit_patterns`` for a command-line name: ``None`` for
    ``"model"`` (the model's dtype), ``"tf32"`` as it is, otherwise a torch dtype."""
    return None if name == "model" else DTYPES.get(name, name)


def forward(model: nn.Module, batches) -> None:
    """The plain forward pass over ``batches`` under ``torch.no_grad()``: the unit of the ratios."""
    with torch.no_grad():
        for x in batches:
            model(x)


# ----------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


class Stopwatch:
    """Wall-clock seconds of a ``with`` block, the device synchronised around it::

        with Stopwatch(device) as watch:
            ...
        watch.seconds
    """

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, None

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def seconds(step: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``step``, the device synchronised around it."""
    with Stopwatch(device) as watch:
        step()
    return watch.seconds


def interleaved(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device
                ) -> dict[str, list[float]]:
    """Seconds of every step, the steps called in turn ``repeats`` times (so drifting
    load hits all of them alike)."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds(step, device))
    return times


def median_seconds(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device
                   ) -> dict[str, float]:
    """Median seconds per call of every step over ``repeats`` interleaved rounds, after
    one untimed warm-up round."""
    interleaved(steps, 1, device)
    return {name: median(t) for name, t in interleaved(steps, repeats, device).items()}


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


# ----------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------
def fit_costs(model: nn.Module, batches: list[torch.Tensor], device: torch.device, short: int = 1,
              repeats: int = 3, products: str = "model") -> dict:
    """Marginal seconds per image of the forward pass, of ``fit_patterns`` (default
    settings) and of the positive-only fit, over all ``batches`` minus the first
    ``short``, interleaved ``repeats`` times; with their ratios to the forward pass.
    ``products`` names the ``compute_dtype`` (see :func:`compute_dtype`)."""
    from toolkit.patterns import fit_patterns

    dtype = compute_dtype(products)
    head = batches[:short]

    def fit(data, **kw):
        fit_patterns(model, data, progress=False, compute_dtype=dtype, **kw)

    steps = {"forward_long": lambda: forward(model, batches), "forward_short": lambda: forward(model, head),
             "default_long": lambda: fit(batches), "default_short": lambda: fit(head),
             "positive_long": lambda: fit(batches, kinds=("positive",)),
             "positive_short": lambda: fit(head, kinds=("positive",))}
    fit(head)  # warm up (allocator, kernels)
    times = interleaved(steps, repeats, device)
    images = sum(len(x) for x in batches[short:])
    result = {"times_s": times}
    for name in ("forward", "default", "positive"):
        result[f"{name}_s_per_image"] = marginal(times[f"{name}_long"], times[f"{name}_short"], images)
    for name in ("default", "positive"):
        result[f"{name}_ratio"] = result[f"{name}_s_per_image"] / result["forward_s_per_image"]
        # two views that load on a shared machine disturbs less: the fastest runs (load
        # only ever adds time), and the ratio within each round (the steps of one round
        # run within a minute of each other)
        fastest = [min(times[f"{step}_{length}"]) for step in (name, "forward") for length in ("long", "short")]
        result[f"{name}_ratio_fastest"] = (fastest[0] - fastest[1]) / (fastest[2] - fastest[3])
        result[f"{name}_ratio_per_round"] = [
            (fl - fs) / (wl - ws) for fl, fs, wl, ws in zip(
                times[f"{name}_long"], times[f"{name}_short"], times["forward_long"], times["forward_short"])]
    return result


def worst_error(patterns, reference) -> float:
    """The largest relative (Frobenius) difference of ``patterns`` from ``reference``
    over the layers and the reference's kinds."""
    worst = 0.0
    for name in reference.names:
        for kind in reference.kinds:
            a, b = getattr(patterns[name], kind), getattr(reference[name], kind)
            worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-300)))
    return worst
