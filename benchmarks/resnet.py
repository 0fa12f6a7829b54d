"""ResNet cost of the forward pass, fitting the patterns and PatternAttribution.

One run times, interleaved round by round on the same inputs (so a busy machine slows
them alike and the ratios stay fair), per batch:

* the forward pass under ``torch.no_grad`` (the unit of the ratios);
* :func:`toolkit.fit_patterns` on 1 and on 2 batches: their difference is the cost of
  one batch of streamed statistics, the rest the set-up and the patterns' closed form,
  paid once per fit;
* PatternAttribution and PatternNet with the fitted patterns (one forward pass with the
  rules in place and one backward pass).

torchvision architectures with random weights (nothing is downloaded)::

    PYTHONPATH=. python benchmarks/resnet.py --model resnet18 --size 224 --batch 8
    PYTHONPATH=. python benchmarks/resnet.py --model resnet50 --size 112 --batch 4 --mask relu_input
    PYTHONPATH=. python benchmarks/resnet.py --model resnet50 --size 224 --batch 32 --device cuda
"""
from __future__ import annotations

import argparse

import torch
import torchvision

from explain import DTYPES, seconds_per_call
from toolkit.methods import PatternAttribution, PatternNet
from toolkit.patterns import fit_patterns
from toolkit.residual import DEFAULT_MASK, MASKS

MODELS = ("resnet18", "resnet34", "resnet50")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=MODELS)
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--compute-dtype", default="float64", choices=sorted(DTYPES),
                        help="dtype of the fit's per-batch products")
    parser.add_argument("--mask", default=DEFAULT_MASK, choices=MASKS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=args.num_classes)
    model = model.to(device, dtype).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    fit = dict(progress=False, mask=args.mask, compute_dtype=DTYPES[args.compute_dtype])

    patterns = fit_patterns(model, [x], **fit)
    explainers = {"PatternAttribution": PatternAttribution(model, patterns),
                  "PatternNet": PatternNet(model, patterns)}

    def forward():
        with torch.no_grad():
            return model(x)

    functions = {"forward (no_grad)": forward,
                 "fit, 1 batch": lambda: fit_patterns(model, [x], **fit),
                 "fit, 2 batches": lambda: fit_patterns(model, [x, x], **fit)}
    functions.update({name: (lambda e=e: e.attribute(x)) for name, e in explainers.items()})
    times = seconds_per_call(functions, args.repeats, device)
    # a fit is (batches x per-batch statistics) + the closed form, once
    per_batch_fit = times["fit, 2 batches"] - times["fit, 1 batch"]
    closed_form = times["fit, 1 batch"] - per_batch_fit
    per_batch = {"forward (no_grad)": times["forward (no_grad)"],
                 "fit_patterns (per batch)": per_batch_fit,
                 "PatternAttribution": times["PatternAttribution"],
                 "PatternNet": times["PatternNet"]}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, {args.size}x{args.size}, batch {args.batch}, {args.dtype} "
          f"(fit products {args.compute_dtype}, mask {args.mask}), {name}, median of {args.repeats}")
    base = per_batch["forward (no_grad)"]
    print(f"{'step':<28}{'s/image':>10}{'x forward':>11}")
    for label, t in per_batch.items():
        print(f"{label:<28}{t / args.batch:>10.4f}{t / base:>11.1f}")
    print(f"patterns' closed form and set-up, once per fit: about {closed_form:.2f} s "
          f"(a fit on 1 batch: {times['fit, 1 batch']:.2f} s)")


if __name__ == "__main__":
    main()
