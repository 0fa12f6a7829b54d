"""How much do cheaper per-batch products change the patterns?

Fits the patterns of a float32 network with float64 products (the reference) and with
float32, bfloat16 and emulated TF32 products, and prints the worst relative error
(Frobenius, over layers and the three patterns). The sums are float64 in every case.

TF32 is emulated on the CPU the way tensor cores compute it: both factors rounded to
10 mantissa bits, products accumulated in float32. bfloat16 runs the products in
bfloat16 (torch's CPU kernels; on CUDA ``fit_patterns(compute_dtype=torch.bfloat16)``).
``benchmarks/gpu_check.py`` measures real TF32 on a GPU.

    PYTHONPATH=. python benchmarks/product_precision.py
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import worst_error  # noqa: E402
from toolkit.layers import ConvOps  # noqa: E402
from toolkit.patterns import KINDS, Patterns, Statistics  # noqa: E402
from toolkit.streaming import stream  # noqa: E402


def network(depth: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    layers, channels = [], 3
    for i in range(depth):
        layers += [nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU()]
        channels = 32
        if i % 3 == 2:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(32 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers).eval()


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 mantissa bits, round to nearest)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextmanager
def emulated_tf32():
    original = ConvOps.patch_sums

    def patch_sums(self, x, g):
        if x.dtype == torch.float32:
            x, g = to_tf32(x), to_tf32(g)
        return original(self, x, g)

    ConvOps.patch_sums = patch_sums
    try:
        yield
    finally:
        ConvOps.patch_sums = original


def fit(model, data, dtype) -> Patterns:
    result = stream(model, data, lambda layer: Statistics(layer, KINDS, dtype), desc="", progress=False)
    return Patterns.from_statistics(result.plan, result.accumulators, result.model_fingerprint)


def main() -> None:
    warnings.filterwarnings("ignore", message="output neurons")
    model = network()
    g = torch.Generator().manual_seed(1)
    inputs = {"raw 0..255 pixels": torch.randint(0, 256, (256, 3, 24, 24), generator=g).float()}
    inputs["standardised"] = (inputs["raw 0..255 pixels"] - 127.5) / 64
    print(f"{'inputs':<20}{'float32':>12}{'TF32 (emul.)':>14}{'bfloat16':>12}")
    for label, x in inputs.items():
        data = list(torch.split(x, 32))
        reference = fit(model, data, torch.float64)
        errors = [worst_error(fit(model, data, torch.float32), reference)]
        with emulated_tf32():
            errors.append(worst_error(fit(model, data, torch.float32), reference))
        errors.append(worst_error(fit(model, data, torch.bfloat16), reference))
        print(f"{label:<20}" + "".join(f"{e:>13.1e}" for e in errors))


if __name__ == "__main__":
    main()
