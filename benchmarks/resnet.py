"""ResNet cost of the forward pass, fitting the patterns and PatternAttribution.

Measured in one run, interleaved and repeated, on torchvision architectures with random
weights (nothing is downloaded):

* the forward pass under ``torch.no_grad`` (the unit of the ratios);
* ``fit_patterns``, default and positive-only, as the *marginal* cost per image (a fit
  over ``--long`` batches minus one over ``--short``, as in ``benchmarks/fit_patterns.py``);
* PatternAttribution and PatternNet with the fitted patterns (one forward pass with the
  rules in place and one backward pass).

::

    PYTHONPATH=. python benchmarks/resnet.py --model resnet18 --size 112 --batch 4
    PYTHONPATH=. python benchmarks/resnet.py --model resnet50 --size 224 --batch 32 --device cuda
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (DTYPES, device_name, fit_costs, forward, median_seconds, parser, prepare,  # noqa: E402
                    random_batches, torchvision_model)
from toolkit.methods import PatternAttribution, PatternNet  # noqa: E402
from toolkit.patterns import fit_patterns  # noqa: E402
from toolkit.layers import DEFAULT_MASK, MASKS  # noqa: E402

MODELS = ("resnet18", "resnet34", "resnet50")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, model="resnet18", models=MODELS, size=112, batch=4, repeats=3)
    p.add_argument("--short", type=int, default=1)
    p.add_argument("--long", type=int, default=3)
    p.add_argument("--mask", default=DEFAULT_MASK, choices=MASKS)
    args = p.parse_args(argv)
    device = prepare(args)
    dtype = DTYPES[args.dtype]
    model = torchvision_model(args.model, device, dtype)
    batches = list(random_batches(args.long * args.batch, args.batch, args.size, device, dtype))
    fits = fit_costs(model, batches, device, args.short, args.repeats)

    patterns = fit_patterns(model, batches, progress=False, mask=args.mask)
    x = batches[0]
    explainers = {"PatternAttribution": PatternAttribution(model, patterns, never_active="linear"),
                  "PatternNet": PatternNet(model, patterns, never_active="linear")}
    steps = {"forward": lambda: forward(model, [x]),
             **{name: (lambda e=e: e.attribute(x)) for name, e in explainers.items()}}
    times = median_seconds(steps, args.repeats, device)
    print(f"{args.model}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, mask {args.mask}; "
          f"{device_name(device)}; medians of {args.repeats} interleaved repeats")
    print(f"{'step':<30}{'s/image':>10}{'x forward':>11}")
    print(f"{'forward (no_grad)':<30}{fits['forward_s_per_image']:>10.4f}{1:>11.2f}")
    for name, label in (("default", "fit_patterns (marginal)"), ("positive", "positive-only fit (marginal)")):
        print(f"{label:<30}{fits[name + '_s_per_image']:>10.4f}{fits[name + '_ratio']:>11.2f}")
    for name in explainers:
        print(f"{name:<30}{times[name] / args.batch:>10.4f}{times[name] / times['forward']:>11.2f}")


if __name__ == "__main__":
    main()
