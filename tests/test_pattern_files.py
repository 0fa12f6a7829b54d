"""Patterns.load on bad files: every problem is one clear error that names the file.

Truncated files, files that are not safetensors, other safetensors files, missing or
malformed metadata, missing tensors, NaN values and patterns shaped unlike the model's
layers are refused; a good file round-trips (tests/test_patterns.py checks the values).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _nets import batches, conv_net
from toolkit.patterns import PatternFileError, PatternMismatchError, Patterns, fit_patterns


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("patterns") / "p.safetensors"
    fit_patterns(conv_net(), batches(), progress=False).save(path)
    return path


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
    with safe_open(str(saved), framework="pt") as f:
        broken = f.get_tensor("fc/positive").clone()
    broken[0, 0] = float("nan")
    nan = rewrite(saved, tmp_path / "nan.safetensors", tensors={"fc/positive": broken})
    with pytest.raises(PatternFileError, match="nan.safetensors: the positive pattern of layer 'fc' holds NaN"):
        Patterns.load(nan)


def test_patterns_shaped_unlike_the_model_are_refused(saved, tmp_path):
    shapes = rewrite(saved, tmp_path / "shapes.safetensors",
                     tensors={f"fc/{k}": torch.zeros(3, 20, dtype=torch.float64)
                              for k in ("linear", "positive", "negative")})
    with pytest.raises(PatternMismatchError, match=r"shapes.safetensors: the linear pattern of layer 'fc' "
                                                   r"has shape \(3, 20\), the layer's weight \(4, 20\)"):
        Patterns.load(shapes, conv_net())
    renamed = rewrite(saved, tmp_path / "renamed.safetensors",
                      metadata={"layers": json.dumps(["conv1", "conv2", "head"]),
                                "kinds": json.dumps({n: ["linear", "positive", "negative"]
                                                     for n in ("conv1", "conv2", "head")})},
                      tensors={f"head/{k}": torch.zeros(4, 20, dtype=torch.float64)
                               for k in ("linear", "positive", "negative")})
    with pytest.raises(PatternMismatchError, match="a layer 'head' that this model does not have"):
        Patterns.load(renamed, conv_net())
