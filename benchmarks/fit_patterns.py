"""How much does fitting patterns cost, as a multiple of the forward pass?

For a torchvision model (random weights, random inputs, nothing downloaded), at one
input size, batch size and device, measures in one run, interleaved and repeated:

* the forward pass (``torch.no_grad()``, eval mode),
* ``fit_patterns`` with the default settings (all three patterns, products in the
  model's dtype), and
* ``fit_patterns(kinds=("positive",))`` (what PatternNet and PatternAttribution with
  the two-component estimator need),

each as the *marginal* seconds per image -- the time over ``--long`` batches minus the
time over ``--short`` batches, per image of the difference, so the one-off work (the
trace, the model's fingerprint, the final pattern solve) does not count -- and as a
ratio to the forward pass. From a plain checkout::

    PYTHONPATH=. python benchmarks/fit_patterns.py --model vgg16 --size 224 --batch 4
    PYTHONPATH=. python benchmarks/fit_patterns.py --model vgg16 --size 224 --batch 64 \\
        --device cuda --compute-dtype tf32
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (DTYPES, device_name, fit_costs, parser, prepare, random_batches, spread,  # noqa: E402
                    torchvision_model, verdict)

TARGETS = {"default": 5.0, "positive": 3.8}


def parse_args(argv=None):
    p = parser(__doc__, model="vgg16", size=224, batch=4, repeats=3)
    p.add_argument("--short", type=int, default=1, help="batches of the short runs")
    p.add_argument("--long", type=int, default=4, help="batches of the long runs")
    p.add_argument("--compute-dtype", choices=("model", "float32", "float64", "tf32", "bfloat16"),
                   default="model", help="dtype of the per-batch products (default: the model's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = prepare(args)
    dtype = DTYPES[args.dtype]
    model = torchvision_model(args.model, device, dtype)
    batches = list(random_batches(args.long * args.batch, args.batch, args.size, device, dtype))
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}, {args.dtype} model, products in "
          f"{args.compute_dtype}; {device_name(device)}, torch {torch.__version__}")
    print(f"marginal cost: {args.long} batches minus {args.short}, {args.repeats} interleaved repeats")
    result = fit_costs(model, batches, device, args.short, args.repeats, args.compute_dtype)
    for name in ("forward", "default", "positive"):
        print(f"{name:<9} long {spread(result['times_s'][name + '_long'])}, short "
              f"{spread(result['times_s'][name + '_short'])}")
    print(f"forward pass            {result['forward_s_per_image']:.4f} s per image")
    for name, label in (("default", "default fit (3 patterns)"), ("positive", "positive-only fit")):
        print(f"{label:<24}{result[name + '_s_per_image']:.4f} s per image = "
              f"{result[name + '_ratio']:.2f}x forward ({verdict(result[name + '_ratio'], TARGETS[name])})")
        rounds = ", ".join(f"{r:.2f}" for r in result[name + "_ratio_per_round"])
        print(f"{'':<24}fastest runs {result[name + '_ratio_fastest']:.2f}x; per round {rounds}")
    result.update(model=args.model, size=args.size, batch=args.batch, device=device_name(device),
                  dtype=args.dtype, compute_dtype=args.compute_dtype, torch=torch.__version__)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
