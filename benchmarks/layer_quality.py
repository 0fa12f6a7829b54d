"""Time ``toolkit.quality.layer_quality`` on every layer of a torchvision model.

The model has random weights (nothing is downloaded); the patterns are fitted with
``toolkit.fit_patterns`` on one set of random images and the quality is measured on
another. Reported: the time to fit the patterns, to stream the moments (one pass over
the data, all layers), and per layer the closed form (eigendecomposition of the
``D x D`` input covariance and the per-neuron 2 x 2 problems), with ``D``, the neurons
``J``, the samples ``n`` and the mean ``rho`` per estimator.

Random images are not natural images: the numbers time the computation; the rho values
only show that it ran (with ``n <= D + 1`` samples a layer's rho is 0 whatever the
estimator).

Usage::

    PYTHONPATH=. python benchmarks/layer_quality.py --model vgg11 --size 32 --images 64 \\
        --batch 32 --device cpu --max-dim 4608
    PYTHONPATH=. python benchmarks/layer_quality.py --model vgg16 --size 224 --images 256 --device cuda
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Stopwatch, device_name, parser, prepare, torchvision_model  # noqa: E402


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images (neighbouring pixels correlated, like natural ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * 3


def main() -> None:
    p = parser(__doc__, model="vgg11", size=32, batch=32, dtypes=())
    p.add_argument("--images", type=int, default=64, help="images to measure on (and to fit on)")
    p.add_argument("--max-dim", type=int, default=None,
                   help="skip layers with more inputs D than this (the moment is 8 D^2 bytes)")
    p.add_argument("--layers", nargs="*", default=None, help="only these layers")
    p.add_argument("--end-to-end", action="store_true",
                   help="also time one plain layer_quality(...) call over the same layers")
    args = p.parse_args()
    device = prepare(args)

    from toolkit.layers import trace
    from toolkit.patterns import fit_patterns
    from toolkit.quality import (MEASURABLE, collect_moments, estimator_directions, inputs_per_neuron,
                                 layer_quality, rho_from_moments)

    model = torchvision_model(args.model, device)
    fit_x = random_images(args.images, args.size, seed=1)
    test_x = random_images(args.images, args.size, seed=2)
    plan = trace(model, fit_x[:1].to(device))
    layers = [layer for layer in plan
              if (args.layers is None or layer.name in args.layers)
              and (args.max_dim is None or inputs_per_neuron(layer) <= args.max_dim)
              and inputs_per_neuron(layer) > 1]
    skipped = [layer.name for layer in plan if layer not in layers]
    print(f"{args.model} at {args.size}x{args.size}, {args.images} images, batch {args.batch}, "
          f"device {device} ({device_name(device)}), torch {torch.__version__}")
    if skipped:
        print(f"skipped layers (D > --max-dim, not in --layers, or D = 1 without a quality): {skipped}")

    with Stopwatch(device) as fit_time:
        patterns = fit_patterns(model, torch.split(fit_x, args.batch), device=device, progress=False)
    # keep only what the measurement needs: the patterns of skipped layers can be a
    # gigabyte (VGG's first dense layer); the fit has freed its statistics itself
    for name in skipped:
        del patterns.layers[name]

    with Stopwatch(device) as moments_time, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, moments = collect_moments(model, torch.split(test_x, args.batch),
                                     layers=[layer.name for layer in layers], device=device,
                                     progress=False)
    moments_s = moments_time.seconds

    head = f"{'layer':<14}{'D':>7}{'J':>6}{'n':>10}{'seconds':>9}"
    head += "".join(f"{e:>15}" for e in MEASURABLE)
    print(head)
    print("-" * len(head))
    closed_s = 0.0
    for layer in layers:
        weight = layer.weight().to(torch.float64)
        directions = {e: estimator_directions(e, weight, patterns[layer.name], seed=0)
                      for e in MEASURABLE}
        with Stopwatch(device) as closed_time:
            rho, defined = rho_from_moments(moments[layer.name], weight, directions)
        closed_s += closed_time.seconds
        m = moments[layer.name]
        means = "".join(f"{float(rho[e][defined[e]].mean()) if defined[e].any() else math.nan:>15.4f}"
                        for e in MEASURABLE)
        print(f"{layer.name:<14}{m.dim:>7}{layer.out_features:>6}{int(m.n):>10,}"
              f"{closed_time.seconds:>9.2f}{means}")
    total = moments_s + closed_s
    print(f"\nfit_patterns {fit_time.seconds:.2f} s; layer_quality {total:.2f} s = moments {moments_s:.2f} s "
          f"({args.images / moments_s:.1f} img/s) + closed form {closed_s:.2f} s")
    if args.end_to_end:
        with Stopwatch(device) as end_to_end, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            layer_quality(model, patterns, torch.split(test_x, args.batch),
                          layers=[layer.name for layer in layers], device=device, progress=False)
        print(f"one layer_quality(...) call: {end_to_end.seconds:.2f} s")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
