"""Run the course: execute the notebooks headless and collect their figures.

``toolkit reproduce --out DIR`` executes every notebook of ``notebooks/`` in order, writes
the executed copies to ``DIR`` and every figure they draw as a PNG file to
``DIR/figures``. Jupyter packages are imported here, on use, never by ``import toolkit``.
"""
from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def course_notebooks(directory: Path | str = NOTEBOOK_DIR) -> list[Path]:
    """The course's notebooks in order (their names start with the lesson number)."""
    directory = Path(directory)
    notebooks = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(
            f"no notebooks found in {directory}; run from a checkout of the repository "
            "(the notebooks are not part of the installed package) or pass --notebooks DIR"
        )
    return notebooks


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


def save_figures(notebook, directory: Path, stem: str) -> list[Path]:
    """Write every ``image/png`` output of ``notebook`` to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    figures = []
    for index, cell in enumerate(notebook.cells):
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        for k, png in enumerate(pngs):
            figure = directory / f"{stem}_cell{index:02d}_{k}.png"
            figure.write_bytes(base64.b64decode(png))
            figures.append(figure)
    return figures


def reproduce(out: Path | str, notebooks: list[Path] | None = None, timeout: int = 900) -> dict[Path, list[Path]]:
    """Execute ``notebooks`` (default: the whole course) and write results to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notebooks = [Path(n) for n in notebooks] if notebooks else course_notebooks()
    results = {}
    for path in notebooks:
        started = time.perf_counter()
        print(f"running {path.name} ...", flush=True)
        executed, figures = execute_notebook(path, out, timeout)
        print(f"  {executed} ({len(figures)} figures, {time.perf_counter() - started:.0f} s)", flush=True)
        results[executed] = figures
    print(f"\nexecuted notebooks: {out.resolve()}\nfigures:            {(out / 'figures').resolve()}")
    return results


if __name__ == "__main__":  # pragma: no cover
    reproduce(sys.argv[1] if len(sys.argv) > 1 else "results")
