"""Time one update of the toy explorer (``toolkit.widgets.explorer``), without a browser.

An update is what happens when a slider moves: the pure computation
(:func:`toolkit.linear.explore`: sample, fit the filter and the five estimators,
measure rho on held-out samples) and the redraw of the panel into a PNG with
matplotlib's Agg renderer (:class:`toolkit.widgets.PanelRenderer`). The goal is an
update under 50 ms, so that dragging a slider feels immediate.

Usage::

    python benchmarks/widget_update.py [--repeats 50] [--n 1000]
"""
import argparse
import inspect
import statistics
import time

import matplotlib

matplotlib.use("Agg")

from toolkit.linear import explore  # noqa: E402
from toolkit.widgets import PanelRenderer  # noqa: E402

BUDGET_MS = 50.0


def main():
    default_n = inspect.signature(explore).parameters["n"].default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--n", type=int, default=default_n, help="samples (explorer default)")
    args = parser.parse_args()

    renderer = PanelRenderer()
    renderer.render(explore(n=args.n))  # warm-up: font cache, first draw

    compute_ms, total_ms, cpu_ms = [], [], []
    for repeat in range(args.repeats):
        angle = 20.0 + 140.0 * repeat / args.repeats  # a slider being dragged
        start, cpu_start = time.perf_counter(), time.process_time()
        result = explore(distractor_angle=angle, n=args.n)
        computed = time.perf_counter()
        renderer.render(result)
        done, cpu_done = time.perf_counter(), time.process_time()
        compute_ms.append(1e3 * (computed - start))
        total_ms.append(1e3 * (done - start))
        cpu_ms.append(1e3 * (cpu_done - cpu_start))

    median = statistics.median(total_ms)
    print(f"explorer update, n={args.n}, {args.repeats} repeats")
    print(f"  computation (explore):  median {statistics.median(compute_ms):6.1f} ms")
    print(f"  computation + redraw:   median {median:6.1f} ms wall "
          f"(min {min(total_ms):.1f}, max {max(total_ms):.1f}), "
          f"median {statistics.median(cpu_ms):.1f} ms CPU")
    verdict = "under" if median < BUDGET_MS else "OVER"
    print(f"  {verdict} the {BUDGET_MS:.0f} ms budget (wall-clock median; on a busy machine "
          "the CPU time is the steadier number)")


if __name__ == "__main__":
    main()
