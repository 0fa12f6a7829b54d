"""How much memory does a fit need, and how large is its patterns file?

For a torchvision model (random weights, random inputs, nothing downloaded), fits the
patterns twice -- with the default settings (all three patterns) and positive-only
(what PatternNet and PatternAttribution with the two-component estimator need) -- each
in a fresh Python process, so that its peak resident set (``ru_maxrss``) is its own,
and prints beside every measured figure the floor computed from the layer shapes:

* the file (``Patterns.save``, the patterns alone): one float32 weight-shaped tensor per
  layer and pattern kind;
* the peak RSS: the process before the fit (interpreter, torch, model, images), plus the
  largest amount the fit must hold at once -- the float64 sums when the data has
  streamed, or, while the patterns are solved layer by layer, the sums not yet solved,
  the patterns made so far and one block of the solve's float64 temporaries;
* on a GPU (``--device cuda``), the peak CUDA memory (``torch.cuda.max_memory_allocated``)
  beside the model and the sums, which live there while the data streams.

From a plain checkout (it needs torch, torchvision, numpy, scipy, tqdm, safetensors)::

    PYTHONPATH=. python benchmarks/memory.py                    # VGG16, 224x224, 2 images
    PYTHONPATH=. python benchmarks/memory.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_name, parser, prepare, random_batches, torchvision_model  # noqa: E402

GIB = 2 ** 30
FITS = {"default": ("linear", "positive", "negative"), "positive": ("positive",)}
TARGETS = {"default": {"file": 1.6, "rss": 5.0}, "positive": {"file": 0.55, "rss": 3.5}}


def parse_args(argv=None):
    p = parser(__doc__, model="vgg16", size=224, batch=2, dtypes=())
    p.add_argument("--images", type=int, default=2, help="images fitted (default 2)")
    p.add_argument("--child", choices=tuple(FITS), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------
# one fit, in its own process
# ----------------------------------------------------------------------------------
def resident_bytes() -> int:
    """The process's resident set now (Linux: VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_resident_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    """Fit, save, and report the figures of this process as JSON."""
    from toolkit.patterns import fit_patterns

    device = prepare(args)
    model = torchvision_model(args.model, device)
    data = list(random_batches(args.images, args.batch, args.size, device))
    before = resident_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    patterns = fit_patterns(model, data, kinds=FITS[args.child], progress=False)
    figures = {"rss_before": before, "rss_peak": peak_resident_bytes()}
    if device.type == "cuda":
        figures.update(cuda_before=cuda_before, cuda_peak=torch.cuda.max_memory_allocated(device))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        patterns.save(path)
        figures["file"] = path.stat().st_size
    figures["rss_peak_with_save"] = peak_resident_bytes()
    return figures


