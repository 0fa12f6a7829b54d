"""ImageNet and other image folders: finding the files, decoding, preprocessing, loading.

The standard preprocessing of torchvision's ImageNet models, which the paper's VGG16
expects too (:class:`Preprocessing`): scale the shorter side to 256 pixels (bilinear,
antialiased), cut the central 224 x 224 square, divide by 255 and normalise every
channel with the ImageNet mean and standard deviation. :func:`denormalize` undoes the
last step for display.

Folder layouts
--------------
:func:`imagenet` reads ``ROOT/train`` or ``ROOT/val`` (``split``) in either of the usual
layouts:

* **one folder per class** -- ``val/n01440764/ILSVRC2012_val_00000293.JPEG`` -- as
  torchvision's ``ImageFolder`` reads it: the class index is the position of the folder
  name in the sorted list of class folders, so with all 1000 ``n...`` folders it is the
  index of torchvision's pretrained models.
* **flat** -- ``val/ILSVRC2012_val_00000001.JPEG`` ... -- with a label file, found in
  the split folder or in ``ROOT`` (or given as ``labels=``):

  - ``LOC_val_solution.csv`` (Kaggle's ImageNet localisation challenge): a header
    ``ImageId,PredictionString`` and per image the file stem and a string whose first
    word is the class's WordNet id;
  - any ``.csv`` with rows ``file,label`` (a header row is allowed): the file name
    (with or without extension) and either a WordNet id or an integer class index;
  - ``ILSVRC2012_validation_ground_truth.txt`` of the ILSVRC2012 devkit: line ``k``
    holds the 1-based ILSVRC2012 id of ``ILSVRC2012_val_0000000k.JPEG`` (so a subset of
    the images works too). These ids are *not* torchvision's class indices; they are
    translated with the devkit's ``meta.mat`` (found next to the label file, in ``ROOT``
    or in ``ROOT/ILSVRC2012_devkit_t12/data``; reading it needs SciPy).

  WordNet ids become indices in the sorted list of ``classes``: given explicitly, else
  the class folders of ``ROOT/train`` if it exists, else the 1000 classes of the devkit,
  else the ids found in the label file (complete only for the whole validation set).

:func:`image_dataset` reads any folder: an ImageNet root, a folder of class folders, or
a flat folder of images (labelled when a label file is found, else with label ``-1``);
:func:`read_images` turns a few files or folders into one preprocessed batch.
:func:`load_photographs` reads the photographs shipped in ``data/images/`` and
:func:`photo_crops` cuts reproducible random crops from them (notebook 04's stand-in data).

Loading
-------
:func:`make_loader` builds the DataLoader: worker processes, pinned memory, one shard
per rank when ``torch.distributed`` is initialised (:class:`ShardSampler`), and on
request JPEG decoding and resizing on the GPU (``decode_device="cuda"``: the workers only
read the files, ``torchvision.io.decode_jpeg`` decodes a whole batch on the device).
"""
from __future__ import annotations

import csv
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LABEL_FILES",
    "Preprocessing",
    "denormalize",
    "decode_image",
    "rgb_array",
    "ImageFiles",
    "LayoutError",
    "find_images",
    "class_folders",
    "read_label_file",
    "imagenet",
    "image_dataset",
    "TENSOR_SUFFIXES",
    "tensor_dataset",
    "read_images",
    "PHOTOGRAPHS",
    "load_photographs",
    "photo_crops",
    "ShardSampler",
    "DeviceDecoder",
    "ImageLoader",
    "make_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File extensions read as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Label files looked for next to a flat folder of images, in this order.
LABEL_FILES = ("LOC_val_solution.csv", "labels.csv", "ILSVRC2012_validation_ground_truth.txt")
_WNID = re.compile(r"^n\d{8}$")


class LayoutError(FileNotFoundError):
    """A folder does not have the layout it should; the message says what was expected."""


