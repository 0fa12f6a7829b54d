"""The distribution is the project: the sdist and the wheel carry the shipped files.

The shipped data (``data/``) and the course (``notebooks/``) stay in the repository's
top-level folders; the build maps them into the package (``pyproject.toml``), and
:func:`toolkit.data.shipped_dir` finds them in an installed package and in a checkout.
The tests build an sdist and, from the unpacked sdist, a wheel with setuptools' own
build hooks (no network, no pip) and compare their contents with the repository.
``.ci/wheel-smoke`` installs such a wheel into a clean environment and uses it.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from toolkit import data as toolkit_data
from toolkit.reproduce import NOTEBOOK_DIR

ROOT = Path(__file__).resolve().parent.parent


def shipped_files(folder: str) -> set[str]:
    """The files of a top-level folder, relative to it (what the distribution must carry)."""
    base = ROOT / folder
    return {p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.is_file() and ".ipynb_checkpoints" not in p.parts}


def test_a_checkout_uses_its_own_folders(monkeypatch):
    monkeypatch.delenv("TOOLKIT_DATA", raising=False)
    assert toolkit_data.shipped_dir("data") == ROOT / "data"
    assert toolkit_data.data_dir() == ROOT / "data"
    assert NOTEBOOK_DIR == ROOT / "notebooks"


def test_toolkit_data_overrides_the_shipped_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLKIT_DATA", str(tmp_path))
    assert toolkit_data.data_dir() == tmp_path


def test_an_installed_package_uses_its_shipped_copy(tmp_path, monkeypatch):
    # the layout of a wheel in site-packages: toolkit/data.py next to toolkit/_shipped/data
    package = tmp_path / "site-packages" / "toolkit"
    (package / "_shipped" / "data").mkdir(parents=True)
    (package / "data.py").write_text((ROOT / "toolkit" / "data.py").read_text())
    (tmp_path / "site-packages" / "data").mkdir()          # someone else's folder: never used
    spec = importlib.util.spec_from_file_location("installed_toolkit_data", package / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("TOOLKIT_DATA", raising=False)
    assert module.data_dir() == package.resolve() / "_shipped" / "data"
    assert module.shipped_dir("notebooks") == tmp_path.resolve() / "site-packages" / "notebooks"


def _build(hook: str, source: Path, out: Path) -> Path:
    """Run one PEP 517 hook of setuptools in ``source``; return the built file."""
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=source, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


def test_sdist_and_wheel_carry_data_and_notebooks(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.fail(f"setuptools {setuptools.__version__} cannot build wheels without the package "
                    "'wheel'; install the test extra: pip install -e '.[test]'")
    sdist = _build("build_sdist", ROOT, tmp_path)
    with tarfile.open(sdist) as archive:
        top = sdist.name[: -len(".tar.gz")]
        names = {n[len(top) + 1:] for n in archive.getnames()}
        archive.extractall(tmp_path / "unpacked", filter="data")
    for folder in ("data", "notebooks"):
        assert {f"{folder}/{f}" for f in shipped_files(folder)} <= names, folder
    assert {"docs/math.md", "docs/conf.py", "pyproject.toml", "README.md"} <= names
    assert not any(n.startswith("docs/_build") for n in names)

    wheel = _build("build_wheel", tmp_path / "unpacked" / top, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for folder in ("data", "notebooks"):
        expected = {f"toolkit/_shipped/{folder}/{f}" for f in shipped_files(folder)}
        assert expected <= names, sorted(expected - names)
    assert {"toolkit/__init__.py", "toolkit/plotting/toy.py", "toolkit/reproduce.py"} <= names
    assert not any(n.startswith(("data/", "notebooks/", "tests/")) for n in names)
