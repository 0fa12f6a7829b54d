"""Data for the toolkit: Fashion-MNIST and images with a known signal.

Two kinds of data are used throughout the notebooks.

*Fashion-MNIST* (Xiao et al. 2017, Zalando SE, MIT licence) is a drop-in
replacement for MNIST: 28 x 28 grey images of ten kinds of clothing. The
repository ships a small class-balanced subset in ``data/fashion_mnist_subset.npz``
(rebuilt by ``scripts/build_fashion_mnist.py``); :func:`load_fashion_mnist`
reads it.

*Ground-truth images* (:func:`make_ground_truth_images`) carry the paper's
linear signal/distractor model into pixel space: every image is the sum of a
signal ``s = y * a_s`` (a fixed shape ``a_s`` at a fixed place, scaled by the
class-carrying amplitude ``y``) and a distractor ``d`` (a second shape with an
independent amplitude, partially overlapping the first, plus smooth noise). As
both parts are known for every image, an explanation can be scored against the
truth with :func:`signal_correlation`, :func:`mass_inside` and
:func:`precision_at_k`.

Normalisation
-------------
Every image tensor handed to a network in this toolkit is float32 in
``[0, 1]`` for Fashion-MNIST (raw bytes divided by 255, *not* centred); the
shipped CNN was trained on exactly this scaling.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST",
    "data_dir",
    "shipped_dir",
    "read_idx",
    "read_fashion_mnist",
    "to_tensor",
    "load_fashion_mnist",
    "GroundTruthImages",
    "ground_truth_masks",
    "make_ground_truth_images",
    "signal_correlation",
    "mass_inside",
    "precision_at_k",
]

#: Names of the ten Fashion-MNIST classes, indexed by label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

SUBSET_FILE = "fashion_mnist_subset.npz"

# ---------------------------------------------------------------------------
# Locating the data directory
# ---------------------------------------------------------------------------


def shipped_dir(name: str) -> Path:
    """Return the folder ``name`` (``"data"`` or ``"notebooks"``) of the shipped files.

    An installed package (a wheel, or a wheel built from the sdist) carries them inside
    itself, in its folder ``_shipped/NAME``; in a checkout (and an editable install) they are
    the repository's top-level ``NAME/`` folder.

    Parameters
    ----------
    name : str
        The top-level folder of the repository.

    Returns
    -------
    pathlib.Path
        The folder (it is not checked for existence).
    """
    package = Path(__file__).resolve().parent
    installed = package / "_shipped" / name
    return installed if installed.is_dir() else package.parent / name


def data_dir() -> Path:
    """Return the directory holding the toolkit's shipped data files.

    The environment variable ``TOOLKIT_DATA`` overrides the default, which is
    the ``data/`` folder of the repository, or its copy inside an installed package
    (:func:`shipped_dir`).

    Returns
    -------
    pathlib.Path
        The directory (it is not checked for existence).
    """
    override = os.environ.get("TOOLKIT_DATA")
    if override:
        return Path(override).expanduser()
    return shipped_dir("data")


# ---------------------------------------------------------------------------
# The idx file format
# ---------------------------------------------------------------------------

# idx type byte -> NumPy dtype (multi-byte types are big-endian on disk)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Read an array stored in the idx format of (Fashion-)MNIST.

    The format is a 4-byte magic number ``0, 0, type, ndim``, then ``ndim``
    big-endian uint32 dimension sizes, then the data in C order. Files whose
    name ends in ``.gz`` are decompressed on the fly.

    Parameters
    ----------
    path : str or os.PathLike
        The idx file, plain or gzip-compressed.

    Returns
    -------
    numpy.ndarray
        The array, in native byte order, with the stored shape and type.

    Raises
    ------
    ValueError
        If the header is malformed or the data size does not match it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx data type 0x{type_code:02x}")
    dtype = _IDX_DTYPES[type_code]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header announces shape {shape} ({expected} bytes) "
            f"but {len(raw) - header} bytes follow"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_fashion_mnist(split: str = "train", source: str = "debian", root=None):
    """Read the *full* Fashion-MNIST split as raw uint8 arrays.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test images.
    source : {"debian", "torchvision"}
        ``"debian"`` reads the idx files of the Debian package
        ``dataset-fashion-mnist`` (or any folder holding the four original
        ``*-ubyte.gz`` files); ``"torchvision"`` uses
        ``torchvision.datasets.FashionMNIST(root, download=True)``.
    root : str or os.PathLike, optional
        The folder; defaults to :data:`DEBIAN_FASHION_MNIST` for ``"debian"``
        and is required for ``"torchvision"``.

    Returns
    -------
    images : numpy.ndarray of uint8, shape (N, 28, 28)
    labels : numpy.ndarray of int64, shape (N,)
    """
    split = _check_split(split)
    if source == "debian":
        root = Path(root) if root is not None else DEBIAN_FASHION_MNIST
        prefix = "train" if split == "train" else "t10k"
        image_file = root / f"{prefix}-images-idx3-ubyte.gz"
        label_file = root / f"{prefix}-labels-idx1-ubyte.gz"
        for file in (image_file, label_file):
            if not file.exists():
                raise FileNotFoundError(
                    f"{file} not found. Install the Debian package "
                    "'dataset-fashion-mnist', pass the folder holding the original "
                    "idx files, or use source='torchvision'."
                )
        images, labels = read_idx(image_file), read_idx(label_file)
    elif source == "torchvision":
        if root is None:
            raise ValueError("source='torchvision' needs a root folder to download into")
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(root), train=(split == "train"), download=True)
        images, labels = ds.data.numpy(), ds.targets.numpy()
    else:
        raise ValueError(f"source must be 'debian' or 'torchvision', not {source!r}")
    return np.ascontiguousarray(images, np.uint8), labels.astype(np.int64)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return split


# ---------------------------------------------------------------------------
# The shipped Fashion-MNIST subset
# ---------------------------------------------------------------------------


def to_tensor(images: np.ndarray):
    """Turn uint8 images (N, H, W) into the network input (N, 1, H, W).

    The bytes are divided by 255, giving float32 values in ``[0, 1]``; this is
    the one normalisation used for Fashion-MNIST throughout the toolkit.
    """
    import torch

    return torch.from_numpy(np.asarray(images, np.float32) / 255.0).unsqueeze(1)


def load_fashion_mnist(split: str = "train", as_tensor: bool = True):
    """Load the class-balanced Fashion-MNIST subset shipped with the toolkit.

    The ``train`` split holds 6,000 images of the original training set, 600
    per class; its two halves ``[:3000]`` and ``[3000:]`` hold 300 per class
    each (fit patterns on one, measure on the other). The ``test`` split holds
    1,000 images of the original test set, 100 per class.

    Parameters
    ----------
    split : {"train", "test"}
    as_tensor : bool, default True
        ``True``: float32 tensor (N, 1, 28, 28) in ``[0, 1]`` (bytes / 255)
        and int64 label tensor. ``False``: the stored uint8 images (N, 28, 28)
        and int64 label array.

    Returns
    -------
    images, labels
    """
    split = _check_split(split)
    path = data_dir() / SUBSET_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Rebuild it with "
            "'python scripts/build_fashion_mnist.py', or point the environment "
            "variable TOOLKIT_DATA at a folder that holds it."
        )
    with np.load(path) as archive:
        images = archive[f"{split}_images"]
        labels = archive[f"{split}_labels"].astype(np.int64)
    if not as_tensor:
        return images, labels
    import torch

    return to_tensor(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------------
# Ground-truth images
# ---------------------------------------------------------------------------


@dataclass
class GroundTruthImages:
    """Images ``x = signal + distractor`` whose two parts are known.

    Attributes
    ----------
    images : torch.Tensor, (N, 1, H, W) float32
        The network input ``x``.
    labels : torch.Tensor, (N,) int64
        ``1`` where ``y > 0``, else ``0``.
    y : torch.Tensor, (N,) float32
        The class-carrying signal amplitude.
    signal : torch.Tensor, (N, 1, H, W) float32
        ``y * signal_mask``: the true signal component.
    distractor : torch.Tensor, (N, 1, H, W) float32
        ``distractor_amplitude * distractor_mask + noise``.
    signal_mask : torch.Tensor, (H, W) bool
        The pixels of the signal shape.
    distractor_mask : torch.Tensor, (H, W) bool
        The pixels of the distractor shape (partially overlapping the signal).
    distractor_amplitude : torch.Tensor, (N,) float32
        The distractor shape's amplitude, drawn independently of ``y``.
    """

    images: "torch.Tensor"
    labels: "torch.Tensor"
    y: "torch.Tensor"
    signal: "torch.Tensor"
    distractor: "torch.Tensor"
    signal_mask: "torch.Tensor"
    distractor_mask: "torch.Tensor"
    distractor_amplitude: "torch.Tensor"

    def __len__(self) -> int:
        return self.images.shape[0]


def ground_truth_masks(size: int = 32):
    """The signal and distractor shapes of :func:`make_ground_truth_images`.

    The signal is a plus sign centred at ``(0.4, 0.4) * size`` with arms of
    half-length ``0.25 * size`` and half-width ``0.06 * size``; the distractor
    is a filled square centred at ``(0.6, 0.6) * size`` with half-side
    ``0.22 * size``. The square covers the lower-right part of the plus's
    centre and the inner halves of its right and lower arms, so the two
    shapes overlap partially. Coordinates are those of pixel centres.

    Parameters
    ----------
    size : int
        Image height and width (at least 8).

    Returns
    -------
    signal_mask, distractor_mask : numpy.ndarray of bool, shape (size, size)
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, not {size}")
    centres = (np.arange(size) + 0.5) / size  # pixel centres in units of size
    row, col = centres[:, None], centres[None, :]
    dr, dc = np.abs(row - 0.4), np.abs(col - 0.4)
    vertical = (dc <= 0.06) & (dr <= 0.25)
    horizontal = (dr <= 0.06) & (dc <= 0.25)
    signal_mask = vertical | horizontal
    distractor_mask = (np.abs(row - 0.6) <= 0.22) & (np.abs(col - 0.6) <= 0.22)
    return signal_mask, distractor_mask