# ----------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, crop the centre, scale to [0, 1], normalise.

    It works on decoded ``uint8`` images shaped ``(C, H, W)`` wherever they are (CPU or
    GPU), so both decoding paths give the same network input.

    Parameters
    ----------
    resize : int
        Length of the shorter side after resizing (bilinear, antialiased).
    crop : int
        Side of the central square that is kept.
    mean, std : tuple of 3 floats
        Per-channel normalisation after dividing by 255; ``mean=(0, 0, 0)`` and
        ``std=(1, 1, 1)`` keep the values in ``[0, 1]``.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.crop > self.resize:
            raise ValueError(f"the crop ({self.crop}) must not be larger than the resized side ({self.resize})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    def __call__(self, image: Tensor) -> Tensor:
        """One ``uint8`` image ``(C, H, W)`` -> normalised ``float32`` ``(3, crop, crop)``."""
        from torchvision.transforms.v2 import functional as TF

        image = _rgb(image)
        image = TF.resize(image, self.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, self.crop)
        x = image.to(torch.float32).div_(255)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return x.sub_(mean).div_(std)

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the normalisation (see :func:`denormalize`)."""
        return denormalize(x, self.mean, self.std)


def _rgb(image: Tensor) -> Tensor:
    """Grey -> 3 equal channels; RGBA / grey+alpha -> drop the alpha channel."""
    if image.dim() != 3:
        raise ValueError(f"an image must be shaped (C, H, W), got {tuple(image.shape)}")
    channels = image.shape[0]
    if channels in (1, 2):
        return image[:1].expand(3, -1, -1)
    if channels == 4:
        return image[:3]
    if channels != 3:
        raise ValueError(f"an image must have 1, 3 or 4 channels, got {channels}")
    return image


def denormalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Map normalised images back to ``[0, 1]`` for display: ``x * std + mean``, clipped.

    Parameters
    ----------
    x : Tensor, shape (3, H, W) or (N, 3, H, W)

    Returns
    -------
    Tensor of the same shape, values in ``[0, 1]``.
    """
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x * std_t + mean_t).clamp(0, 1)


# ----------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------
def decode_image(path: str | os.PathLike) -> Tensor:
    """Decode an image file with Pillow into a ``uint8`` ``(3, H, W)`` RGB tensor.

    16-bit greyscale PNGs are scaled to 8 bits (``value >> 8``, as torchvision's
    ``to_dtype(..., scale=True)`` maps uint16 to uint8); Pillow's own conversion would
    clip them at 255. Images of 32-bit integer or floating-point pixels are refused
    with their name (:func:`rgb_array`).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = rgb_array(image, path)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read the image {path}: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1)


#: Pillow's modes of 16-bit greyscale pixels (PNG bit depth 16, one channel).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def rgb_array(image, name) -> np.ndarray:
    """A Pillow image as a ``uint8`` ``(H, W, 3)`` RGB array.

    Pillow converts 8-bit modes (and 16-bit colour PNGs, which it reads as 8-bit) to RGB
    correctly, but clips 16-bit greyscale values at 255; those are scaled instead. Modes
    whose range is unknown (32-bit integers ``I`` other than a PNG's, floats ``F``) are
    refused with a :class:`ValueError` that names the image ``name``.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):
        grey = np.asarray(image).astype(np.int64).clip(0, 2**16 - 1) >> 8
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode in ("I", "F") or mode.startswith("I;"):
        raise ValueError(f"cannot read the image {name}: its pixels are {mode!r} (32-bit integers "
                         "or floats) of unknown range; save it as an 8- or 16-bit PNG or a JPEG")
    return np.array(image.convert("RGB"))