def run_child(kind: str, argv: list[str]) -> dict:
    """:func:`child` in a fresh interpreter (its peak RSS is then the fit's own)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, *argv, "--child", kind], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} fit failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------
# the floor, from the layer shapes
# ----------------------------------------------------------------------------------
def meta_model(name: str) -> nn.Module:
    """The torchvision model ``name`` on the meta device: its shapes, no memory."""
    import torchvision

    with torch.device("meta"):
        return getattr(torchvision.models, name)(weights=None)


def floors(shapes: list[torch.Size], kinds: tuple[str, ...], model_bytes: int) -> dict:
    """Bytes the fit of ``kinds`` must hold at most, beyond the process it runs in, by
    :class:`toolkit.patterns.Statistics`'s layout (``Statistics.shapes``) and the order in
    which ``Patterns.from_statistics`` and :func:`toolkit.patterns.estimate_patterns` work:
    layer by layer, the smallest first, each kind's float32 pattern made a block at a
    time, then the sums no later kind reads released (which kind reads which sums:
    ``toolkit.patterns._sides``, on meta tensors)."""
    from toolkit.patterns import SOLVE_BLOCK_ELEMENTS, Statistics, _sides

    kind_side = {"linear": "all", "positive": "positive", "negative": "negative"}
    layers = [{key: torch.empty(size, dtype=torch.float64, device="meta")
               for key, size in Statistics.shapes(shape, kinds, side_shifts=True).items()} for shape in shapes]
    sums = sum(t.numel() * 8 for sums_ in layers for t in sums_.values())
    held = peak = model_bytes + sums  # when the data has streamed
    for shape, sums_ in sorted(zip(shapes, layers), key=lambda pair: pair[0].numel()):  # smallest first
        sides = _sides(Statistics.from_tensors(sums_, kinds))
        reads = [{id(t) for part in sides[kind_side[k]].parts for t in (part.xy, *(t for _, t in part.x))}
                 for k in kinds]
        alive = {key: t.numel() * 8 for key, t in sums_.items()}
        for j in range(len(kinds)):
            held += shape.numel() * 4                       # the pattern, float32
            peak = max(peak, held + SOLVE_BLOCK_ELEMENTS * 8)  # and one block's temporaries
            later = set().union(*reads[j + 1:])
            for key in [key for key in alive if id(sums_[key]) not in later]:
                held -= alive.pop(key)
    return {"file": sum(shape.numel() * 4 for shape in shapes) * len(kinds), "sums": sums,
            "model": model_bytes, "held": peak}


# ----------------------------------------------------------------------------------
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    device = prepare(args)
    model = meta_model(args.model)
    shapes = [m.weight.shape for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model_bytes = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    on_cpu = device.type == "cpu"
    print(f"{args.model} at {args.size}x{args.size}, {args.images} images in batches of {args.batch}, float32, "
          f"random weights; {device_name(device)}, torch {torch.__version__}; each fit in a fresh process")
    result = {"model": args.model, "size": args.size, "images": args.images, "device": device_name(device)}
    rows = []
    for kind, kinds in FITS.items():
        measured = run_child(kind, _without_json(argv))
        floor = floors(shapes, kinds, model_bytes)
        if on_cpu:  # on a GPU the sums live there, and come to the CPU a layer at a time
            floor["rss"] = measured["rss_before"] + floor["held"] - model_bytes
        result[kind] = {"measured": measured, "floor": floor}
        rows.append((kind, measured, floor))

    def gib(value) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    print(f"\n{'fit':<10}{'file GiB':>10}{'floor':>8}{'target':>8}   {'peak RSS GiB':>13}{'floor':>8}"
          f"{'target':>8}   before the fit   sums   model")
    for kind, m, f in rows:
        t = TARGETS[kind]
        rss_target = f"{t['rss']:.2f}" if on_cpu else "-"
        print(f"{kind:<10}{gib(m['file']):>10}{gib(f['file']):>8}{t['file']:>8.2f}   "
              f"{gib(m['rss_peak']):>13}{gib(f.get('rss')):>8}{rss_target:>8}   "
              f"{gib(m['rss_before']):>14}{gib(f['sums']):>7}{gib(f['model']):>8}")
    for kind, m, f in rows:
        t = TARGETS[kind]
        verdicts = [f"file {'meets' if m['file'] / GIB <= t['file'] else 'MISSES'} {t['file']} GiB"]
        if on_cpu:
            verdicts.append(f"peak RSS {'meets' if m['rss_peak'] / GIB <= t['rss'] else 'MISSES'} {t['rss']} GiB")
        print(f"{kind}: {', '.join(verdicts)}; peak RSS with the save: {gib(m['rss_peak_with_save'])} GiB")
    if not on_cpu:
        print(f"\n{'fit':<10}{'peak CUDA GiB':>14}{'model + sums':>14}")
        for kind, m, f in rows:
            print(f"{kind:<10}{gib(m['cuda_peak']):>14}{gib(f['model'] + f['sums']):>14}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _without_json(argv: list[str]) -> list[str]:
    """The arguments for a child: those of this run without ``--json FILE``."""
    out = list(argv)
    if "--json" in out:
        i = out.index("--json")
        del out[i:i + 2]
    return out


if __name__ == "__main__":
    main()
