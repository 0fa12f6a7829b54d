"""The prepared GPU check: VGG16 at 224x224 on one CUDA device, one JSON out.

Measures, on random weights and random images (nothing is downloaded):

* forward pass, and the marginal cost per image of ``fit_patterns`` with float32
  products, with TF32 products, and of the positive-only fit (``benchmarks/fit_patterns.py``);
* the error of TF32 products against float32 products (relative Frobenius, worst layer
  and pattern) -- on random images *and* on raw 0..255 pixel values;
* every explanation method's ``attribute`` as a multiple of the forward pass;
* ``layer_quality`` for all 16 layers on ``--quality-images`` images;
* ResNet-50 at the same size: forward, both fits and PatternAttribution.

Run from a plain checkout with ``PYTHONPATH=.`` (torch, torchvision, numpy, scipy, tqdm,
safetensors; no Jupyter stack): ``benchmarks/gpu_check.sh`` does it with time limits.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (Stopwatch, device_name, fit_costs, forward, interleaved, median, parser,  # noqa: E402
                    prepare, random_batches, torchvision_model, worst_error)


def parse_args(argv=None):
    p = parser(__doc__, model="vgg16", size=224, batch=64, repeats=3, dtypes=(), device="cuda")
    p.add_argument("--short", type=int, default=1)
    p.add_argument("--long", type=int, default=4)
    p.add_argument("--quality-images", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    return p.parse_args(argv)


def tf32_error(model, data) -> float:
    from toolkit.patterns import fit_patterns

    exact = fit_patterns(model, data, progress=False, compute_dtype=torch.float32)
    fast = fit_patterns(model, data, progress=False, compute_dtype="tf32")
    return worst_error(fast, exact)


def without_times(costs: dict) -> dict:
    return {k: v for k, v in costs.items() if k != "times_s"}


def resnet50(args, device) -> dict:
    """ResNet-50 at the same size and batch: forward, both fits, PatternAttribution."""
    from toolkit.methods import PatternAttribution
    from toolkit.patterns import fit_patterns

    model = torchvision_model("resnet50", device)
    batches = list(random_batches(args.long * args.batch, args.batch, args.size, device, seed=3))
    result = without_times(fit_costs(model, batches, device, args.short, args.repeats))
    patterns = fit_patterns(model, batches[:2], progress=False, kinds=("linear", "positive"))
    explainer = PatternAttribution(model, patterns, never_active="linear")
    x = batches[0]
    steps = {"forward": lambda: forward(model, [x]), "patternattribution": lambda: explainer.attribute(x)}
    times = interleaved(steps, args.repeats, device)
    result["patternattribution_ratio"] = median(times["patternattribution"]) / median(times["forward"])
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    from toolkit.compare import make_explainers
    from toolkit.patterns import fit_patterns
    from toolkit.quality import layer_quality

    device = prepare(args)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    model = torchvision_model(args.model, device)
    batches = list(random_batches(args.long * args.batch, args.batch, args.size, device))
    result = {"device": device_name(device), "torch": torch.__version__, "model": args.model,
              "size": args.size, "batch": args.batch}
    started = time.perf_counter()
    for products in ("model", "tf32") if cuda else ("model",):
        result[f"fit_{products}"] = fit_costs(model, batches, device, args.short, args.repeats, products)
        print(products, without_times(result[f"fit_{products}"]), flush=True)
    if cuda:
        pixels = [(b.clamp(-2, 2) * 60 + 120).round() for b in batches[:2]]
        result["tf32_error"] = {"random": tf32_error(model, batches[:2]),
                                "pixels_0_255": tf32_error(model, pixels)}
        print("tf32 error", result["tf32_error"], flush=True)

    patterns = fit_patterns(model, batches[:2], progress=False)
    explainers = make_explainers(model, patterns)
    x = batches[0]
    steps = {"forward": lambda: forward(model, [x])}
    steps.update({name: (lambda e=e: e.attribute(x)) for name, e in explainers.items()})
    forward(model, [x])
    times = interleaved(steps, args.repeats, device)
    forward_s = median(times.pop("forward"))
    result["methods_ratio_to_forward"] = {name: median(t) / forward_s for name, t in times.items()}
    print("methods", result["methods_ratio_to_forward"], flush=True)

    n = args.quality_images
    with Stopwatch(device) as watch:
        quality = layer_quality(model, patterns, random_batches(n, args.batch, args.size, device, seed=2),
                                progress=False)
    result["layer_quality"] = {"images": n, "seconds": watch.seconds,
                               "layers": len(quality.layers), "mean_rho": quality.to_dict()}
    result["resnet50"] = resnet50(args, device)
    print("resnet50", result["resnet50"], flush=True)
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    result["wall_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