def _read_bytes(path: str | os.PathLike) -> Tensor:
    """The encoded file as a 1-D ``uint8`` tensor."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def _is_jpeg(data: Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def decode_batch(encoded: Sequence[Tensor], device: str | torch.device,
                 names: Sequence[str] | None = None) -> list[Tensor]:
    """Decode encoded image files to ``uint8`` RGB tensors on ``device``.

    JPEGs are decoded together by ``torchvision.io.decode_jpeg`` on ``device`` (with
    nvJPEG on a GPU); other formats (PNG) are decoded on the CPU (:func:`rgb_array`)
    and moved there. ``names`` (the files) name a bad image in errors.
    """
    from PIL import Image
    import io
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    images: list[Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if _is_jpeg(data)]
    if jpegs:
        with warnings.catch_warnings():  # torchvision 0.29 announces a move to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    for i, data in enumerate(encoded):
        if images[i] is None:
            name = names[i] if names is not None else f"image {i} of the batch"
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                array = rgb_array(image, name)
            images[i] = torch.from_numpy(array).permute(2, 0, 1).to(device)
    return images


# ----------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Image files with labels; item ``i`` is ``(image, label)``.

    Parameters
    ----------
    files : sequence of paths
    labels : sequence of int, optional
        One class index per file; ``-1`` for every file when not given.
    classes : sequence of str, optional
        The class names (WordNet ids for ImageNet) in index order.
    preprocessing : Preprocessing
    encoded : bool
        If True, items are the undecoded file bytes (a ``uint8`` tensor) for decoding
        later, a whole batch at once on the GPU (see :class:`DeviceDecoder`); otherwise
        decoded (Pillow) and preprocessed ``float32`` tensors.
    """

    def __init__(self, files: Sequence[str | os.PathLike], labels: Sequence[int] | None = None,
                 classes: Sequence[str] | None = None, preprocessing: Preprocessing = Preprocessing(),
                 encoded: bool = False):
        self.files = [Path(f) for f in files]
        self.labels = [int(v) for v in labels] if labels is not None else [-1] * len(self.files)
        if len(self.labels) != len(self.files):
            raise ValueError(f"got {len(self.labels)} labels for {len(self.files)} files")
        self.classes = list(classes) if classes is not None else []
        self.preprocessing = preprocessing
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        if self.encoded:
            return _read_bytes(path), self.labels[index]
        return self.preprocessing(decode_image(path)), self.labels[index]

    def __repr__(self) -> str:
        return (f"ImageFiles({len(self)} files, {len(self.classes)} classes, "
                f"resize={self.preprocessing.resize}, crop={self.preprocessing.crop})")

    @property
    def names(self) -> list[str]:
        """The file names, in item order."""
        return [f.name for f in self.files]

    def subset(self, n: int) -> "ImageFiles":
        """``n`` files spread evenly over the list (all of them when there are fewer).

        File ``i * len / n`` for ``i = 0 .. n-1``: from a folder of class folders every
        class contributes about equally, where the first ``n`` files would come from the
        first few classes only.
        """
        if n < 1:
            raise ValueError(f"a subset needs at least one file, not {n}")
        if n >= len(self):
            return self._copy()
        index = [i * len(self) // n for i in range(n)]
        return self._copy(files=[self.files[i] for i in index], labels=[self.labels[i] for i in index])

    def with_encoded(self, encoded: bool = True) -> "ImageFiles":
        """The same files, with items as encoded bytes (or decoded tensors)."""
        return self._copy(encoded=encoded)

    def _copy(self, **changes) -> "ImageFiles":
        kw = dict(files=self.files, labels=self.labels, classes=self.classes,
                  preprocessing=self.preprocessing, encoded=self.encoded)
        kw.update(changes)
        return ImageFiles(**kw)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files (JPEG, PNG) in ``folder``, sorted by path."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if _is_image(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _describe(folder: Path) -> str:
    """A short account of what a folder holds, for error messages."""
    entries = sorted(folder.iterdir())
    if not entries:
        return "it is empty"
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:5])
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    return f"it holds {shown}{more}"


