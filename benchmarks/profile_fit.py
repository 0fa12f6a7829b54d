"""Where does a fit spend its time? The operators of a short ``fit_patterns`` run,
final solve included, by self CPU time (``torch.profiler``).

    PYTHONPATH=. python benchmarks/profile_fit.py --model vgg11 --size 64 --batch 16 --batches 3
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compute_dtype, parser, prepare, random_batches, torchvision_model  # noqa: E402


def main(argv=None) -> None:
    p = parser(__doc__, model="vgg11", size=64, batch=16, dtypes=(), device="cpu")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--rows", type=int, default=12, help="operators to list")
    p.add_argument("--compute-dtype", choices=("model", "float32", "float64"), default="model")
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from toolkit.patterns import fit_patterns

    device = prepare(args)
    model = torchvision_model(args.model, device)
    data = list(random_batches(args.batches * args.batch, args.batch, args.size, device))
    dtype = compute_dtype(args.compute_dtype)
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
