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

import torch

from _fashion import add_source_option, source_and_root, train_and_save, training_parser
from toolkit.data import data_dir, read_fashion_mnist, to_tensor
from toolkit.models import FASHION_CNN_FILE, SmallVGG


def main(argv=None):
    parser = training_parser(__doc__, data_dir() / FASHION_CNN_FILE, epochs=6, batch_size=128, threads=None)
    add_source_option(parser, "'debian [FOLDER]' or 'torchvision ROOT'")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args(argv)
    source, root = source_and_root(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)

    train_x, train_y = read_fashion_mnist("train", source=source, root=root)
    test_x, test_y = read_fashion_mnist("test", source=source, root=root)
    train_x, test_x = to_tensor(train_x), to_tensor(test_x)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    train_and_save(lambda: SmallVGG(width=args.width, dropout=args.dropout), (train_x, train_y),
                   (test_x, test_y), args, "images")


if __name__ == "__main__":
    main()
