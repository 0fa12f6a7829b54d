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

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fit_patterns as fit_benchmark  # noqa: E402
from timing import DTYPES, device_name, median_seconds  # noqa: E402
from toolkit.methods import PatternAttribution, PatternNet  # noqa: E402
from toolkit.patterns import fit_patterns  # noqa: E402
from toolkit.residual import DEFAULT_MASK, MASKS  # noqa: E402

MODELS = ("resnet18", "resnet34", "resnet50")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=MODELS)
    parser.add_argument("--size", type=int, default=112, help="image height and width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--short", type=int, default=1)
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--mask", default=DEFAULT_MASK, choices=MASKS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="output neurons")

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = getattr(torchvision.models, args.model)(weights=None).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device, dtype)
               for _ in range(args.long)]
    options = argparse.Namespace(short=args.short, long=args.long, repeats=args.repeats,
                                 batch=args.batch, compute_dtype="model")
    fits = fit_benchmark.measure(model, batches, options, device)

    patterns = fit_patterns(model, batches, progress=False, mask=args.mask)
    x = batches[0]
    explainers = {"PatternAttribution": PatternAttribution(model, patterns, never_active="linear"),
                  "PatternNet": PatternNet(model, patterns, never_active="linear")}

    def forward():
        with torch.no_grad():
            return model(x)

    steps = {"forward": forward, **{name: (lambda e=e: e.attribute(x)) for name, e in explainers.items()}}
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
