"""Reading ImageNet-style folders and image files, on tiny trees of generated JPEGs."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data import data_dir
from toolkit.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOGRAPHS,
    ImageFiles,
    LayoutError,
    Preprocessing,
    ShardSampler,
    decode_batch,
    decode_image,
    denormalize,
    image_dataset,
    imagenet,
    load_photographs,
    make_loader,
    photo_crops,
    read_images,
    rgb_array,
)

CLASSES = ["n01440764", "n01443537", "n01484850"]
SMALL = Preprocessing(resize=36, crop=32)


def _jpeg(path: Path, seed: int, size=(40, 52)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _class_tree(root: Path, per_class: int = 2) -> None:
    for split in ("train", "val"):
        for c, wnid in enumerate(CLASSES):
            for i in range(per_class):
                _jpeg(root / split / wnid / f"{wnid}_{split}_{i}.JPEG", seed=100 * c + i)


def _flat_val(root: Path) -> list[str]:
    """Six flat validation images; their classes in file order."""
    truth = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]
    for i in range(len(truth)):
        _jpeg(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", seed=i)
    return truth


# ----------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------
def test_preprocessing_resizes_crops_and_normalises():
    grey = torch.full((3, 300, 451), 128, dtype=torch.uint8)
    x = Preprocessing()(grey)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 100, 100], expected)
    torch.testing.assert_close(denormalize(x), torch.full_like(x, 128 / 255))


def test_preprocessing_keeps_the_centre():
    image = torch.zeros((3, 100, 200), dtype=torch.uint8)
    image[:, :, 50:150] = 255  # a bright centre band as wide as the crop
    x = Preprocessing(resize=100, crop=100, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert x.min() > 0.99


def test_grey_png_and_rgba_images_become_three_channels(tmp_path):
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((40, 40, 4), 90, np.uint8)).save(tmp_path / "rgba.png")
    images, names = read_images(tmp_path, SMALL)
    assert images.shape == (2, 3, 32, 32) and names == ["grey.png", "rgba.png"]


def _png(path: Path, array: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written byte by byte (PNG specification: IHDR, one zlib IDAT of
    filter-0 rows of big-endian samples, IEND), independent of Pillow's writer."""
    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    """Greyscale: Pillow alone would clip every value above 255 to white; each 16-bit
    value v must read as v >> 8 (the top byte), on every path that decodes a PNG."""
    grey = np.arange(0, 65536, 65536 // 120, dtype=np.uint16)[:120].reshape(10, 12)
    grey[0, 0], grey[-1, -1] = 0, 65535
    expected = torch.from_numpy((grey >> 8).astype(np.uint8)).expand(3, -1, -1)
    path = _png(tmp_path / "grey16.png", grey, color_type=0)
    assert torch.equal(decode_image(path), expected)
    from toolkit.imagenet import _read_bytes

    assert torch.equal(decode_batch([_read_bytes(path)], "cpu", [str(path)])[0], expected)
    images, _ = read_images(path, Preprocessing(resize=10, crop=10, mean=(0, 0, 0), std=(1, 1, 1)))
    assert 0.3 < float(images.mean()) < 0.7  # a ramp from black to white, not 99% white
    rgb = np.stack([grey, grey // 2, grey // 3], axis=-1)  # colour: Pillow reads it as 8 bits itself
    decoded = decode_image(_png(tmp_path / "rgb16.png", rgb, color_type=2))
    assert (decoded.permute(1, 2, 0).numpy().astype(int) - (rgb >> 8)).__abs__().max() <= 1


def test_images_of_unknown_range_are_refused_with_their_name():
    image = Image.fromarray(np.full((4, 4), 70000, np.int32))  # mode "I": 32-bit integers
    with pytest.raises(ValueError, match="scan.tif.*32-bit"):
        rgb_array(image, "scan.tif")
    with pytest.raises(ValueError, match="scan.tif"):
        rgb_array(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "scan.tif")


def test_a_corrupt_image_is_refused_with_its_name_whatever_the_workers(tmp_path):
    """The loader raises the reader's own error in this process: with worker processes
    too, not a worker's traceback folded into the message."""
    for i in range(4):
        _jpeg(tmp_path / "images" / f"{i}.jpg", seed=i)
    (tmp_path / "images" / "2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    dataset = image_dataset(tmp_path / "images", preprocessing=SMALL)
    for workers in (0, 2):
        with pytest.raises(ValueError) as caught:
            list(make_loader(dataset, batch_size=2, workers=workers, pin_memory=False))
        message = str(caught.value)
        assert message.startswith(f"cannot read the image {tmp_path / 'images' / '2.jpg'}: "), message
        assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    readable = ImageFiles([tmp_path / "images" / f"{i}.jpg" for i in (0, 1)], preprocessing=SMALL)
    good = list(make_loader(readable, batch_size=2, workers=2, pin_memory=False))
    assert len(good) == 1 and good[0][0].shape == (2, 3, 32, 32)


def test_crop_larger_than_resize_is_refused():
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(resize=200, crop=224)


# ----------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------
def test_class_folders_are_indexed_in_sorted_order(tmp_path):
    _class_tree(tmp_path)
    train = imagenet(tmp_path, "train", preprocessing=SMALL)
    assert train.classes == CLASSES and len(train) == 6
    assert train.labels == [0, 0, 1, 1, 2, 2]
    assert all(f.parent.name == CLASSES[label] for f, label in zip(train.files, train.labels))
    x, y = train[3]
    assert x.shape == (3, 32, 32) and y == 1


def test_flat_val_with_kaggle_solution_csv(tmp_path):
    _class_tree(tmp_path)
    (tmp_path / "val").rename(tmp_path / "val_classes")
    truth = _flat_val(tmp_path)
    rows = ["ImageId,PredictionString"]
    rows += [f"ILSVRC2012_val_{i + 1:08d},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in enumerate(truth)]
    rows = rows[:1] + rows[:0:-1]  # the rows need not follow the files' order
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    val = imagenet(tmp_path, "val", preprocessing=SMALL)
    assert val.classes == CLASSES  # taken from train/
    assert val.labels == [CLASSES.index(w) for w in truth]


def test_flat_val_with_file_label_csv_of_indices(tmp_path):
    _flat_val(tmp_path)
    (tmp_path / "val" / "labels.csv").write_text(
        "file,label\n" + "".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG,{i % 3}\n" for i in range(6)))
    val = imagenet(tmp_path, "val", preprocessing=SMALL)
    assert val.labels == [0, 1, 2, 0, 1, 2]


def test_flat_val_with_devkit_ground_truth(tmp_path):
    from scipy.io import savemat

    truth = _flat_val(tmp_path)
    # the devkit numbers classes in its own order, not the sorted one; a non-leaf synset too
    ilsvrc_ids = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
              ("num_children", "O"), ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = np.zeros((4, 1), dtype=fields)
    for row, (wnid, i) in enumerate([*ilsvrc_ids.items(), ("n00000001", 4)]):
        synsets[row, 0] = (i, wnid, "words", "gloss", 0 if i < 4 else 3, np.zeros(0), 0, 10)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ilsvrc_ids[w]}\n" for w in truth))
    val = imagenet(tmp_path, "val", labels=devkit / "ILSVRC2012_validation_ground_truth.txt", preprocessing=SMALL)
    assert val.classes == CLASSES
    assert val.labels == [CLASSES.index(w) for w in truth]
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()  # a subset: labels follow the numbers
    val = imagenet(tmp_path, "val", labels=devkit / "ILSVRC2012_validation_ground_truth.txt", preprocessing=SMALL)
    assert val.labels == [CLASSES.index(w) for w in truth[1:]]


def test_wrong_layouts_say_what_was_expected(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(LayoutError, match=r"val/.*n01440764"):
        imagenet(tmp_path, "val")
    _flat_val(tmp_path)
    with pytest.raises(LayoutError, match="LOC_val_solution.csv"):
        imagenet(tmp_path, "val")
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(LayoutError, match="holds no JPEG or PNG"):
        imagenet(tmp_path, "train")
    with pytest.raises(LayoutError, match="holds no JPEG or PNG images"):
        image_dataset(tmp_path / "photos")


def test_image_dataset_reads_any_folder(tmp_path):
    _class_tree(tmp_path / "inet")
    assert image_dataset(tmp_path / "inet", preprocessing=SMALL).names[0].endswith("_val_0.JPEG")
    assert image_dataset(tmp_path / "inet", split="train", preprocessing=SMALL).classes == CLASSES
    assert image_dataset(tmp_path / "inet" / "train", preprocessing=SMALL).labels == [0, 0, 1, 1, 2, 2]
    flat = image_dataset(tmp_path / "inet" / "val" / CLASSES[0], preprocessing=SMALL)
    assert len(flat) == 2 and flat.labels == [-1, -1]


def test_subsets_spread_over_all_classes(tmp_path):
    _class_tree(tmp_path, per_class=4)
    train = imagenet(tmp_path, "train", preprocessing=SMALL)
    assert train.subset(3).labels == [0, 1, 2]
    assert train.subset(6).labels == [0, 0, 1, 1, 2, 2]
    assert len(train.subset(100)) == 12


def test_read_images_reads_the_shipped_photographs():
    folder = data_dir() / "images"
    images, names = read_images(folder)
    assert images.shape == (len(names), 3, 224, 224) and len(names) >= 4
    assert torch.isfinite(images).all()
    sources = (folder / "SOURCES.md").read_text()
    for name in names:
        assert name in sources, f"{name} has no entry (source, licence) in data/images/SOURCES.md"
        assert (folder / name).stat().st_size < 100_000


# ----------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------
def test_shards_cover_every_image_exactly_once():
    dataset = torch.utils.data.TensorDataset(torch.arange(7.0))
    shards = [list(ShardSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(ShardSampler(dataset, num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


def test_loader_batches_and_device_decoding_agree(tmp_path):
    _class_tree(tmp_path)
    dataset = imagenet(tmp_path, "train", preprocessing=SMALL)
    batches = list(make_loader(dataset, batch_size=4, pin_memory=False))
    assert [x.shape[0] for x, _ in batches] == [4, 2]
    decoded = make_loader(dataset, batch_size=4, pin_memory=False, decode_device="cpu")
    assert len(decoded) == 2 and decoded.sampler is not None
    for (x, y), (x_dev, y_dev) in zip(batches, decoded):
        torch.testing.assert_close(x_dev, x, atol=0.05, rtol=0)  # two JPEG decoders may differ by a grey level
        assert torch.equal(y, y_dev)


def test_device_decoding_needs_image_files():
    with pytest.raises(TypeError, match="ImageFiles"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(2)), decode_device="cpu")


def test_image_files_checks_labels(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        ImageFiles([tmp_path / "a.jpg"], labels=[0, 1])


# ----------------------------------------------------------------------------------
# the shipped photographs
# ----------------------------------------------------------------------------------
def test_photo_crops_are_reproducible():
    photos, names = load_photographs()
    assert names == list(PHOTOGRAPHS) and all(p.dtype == torch.uint8 for p in photos)
    a, labels = photo_crops(photos, 12, 32, seed=5)
    b, _ = photo_crops(photos, 12, 32, seed=5)
    c, _ = photo_crops(photos, 12, 32, seed=6)
    assert a.shape == (12, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert labels.tolist() == [i % 5 for i in range(12)]
