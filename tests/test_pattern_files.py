"""Patterns.load on bad files: every problem is one clear error that names the file.

Truncated files, files that are not safetensors, other safetensors files, missing or
malformed metadata, another format version, missing or extra tensors, tensors of the
wrong dtype or shape, NaN values and negative counts -- in the patterns and in the
statistics alike -- and patterns shaped unlike the model's layers are refused, naming
the file and the tensor; a good file round-trips (tests/test_patterns.py checks the
values). Patterns.save into a folder it cannot write names the file it was asked to
write, not safetensors' temporary file.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _nets import batches, conv_net
from toolkit.patterns import PatternFileError, PatternMismatchError, Patterns, fit_patterns


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A file with the patterns and their statistics."""
    path = tmp_path_factory.mktemp("patterns") / "p.safetensors"
    fit_patterns(conv_net(), batches(), progress=False, keep_statistics=True).save(path, statistics=True)
    return path


def tensor(path, key):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).clone()


def rewrite(source, target, tensors=None, metadata=None):
    """Write ``source``'s tensors and metadata to ``target``, changed as given."""
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        stored = {k: f.get_tensor(k) for k in f.keys()}
    stored.update(tensors or {})
    stored = {k: v for k, v in stored.items() if v is not None}
    meta.update(metadata or {})
    save_file(stored, str(target), metadata={k: v for k, v in meta.items() if v is not None})
    return target


