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

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import DTYPES, device_name, interleaved, marginal, spread, verdict  # noqa: E402

TARGETS = {"default": 5.0, "positive": 3.8}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16", help="torchvision model name (vgg16, vgg11, alexnet, ...)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--short", type=int, default=1, help="batches of the short runs")
    parser.add_argument("--long", type=int, default=4, help="batches of the long runs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians are compared)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the model and its inputs")
    parser.add_argument("--compute-dtype", choices=("model", "float32", "float64", "tf32", "bfloat16"),
                        default="model", help="dtype of the per-batch products (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def measure(model, batches: list, args, device) -> dict:
    """Marginal seconds per image of the forward pass and both fits, and their ratios."""
    from toolkit.patterns import fit_patterns

    compute = None if args.compute_dtype == "model" else DTYPES.get(args.compute_dtype, args.compute_dtype)
    short, long = batches[:args.short], batches[:args.long]

    def forward(data):
        with torch.no_grad():
            for x in data:
                model(x)

    def fit(data, **kw):
        fit_patterns(model, data, progress=False, compute_dtype=compute, **kw)

    steps = {"forward_long": lambda: forward(long), "forward_short": lambda: forward(short),
             "default_long": lambda: fit(long), "default_short": lambda: fit(short),
             "positive_long": lambda: fit(long, kinds=("positive",)),
             "positive_short": lambda: fit(short, kinds=("positive",))}
    fit(short)  # warm up (allocator, kernels)
    times = interleaved(steps, args.repeats, device)
    images = (args.long - args.short) * args.batch
    result = {"times_s": times}
    for name in ("forward", "default", "positive"):
        result[f"{name}_s_per_image"] = marginal(times[f"{name}_long"], times[f"{name}_short"], images)
    for name in ("default", "positive"):
        result[f"{name}_ratio"] = result[f"{name}_s_per_image"] / result["forward_s_per_image"]
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torchvision

    warnings.filterwarnings("ignore", message="output neurons")  # random weights: many never fire

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).to(device, dtype).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device, dtype)
               for _ in range(args.long)]
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}, {args.dtype} model, products in "
          f"{args.compute_dtype}; {device_name(device)}, torch {torch.__version__}")
    print(f"marginal cost: {args.long} batches minus {args.short}, {args.repeats} interleaved repeats")
    result = measure(model, batches, args, device)
    for name in ("forward", "default", "positive"):
        print(f"{name:<9} long {spread(result['times_s'][name + '_long'])}, short "
              f"{spread(result['times_s'][name + '_short'])}")
    print(f"forward pass            {result['forward_s_per_image']:.4f} s per image")
    for name, label in (("default", "default fit (3 patterns)"), ("positive", "positive-only fit")):
        print(f"{label:<24}{result[name + '_s_per_image']:.4f} s per image = "
              f"{result[name + '_ratio']:.2f}x forward ({verdict(result[name + '_ratio'], TARGETS[name])})")
    result.update(model=args.model, size=args.size, batch=args.batch, device=device_name(device),
                  dtype=args.dtype, compute_dtype=args.compute_dtype, torch=torch.__version__)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
