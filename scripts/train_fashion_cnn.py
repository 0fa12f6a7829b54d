"""Train the toolkit's Fashion-MNIST CNN and save ``data/fashion_cnn.safetensors``.

Usage::

    python scripts/train_fashion_cnn.py                        # Debian idx files
    python scripts/train_fashion_cnn.py --source torchvision ~/fashion

Trains :class:`toolkit.models.SmallVGG` (width 16) on all 60,000 training
images of Fashion-MNIST, scaled to ``[0, 1]`` exactly as
:func:`toolkit.data.load_fashion_mnist` scales them, with Adam and a seeded
shuffle; reports the accuracy on all 10,000 test images; and saves the weights
with the test accuracy, epochs, seed and wall time as safetensors metadata.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from toolkit.data import data_dir, read_fashion_mnist, to_tensor
from toolkit.models import FASHION_CNN_FILE, SmallVGG, accuracy, save_model, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        nargs="+",
        default=["debian"],
        metavar=("SOURCE", "ROOT"),
        help="'debian [FOLDER]' or 'torchvision ROOT'",
    )
    parser.add_argument("--out", type=Path, default=data_dir() / FASHION_CNN_FILE)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    source, root = args.source[0], (args.source[1] if len(args.source) > 1 else None)
    if args.threads:
        torch.set_num_threads(args.threads)

    train_x, train_y = read_fashion_mnist("train", source=source, root=root)
    test_x, test_y = read_fashion_mnist("test", source=source, root=root)
    train_x, test_x = to_tensor(train_x), to_tensor(test_x)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")

    torch.manual_seed(args.seed)  # the initial weights
    model = SmallVGG(width=args.width, dropout=args.dropout)
    start = time.perf_counter()
    model, history = train(
        model,
        (train_x, train_y),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_x, test_y)
    print(f"training took {seconds:.0f} s; per-epoch loss {[round(l, 4) for l in history['loss']]}")
    print(f"test accuracy on all {len(test_y)} images: {test_accuracy:.4f}")

    save_model(
        model,
        args.out,
        test_accuracy=f"{test_accuracy:.4f}",
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


if __name__ == "__main__":
    main()