def _smooth_noise(rng, n: int, size: int, sigma: float, scale: float) -> np.ndarray:
    """Gaussian-filtered white noise with per-pixel standard deviation ``scale``.

    The filter wraps around the image border, which makes the noise field
    stationary; its variance is then the sum of the squared filter weights,
    which we measure by filtering a unit impulse and divide out exactly.
    """
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal((n, size, size))
    if sigma <= 0:
        return scale * white
    smooth = gaussian_filter(white, sigma=(0, sigma, sigma), mode="wrap")
    impulse = np.zeros((size, size))
    impulse[0, 0] = 1.0
    kernel = gaussian_filter(impulse, sigma=sigma, mode="wrap")
    return smooth * (scale / np.sqrt(np.sum(kernel**2)))


def make_ground_truth_images(
    n: int,
    size: int = 32,
    seed=None,
    *,
    min_amplitude: float = 0.5,
    max_amplitude: float = 1.0,
    distractor_scale: float = 1.0,
    noise_scale: float = 0.3,
    noise_sigma: float = 1.5,
) -> GroundTruthImages:
    """Generate images whose signal and distractor are known exactly.

    Every image is ``x = s + d`` with

    * signal ``s = y * a_s``: ``a_s`` is the plus-shaped mask of
      :func:`ground_truth_masks`, ``y = c * m`` with a fair random sign
      ``c = +-1`` and magnitude ``m ~ U[min_amplitude, max_amplitude]``;
      the label is ``y > 0``;
    * distractor ``d = b * a_d + noise``: ``a_d`` is the square mask that
      partially overlaps the plus, ``b ~ U[-1, 1] * distractor_scale``
      independently of ``y``, and the noise is white Gaussian noise smoothed by
      a Gaussian filter of width ``noise_sigma`` pixels (wrapping at the
      border) and scaled to per-pixel standard deviation ``noise_scale``.

    The magnitude is bounded away from zero so that the two classes are
    separable up to the noise; a small CNN classifies them almost perfectly.

    Parameters
    ----------
    n : int
        Number of images.
    size : int, default 32
        Height and width.
    seed : int or numpy.random.Generator, optional
        Seed of the generator; the same seed gives the same images.
    min_amplitude, max_amplitude : float
        Range of ``|y|``.
    distractor_scale : float
        Largest ``|b|``.
    noise_scale : float
        Standard deviation of the smooth noise per pixel.
    noise_sigma : float
        Width of the Gaussian smoothing filter in pixels (0: white noise).

    Returns
    -------
    GroundTruthImages
    """
    import torch

    if n < 0:
        raise ValueError(f"n must be non-negative, not {n}")
    if not 0 <= min_amplitude <= max_amplitude:
        raise ValueError("need 0 <= min_amplitude <= max_amplitude")
    rng = np.random.default_rng(seed)
    signal_mask, distractor_mask = ground_truth_masks(size)

    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    y = sign * rng.uniform(min_amplitude, max_amplitude, n)
    b = rng.uniform(-distractor_scale, distractor_scale, n)
    noise = _smooth_noise(rng, n, size, noise_sigma, noise_scale)

    signal = (y[:, None, None] * signal_mask).astype(np.float32)
    distractor = (b[:, None, None] * distractor_mask + noise).astype(np.float32)
    images = signal + distractor  # float32 sum: x == s + d holds exactly

    def image_tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)

    return GroundTruthImages(
        images=image_tensor(images),
        labels=torch.from_numpy((y > 0).astype(np.int64)),
        y=torch.from_numpy(y.astype(np.float32)),
        signal=image_tensor(signal),
        distractor=image_tensor(distractor),
        signal_mask=torch.from_numpy(signal_mask),
        distractor_mask=torch.from_numpy(distractor_mask),
        distractor_amplitude=torch.from_numpy(b.astype(np.float32)),
    )