def test_truncated_and_foreign_files_name_the_file(saved, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved.read_bytes()[:200])
    with pytest.raises(PatternFileError, match="truncated.safetensors cannot be read"):
        Patterns.load(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(PatternFileError, match="notes.safetensors cannot be read"):
        Patterns.load(text)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(PatternFileError, match="weights.safetensors is not a patterns file"):
        Patterns.load(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Patterns.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("metadata, message", [
    ({"layers": None}, "missing or malformed metadata"),
    ({"layers": "[conv1"}, "missing or malformed metadata"),
    ({"kinds": "{"}, "missing or malformed metadata"),
    ({"mean_y": "median"}, "malformed metadata"),
    ({"fingerprint": None}, "missing or malformed metadata"),
])
def test_forged_metadata_is_refused(saved, tmp_path, metadata, message):
    forged = rewrite(saved, tmp_path / "forged.safetensors", metadata=metadata)
    with pytest.raises(PatternFileError, match=f"forged.safetensors.*{message}|{message}"):
        Patterns.load(forged)


def test_missing_tensors_and_nan_values_are_refused(saved, tmp_path):
    missing = rewrite(saved, tmp_path / "missing_tensor.safetensors", tensors={"conv2/negative": None})
    with pytest.raises(PatternFileError, match="missing_tensor.safetensors lacks the tensor 'conv2/negative'"):
        Patterns.load(missing)
    broken = tensor(saved, "fc/positive")
    broken[0, 0] = float("nan")
    nan = rewrite(saved, tmp_path / "nan.safetensors", tensors={"fc/positive": broken})
    with pytest.raises(PatternFileError, match="nan.safetensors: the tensor 'fc/positive' holds NaN"):
        Patterns.load(nan)


@pytest.mark.parametrize("key", ["conv1/stats/x.y_neg", "conv2/stats/shift_x", "fc/stats/sum_y",
                                 "fc/stats/n", "conv1/n_pos"])
def test_a_nan_anywhere_is_refused_naming_the_tensor(saved, tmp_path, key):
    """The statistics too: a NaN there would make the patterns recomputed from them (the
    other mean_y convention) NaN, and every explanation with them."""
    broken = tensor(saved, key)
    broken.view(-1)[0] = float("nan")
    path = rewrite(saved, tmp_path / "nan.safetensors", tensors={key: broken})
    with pytest.raises(PatternFileError, match=f"nan.safetensors: the tensor '{key}' holds NaN or Inf"):
        Patterns.load(path)


@pytest.mark.parametrize("key, value, message", [
    ("conv1/stats/x.active", torch.zeros(6, 3, 3, 3, dtype=torch.float32), "is float32, not float64"),
    ("conv1/stats/x.active", torch.zeros(6, 3, 3, dtype=torch.float64), r"has shape \(6, 3, 3\), expected \(6, 3, 3, 3\)"),
    ("fc/stats/shift_y", torch.zeros(5, dtype=torch.float64), r"has shape \(5,\), expected \(4,\)"),
    ("fc/stats/total.active", -torch.ones(4, dtype=torch.float64), "holds negative values"),
    ("fc/positive", torch.zeros(4, 20, dtype=torch.int64), "is int64, not float32 or float64"),
    ("fc/negative", torch.zeros(4, 21, dtype=torch.float64), r"has shape \(4, 21\), expected \(4, 20\)"),
    ("fc/n_pos", torch.full((4,), 1e9, dtype=torch.float64), "counts more active samples"),
    ("fc/stats/x.extra", torch.zeros(1, dtype=torch.float64), "is not a statistic"),
    ("head/linear", torch.zeros(1, dtype=torch.float64), "holds tensors of no layer"),
])
def test_tensors_of_the_wrong_dtype_shape_or_value_are_refused(saved, tmp_path, key, value, message):
    path = rewrite(saved, tmp_path / "forged.safetensors", tensors={key: value})
    with pytest.raises(PatternFileError, match=f"forged.safetensors.*{message}"):
        Patterns.load(path)


def test_another_format_version_is_refused(saved, tmp_path):
    for version in ("4", None):
        path = rewrite(saved, tmp_path / "version.safetensors", metadata={"version": version})
        with pytest.raises(PatternFileError, match="version.safetensors has the format version .*reads versions 1, 2, 3"):
            Patterns.load(path)


def test_saving_into_a_folder_that_cannot_be_written_names_the_file(saved, tmp_path):
    patterns = Patterns.load(saved)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    target = a_file / "p.safetensors"
    with pytest.raises(NotADirectoryError) as caught:
        patterns.save(target)
    message = str(caught.value)
    assert str(target) in message and "cannot write the patterns file" in message and ".tmp" not in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no-folder" / "p.safetensors")):
        patterns.save(tmp_path / "no-folder" / "p.safetensors")
    if os.name == "posix" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission case needs another user")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as caught:
            patterns.save(locked / "p.safetensors")
        assert str(locked / "p.safetensors") in str(caught.value) and ".tmp" not in str(caught.value)
    finally:
        locked.chmod(0o755)


def test_patterns_shaped_unlike_the_model_are_refused(tmp_path):
    saved = tmp_path / "p.safetensors"
    fit_patterns(conv_net(), batches(), progress=False).save(saved)  # the patterns alone
    kinds = ("linear", "positive", "negative")
    shapes = rewrite(saved, tmp_path / "shapes.safetensors",
                     tensors={**{f"fc/{k}": torch.zeros(3, 20, dtype=torch.float64) for k in kinds},
                              "fc/n_pos": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(PatternMismatchError, match=r"shapes.safetensors: the linear pattern of layer 'fc' "
                                                   r"has shape \(3, 20\), the layer's weight \(4, 20\)"):
        Patterns.load(shapes, conv_net())
    renamed = rewrite(saved, tmp_path / "renamed.safetensors",
                      metadata={"layers": json.dumps(["conv1", "conv2", "head"]),
                                "kinds": json.dumps({n: list(kinds) for n in ("conv1", "conv2", "head")})},
                      tensors={**{f"head/{k}": tensor(saved, f"fc/{k}") for k in kinds},
                               **{f"fc/{k}": None for k in (*kinds, "n_pos")}})
    with pytest.raises(PatternMismatchError, match="a layer 'head' that this model does not have"):
        Patterns.load(renamed, conv_net())
