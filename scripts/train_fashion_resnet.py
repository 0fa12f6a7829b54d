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

import torch

from _fashion import train_and_save, training_parser
from toolkit.data import data_dir, load_fashion_mnist
from toolkit.models import FASHION_RESNET_FILE, SmallResNet


def main(argv=None):
    parser = training_parser(__doc__, data_dir() / FASHION_RESNET_FILE, epochs=15, batch_size=64, threads=2)
    parser.add_argument("--progress", action="store_true", help="a progress bar per epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    train_and_save(lambda: SmallResNet(width=args.width), (train_x, train_y), (test_x, test_y), args,
                   "subset test images", progress=args.progress, test_images=len(test_y))


if __name__ == "__main__":
    main()
