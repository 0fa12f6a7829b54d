"""VGG16 on one device: forward, fitting patterns, every explanation method, layer quality.

One run measures, on the same random batch and the same model (random weights, nothing is
downloaded):

* the plain forward pass (``torch.no_grad()``, eval mode): images/s -- the yardstick;
* the fitting pass: the forward pass with every Conv2d/Linear layer's statistics streamed
  into float64 sums (the per-batch work of ``toolkit.fit_patterns``);
* each explanation method's ``attribute`` (one forward and one backward pass);
* ``toolkit.quality.layer_quality`` for every Conv2d/Linear layer (16 for VGG16) on
  ``--quality-images`` random images: the moments pass plus the closed form per layer.

Ratios are times relative to the forward pass (2.0 = takes twice as long), printed next
to the project's targets: fitting <= 3x the forward pass, each method <= 2.2x, layer
quality for all 16 layers over 5,000 images in under 5 minutes. Every measurement is
warmed up first; on a GPU every timing is bracketed by ``torch.cuda.synchronize()``.

From a plain checkout (torch, torchvision, numpy, scipy, tqdm, safetensors; no Jupyter)::

    PYTHONPATH=. python benchmarks/vgg16.py --model vgg16 --size 224 --batch 64 --batches 10 \\
        --device cuda --compute-dtype float32 --channels-last --tf32 --quality-images 5000
    PYTHONPATH=. python benchmarks/vgg16.py --model vgg11 --size 64 --batch 8 --batches 2 \\
        --device cpu --quality-images 32

``--json FILE`` also writes the measured rates; notebook 04 reads such a file (environment
variable ``TOOLKIT_BENCHMARK``) to estimate how long a full run takes.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (DTYPES, Stopwatch, device_name, median_seconds, parser, prepare,  # noqa: E402
                    random_batches, torchvision_model, verdict)
from toolkit.methods import REGISTRY  # noqa: E402

MODELS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "alexnet")
#: (what, largest allowed ratio to the forward pass); benchmarks/fit_patterns.py measures
#: the fit's marginal cost per image end to end
TARGET_FITTING = 5.0
TARGET_METHOD = 2.2
#: layer quality for all layers over this many images in at most this many seconds
TARGET_QUALITY_IMAGES, TARGET_QUALITY_SECONDS = 5000, 300.0
#: on a CPU, layers with more inputs than this are left out of the quality run unless
#: --quality-max-dim says otherwise (the 25088 x 25088 moment of VGG's first dense
#: layer needs 5 GB and an eigendecomposition that takes hours on a few cores)
CPU_QUALITY_MAX_DIM = 4608


#: The explanation methods timed: every registered method but the variants (the
#: linear-pattern ones time the same as their two-component method).
BENCHMARKED = tuple(name for name, m in REGISTRY.items() if not m.options)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__, model="vgg16", models=MODELS, size=224, batch=64)
    p.add_argument("--batches", type=int, default=5,
                   help="timed batches per measurement, after one warm-up batch (default 5)")
    p.add_argument("--compute-dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the fitting pass's per-batch products; the sums are "
                        "always float64 (default float32)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and inputs in torch.channels_last memory format")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 in cuBLAS and cuDNN (torch.backends.cuda.matmul.allow_tf32, "
                        "torch.backends.cudnn.allow_tf32); without it both are switched off")
    p.add_argument("--quality-images", type=int, default=TARGET_QUALITY_IMAGES,
                   help=f"random images for the layer-quality run; 0 skips it "
                        f"(default {TARGET_QUALITY_IMAGES})")
    p.add_argument("--quality-batch", type=int, default=None,
                   help="batch size of the layer-quality run (default --batch)")
    p.add_argument("--quality-max-dim", type=int, default=None,
                   help="leave out layers with more inputs D than this from the quality run "
                        f"(default: none on a GPU, {CPU_QUALITY_MAX_DIM} on a CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the measured rates to FILE")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torchvision

    from toolkit.layers import Hooks, evaluation_mode, run, trace
    from toolkit.compare import TITLES, make_explainers
    from toolkit.patterns import KINDS, Patterns, Statistics, fingerprint
    from toolkit.quality import collect_moments, estimator_directions, rho_from_moments, MEASURABLE

    device = prepare(args)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    dtype, compute_dtype = DTYPES[args.dtype], DTYPES[args.compute_dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    model = torchvision_model(args.model, device, dtype, memory_format=memory_format)
    x = next(random_batches(args.batch, args.batch, args.size, device, dtype,
                            channels_last=args.channels_last))
    plan = trace(model, x[:1])

    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f} M parameters, {len(plan)} neuron layers; "
          f"batch {args.batch}x3x{args.size}x{args.size} {args.dtype}"
          f"{', channels-last' if args.channels_last else ''}; fitting products in {args.compute_dtype}; "
          f"TF32 {'on' if args.tf32 else 'off'}")
    print(f"device: {device_name(device)}; torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"timings: median of {args.batches} batches after one warm-up batch, methods taking turns\n")

    # -- forward, fitting, methods: one set of interleaved rounds --------------------
    stats = {layer.name: Statistics(layer, KINDS, compute_dtype) for layer in plan}

    def observe(layer, layer_input, output):
        stats[layer.name].update(layer, layer_input, output)

    def forward():
        with evaluation_mode(model), torch.no_grad():
            model(x)

    def fitting():
        with evaluation_mode(model), torch.no_grad():
            run(model, plan, x, Hooks(on_layer=observe))

    # patterns from one fitting batch (the cost of a pass does not depend on their values)
    fitting()
    for s in stats.values():
        s.flush()
    with Stopwatch(device) as estimate:
        patterns = Patterns.from_statistics(plan, stats, fingerprint(model))
    methods = {TITLES[name]: explainer
               for name, explainer in make_explainers(model, patterns, BENCHMARKED).items()}
    functions = {"forward": forward, "fitting": fitting}
    functions.update({name: (lambda m=m: m.attribute(x)) for name, m in methods.items()})
    seconds = median_seconds(functions, args.batches, device)

    base = seconds["forward"]
    print(f"{'pass':<20}{'s/batch':>10}{'images/s':>11}{'x forward':>11}{'target':>9}")
    print("-" * 61)
    rates, ratios = {}, {}
    for name, t in seconds.items():
        ratio = t / base
        rates[name], ratios[name] = args.batch / t, ratio
        target = "" if name == "forward" else (TARGET_FITTING if name == "fitting" else TARGET_METHOD)
        mark = "" if target == "" else f"<= {target:g}  {verdict(ratio, target)}"
        print(f"{name:<20}{t:>10.4f}{args.batch / t:>11.1f}{ratio:>11.2f}   {mark}")
    print(f"(patterns from the statistics of one batch, estimate_patterns on the CPU: {estimate.seconds:.1f} s; "
          f"this is paid once per fit, not per image)")

    # -- layer quality --------------------------------------------------------------
    quality = None
    if args.quality_images > 0:
        quality = quality_run(args, model, patterns, plan, device, dtype, collect_moments,
                              estimator_directions, rho_from_moments, MEASURABLE)
    if device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB")

    result = {
        "model": args.model, "size": args.size, "batch": args.batch, "device": device_name(device),
        "dtype": args.dtype, "compute_dtype": args.compute_dtype, "channels_last": args.channels_last,
        "tf32": args.tf32, "torch": torch.__version__,
        "images_per_second": rates, "ratio_to_forward": ratios, "quality": quality,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


def quality_run(args, model, patterns, plan, device, dtype, collect_moments, estimator_directions,
                rho_from_moments, estimators) -> dict:
    """Time layer_quality's two parts: the moments pass over the images and the closed form."""
    max_dim = args.quality_max_dim
    if max_dim is None and device.type == "cpu":
        max_dim = CPU_QUALITY_MAX_DIM
    layers = [layer for layer in plan if max_dim is None or layer.weight()[0].numel() <= max_dim]
    left_out = [f"{layer.name} (D={layer.weight()[0].numel()})" for layer in plan if layer not in layers]
    batch = args.quality_batch or args.batch
    print(f"\nlayer quality: {len(layers)} of {len(plan)} layers, {args.quality_images} random images "
          f"in batches of {batch}, estimators {', '.join(estimators)}")
    if left_out:
        print(f"  left out (D > {max_dim}; --quality-max-dim to change): {', '.join(left_out)}")
    names = [layer.name for layer in layers]

    # warm-up: one small batch through the whole computation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warm = random_batches(min(batch, args.quality_images), batch, args.size, device, dtype, seed=99,
                              channels_last=args.channels_last)
        _, moments = collect_moments(model, warm, layers=names, device=device, progress=False)
        for layer in layers[:1]:
            w = layer.weight().to(torch.float64)
            rho_from_moments(moments[layer.name], w, {e: estimator_directions(e, w, patterns[layer.name])
                                                      for e in estimators})
        del moments
        with Stopwatch(device) as moments_time:
            data = random_batches(args.quality_images, batch, args.size, device, dtype, seed=1,
                                  channels_last=args.channels_last)
            _, moments = collect_moments(model, data, layers=names, device=device, progress=False)
        moments_s = moments_time.seconds
        closed = {}
        for layer in layers:
            w = layer.weight().to(torch.float64)
            directions = {e: estimator_directions(e, w, patterns[layer.name]) for e in estimators}
            with Stopwatch(device) as closed_time:
                rho_from_moments(moments[layer.name], w, directions)
            closed[layer.name] = closed_time.seconds
    closed_s = sum(closed.values())
    total = moments_s + closed_s
    slowest = sorted(closed.items(), key=lambda kv: -kv[1])[:3]
    print(f"  moments pass   {moments_s:9.1f} s  ({args.quality_images / moments_s:.1f} images/s)")
    print(f"  closed form    {closed_s:9.1f} s  (slowest: "
          + ", ".join(f"{name} {s:.1f} s" for name, s in slowest) + ")")
    print(f"  total          {total:9.1f} s", end="")
    all_layers = not left_out
    if args.quality_images == TARGET_QUALITY_IMAGES and all_layers and args.size == 224:
        print(f"   target: all layers, {TARGET_QUALITY_IMAGES} images <= {TARGET_QUALITY_SECONDS:.0f} s  "
              f"{verdict(total, TARGET_QUALITY_SECONDS)}")
    else:
        projected = moments_s * TARGET_QUALITY_IMAGES / args.quality_images + closed_s
        print(f"   (target is for all layers of VGG16 at 224x224 over {TARGET_QUALITY_IMAGES} images "
              f"<= {TARGET_QUALITY_SECONDS:.0f} s; these settings, scaled to {TARGET_QUALITY_IMAGES} "
              f"images: about {projected:.0f} s)")
    return {"images": args.quality_images, "layers": names, "left_out": left_out,
            "moments_seconds": moments_s, "closed_form_seconds": closed,
            "moments_images_per_second": args.quality_images / moments_s, "total_seconds": total}


if __name__ == "__main__":
    main()
