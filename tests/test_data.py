"""Tests of toolkit.data: the shipped subset, the idx reader, ground-truth images, scores."""
import gzip
import struct

import numpy as np
import pytest
import torch

from toolkit.data import (
    FASHION_MNIST_CLASSES,
    ground_truth_masks,
    load_fashion_mnist,
    make_ground_truth_images,
    mass_inside,
    precision_at_k,
    read_idx,
    signal_correlation,
)

# ---------------------------------------------------------------------------
# The shipped Fashion-MNIST subset
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split, n", [("train", 6000), ("test", 1000)])
def test_subset_shapes_dtypes_range(split, n):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (n, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    raw, raw_labels = load_fashion_mnist(split, as_tensor=False)
    assert raw.dtype == np.uint8 and raw.shape == (n, 28, 28)
    np.testing.assert_array_equal(raw / np.float32(255), images[:, 0].numpy())
    np.testing.assert_array_equal(raw_labels, labels.numpy())


def test_subset_is_class_balanced():
    _, train_labels = load_fashion_mnist("train", as_tensor=False)
    _, test_labels = load_fashion_mnist("test", as_tensor=False)
    assert len(FASHION_MNIST_CLASSES) == 10
    assert np.bincount(train_labels, minlength=10).tolist() == [600] * 10
    assert np.bincount(train_labels[:3000], minlength=10).tolist() == [300] * 10
    assert np.bincount(train_labels[3000:], minlength=10).tolist() == [300] * 10
    assert np.bincount(test_labels, minlength=10).tolist() == [100] * 10
    # shuffled, not sorted by class
    assert np.any(np.diff(train_labels[:3000].astype(int)) < 0)


def test_subset_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="build_fashion_mnist.py"):
        load_fashion_mnist("train")


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


def _idx_bytes(type_code, shape, payload):
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def test_read_idx_uint8_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(_idx_bytes(0x08, array.shape, array.tobytes()))
    back = read_idx(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, array)


def test_read_idx_big_endian_int32_plain(tmp_path):
    values = np.array([1, -2, 70000, 2**31 - 1], dtype=np.int32)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(0x0C, values.shape, values.astype(">i4").tobytes()))
    back = read_idx(path)
    assert back.dtype == np.int32 and back.dtype.isnative
    np.testing.assert_array_equal(back, values)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(0x08, (5,), b"\x00\x01"))
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(short)


# ---------------------------------------------------------------------------
# Ground-truth images
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth():
    return make_ground_truth_images(10000, size=32, seed=1)


def test_ground_truth_shapes_and_decomposition(truth):
    n = len(truth)
    assert truth.images.shape == truth.signal.shape == truth.distractor.shape == (n, 1, 32, 32)
    assert truth.images.dtype == torch.float32
    assert truth.signal_mask.shape == (32, 32) and truth.signal_mask.dtype == torch.bool
    assert torch.equal(truth.images, truth.signal + truth.distractor)  # exactly
    assert torch.equal(truth.labels, (truth.y > 0).long())


def test_ground_truth_is_seeded():
    a = make_ground_truth_images(50, seed=7)
    b = make_ground_truth_images(50, seed=7)
    c = make_ground_truth_images(50, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.y, b.y)
    assert not torch.equal(a.images, c.images)


def test_signal_lies_in_its_mask(truth):
    mask = truth.signal_mask
    assert torch.all(truth.signal[:, 0][:, ~mask] == 0)
    # inside the mask the signal is the amplitude y, the same for every pixel
    inside = truth.signal[:, 0][:, mask]
    assert torch.equal(inside, truth.y[:, None].expand_as(inside))
    assert truth.y.abs().min() >= 0.5 and truth.y.abs().max() <= 1.0


def test_distractor_partially_overlaps_signal(truth):
    s, d = truth.signal_mask, truth.distractor_mask
    overlap = (s & d).sum().item()
    assert 0 < overlap < s.sum().item()  # partial overlap
    # the distractor shape is present (with its own amplitude) in the overlap
    d_overlap = truth.distractor[:, 0][:, s & d].mean(1)
    assert np.corrcoef(d_overlap, truth.distractor_amplitude)[0, 1] > 0.9


def test_distractor_independent_of_signal(truth):
    n = len(truth)
    r = np.corrcoef(truth.distractor_amplitude.numpy(), truth.y.numpy())[0, 1]
    assert abs(r) < 4 / np.sqrt(n)
    # also for the distractor pixels as a whole, in the signal region
    d_mean = truth.distractor[:, 0][:, truth.signal_mask].mean(1).numpy()
    assert abs(np.corrcoef(d_mean, truth.y.numpy())[0, 1]) < 4 / np.sqrt(n)
    # and the classes are balanced
    assert abs(truth.labels.float().mean().item() - 0.5) < 4 * 0.5 / np.sqrt(n)


