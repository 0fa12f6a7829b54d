"""The fit's cost across network families: marginal seconds per image as a multiple of
the forward pass, for the torchvision classifiers issue 19 opened the toolkit to.

For each model (random weights, random inputs at its own size, nothing downloaded) it
runs :mod:`fit_patterns`'s measurement -- the forward pass, the default fit (all three
patterns) and the positive-only fit, interleaved and repeated in one run, each as the
time over ``--long`` batches minus the time over ``--short`` batches -- and prints one
table. From a plain checkout::

    PYTHONPATH=. python benchmarks/fit_families.py
    PYTHONPATH=. python benchmarks/fit_families.py --models vgg16 densenet121 --batch 4

A family whose fit costs more than the targets (default at most 5x the forward pass,
positive-only at most 3.8x) is flagged; the note after the table says where such a cost
usually comes from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import DTYPES, device_name, fit_costs, random_batches, torchvision_model, verdict  # noqa: E402

MODELS = ("resnet50", "densenet121", "inception_v3", "mobilenet_v2", "shufflenet_v2_x1_0", "regnet_x_400mf")
SIZES = {"inception_v3": 299}
TARGETS = {"default": 5.0, "positive": 3.8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--size", type=int, default=224, help="input side (inception_v3: 299 unless given)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--short", type=int, default=1)
    p.add_argument("--long", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.long} batches minus {args.short}, {args.repeats} interleaved repeats\n")
    rows = {}
    for name in args.models:
        size = SIZES.get(name, args.size) if args.size == 224 else args.size
        model = torchvision_model(name, device, DTYPES["float32"])
        batches = list(random_batches(args.long * args.batch, args.batch, size, device))
        result = fit_costs(model, batches, device, args.short, args.repeats, "model")
        rows[name] = {"size": size, **{k: result[k] for k in ("forward_s_per_image", "default_ratio",
                                                              "positive_ratio", "default_ratio_fastest",
                                                              "positive_ratio_fastest")}}
        print(f"{name:<20} {size:>4}  forward {result['forward_s_per_image']:.4f} s/img  "
              f"default {result['default_ratio']:.2f}x ({verdict(result['default_ratio'], TARGETS['default'])}; "
              f"fastest runs {result['default_ratio_fastest']:.2f}x)  positive-only {result['positive_ratio']:.2f}x "
              f"({verdict(result['positive_ratio'], TARGETS['positive'])}; fastest runs "
              f"{result['positive_ratio_fastest']:.2f}x)", flush=True)
        del model, batches
    print("\nA depthwise convolution is memory-bound in the forward pass (few multiply-adds per value "
          "read), while its fit adds a grouped weight-gradient product with 3 output channels per "
          "neuron: such layers cost more than their share of the forward pass.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
