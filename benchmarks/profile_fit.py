"""Where does a fit spend its time? The operators of a short ``fit_patterns`` run,
final solve included, by self CPU time (``torch.profiler``).

    PYTHONPATH=. python benchmarks/profile_fit.py --model vgg11 --size 64 --batch 16 --batches 3
"""
from __future__ import annotations

import argparse
import warnings

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12, help="operators to list")
    parser.add_argument("--compute-dtype", choices=("model", "float32", "float64"), default="model")
    args = parser.parse_args(argv)
    import torchvision
    from torch.profiler import ProfilerActivity, profile

    from toolkit.patterns import fit_patterns

    warnings.filterwarnings("ignore", message="output neurons")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    data = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.batches)]
    dtype = None if args.compute_dtype == "model" else getattr(torch, args.compute_dtype)
    fit_patterns(model, data[:1], progress=False, compute_dtype=dtype)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit_patterns(model, data, progress=False, compute_dtype=dtype)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model} {args.size}x{args.size}, {args.batches} batches of {args.batch}, "
          f"products {args.compute_dtype}: {total / 1e6:.2f} s of operators")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
        print(f"  {e.key:<40}{e.self_cpu_time_total / 1e6:8.2f} s  {100 * e.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    main()
