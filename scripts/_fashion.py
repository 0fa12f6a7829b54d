"""What the Fashion-MNIST scripts share: the ``--source`` option of the original files,
the options of a training run, and training a network, measuring it on the test images
and saving it with the run's metadata (``scripts/train_fashion_cnn.py``,
``scripts/train_fashion_resnet.py``, ``scripts/build_fashion_mnist.py``)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from toolkit.models import accuracy, save_model, train


def add_source_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--source", nargs="+", default=["debian"], metavar=("SOURCE", "ROOT"), help=help)


def source_and_root(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str | None]:
    """``--source``'s name and folder (``None`` for the source's default)."""
    if len(args.source) > 2:
        parser.error("--source takes a source name and at most one folder")
    return args.source[0], (args.source[1] if len(args.source) == 2 else None)


def training_parser(doc: str, out: Path, epochs: int, batch_size: int,
                    threads: int | None) -> argparse.ArgumentParser:
    """``--out``, ``--epochs``, ``--lr``, ``--batch-size``, ``--width``, ``--seed`` and
    ``--threads`` with the script's defaults; the description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    return parser


def train_and_save(build: Callable[[], nn.Module], train_data, test_data, args: argparse.Namespace,
                   test_label: str, progress: bool = True, **metadata) -> None:
    """Build the network with ``torch.manual_seed(args.seed)`` (the initial weights),
    train it on ``train_data`` with Adam and a seeded shuffle, report its accuracy on
    ``test_data`` and save it to ``args.out`` with the run as metadata (``metadata``
    after the test accuracy)."""
    (train_x, train_y), (test_x, test_y) = train_data, test_data
    torch.manual_seed(args.seed)
    model = build()
    start = time.perf_counter()
    model, history = train(model, (train_x, train_y), epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, progress=progress)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_x, test_y)
    print(f"training took {seconds:.0f} s; per-epoch loss {[round(l, 4) for l in history['loss']]}")
    print(f"test accuracy on all {len(test_y)} {test_label}: {test_accuracy:.4f}")

    save_model(
        model,
        args.out,
        test_accuracy=f"{test_accuracy:.4f}",
        **metadata,
        epochs=args.epochs,
        seed=args.seed,
        lr=args.lr,
        batch_size=args.batch_size,
        train_images=len(train_y),
        training_seconds=f"{seconds:.0f}",
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        normalisation="bytes / 255, in [0, 1]",
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