# ---------------------------------------------------------------------------
# Scoring an explanation against the truth
# ---------------------------------------------------------------------------


def _as_numpy(a) -> np.ndarray:
    """A float64 NumPy copy of an array or (possibly grad-tracking) tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _pixel_relevance(attribution) -> np.ndarray:
    """Absolute relevance per pixel, shape (N, H, W).

    A 4-D attribution (N, C, H, W) is summed in absolute value over channels;
    a 3-D one (N, H, W) is taken as is.
    """
    r = np.abs(_as_numpy(attribution))
    if r.ndim == 4:
        return r.sum(axis=1)
    if r.ndim == 3:
        return r
    raise ValueError(f"attribution must be (N, C, H, W) or (N, H, W), got shape {r.shape}")


def _pixel_mask(mask, relevance: np.ndarray) -> np.ndarray:
    """Broadcast a (H, W) or (N, H, W) mask (a (N, 1, H, W) one is squeezed)."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask).astype(bool)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    try:
        return np.broadcast_to(mask, relevance.shape)
    except ValueError:
        raise ValueError(
            f"mask of shape {mask.shape} does not fit pixel maps of shape {relevance.shape}"
        ) from None


def signal_correlation(estimate, true_signal) -> np.ndarray:
    """Pearson correlation between an estimated and the true signal, per image.

    Each image is flattened (channels and pixels together) and the two vectors
    are correlated. Where either is constant its correlation is undefined; we
    return 0 there (no linear relation can be shown), never NaN.

    Parameters
    ----------
    estimate, true_signal : array or tensor, shape (N, ...)
        Same shape.

    Returns
    -------
    numpy.ndarray, shape (N,)
        Values in ``[-1, 1]``.
    """
    a, b = _as_numpy(estimate), _as_numpy(true_signal)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    # a constant image has max == min exactly; its correlation is defined as 0
    constant = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a**2).sum(axis=1) * (b**2).sum(axis=1))
    cov = (a * b).sum(axis=1)
    r = np.where(constant, 0.0, cov / np.where(constant, 1.0, norm))
    return np.clip(r, -1.0, 1.0)


