"""Bad files and unwritable outputs on the command line: one line on stderr, exit 2.

Every command that reads a file gets it truncated, as a text file that is not
safetensors, and missing (``--patterns`` of quality/explain/perturbation,
``--checkpoint`` of fit, ``--weights`` and ``--model`` files of every command,
``--data`` tensor files, image files); the message names the option and the file.
Every output (``--out``, ``--checkpoint``, ``--figure``) is checked before the work
starts: the tests give a --data that does not exist as well, so an error about the
output proves that the output was checked first.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.cli import main
from toolkit.models import SmallVGG, save_model

IMAGE = ["--resize", "8", "--crop", "8", "--mean", "0", "0", "0", "--std", "1", "1", "1"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """m.safetensors (SmallVGG on 3 x 8 x 8), d.npz, p.safetensors (its patterns),
    w.pt (its state dict), img.png, and bad files: truncated, text, missing."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = SmallVGG(in_channels=3, num_classes=3, image_size=8, width=2, hidden=8)
    save_model(model, root / "m.safetensors")
    torch.save(model.state_dict(), root / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", images=rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8))
    torch.save(torch.rand(6, 3, 8, 8), root / "d.pt")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "img.png")
    assert main(["fit", "--model", str(root / "m.safetensors"), "--data", str(root / "d.npz"),
                 "--out", str(root / "p.safetensors"), "--workers", "0", "--quiet"]) == 0
    for name in ("p.safetensors", "m.safetensors", "w.pt", "d.npz", "d.pt", "img.png"):
        data = (root / name).read_bytes()
        (root / f"truncated-{name}").write_bytes(data[: len(data) // 2])
        (root / f"text-{name}").write_text("this is not the file you are looking for\n")
    (root / "a-file").write_text("a regular file")
    return root


BAD = ["truncated", "text", "missing"]


def _bad(ws: Path, kind: str, name: str) -> Path:
    return ws / f"{kind}-{name}"


def _model(ws: Path) -> list[str]:
    return ["--model", str(ws / "m.safetensors")]


def _data(ws: Path, data: str = "d.npz") -> list[str]:
    return ["--data", str(ws / data), "--workers", "0", "--quiet"]


def _commands(ws: Path) -> dict[str, list[str]]:
    """Each command's arguments without its --patterns/--weights/--model, all good."""
    return {
        "fit": ["fit", *_data(ws), "--out", str(ws / "out" / "p.safetensors")],
        "quality": ["quality", *_data(ws)],
        "explain": ["explain", str(ws / "img.png"), "--method", "gradient", "--out", str(ws / "out" / "e"), *IMAGE],
        "perturbation": ["perturbation", *_data(ws), "--methods", "gradient", "--steps", "1", "--patch", "4",
                         "--out", str(ws / "out" / "pe")],
    }


def _one_line_error(capsys, command: str, *words: str, after_progress: bool = False) -> str:
    """The error line; with ``after_progress`` it may follow the line that announces a fit."""
    err = capsys.readouterr().err.strip()
    if after_progress and err.startswith("fitting patterns of "):
        err = err.split("\n", 1)[1]
    assert err.startswith(f"toolkit {command}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def _names(option: str, path: Path) -> tuple[str, str]:
    """Words an error about ``option`` ``path`` must contain: the option, then the file."""
    return f"error: {option}", str(path)


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("command", ["quality", "explain", "perturbation"])
def test_bad_patterns_file(ws, capsys, command, kind):
    bad = _bad(ws, kind, "p.safetensors")
    args = _commands(ws)[command]
    if command == "explain":
        args = [*args, "--method", "patternnet"]
    assert main([args[0], *_model(ws), "--patterns", str(bad), *args[1:]]) == 2
    _one_line_error(capsys, command, *_names("--patterns", bad))


def test_patterns_of_a_model_file_are_refused(ws, capsys):
    """A safetensors file that holds no patterns (a model file) names the file too."""
    assert main(["quality", *_model(ws), "--patterns", str(ws / "m.safetensors"), *_data(ws)]) == 2
    _one_line_error(capsys, "quality", *_names("--patterns", ws / "m.safetensors"))


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_bad_checkpoint_file(ws, capsys, kind):
    bad = _bad(ws, kind, "p.safetensors")
    args = _commands(ws)["fit"]
    assert main([args[0], *_model(ws), "--checkpoint", str(bad), *args[1:]]) == 2
    _one_line_error(capsys, "fit", *_names("--checkpoint", bad))


def test_checkpoint_that_is_another_file(ws, capsys):
    """A readable safetensors file that is not a checkpoint of this fit (a model file)."""
    args = _commands(ws)["fit"]
    assert main([args[0], *_model(ws), "--checkpoint", str(ws / "m.safetensors"), *args[1:]]) == 2
    _one_line_error(capsys, "fit", str(ws / "m.safetensors"), after_progress=True)


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("name", ["w.pt", "m.safetensors"])
@pytest.mark.parametrize("command", ["fit", "quality", "explain", "perturbation"])
def test_bad_weights_file(ws, capsys, command, name, kind):
    bad = _bad(ws, kind, name)
    args = _commands(ws)[command]
    patterns = ["--patterns", str(ws / "p.safetensors")] if command == "quality" else []
    assert main([args[0], *_model(ws), "--weights", str(bad), *patterns, *args[1:]]) == 2
    _one_line_error(capsys, command, *_names("--weights", bad))


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("command", ["fit", "quality", "explain", "perturbation"])
def test_bad_model_file(ws, capsys, command, kind):
    bad = _bad(ws, kind, "m.safetensors")
    args = _commands(ws)[command]
    patterns = ["--patterns", str(ws / "p.safetensors")] if command == "quality" else []
    assert main([args[0], "--model", str(bad), *patterns, *args[1:]]) == 2
    _one_line_error(capsys, command, str(bad))


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("name", ["d.npz", "d.pt"])
def test_bad_data_file(ws, capsys, name, kind):
    bad = _bad(ws, kind, name)
    assert main(["fit", *_model(ws), "--data", str(bad), "--out", str(ws / "out" / "x.safetensors"),
                 "--workers", "0", "--quiet"]) == 2
    _one_line_error(capsys, "fit", str(bad))


@pytest.mark.parametrize("kind", BAD)
def test_bad_image_file(ws, capsys, kind):
    bad = _bad(ws, kind, "img.png")
    assert main(["explain", *_model(ws), str(bad), "--method", "gradient", "--out", str(ws / "out" / "e"), *IMAGE]) == 2
    _one_line_error(capsys, "explain", str(bad))


@pytest.mark.parametrize("workers", ["0", "4"])
def test_a_corrupt_image_in_a_folder_is_one_line_whatever_the_workers(ws, tmp_path, capsys, workers):
    """The image is named in one line, also when a worker process read it (not the
    worker's traceback folded into the message)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes((ws / "img.png").read_bytes())
    (folder / "3.png").write_bytes((ws / "truncated-img.png").read_bytes())
    assert main(["fit", *_model(ws), "--data", str(folder), "--workers", workers, "--batch-size", "2",
                 "--quiet", "--out", str(tmp_path / "p.safetensors"), *IMAGE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("toolkit fit: error: ")]
    assert len(errors) == 1 and errors == err[-1:], err
    assert f"cannot read the image {folder / '3.png'}" in errors[0] and "Traceback" not in errors[0]
    assert "worker" not in errors[0] and len(errors[0]) < 300, errors[0]


# ----------------------------------------------------------------------------------
# outputs are checked before the work
# ----------------------------------------------------------------------------------
def _outputs(ws: Path, target: Path) -> list[tuple[str, list[str], str]]:
    """(command, arguments, option) with ``target`` as the output and a missing --data."""
    missing = ["--data", str(ws / "no-such-data"), "--workers", "0", "--quiet"]
    return [
        ("fit", ["fit", *_model(ws), *missing, "--out", str(target)], "--out"),
        ("fit", ["fit", *_model(ws), *missing, "--out", str(ws / "out" / "ok.safetensors"),
                 "--checkpoint", str(target)], "--checkpoint"),
        ("quality", ["quality", *_model(ws), "--patterns", str(ws / "p.safetensors"), *missing,
                     "--figure", str(target)], "--figure"),
        ("explain", ["explain", *_model(ws), str(ws / "no-such-image.png"), "--method", "gradient",
                     "--out", str(target)], "--out"),
        ("perturbation", ["perturbation", *_model(ws), *missing, "--methods", "gradient", "--out", str(target)],
         "--out"),
        ("reproduce", ["reproduce", "--notebooks", str(ws / "no-such.ipynb"), "--out", str(target)], "--out"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_output_under_a_regular_file(ws, capsys, index):
    target = ws / "a-file" / "inside"
    command, args, option = _outputs(ws, target)[index]
    assert main(args) == 2
    _one_line_error(capsys, command, f"{option} {target}", "is a file, not a folder")


@pytest.mark.parametrize("index", [0, 3])
def test_output_of_the_wrong_kind(ws, capsys, index):
    """A file where a folder is wanted (explain --out) and a folder where a file is (fit --out)."""
    target = ws / "a-file" if index == 3 else ws
    command, args, option = _outputs(ws, target)[index]
    assert main(args) == 2
    _one_line_error(capsys, command, f"{option} {target}: it is a")


@pytest.mark.parametrize("index", range(6))
def test_output_in_a_read_only_folder(ws, tmp_path, capsys, monkeypatch, index):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.name == "posix" and os.geteuid() == 0:  # root may write anywhere: deny it here
        real_access = os.access
        monkeypatch.setattr("toolkit.cli.os.access", lambda path, mode: (
            not (mode & os.W_OK and Path(path) == locked) and real_access(path, mode)))
    try:
        command, args, option = _outputs(ws, locked / "sub" / "out")[index]
        assert main(args) == 2
        _one_line_error(capsys, command, option, "not writable")
    finally:
        locked.chmod(0o755)


def test_good_files_still_work(ws, capsys, tmp_path):
    """The same commands with the good files exit 0 (the checks refuse nothing valid)."""
    args = _commands(ws)
    assert main([args["fit"][0], *_model(ws), "--weights", str(ws / "w.pt"), *args["fit"][1:3],
                 "--workers", "0", "--quiet", "--out", str(tmp_path / "new" / "p.safetensors"),
                 "--checkpoint", str(tmp_path / "c.safetensors")]) == 0
    assert main([args["explain"][0], *_model(ws), "--patterns", str(ws / "p.safetensors"),
                 *args["explain"][1:], "--method", "patternattribution"]) == 0