def class_folders(folder: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and classes of a folder with one sub-folder of images per class.

    The class index is the position of the sub-folder's name in the sorted list of
    sub-folders (as torchvision's ``ImageFolder``); images are found recursively inside
    each class folder.

    Raises
    ------
    LayoutError
        If there are no sub-folders, or one of them holds no image.
    """
    folder = Path(folder)
    classes = [p.name for p in _subfolders(folder)]
    if not classes:
        raise LayoutError(f"{folder} has no class folders (expected {folder}/<class>/<image>.JPEG); {_describe(folder)}")
    files, labels = [], []
    for index, name in enumerate(classes):
        images = find_images(folder / name, recursive=True)
        if not images:
            raise LayoutError(
                f"class folder {folder / name} holds no JPEG or PNG image (expected "
                f"{folder}/<class>/<image>.JPEG for every class folder)"
            )
        files += images
        labels += [index] * len(images)
    return files, labels, classes


# ----------------------------------------------------------------------------------
# label files
# ----------------------------------------------------------------------------------
def _read_devkit_meta(path: Path) -> dict[int, str]:
    """ILSVRC2012 id -> WordNet id of the 1000 leaf classes, from the devkit's meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(str(path), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _find_devkit_meta(label_file: Path, root: Path | None) -> Path:
    places = [label_file.parent, label_file.parent.parent]
    if root is not None:
        places += [root, root / "ILSVRC2012_devkit_t12" / "data"]
    for place in places:
        if (place / "meta.mat").is_file():
            return place / "meta.mat"
    raise LayoutError(
        f"{label_file.name} holds ILSVRC2012 ids, which need the devkit's meta.mat to become "
        f"class indices; put meta.mat (from ILSVRC2012_devkit_t12/data/) next to {label_file}"
    )


def _validation_numbers(files: Sequence[Path], lines: int, label_file: Path) -> list[int]:
    """The line of the devkit's ground truth for every file: ``k`` for
    ``ILSVRC2012_val_0000000k.JPEG``, else the file's place in the sorted list."""
    numbers = [re.search(r"(\d+)$", f.stem) for f in files]
    if all(numbers):
        numbers = [int(m.group(1)) for m in numbers]
    elif len(files) == lines:
        numbers = list(range(1, lines + 1))
    else:
        raise LayoutError(
            f"{label_file} has {lines} labels for {len(files)} images; name the images "
            "ILSVRC2012_val_<number>.JPEG or give one line per image, in sorted order"
        )
    beyond = [n for n in numbers if not 1 <= n <= lines]
    if beyond:
        raise LayoutError(f"{label_file} has {lines} lines: no label for image number {beyond[0]}")
    return numbers


def read_label_file(path: str | os.PathLike, files: Sequence[Path], root: str | os.PathLike | None = None
                    ) -> tuple[list, list[str] | None]:
    """The label of every file in ``files`` from a label file (formats: module docstring).

    Returns
    -------
    labels : list of str or int
        A WordNet id or an integer class index per file.
    classes : list of str or None
        The devkit's 1000 WordNet ids (sorted) for the devkit format, else None.

    Raises
    ------
    LayoutError
        If the file's format is not recognised or a file has no label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no label file at {path}")
    if path.suffix.lower() == ".txt":  # the devkit's ground truth: line k is image k
        try:
            ids = [int(word) for word in path.read_text().split()]
        except ValueError:
            raise LayoutError(f"{path} is not a devkit ground truth file: expected one integer per line") from None
        ids = [ids[k - 1] for k in _validation_numbers(files, len(ids), path)]
        meta = _read_devkit_meta(_find_devkit_meta(path, Path(root) if root else None))
        unknown = sorted(set(ids) - set(meta))
        if unknown:
            raise LayoutError(f"{path} holds ILSVRC2012 ids not in meta.mat, e.g. {unknown[0]}")
        return [meta[i] for i in ids], sorted(meta.values())

    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows or len(rows[0]) < 2:
        raise LayoutError(f"{path} is not a label file: expected CSV rows 'file,label'")
    kaggle = rows[0][0].strip() == "ImageId" and rows[0][1].strip() == "PredictionString"
    if kaggle or not _is_label(rows[0][1]):  # a header row
        rows = rows[1:]
    by_name = {}
    for row in rows:
        if len(row) < 2 or not row[1].strip():
            raise LayoutError(f"{path}: the row {','.join(row)!r} has no label; expected 'file,label'")
        name, label = row[0].strip(), row[1].strip()
        label = label.split()[0] if kaggle else label
        by_name[name] = by_name[Path(name).stem] = int(label) if label.lstrip("-").isdigit() else label
    labels = []
    for file in files:
        label = by_name.get(file.name, by_name.get(file.stem))
        if label is None:
            raise LayoutError(f"{path} has no label for {file.name}")
        labels.append(label)
    return labels, None


def _is_label(text: str) -> bool:
    text = text.strip().split()[0] if text.strip() else ""
    return bool(_WNID.match(text)) or text.isdigit()


def _class_indices(labels: list, classes: list[str] | None) -> tuple[list[int], list[str]]:
    """WordNet ids -> indices in the sorted ``classes`` (integer labels pass through)."""
    wnids = sorted({label for label in labels if isinstance(label, str)})
    if not wnids:
        return [int(v) for v in labels], list(classes or [])
    classes = sorted(classes) if classes else wnids
    index = {name: i for i, name in enumerate(classes)}
    missing = [w for w in wnids if w not in index]
    if missing:
        raise LayoutError(f"the labels name classes that are not in the class list, e.g. {missing[0]}")
    return [index[v] if isinstance(v, str) else int(v) for v in labels], classes


def _read_classes(classes) -> list[str] | None:
    """A class list given as a sequence, a text file with one name per line, or None."""
    if classes is None or not isinstance(classes, (str, os.PathLike)):
        return list(classes) if classes is not None else None
    return Path(classes).read_text().split()


# ----------------------------------------------------------------------------------
# the readers
# ----------------------------------------------------------------------------------
def _flat_folder(folder: Path, labels, classes, root: Path | None, preprocessing) -> ImageFiles | None:
    """A flat folder of images with their label file; None if it holds no image."""
    files = find_images(folder)
    if not files:
        return None
    if labels is None:
        places = [folder] + ([root] if root is not None else [])
        found = [p / name for name in LABEL_FILES for p in places if (p / name).is_file()]
        if not found:
            return ImageFiles(files, None, _read_classes(classes), preprocessing)
        labels = found[0]
    values, devkit_classes = read_label_file(labels, files, root)
    indices, class_list = _class_indices(values, _read_classes(classes) or devkit_classes)
    return ImageFiles(files, indices, class_list, preprocessing)


def imagenet(root: str | os.PathLike, split: str = "val", *, labels: str | os.PathLike | None = None,
             classes=None, preprocessing: Preprocessing = Preprocessing()) -> ImageFiles:
    """Read the ``split`` (``"train"`` or ``"val"``) of an ImageNet folder.

    Parameters
    ----------
    root : path
        The folder that holds ``train/`` and/or ``val/``.
    split : str
        The sub-folder to read.
    labels : path, optional
        The label file of a flat split folder (default: the first of
        :data:`LABEL_FILES` found in the split folder or in ``root``).
    classes : sequence of str or path, optional
        The class names in index order (a file: one per line); default: the class
        folders of ``root/train``, if there are any (see the module docstring).
    preprocessing : Preprocessing

    Returns
    -------
    ImageFiles

    Raises
    ------
    LayoutError
        If the folder does not have one of the two layouts (the message says which were
        expected and what was found), or a flat split has no label file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no ImageNet folder at {root}")
    folder = root / split
    if not folder.is_dir():
        raise LayoutError(
            f"expected the ImageNet split folder {folder}/ (with one folder per class such as "
            f"{folder}/n01440764/, or the images and a label file); {_describe(root)}"
        )
    if classes is None and split != "train" and (root / "train").is_dir():
        classes = [p.name for p in _subfolders(root / "train")] or None
    if _subfolders(folder):
        files, labels_, found = class_folders(folder)
        if classes is not None:
            labels_, found = _class_indices([found[i] for i in labels_], _read_classes(classes))
        return ImageFiles(files, labels_, found, preprocessing)
    dataset = _flat_folder(folder, labels, classes, root, preprocessing)
    if dataset is None:
        raise LayoutError(
            f"{folder} holds neither class folders ({folder}/n01440764/...) nor images "
            f"({folder}/ILSVRC2012_val_00000001.JPEG with a label file); {_describe(folder)}"
        )
    if dataset.labels and dataset.labels[0] == -1 and labels is None:
        raise LayoutError(
            f"{folder} holds images but no label file; expected one of {', '.join(LABEL_FILES)} "
            f"in {folder} or {root} (or pass labels=FILE)"
        )
    return dataset


def image_dataset(path: str | os.PathLike, *, split: str | None = None, labels=None, classes=None,
                  preprocessing: Preprocessing = Preprocessing()) -> ImageFiles:
    """Read any folder of images, whatever its layout.

    * an ImageNet root (it holds ``train/`` or ``val/``): :func:`imagenet` with ``split``
      (default ``"val"``, or ``"train"`` when there is no ``val/``);
    * a folder of class folders: :func:`class_folders`;
    * a flat folder of images: labelled if a label file is found (see :func:`imagenet`),
      else every label is ``-1`` (fitting patterns needs no labels).

    Raises
    ------
    LayoutError
        If the folder holds no image in any of these layouts.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no image folder at {path}")
    splits = [s for s in ("train", "val") if (path / s).is_dir()]
    if splits or split is not None:
        chosen = split or ("val" if "val" in splits else "train")
        return imagenet(path, chosen, labels=labels, classes=classes, preprocessing=preprocessing)
    if _subfolders(path) and not find_images(path):
        files, labels_, found = class_folders(path)
        return ImageFiles(files, labels_, found, preprocessing)
    dataset = _flat_folder(path, labels, classes, None, preprocessing)
    if dataset is None:
        raise LayoutError(
            f"{path} holds no JPEG or PNG images; expected images in it, one folder per class "
            f"({path}/<class>/<image>.jpg), or ImageNet's {path}/train/ and {path}/val/; {_describe(path)}"
        )
    return dataset


#: The suffixes of the tensor files :func:`tensor_dataset` reads.
TENSOR_SUFFIXES = (".pt", ".pth", ".npz")


def tensor_dataset(path: str | os.PathLike, split: str | None = None) -> TensorDataset:
    """Model inputs (and labels) from a tensor file, as a TensorDataset.

    ``.pt``/``.pth``: a tensor, an ``(inputs, labels)`` pair or a dict; ``.npz``: arrays.
    The inputs are the array ``images`` (or ``inputs``, ``x``), the labels ``labels`` (or
    ``y``; -1 where there are none); with ``split`` the arrays ``<split>_images`` and
    ``<split>_labels``. Integer inputs are divided by 255, ``(N, H, W)`` inputs get a
    channel axis.

    Raises
    ------
    ValueError
        If the file cannot be read or holds no inputs (the message names the file).
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        try:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        if isinstance(arrays, torch.Tensor):
            arrays = {"images": arrays}
        elif isinstance(arrays, (tuple, list)) and len(arrays) == 2:
            arrays = {"images": arrays[0], "labels": arrays[1]}
        elif not isinstance(arrays, dict):
            raise ValueError(f"{path} holds a {type(arrays).__name__}; expected a tensor, a pair or a dict")
    prefix = f"{split}_" if split else ""
    image_keys = [prefix + k for k in ("images", "inputs", "x")]
    key = next((k for k in image_keys if k in arrays), None)
    if key is None:
        raise ValueError(
            f"{path} has no array {' / '.join(image_keys)} (it has {', '.join(map(str, arrays)) or 'none'}); "
            "with split NAME (the command's --split NAME) the arrays NAME_images and NAME_labels are read"
        )
    images = torch.as_tensor(np.asarray(arrays[key]) if not isinstance(arrays[key], torch.Tensor) else arrays[key])
    if not images.is_floating_point():
        images = images.to(torch.float32) / 255
    if images.dim() == 3:
        images = images[:, None]
    label_key = next((prefix + k for k in ("labels", "y") if prefix + k in arrays), None)
    labels = (torch.as_tensor(np.asarray(arrays[label_key])).long() if label_key
              else torch.full((len(images),), -1, dtype=torch.long))
    return TensorDataset(images, labels)


def read_images(paths: str | os.PathLike | Iterable[str | os.PathLike],
                preprocessing: Preprocessing = Preprocessing(), device=None) -> tuple[Tensor, list[str]]:
    """Read images into one preprocessed batch.

    Parameters
    ----------
    paths : path or iterable of paths
        Image files and/or folders (every JPEG/PNG directly inside, sorted).
    preprocessing : Preprocessing
    device : torch.device or str, optional
        Where to put the batch; on a CUDA device JPEGs are also decoded there.

    Returns
    -------
    images : Tensor, shape (N, 3, crop, crop)
    names : list of str
        The file names, in batch order.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)
            if not found:
                raise LayoutError(f"{p} holds no JPEG or PNG images; {_describe(p)}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no image file or folder at {p}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        decoded = decode_batch([_read_bytes(f) for f in files], device, [str(f) for f in files])
    else:
        decoded = [decode_image(f) for f in files]
    return torch.stack([preprocessing(image) for image in decoded]), [f.name for f in files]


# ----------------------------------------------------------------------------------
# the shipped photographs, and random crops of them
# ----------------------------------------------------------------------------------
#: The photographs shipped in ``data/images/<name>.jpg``, in this order.
PHOTOGRAPHS = ("astronaut", "camera", "cat", "coffee", "rocket")


def load_photographs(folder: str | os.PathLike | None = None) -> tuple[list[Tensor], list[str]]:
    """The shipped photographs as ``uint8`` ``(3, H, W)`` tensors, in :data:`PHOTOGRAPHS` order.

    ``folder`` defaults to ``images/`` in :func:`toolkit.data.data_dir`.
    """
    from toolkit.data import data_dir

    folder = Path(folder) if folder is not None else data_dir() / "images"
    return [decode_image(folder / f"{name}.jpg") for name in PHOTOGRAPHS], list(PHOTOGRAPHS)


def photo_crops(photos: list[Tensor], n: int, size: int, seed: int, scale: tuple[float, float] = (0.08, 1.0),
                mean=None, std=None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``n`` random crops of the photographs, resized to ``size``, normalised like ImageNet.

    Crop ``i`` comes from photograph ``i % len(photos)`` (so every photograph gives as
    many); its area is a uniform fraction ``scale`` of the photograph's, its aspect ratio
    log-uniform in [3/4, 4/3], its place uniform, and it is mirrored with probability 1/2
    (torchvision's ``RandomResizedCrop`` recipe). Everything is drawn from one generator
    seeded with ``seed``; resizing (bilinear, antialiased) is done in ``dtype``. ``mean``
    and ``std`` default to :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.

    Returns
    -------
    images : Tensor (n, 3, size, size), ``dtype``
    labels : Tensor (n,), the photograph of each crop
    """
    from torchvision.transforms.v2 import functional as TF

    mean = torch.tensor(mean or IMAGENET_MEAN, dtype=dtype)[:, None, None]
    std = torch.tensor(std or IMAGENET_STD, dtype=dtype)[:, None, None]
    generator = torch.Generator().manual_seed(int(seed))
    floats = [p.to(dtype) / 255 for p in photos]
    out = torch.empty(n, 3, size, size, dtype=dtype)
    labels = torch.arange(n) % len(photos)
    for i in range(n):
        image = floats[int(labels[i])]
        h, w = image.shape[1:]
        u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
        crop = TF.resized_crop(image, top, left, ch, cw, [size, size],
                               interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if u[4] < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop.clamp(0, 1) - mean) / std
    return out, labels


# ----------------------------------------------------------------------------------
# loading: shards, workers, decoding on the device
# ----------------------------------------------------------------------------------
class ShardSampler(DistributedSampler):
    """Every sample exactly once across the ranks: rank ``r`` takes ``r, r + W, r + 2W, ...``.

    torch's :class:`DistributedSampler` makes the shards equally long by repeating
    samples (or dropping them with ``drop_last``); for statistics -- patterns, layer
    quality -- that would count some images twice. This sampler neither repeats nor
    drops nor shuffles, so the shards of all ranks together are the dataset. It is a
    ``DistributedSampler`` so that :func:`toolkit.fit_patterns` sees the data as sharded.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _collate_encoded(batch):
    """Keep the encoded files of a batch as a list (they differ in length)."""
    data, labels = zip(*batch)
    return list(data), torch.tensor(labels)


@dataclass
class Unreadable:
    """A file that could not be read, sent from a worker in place of its batch, so that
    the main process raises the reader's own error (one line naming the file) instead
    of torch re-raising it with the worker's traceback folded into the message."""

    error_type: type
    message: str

    def error(self) -> BaseException:
        return self.error_type(self.message)


class _Guarded(Dataset):
    """A dataset whose unreadable items (:class:`ValueError` or :class:`OSError` of the
    reader, which name the file) become :class:`Unreadable`; its other attributes are
    the wrapped dataset's."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (ValueError, OSError) as error:
            return Unreadable(type(error), str(error)), -1

    def __getattr__(self, name: str):
        """The wrapped dataset's attributes (``files``, ``classes``, ...)."""
        if name == "dataset":  # not set yet (while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _collate(collate):
    """``collate`` that passes the first :class:`Unreadable` of a batch on instead."""
    def guarded(batch):
        bad = next((item[0] for item in batch if isinstance(item[0], Unreadable)), None)
        return bad if bad is not None else collate(batch)
    return guarded


class ImageLoader(DataLoader):
    """A DataLoader that raises the error of an unreadable file in the main process, the
    same with and without worker processes (:func:`make_loader`)."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, Unreadable):
                raise batch.error()
            yield batch


class DeviceDecoder:
    """Wrap a DataLoader of encoded files: decode and preprocess every batch on a device.

    Iterating yields ``(images, labels)`` like a DataLoader of decoded images, with the
    images already on ``device``. ``sampler`` and ``len`` are the loader's.
    """

    def __init__(self, loader: DataLoader, preprocessing: Preprocessing, device):
        self.loader = loader
        self.preprocessing = preprocessing
        self.device = torch.device(device)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for encoded, labels in self.loader:
            images = decode_batch(encoded, self.device)
            yield torch.stack([self.preprocessing(image) for image in images]), labels


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def make_loader(dataset: Dataset, batch_size: int = 64, *, workers: int = 0, pin_memory: bool | None = None,
                shuffle: bool = False, distributed: bool | None = None, decode_device=None):
    """A DataLoader for fitting and evaluating, optionally sharded and decoding on a GPU.

    Parameters
    ----------
    dataset : Dataset
        Usually :class:`ImageFiles`; any map-style dataset works on the default path.
    batch_size : int
    workers : int
        Worker processes that read (and, on the CPU path, decode) the images.
    pin_memory : bool, optional
        Page-locked batches for fast copies to a GPU; default: when CUDA is available.
    shuffle : bool
        Shuffle every epoch (not with ``distributed``).
    distributed : bool, optional
        Give every rank its own shard (:class:`ShardSampler`). Default: when
        ``torch.distributed`` is initialised with more than one process.
    decode_device : torch.device or str, optional
        Decode JPEGs with ``torchvision.io.decode_jpeg`` and preprocess on this device
        (``"cuda"``) instead of in the workers; needs an :class:`ImageFiles` dataset.
        Default None: decode with Pillow in the workers (the CPU path).

    Returns
    -------
    ImageLoader or DeviceDecoder
        Both yield ``(images, labels)`` batches and have a ``sampler``. A file that cannot
        be read raises its reader's error, which names it, in the calling process,
        whatever the number of ``workers``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if distributed is None:
        distributed = _distributed_world() > 1
    if distributed and shuffle:
        raise ValueError("shuffle and distributed exclude each other: each rank reads a fixed shard")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if decode_device is not None:
        if not isinstance(dataset, ImageFiles):
            raise TypeError(f"decoding on a device needs an ImageFiles dataset, not {type(dataset).__name__}")
        dataset = dataset.with_encoded(True)
    sampler = ShardSampler(dataset) if distributed else None
    loader = ImageLoader(
        _Guarded(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory and decode_device is None,
        collate_fn=_collate(_collate_encoded if decode_device is not None else default_collate),
        persistent_workers=False,
    )
    if decode_device is not None:
        return DeviceDecoder(loader, dataset.preprocessing, decode_device)
    return loader