def mass_inside(attribution, mask) -> np.ndarray:
    """Fraction of absolute attribution inside a region, per image.

    ``sum_{p in mask} |r_p| / sum_p |r_p|`` with ``|r_p|`` summed over
    channels. An all-zero attribution has no mass to place; we return 0.

    Parameters
    ----------
    attribution : array or tensor, (N, C, H, W) or (N, H, W)
    mask : array or tensor of bool, (H, W) or (N, H, W)
        The true signal region (e.g. ``GroundTruthImages.signal_mask``).

    Returns
    -------
    numpy.ndarray, shape (N,)
        Values in ``[0, 1]``.
    """
    r = _pixel_relevance(attribution)
    m = _pixel_mask(mask, r)
    total = r.sum(axis=(1, 2))
    inside = np.where(m, r, 0.0).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def precision_at_k(attribution, mask, k: int) -> np.ndarray:
    """Fraction of the ``k`` most relevant pixels that lie in a region, per image.

    Pixels are ranked by absolute relevance (summed over channels); ties are
    broken in favour of the pixel that comes first in row-major order, so the
    result is deterministic. An image whose pixels all tie (a constant map,
    e.g. all zero) ranks nothing; we return 0 for it.

    Parameters
    ----------
    attribution : array or tensor, (N, C, H, W) or (N, H, W)
    mask : array or tensor of bool, (H, W) or (N, H, W)
    k : int
        Number of top pixels, ``1 <= k <= H * W``. A natural choice is the
        size of the region, ``int(mask.sum())``.

    Returns
    -------
    numpy.ndarray, shape (N,)
        Values in ``[0, 1]``.
    """
    r = _pixel_relevance(attribution)
    m = _pixel_mask(mask, r)
    n, pixels = r.shape[0], r.shape[1] * r.shape[2]
    k = int(k)
    if not 1 <= k <= pixels:
        raise ValueError(f"k must lie in [1, {pixels}], not {k}")
    r, m = r.reshape(n, pixels), m.reshape(n, pixels)
    order = np.argsort(-r, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(m, order, axis=1).mean(axis=1)
    constant = np.ptp(r, axis=1) == 0
    return np.where(constant, 0.0, hits)
