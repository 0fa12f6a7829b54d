"""Throughput of the explanation methods next to the plain forward pass.

Every method is one forward pass (with the rules' autograd functions in place) and one
backward pass, so its cost is measured against a forward pass under ``torch.no_grad``
timed in the same run, on the same inputs. PatternNet and PatternAttribution use
patterns built from the weights (``A = W``): fitting patterns is benchmarked elsewhere,
and the cost of a pass does not depend on the patterns' values.

Models are torchvision architectures with random weights (nothing is downloaded)::

    PYTHONPATH=. python benchmarks/explain.py --model vgg16 --size 224 --batch 32 --device cuda
    PYTHONPATH=. python benchmarks/explain.py --model vgg11 --size 64 --batch 16 --device cpu
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (DTYPES, device_name, forward, median_seconds, parser, prepare,  # noqa: E402
                    random_batches, torchvision_model)
from toolkit.layers import trace  # noqa: E402
from toolkit.compare import TITLES, make_explainers  # noqa: E402
from toolkit.methods import REGISTRY  # noqa: E402
from toolkit.patterns import LayerPatterns, Patterns, fingerprint  # noqa: E402

#: The explanation methods timed: every registered method but the variants (the
#: linear-pattern ones time the same as their two-component method).
BENCHMARKED = tuple(name for name, m in REGISTRY.items() if not m.options)

MODELS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg16_bn", "alexnet")


def weight_patterns(model: torch.nn.Module, example: torch.Tensor) -> Patterns:
    """Patterns equal to the (folded) weights; one float64 CPU copy shared by a, a_+, a_-."""
    layers = {}
    for layer in trace(model, example):
        w = layer.weight().to("cpu", torch.float64)
        layers[layer.name] = LayerPatterns(w, w, w)
    return Patterns(layers, fingerprint(model))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, model="vgg11", models=MODELS, size=64, batch=16, repeats=5, dtypes=tuple(sorted(DTYPES)))
    p.add_argument("--num-classes", type=int, default=1000)
    args = p.parse_args(argv)
    device, dtype = prepare(args), DTYPES[args.dtype]
    model = torchvision_model(args.model, device, dtype, num_classes=args.num_classes)
    x = next(random_batches(args.batch, args.batch, args.size, device, dtype))
    patterns = weight_patterns(model, x)
    methods = {TITLES[name]: explainer
               for name, explainer in make_explainers(model, patterns, BENCHMARKED).items()}

    def autograd_gradient():  # the plain input gradient, no rules: the cost of autograd alone
        inputs = x.detach().requires_grad_(True)
        logits = model(inputs)
        return torch.autograd.grad(logits.max(1).values.sum(), inputs)

    functions = {"forward (no_grad)": lambda: forward(model, [x]), "autograd gradient": autograd_gradient}
    functions.update({label: (lambda m=method: m.attribute(x)) for label, method in methods.items()})
    times = median_seconds(functions, args.repeats, device)

    print(f"{args.model}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, {device_name(device)}, "
          f"median of {args.repeats}")
    base = times["forward (no_grad)"]
    print(f"{'method':<20}{'s/batch':>10}{'images/s':>12}{'x forward':>11}")
    for label, t in times.items():
        print(f"{label:<20}{t:>10.4f}{args.batch / t:>12.1f}{t / base:>11.2f}")


if __name__ == "__main__":
    main()
