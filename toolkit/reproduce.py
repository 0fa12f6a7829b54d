"""Run the course: execute the notebooks headless and collect their figures.

``toolkit reproduce --out DIR`` executes every notebook of the course in order (the
repository's ``notebooks/``, or the copy inside an installed package), writes the
executed copies to ``DIR`` and every figure they draw as a PNG file to ``DIR/figures``.
``--notebooks`` takes paths or names of course notebooks (``01``, ``01_linear_toy``).
:func:`copy_course` copies the notebooks to a folder of one's own to work on.

Figures are named after what they show: a code cell whose source begins with the
comment line ``# Figure: NAME`` writes its images as ``NAME.png``, ``NAME_2.png``, ...;
the images of other cells are named ``STEM_cellNN_K.png`` (notebook stem, cell index,
image index). Jupyter packages are imported here, on use, never by ``import toolkit``.
"""
from __future__ import annotations

import base64
import re
import sys
import time
import warnings
from pathlib import Path

from toolkit.data import shipped_dir

NOTEBOOK_DIR = shipped_dir("notebooks")


def course_notebooks(directory: Path | str = NOTEBOOK_DIR) -> list[Path]:
    """The course's notebooks in order (their names start with the lesson number, two
    digits and an optional letter for a lesson placed between two: ``01_``, ``01b_``, ``02_``)."""
    directory = Path(directory)
    notebooks = sorted(directory.glob("[0-9][0-9]*_*.ipynb"),
                       key=lambda path: path.name.split("_", 1)[0])
    if not notebooks:
        raise FileNotFoundError(
            f"no notebooks found in {directory}: the package was installed without its "
            "notebooks; install it from a wheel or sdist of the project, or run from a checkout"
        )
    return notebooks


def find_notebook(name: Path | str, directory: Path | str = NOTEBOOK_DIR) -> Path:
    """A notebook given by its path, or a course notebook given by its name.

    ``name`` is an existing path, or the file name, stem or number of a course notebook
    (``"01_linear_toy.ipynb"``, ``"01_linear_toy"``, ``"01"``).
    """
    path = Path(name)
    if path.exists():
        return path
    matches = [n for n in course_notebooks(directory)
               if str(name) in (n.name, n.stem) or n.name.startswith(f"{name}_")]
    if len(matches) != 1:
        known = ", ".join(n.name for n in course_notebooks(directory))
        raise FileNotFoundError(f"notebook {str(name)!r} is neither a file nor one course notebook "
                                f"(course notebooks: {known})")
    return matches[0]


def copy_course(destination: Path | str, directory: Path | str = NOTEBOOK_DIR) -> list[Path]:
    """Copy the course's notebooks into ``destination`` to work on; never overwrite.

    Notebooks already in ``destination`` are kept as they are (a student's work), so the
    call can run at every login of a JupyterHub. Returns the notebooks it copied.
    """
    destination = Path(destination).expanduser()
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for notebook in course_notebooks(directory):
        target = destination / notebook.name
        if not target.exists():
            target.write_bytes(notebook.read_bytes())
            copied.append(target)
    return copied


WIDGET_NOTE = ("Interactive widget (ipywidgets): run this notebook in Jupyter to use the "
               "controls.")


def strip_widget_state(notebook) -> None:
    """Remove saved widget state and widget views (they only work in a live kernel)."""
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if data.pop("application/vnd.jupyter.widget-view+json", None) is not None:
                data["text/plain"] = WIDGET_NOTE
            data.pop("application/vnd.jupyter.widget-state+json", None)


def run_notebook(path: Path, timeout: int = 900):
    """Execute a notebook top to bottom in a fresh kernel, in its own folder; return it
    without widget state."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(Path(path).parent)}})
    client.execute()
    strip_widget_state(notebook)
    return notebook


def execute_notebook(path: Path, out_dir: Path, timeout: int = 900) -> tuple[Path, list[Path]]:
    """Execute one notebook; save the executed copy to ``out_dir`` and its figures.

    Returns the executed notebook's path and the paths of the PNG figures.
    """
    import nbformat

    notebook = run_notebook(path, timeout)
    executed = out_dir / path.name
    nbformat.write(notebook, executed)
    return executed, save_figures(notebook, out_dir / "figures", path.stem)


FIGURE_LINE = re.compile(r"#\s*Figure:\s*([\w.-]+)\s*$")


def figure_name(cell) -> str | None:
    """The name a code cell gives its figures: ``NAME`` from a first line ``# Figure: NAME``."""
    if cell.get("cell_type") != "code":
        return None
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    lines = source.lstrip().splitlines()
    match = FIGURE_LINE.match(lines[0]) if lines else None
    return match.group(1) if match else None


def save_figures(notebook, directory: Path, stem: str) -> list[Path]:
    """Write every ``image/png`` output of ``notebook`` to ``directory``.

    A cell that begins with ``# Figure: NAME`` names its images ``NAME.png``,
    ``NAME_2.png``, ...; other cells' images are ``{stem}_cell{NN}_{K}.png``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    figures = []
    for index, cell in enumerate(notebook.cells):
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        name = figure_name(cell)
        for k, png in enumerate(pngs):
            if name is None:
                figure = directory / f"{stem}_cell{index:02d}_{k}.png"
            else:
                figure = directory / (f"{name}.png" if k == 0 else f"{name}_{k + 1}.png")
            if figure in figures:
                warnings.warn(f"{stem}: cell {index} writes {figure.name} again; the figure of an "
                              "earlier cell is replaced (give each '# Figure:' line its own name)")
            figure.write_bytes(base64.b64decode(png))
            figures.append(figure)
    return figures


def reproduce(out: Path | str, notebooks: list[Path] | None = None, timeout: int = 900) -> dict[Path, list[Path]]:
    """Execute ``notebooks`` (default: the whole course) and write results to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notebooks = [find_notebook(n) for n in notebooks] if notebooks else course_notebooks()
    results = {}
    for path in notebooks:
        started = time.perf_counter()
        print(f"running {path.name} ...", flush=True)
        executed, figures = execute_notebook(path, out, timeout)
        for figure in figures:
            earlier = next((e for e, f in results.items() if figure in f), None)
            if earlier is not None:
                warnings.warn(f"{path.name} writes {figure.name}, replacing the figure of {earlier.name}")
        print(f"  {executed} ({len(figures)} figures, {time.perf_counter() - started:.0f} s)", flush=True)
        results[executed] = figures
    print(f"\nexecuted notebooks: {out.resolve()}\nfigures:            {(out / 'figures').resolve()}")
    return results


if __name__ == "__main__":  # pragma: no cover
    reproduce(sys.argv[1] if len(sys.argv) > 1 else "results")
