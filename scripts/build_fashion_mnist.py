"""Build the class-balanced Fashion-MNIST subset shipped in ``data/``.

Usage::

    python scripts/build_fashion_mnist.py                      # Debian idx files
    python scripts/build_fashion_mnist.py --source torchvision ~/fashion   # download

Reads the original Fashion-MNIST files -- by default those of the Debian
package ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist`` --
and writes ``data/fashion_mnist_subset.npz`` with the arrays

* ``train_images`` (6000, 28, 28) uint8, ``train_labels`` (6000,) uint8:
  600 images per class from the training set, ordered so that each half,
  ``[:3000]`` and ``[3000:]``, holds 300 per class in seeded random order;
* ``test_images`` (1000, 28, 28) uint8, ``test_labels`` (1000,) uint8:
  100 images per class from the test set, in seeded random order;
* ``train_index``, ``test_index`` (int64): the positions of the chosen
  images in the original files.

Both sources hold the same data in the same order, so they give the same file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _fashion import add_source_option, source_and_root
from toolkit.data import SUBSET_FILE, data_dir, read_fashion_mnist

NUM_CLASSES = 10


def balanced_indices(labels: np.ndarray, per_class: int, parts: int, rng) -> np.ndarray:
    """Choose ``per_class`` indices of every class, split into balanced parts.

    For each class, ``per_class`` of its positions are drawn without
    replacement and cut into ``parts`` equal pieces. Part ``p`` of the result
    concatenates piece ``p`` of every class and is then shuffled, so every
    part is class-balanced on its own and the classes are mixed within it.

    Parameters
    ----------
    labels : numpy.ndarray, (N,)
    per_class : int
        Must be divisible by ``parts``.
    parts : int
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray of int64, (NUM_CLASSES * per_class,)
    """
    if per_class % parts:
        raise ValueError(f"per_class={per_class} is not divisible by parts={parts}")
    chosen = []
    for c in range(NUM_CLASSES):  # ten classes, not one loop step per sample
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} images, need {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False).reshape(parts, -1))
    stacked = np.stack(chosen, axis=1).reshape(parts, -1)  # (parts, classes * piece)
    return np.concatenate([rng.permutation(part) for part in stacked]).astype(np.int64)


def build(source: str, root, out: Path, train_per_class: int, test_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class, parts in (("train", train_per_class, 2), ("test", test_per_class, 1)):
        images, labels = read_fashion_mnist(split, source=source, root=root)
        index = balanced_indices(labels, per_class, parts, rng)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index].astype(np.uint8)
        arrays[f"{split}_index"] = index
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_option(parser, "'debian [FOLDER]' (default folder /usr/share/datasets/fashion-mnist) "
                              "or 'torchvision ROOT' (downloads into ROOT)")
    parser.add_argument("--out", type=Path, default=data_dir() / SUBSET_FILE)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source, root = source_and_root(parser, args)

    arrays = build(source, root, args.out, args.train_per_class, args.test_per_class, args.seed)
    for name, a in arrays.items():
        print(f"{name:13s} {str(a.shape):16s} {a.dtype}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
