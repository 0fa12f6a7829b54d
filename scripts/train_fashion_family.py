"""Train one of the toolkit's Inception-, DenseNet- or MobileNetV2-like Fashion-MNIST networks
and save its weights in ``data/``.

Usage::

    python scripts/train_fashion_family.py inception   # -> data/fashion_inception.safetensors
    python scripts/train_fashion_family.py densenet    # -> data/fashion_densenet.safetensors
    python scripts/train_fashion_family.py mobilenet   # -> data/fashion_mobilenet.safetensors

Trains :class:`toolkit.architectures.SmallInception`, ``SmallDenseNet`` or
``SmallMobileNetV2`` (at their default width unless ``--width`` says otherwise) on the 6,000 training images of the shipped
Fashion-MNIST subset (:func:`toolkit.data.load_fashion_mnist`, scaled to ``[0, 1]``), as
``scripts/train_fashion_resnet.py`` trains the ResNet: Adam, a seeded shuffle, the same
epochs, learning rate and batch size. It reports the accuracy on the subset's 1,000 test
images and saves the weights with the test accuracy, epochs, seed and wall time as
safetensors metadata. Deterministic on the CPU for a given torch version and thread
count (the initial weights and the shuffle are seeded).
"""
from __future__ import annotations

import torch

from _fashion import train_and_save, training_parser
from toolkit.data import data_dir, load_fashion_mnist
from toolkit.models import ARCHITECTURES, FASHION_MODELS

#: The networks this script trains, by their name in toolkit.models.FASHION_MODELS.
FAMILIES = {"inception": "SmallInception", "densenet": "SmallDenseNet", "mobilenet": "SmallMobileNetV2"}


def main(argv=None):
    parser = training_parser(__doc__, None, epochs=15, batch_size=64, threads=2)
    parser.add_argument("family", choices=tuple(FAMILIES))
    parser.add_argument("--progress", action="store_true", help="a progress bar per epoch")
    parser.set_defaults(width=None)  # each network's own default (its class's)
    args = parser.parse_args(argv)
    args.out = args.out or data_dir() / FASHION_MODELS[args.family][0]
    torch.set_num_threads(args.threads)

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    print(f"{FAMILIES[args.family]}: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    network = ARCHITECTURES[FAMILIES[args.family]]
    options = {} if args.width is None else {"width": args.width}
    train_and_save(lambda: network(**options), (train_x, train_y), (test_x, test_y), args,
                   "subset test images", progress=args.progress, test_images=len(test_y))


if __name__ == "__main__":
    main()
