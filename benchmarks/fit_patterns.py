"""How much slower is fitting patterns than running the model?

Measures, in one run and on the same batches, the images per second of

* the plain forward pass (``torch.no_grad()``, eval mode), and
* the fitting pass: the same forward pass with the statistics of every Conv2d/Linear
  layer streamed into float64 sums -- exactly the per-batch work of
  ``toolkit.fit_patterns`` (``toolkit.layers.intercept`` + ``Statistics.update``),

and their ratio; then one end-to-end ``fit_patterns`` call over the batches, split into
the streaming part and the final ``estimate_patterns``. Both passes are warmed up first;
on a GPU every timing ends with ``torch.cuda.synchronize()``.

Random weights and random inputs, nothing is downloaded. From a plain checkout::

    PYTHONPATH=. python benchmarks/fit_patterns.py --model vgg16 --size 224 --batch 32 \\
        --batches 10 --device cuda --compute-dtype float32
"""
from __future__ import annotations

import argparse
import time
from statistics import median as statistics_median

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg11",
                        help="torchvision model name (vgg11, vgg16, vgg16_bn, alexnet, ...)")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches before the first measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure forward and fitting passes alternately this many times (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the model and its inputs")
    parser.add_argument("--compute-dtype", choices=sorted(DTYPES), default="float64",
                        help="dtype of the per-batch products (the sums are always float64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-end-to-end", action="store_true",
                        help="skip the end-to-end fit_patterns call")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, x, batches: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``batches`` calls of ``step(x)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step(x)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        step(x)
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    import torchvision

    from toolkit.layers import evaluation_mode, intercept, trace
    from toolkit.patterns import Statistics, estimate_patterns, fit_patterns

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype, compute_dtype = DTYPES[args.dtype], DTYPES[args.compute_dtype]
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).to(device, dtype).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)

    plan = trace(model, x)
    statistics = {layer.name: Statistics.zeros(layer.weight_shape, device) for layer in plan}

    def forward(batch):
        model(batch)

    def observe(layer, layer_input, output):
        statistics[layer.name].update(layer, layer_input, output, compute_dtype)

    def fitting(batch):
        with intercept(model, plan, on_layer=observe):
            model(batch)

    name = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
    params = sum(p.numel() for p in model.parameters())
    stats_bytes = sum(t.numel() * t.element_size() for s in statistics.values() for t in s.tensors().values())
    print(f"{args.model}: {params / 1e6:.1f} M parameters, {len(plan)} Conv2d/Linear layers, "
          f"input {args.batch}x3x{args.size}x{args.size} {args.dtype}, products in "
          f"{args.compute_dtype}, statistics {stats_bytes / 2**30:.2f} GiB")
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    images = args.batch * args.batches
    forward_rates, fitting_rates = [], []
    with evaluation_mode(model), torch.no_grad():
        for repeat in range(args.repeats):  # alternate, so drifting load hits both alike
            warmup = args.warmup if repeat == 0 else 0
            forward_rates.append(images / timed(forward, x, args.batches, warmup, device))
            fitting_rates.append(images / timed(fitting, x, args.batches, warmup, device))
    forward_rate, fitting_rate = statistics_median(forward_rates), statistics_median(fitting_rates)

    def spread(rates):
        return f"(median of {len(rates)}; {min(rates):.1f} .. {max(rates):.1f})" if len(rates) > 1 else ""

    print(f"forward pass (no_grad, eval)  {forward_rate:10.1f} images/s  {spread(forward_rates)}")
    print(f"fitting pass (statistics)     {fitting_rate:10.1f} images/s  {spread(fitting_rates)}")
    print(f"ratio fitting / forward       {fitting_rate / forward_rate:10.3f}  "
          f"(fitting is {forward_rate / fitting_rate:.2f}x slower)")

    if not args.no_end_to_end:
        del statistics
        data = [x] * args.batches
        synchronize(device)
        start = time.perf_counter()
        patterns = fit_patterns(model, data, progress=False, compute_dtype=compute_dtype)
        synchronize(device)
        total = time.perf_counter() - start
        start = time.perf_counter()
        for layer in plan:
            estimate_patterns(patterns.statistics[layer.name], layer.weight(), patterns.mean_y)
        estimate = time.perf_counter() - start
        print(f"fit_patterns end to end       {images / total:10.1f} images/s  ({total:.2f} s for "
              f"{args.batches} batches, of which about {estimate:.2f} s estimate_patterns)")
    if device.type == "cuda":
        print(f"peak GPU memory               {torch.cuda.max_memory_allocated(device) / 2**30:10.2f} GiB")


if __name__ == "__main__":
    main()