def test_noise_has_requested_scale():
    t = make_ground_truth_images(4000, size=32, seed=0, distractor_scale=0.0, noise_scale=0.3)
    noise = t.distractor.numpy()
    assert abs(noise.std() - 0.3) < 0.01
    # smooth: neighbouring pixels are strongly correlated
    horizontal = np.corrcoef(noise[..., :-1].ravel(), noise[..., 1:].ravel())[0, 1]
    assert horizontal > 0.5


def test_masks_scale_with_size():
    for size in (28, 32, 64):
        s, d = ground_truth_masks(size)
        assert s.shape == d.shape == (size, size)
        assert (s & d).any() and (s & ~d).any() and (d & ~s).any()


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


def test_signal_correlation_matches_corrcoef():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 1, 6, 6))
    b = 0.5 * a + rng.normal(size=a.shape)
    expected = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(5)]
    np.testing.assert_allclose(signal_correlation(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(signal_correlation(torch.tensor(a), torch.tensor(b)), expected)
    np.testing.assert_allclose(signal_correlation(a, -3 * a + 1), -1.0)


def test_signal_correlation_constant_images_are_zero():
    a = np.stack([np.full((4, 4), 0.1), np.arange(16.0).reshape(4, 4)])
    b = np.stack([np.arange(16.0).reshape(4, 4), np.zeros((4, 4))])
    r = signal_correlation(a, b)
    assert np.all(np.isfinite(r))
    np.testing.assert_array_equal(r, [0.0, 0.0])


def test_signal_correlation_of_true_signal(truth):
    r = signal_correlation(truth.signal[:100], truth.signal[:100])
    np.testing.assert_allclose(r, 1.0)
    # the raw image carries the distractor too, so it correlates less
    assert signal_correlation(truth.images[:100], truth.signal[:100]).mean() < 0.9


def test_mass_inside_hand_computed():
    mask = np.zeros((3, 3), bool)
    mask[0, :] = True
    r = np.array(
        [
            [[1, -1, 2], [0, 0, 4], [0, 0, 0]],  # inside 4 of 8
            [[0, 0, 0], [0, 0, 0], [0, 0, -2]],  # inside 0 of 2
            [[0, 0, 0], [0, 0, 0], [0, 0, 0]],  # no mass: defined as 0
        ],
        dtype=float,
    )
    np.testing.assert_allclose(mass_inside(r, mask), [0.5, 0.0, 0.0])
    # (N, C, H, W): absolute values summed over channels
    two_channels = np.stack([r, -r], axis=1)
    np.testing.assert_allclose(mass_inside(torch.tensor(two_channels), torch.tensor(mask)), [0.5, 0, 0])
    # per-image masks
    masks = np.stack([mask, ~mask, mask])
    np.testing.assert_allclose(mass_inside(r, masks), [0.5, 1.0, 0.0])


def test_precision_at_k_hand_computed():
    mask = np.zeros((2, 3), bool)
    mask[0, 0] = mask[1, 2] = True
    r = np.array(
        [
            [[9, 1, 2], [3, 4, -8]],  # top-2: 9 (in), -8 (in)
            [[9, 1, 2], [3, 7, 0]],  # top-2: 9 (in), 7 (out)
            [[5, 5, 5], [5, 5, 5]],  # constant: defined as 0
        ],
        dtype=float,
    )
    np.testing.assert_allclose(precision_at_k(r, mask, 2), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(precision_at_k(r, mask, 1), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(precision_at_k(r[:, None], mask, 6), [1 / 3, 1 / 3, 0.0])
    # ties go to the earlier pixel in row-major order: 3 (out) before 3 (in)
    tie = np.array([[[0, 3, 0], [0, 0, 3]]], dtype=float)
    np.testing.assert_allclose(precision_at_k(tie, mask, 1), [0.0])
    with pytest.raises(ValueError, match="k must"):
        precision_at_k(r, mask, 7)


def test_scores_of_the_truth_itself(truth):
    mask = truth.signal_mask
    k = int(mask.sum())
    np.testing.assert_allclose(mass_inside(truth.signal[:50], mask), 1.0)
    np.testing.assert_allclose(precision_at_k(truth.signal[:50], mask, k), 1.0)
    # the image itself spreads relevance over distractor and noise
    assert mass_inside(truth.images[:50], mask).mean() < 0.6
