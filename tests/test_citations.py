"""Every file the project cites is in the repository, and nothing outside it is cited.

Scans the package, the tests, the scripts and benchmarks, the documentation, the README
and the notebooks' cells (their sources, not their outputs) for

* repository paths: ``docs/math.md``, ``data/images/SOURCES.md``, ``scripts/x.py``, ...
  (a path that starts with a top-level folder of the repository; ``*`` globs must match);
* bare Markdown file names in prose such as ``math.md``, which must name a file next to
  the citing file or at the repository root (``README.md``);
* paths outside the project (the parent folder's shared inputs, absolute paths of this
  machine): never allowed.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("docs", "data", "scripts", "notebooks", "toolkit", "tests", "benchmarks", ".ci")
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*-]*)" % "|".join(re.escape(t) for t in TOP_LEVEL))
BARE_MARKDOWN = re.compile(r"(?<![\w./'\"-])([\w-]+\.md)\b")   # not a quoted string: code, not prose
SHARED = "shar" + "ed"  # spelled in pieces, so that this file itself cites nothing outside
OUTSIDE = re.compile(rf"\.\./{SHARED}|{SHARED}/seed|{SHARED}/docs|/work/")
# what a build writes: the site, the course copied for it, the shipped files inside a wheel
BUILD_OUTPUTS = ("docs/_build", "docs/course", "toolkit/_shipped")


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "data" / "README.md"]
    for folder, pattern in [("toolkit", "**/*.py"), ("tests", "**/*.py"), ("scripts", "*.py"),
                            ("benchmarks", "*.py"), ("docs", "**/*.md"), ("docs", "**/*.py"),
                            ("docs", "**/*.rst"), ("data", "**/*.md"), ("notebooks", "*.ipynb")]:
        files += [f for f in sorted((ROOT / folder).glob(pattern)) if "_build" not in f.parts]
    return sorted(set(files) - {Path(__file__).resolve()})       # this file's examples are not citations


def text_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(cell["source"]) for cell in cells)
    return path.read_text(encoding="utf-8")


def broken_citations(path: Path) -> list[str]:
    text = text_of(path)
    problems = [f"outside path {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
    for match in REPO_PATH.finditer(text):
        cited = match.group(1).rstrip(".,;:")
        if cited.startswith(BUILD_OUTPUTS):
            continue
        if not (any(ROOT.glob(cited)) if "*" in cited else (ROOT / cited).exists()):
            problems.append(f"missing file {cited!r}")
    for match in BARE_MARKDOWN.finditer(text):
        name = match.group(1)
        if not ((path.parent / name).exists() or (ROOT / name).exists()):
            problems.append(f"bare file name {name!r} (cite it by its path in the repository)")
    return problems


def test_the_scan_sees_the_project():
    names = {f.relative_to(ROOT).as_posix() for f in scanned_files()}
    assert {"README.md", "docs/math.md", "toolkit/quality.py", "notebooks/01_linear_toy.ipynb"} <= names


def test_the_scan_finds_what_it_must(tmp_path, monkeypatch):
    cited = tmp_path / "cited.md"
    cited.write_text(f"see math.md, section 4, docs/nothing.md, ../{SHARED}/seed/x.txt and data/*.npz;\n"
                     "docs/math.md, `data/images/` and open('LOCAL.md') are fine\n")
    assert sorted(broken_citations(cited)) == [
        "bare file name 'math.md' (cite it by its path in the repository)",
        "missing file 'docs/nothing.md'",
        f"outside path '../{SHARED}'",
    ]


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_cited_file_exists(path):
    assert broken_citations(path) == [], f"{path.relative_to(ROOT)} cites what the repository lacks"
