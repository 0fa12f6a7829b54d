"""Train the toolkit's Fashion-MNIST ResNet and save ``data/fashion_resnet.safetensors``.

Usage::

    python scripts/train_fashion_resnet.py     # 15 epochs of about 9 s each on 2 idle CPU cores

Trains :class:`toolkit.models.SmallResNet` (width 16) on the 6,000 training images of
the shipped Fashion-MNIST subset (:func:`toolkit.data.load_fashion_mnist`, scaled to
``[0, 1]``), with Adam and a seeded shuffle; reports the accuracy on the subset's 1,000
test images; and saves the weights with the test accuracy, epochs, seed and wall time
as safetensors metadata. Deterministic on the CPU for a given torch version and thread
count (the initial weights and the shuffle are seeded).

The CNN of :func:`toolkit.models.load_fashion_cnn` was trained on all 60,000 training
images (``scripts/train_fashion_cnn.py``); this network sees a tenth of them, which is
what the shipped data allows without a download.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from toolkit.data import data_dir, load_fashion_mnist
from toolkit.models import FASHION_RESNET_FILE, SmallResNet, accuracy, save_model, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=data_dir() / FASHION_RESNET_FILE)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--progress", action="store_true", help="a progress bar per epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")

    torch.manual_seed(args.seed)  # the initial weights
    model = SmallResNet(width=args.width)
    start = time.perf_counter()
    model, history = train(model, (train_x, train_y), epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, progress=args.progress)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_x, test_y)
    print(f"training took {seconds:.0f} s; per-epoch loss {[round(l, 4) for l in history['loss']]}")
    print(f"test accuracy on all {len(test_y)} subset test images: {test_accuracy:.4f}")

    save_model(
        model,
        args.out,
        test_accuracy=f"{test_accuracy:.4f}",
        test_images=len(test_y),
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
