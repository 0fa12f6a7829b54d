"""Every measured number in a notebook's prose is printed by the notebook's own code.

A number written by hand into a markdown cell drifts whenever a model, a seed or a
library changes; a number printed by a code cell is measured again every time the
notebook runs. So every number with two or more decimals in a markdown cell of a
notebook in ``notebooks/`` (new notebooks included, found by the glob) must appear in
the text outputs of the same notebook, as the same digits (``0.56`` is not found in
``0.560`` or ``10.56``). The only exceptions are figures quoted from the literature,
listed below with their source.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

#: A number with two or more decimals, not part of a version string such as 2.14.1.
NUMBER = re.compile(r"(?<![\d.])\d+\.\d{2,}(?![\d])(?!\.\d)")

#: Numbers that a notebook's prose may state without printing them: figures from the
#: literature, with the source. Keep this list short.
EXCEPTIONS: dict[str, dict[str, str]] = {}


def prose_numbers(notebook) -> set[str]:
    """The numbers with two or more decimals in the markdown cells."""
    return {m.group(0) for cell in notebook.cells if cell.cell_type == "markdown"
            for m in NUMBER.finditer(cell.source.replace("\u2212", "-"))}


def printed_text(notebook) -> str:
    """Everything the code cells printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            for kind in ("text/plain", "text/markdown", "text/html"):
                value = output.get("data", {}).get(kind)
                if value:
                    parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts).replace("\u2212", "-")


def unprinted(notebook, exceptions=()) -> list[str]:
    """The prose numbers of ``notebook`` that no output prints (and no exception covers)."""
    text = printed_text(notebook)
    return sorted(n for n in prose_numbers(notebook) if n not in exceptions
                  and not re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", text))


def test_the_rule_catches_a_number_that_drifted():
    printed = nbformat.v4.new_code_cell("print(x)")
    printed.outputs = [nbformat.v4.new_output("stream", text="AOPC 0.102, rho 0.560, total 10.56\n")]
    prose = nbformat.v4.new_markdown_cell("AOPC 0.103 against 0.102; rho 0.56; 10.56; torch 2.14.1; 0.5")
    nb = nbformat.v4.new_notebook(cells=[printed, prose])
    assert unprinted(nb) == ["0.103", "0.56"]
    assert unprinted(nb, exceptions={"0.103": "a paper", "0.56": "a paper"}) == []


def test_every_notebook_is_checked():
    names = [path.name for path in NOTEBOOKS]
    assert "01_linear_toy.ipynb" in names and "05_residual_networks.ipynb" in names
    assert set(EXCEPTIONS) <= set(names), "exceptions for notebooks that do not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_prose_numbers_are_printed_by_the_notebook(path):
    notebook = nbformat.read(path, as_version=4)
    missing = unprinted(notebook, EXCEPTIONS.get(path.name, {}))
    assert not missing, (f"{path.name}: the prose states {missing}, which no output of the notebook "
                         "prints: print them from the code (a sentence formatted from the values is "
                         "fine), or list a figure quoted from the literature in EXCEPTIONS with its source")
