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

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_name, interleaved, median, synchronize  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--short", type=int, default=1)
    parser.add_argument("--long", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality-images", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--device", default="cuda", help="cuda (a CPU run checks the script: no TF32)")
    return parser.parse_args(argv)


def tf32_error(model, data) -> float:
    from toolkit.patterns import fit_patterns

    exact = fit_patterns(model, data, progress=False, compute_dtype=torch.float32)
    fast = fit_patterns(model, data, progress=False, compute_dtype="tf32")
    worst = 0.0
    for name in exact.names:
        for kind in exact.kinds:
            a, b = getattr(fast[name], kind), getattr(exact[name], kind)
            worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-300)))
    return worst


def no_grad(model, x):
    with torch.no_grad():
        return model(x)


def resnet50(args, device) -> dict:
    """ResNet-50 at the same size and batch: forward, both fits, PatternAttribution."""
    import torchvision

    import fit_patterns as fit_benchmark
    from toolkit.methods import PatternAttribution
    from toolkit.patterns import fit_patterns

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device).eval()
    g = torch.Generator(device=device).manual_seed(3)
    batches = [torch.randn(args.batch, 3, args.size, args.size, device=device, generator=g)
               for _ in range(args.long)]
    options = argparse.Namespace(short=args.short, long=args.long, repeats=args.repeats,
                                 batch=args.batch, compute_dtype="model")
    result = {k: v for k, v in fit_benchmark.measure(model, batches, options, device).items() if k != "times_s"}
    patterns = fit_patterns(model, batches[:2], progress=False, kinds=("linear", "positive"))
    explainer = PatternAttribution(model, patterns, never_active="linear")
    x = batches[0]
    times = interleaved({"forward": lambda: no_grad(model, x), "patternattribution": lambda: explainer.attribute(x)},
                        args.repeats, device)
    result["patternattribution_ratio"] = median(times["patternattribution"]) / median(times["forward"])
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torchvision

    from toolkit.compare import make_explainers
    from toolkit.quality import layer_quality
    import fit_patterns as fit_benchmark

    warnings.filterwarnings("ignore", message="output neurons")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).to(device).eval()
    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(args.batch, 3, args.size, args.size, device=device, generator=g)
               for _ in range(args.long)]
    result = {"device": device_name(device), "torch": torch.__version__, "model": args.model,
              "size": args.size, "batch": args.batch}
    started = time.perf_counter()
    for products in ("model", "tf32") if cuda else ("model",):
        options = argparse.Namespace(short=args.short, long=args.long, repeats=args.repeats,
                                     batch=args.batch, compute_dtype=products)
        result[f"fit_{products}"] = fit_benchmark.measure(model, batches, options, device)
        print(products, {k: v for k, v in result[f"fit_{products}"].items() if k != "times_s"}, flush=True)
    if cuda:
        pixels = [(b.clamp(-2, 2) * 60 + 120).round() for b in batches[:2]]
        result["tf32_error"] = {"random": tf32_error(model, batches[:2]),
                                "pixels_0_255": tf32_error(model, pixels)}
        print("tf32 error", result["tf32_error"], flush=True)

    from toolkit.patterns import fit_patterns
    patterns = fit_patterns(model, batches[:2], progress=False)
    explainers = make_explainers(model, patterns)
    x = batches[0]
    steps = {"forward": lambda: no_grad(model, x)}
    steps.update({name: (lambda e=e: e.attribute(x)) for name, e in explainers.items()})
    with torch.no_grad():
        model(x)
    times = interleaved(steps, args.repeats, device)
    forward = median(times.pop("forward"))
    result["methods_ratio_to_forward"] = {name: median(t) / forward for name, t in times.items()}
    print("methods", result["methods_ratio_to_forward"], flush=True)

    n = args.quality_images
    gen = torch.Generator(device=device).manual_seed(2)
    data = (torch.randn(args.batch, 3, args.size, args.size, device=device, generator=gen)
            for _ in range(max(1, n // args.batch)))
    synchronize(device)
    t0 = time.perf_counter()
    quality = layer_quality(model, patterns, data, progress=False)
    synchronize(device)
    result["layer_quality"] = {"images": n, "seconds": time.perf_counter() - t0,
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
