"""The ``toolkit`` command end to end on a tiny model and tiny generated images:
fit -> quality -> explain -> perturbation, errors as one line, torchrun, and the package
without a Jupyter stack."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

matplotlib.use("Agg")

from toolkit.cli import main  # noqa: E402
from toolkit.models import SmallVGG, save_model  # noqa: E402
from toolkit.patterns import Patterns, fit_patterns  # noqa: E402

SIZE = ["--resize", "18", "--crop", "16"]
CLASSES = ["n01440764", "n01443537", "n01484850"]
PNG = b"\x89PNG\r\n\x1a\n"


def _images(folder: Path, seed: int, n: int) -> None:
    """Smooth random colour images, 20 x 24 pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((24, 20), Image.BILINEAR).save(folder / f"img{seed}_{i}.JPEG")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """tiny.safetensors (a SmallVGG for 3 x 16 x 16 inputs) and imagenet/{train,val}/<wnid>/."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_model(SmallVGG(in_channels=3, num_classes=3, image_size=16, width=4, hidden=16),
               root / "tiny.safetensors")
    for c, wnid in enumerate(CLASSES):
        _images(root / "imagenet" / "train" / wnid, seed=c, n=5)
        _images(root / "imagenet" / "val" / wnid, seed=10 + c, n=3)
    return root


def _common(ws: Path, data: bool = True) -> list[str]:
    return ["--model", str(ws / "tiny.safetensors"), *SIZE] + (["--workers", "0"] if data else [])


def _fit_args(ws: Path, out: Path) -> list[str]:
    return ["fit", *_common(ws), "--data", str(ws / "imagenet"), "--out", str(out), "--batch-size", "4",
            "--dtype", "float64", "--quiet"]


@pytest.fixture(scope="module")
def fitted(workspace) -> Path:
    out = workspace / "tiny.patterns.safetensors"
    assert main(_fit_args(workspace, out)) == 0
    return out


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"toolkit {command}: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------
def test_fit_writes_patterns_of_the_model(workspace, fitted, capsys):
    from toolkit.models import load_saved_model

    model, _ = load_saved_model(workspace / "tiny.safetensors")
    patterns = Patterns.load(fitted, model)  # checks the fingerprint
    assert patterns.names == ["features.0", "features.2", "features.5", "features.7",
                              "classifier.1", "classifier.3"]
    assert patterns["classifier.3"].n == 15  # the 15 training images
    assert patterns.statistics == {} and patterns.dtype == torch.float64  # the patterns alone, --dtype


def test_fit_on_a_tensor_file_equals_fit_patterns(tmp_path):
    torch.manual_seed(1)
    model = SmallVGG(in_channels=1, num_classes=4, image_size=8, width=2, hidden=8)
    save_model(model, tmp_path / "m.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.arange(10) % 4)
    out = tmp_path / "p.safetensors"
    assert main(["fit", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "d.npz"),
                 "--split", "train", "--out", str(out), "--batch-size", "3", "--workers", "0", "--quiet"]) == 0
    x = torch.from_numpy(images).float()[:, None] / 255
    expected = fit_patterns(model, [x[i:i + 3] for i in range(0, 10, 3)], progress=False)
    saved = Patterns.load(out, model)
    for name in expected.names:
        torch.testing.assert_close(saved[name].positive, expected[name].positive, rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore:layers .* have no more samples:RuntimeWarning")
def test_quality_prints_the_table_and_draws_the_figure(workspace, fitted, tmp_path, capsys):
    figure = tmp_path / "quality.png"
    assert main(["quality", *_common(workspace), "--patterns", str(fitted), "--data", str(workspace / "imagenet"),
                 "--figure", str(figure), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "two_component" in out
    assert figure.read_bytes()[:8] == PNG


def test_explain_writes_one_figure_per_image(workspace, fitted, tmp_path, capsys):
    out = tmp_path / "explanations"
    images = workspace / "imagenet" / "val" / CLASSES[0]
    assert main(["explain", *_common(workspace, data=False), "--patterns", str(fitted), "--method", "gradient",
                 "--method", "patternnet,patternattribution", "--method", "lrpz", "--kind", "linear", str(images), "--out", str(out)]) == 0
    figures = sorted(out.glob("*.png"))
    assert [f.stem for f in figures] == sorted(p.stem for p in images.iterdir())
    assert all(f.read_bytes()[:8] == PNG for f in figures)
    assert capsys.readouterr().out.count("-> ") == 3


@pytest.mark.parametrize("name", ["mobilenet_v2"])
def test_a_torchvision_family_beyond_vgg_is_fitted_and_explained(workspace, tmp_path, name, capsys):
    """The CLI takes the new families by name (random weights, 32 x 32 crops)."""
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(name, weights=None).state_dict(), tmp_path / "w.pt")
    model = ["--model", name, "--weights", str(tmp_path / "w.pt"), "--resize", "36", "--crop", "32"]
    out = tmp_path / f"{name}.patterns.safetensors"
    assert main(["fit", *model, "--workers", "0", "--data", str(workspace / "imagenet"), "--max-images", "6", "--batch-size", "3",
                 "--out", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out   # hundreds of classes never predicted: listed in short
    assert "in all)]" in summary and max(len(line) for line in summary.splitlines()) < 200
    images = workspace / "imagenet" / "val" / CLASSES[0]
    assert main(["explain", *model, "--patterns", str(out), "--method", "patternattribution", "--kind",
                 "linear", str(images), "--out", str(tmp_path / "figures")]) == 0
    assert len(list((tmp_path / "figures").glob("*.png"))) == len(list(images.iterdir()))


def test_perturbation_prints_aopc_and_draws_curves(workspace, fitted, tmp_path, capsys):
    out = tmp_path / "perturbation"
    assert main(["perturbation", *_common(workspace), "--patterns", str(fitted), "--data",
                 str(workspace / "imagenet"), "--methods", "gradient", "patternattribution", "random",
                 "--patch", "4", "--steps", "5", "--random-repeats", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "AOPC" in printed and "patternattribution" in printed
    assert (out / "perturbation.png").read_bytes()[:8] == PNG
    table = (out / "aopc.csv").read_text().splitlines()
    assert table[0] == "method,aopc,images" and [row.split(",")[0] for row in table[1:]] == [
        "gradient", "patternattribution", "random"]
    assert all(row.endswith(",9") for row in table[1:])  # the 9 validation images


# ----------------------------------------------------------------------------------
# several processes
# ----------------------------------------------------------------------------------
def test_two_process_torchrun_fit_equals_one_process(workspace, fitted, tmp_path):
    out = tmp_path / "two.safetensors"
    checkpoint = tmp_path / "ck.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOOLKIT_TRACEBACK": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "toolkit.cli", *_fit_args(workspace, out), "--device", "cpu",
               "--checkpoint", str(checkpoint), "--statistics"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 processes" in done.stderr
    assert (tmp_path / "ck.rank0.safetensors").exists() and (tmp_path / "ck.rank1.safetensors").exists()

    from safetensors.torch import load_file

    with_statistics = tmp_path / "one.safetensors"
    assert main([*_fit_args(workspace, with_statistics), "--statistics"]) == 0
    one, two = load_file(str(with_statistics)), load_file(str(out))
    assert one.keys() == two.keys() and any("/stats/" in key for key in one)
    assert load_file(str(fitted)).keys() == {key for key in one if "/stats/" not in key}
    for key in one:
        if "/stats/" not in key:  # the patterns
            torch.testing.assert_close(two[key], one[key], rtol=1e-10, atol=1e-10, msg=key)
    # the sums are stored relative to the first batch's means, which differ with the
    # sharding: compare the plain sums they stand for
    one, two = Patterns.load(with_statistics), Patterns.load(out)
    for name in one.names:
        plain_one, plain_two = one.statistics[name].unshifted(), two.statistics[name].unshifted()
        for key, t in plain_one.items():
            torch.testing.assert_close(plain_two[key], t, rtol=1e-10, atol=1e-8, msg=f"{name}/{key}")


# ----------------------------------------------------------------------------------
# errors a user can fix: one line, exit status 2
# ----------------------------------------------------------------------------------
def test_missing_pretrained_weights_say_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert main(["fit", "--model", "vgg16", "--offline", "--data", str(tmp_path), "--out", "x"]) == 2
    err = _one_line_error(capsys, "fit")
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in err and "--weights FILE" in err


def test_wrong_folder_layout_says_what_was_expected(workspace, tmp_path, capsys):
    (tmp_path / "data" / "notes").mkdir(parents=True)
    assert main(["fit", *_common(workspace), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "p")]) == 2
    assert "expected" in _one_line_error(capsys, "fit")
    assert main(["fit", *_common(workspace), "--data", str(tmp_path / "nothing"), "--out", "p"]) == 2
    assert "no such file or folder" in _one_line_error(capsys, "fit")


def test_pattern_methods_need_patterns(workspace, capsys):
    image = next((workspace / "imagenet" / "val" / CLASSES[0]).iterdir())
    assert main(["explain", *_common(workspace, data=False), "--method", "patternnet", str(image), "--out", "x"]) == 2
    assert "--patterns" in _one_line_error(capsys, "explain")
    assert main(["explain", *_common(workspace, data=False), "--method", "saliency", str(image), "--out", "x"]) == 2
    assert "choose from" in _one_line_error(capsys, "explain")


def test_patterns_of_another_model_are_refused(workspace, fitted, tmp_path, capsys):
    save_model(SmallVGG(in_channels=3, num_classes=3, image_size=16, width=4, hidden=16), tmp_path / "other.safetensors")
    image = next((workspace / "imagenet" / "val" / CLASSES[0]).iterdir())
    assert main(["explain", "--model", str(tmp_path / "other.safetensors"), *SIZE, "--patterns", str(fitted),
                 str(image), "--out", str(tmp_path)]) == 2
    assert "another model" in _one_line_error(capsys, "explain")


def test_bad_arguments_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--model", "vgg16"])
    assert caught.value.code == 2
    assert "the following arguments are required: --data, --out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# help and the console script
# ----------------------------------------------------------------------------------
def test_help_texts(capsys):
    for command, words in [("fit", ["--checkpoint", "torchrun", "--weights"]),
                           ("explain", ["patternattribution", "--kind"]),
                           ("quality", ["--figure"]), ("perturbation", ["--patch", "AOPC"])]:
        with pytest.raises(SystemExit) as caught:
            main([command, "--help"])
        assert caught.value.code == 0
        text = capsys.readouterr().out
        assert all(word in text for word in words), (command, text)


def test_console_script_help():
    script = shutil.which("toolkit", path=str(Path(sys.executable).parent))
    assert script is not None, "the console script 'toolkit' is not installed (pip install -e .)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("fit", "quality", "explain", "perturbation", "reproduce"):
        assert command in done.stdout


# ----------------------------------------------------------------------------------
# the package without Jupyter
# ----------------------------------------------------------------------------------
BLOCKED_IMPORTS = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {"ipywidgets", "nbclient", "nbformat", "nbconvert", "IPython", "ipykernel", "notebook"}

    class NoJupyter(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in BLOCKED or top.startswith("jupyter"):
                raise ImportError(f"{name} is blocked: this machine has no Jupyter stack")
            return None

    sys.meta_path.insert(0, NoJupyter())
    import toolkit

    skipped = {"toolkit.widgets", "toolkit.reproduce"}
    names = sorted(m.name for m in pkgutil.walk_packages(toolkit.__path__, "toolkit.") if m.name not in skipped)
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            failed.append(f"{name}: {type(error).__name__}: {error}")
    from toolkit.cli import build_parser
    build_parser()
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED or m.startswith("jupyter"))
    print("imported", len(names), "modules")
    print("FAILED", failed) if failed else None
    print("LEAKED", leaked) if leaked else None
""")


def test_every_module_imports_without_jupyter():
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FAILED" not in done.stdout and "LEAKED" not in done.stdout, done.stdout
    assert int(done.stdout.split()[1]) >= 10
