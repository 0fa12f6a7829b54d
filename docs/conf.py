"""Sphinx configuration of the documentation site.

Build it with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` after
``pip install -e '.[docs]'``. The committed notebooks are rendered with their outputs and
never executed; they are copied from ``notebooks/`` into ``docs/course/`` at every build,
so every ``notebooks/*.ipynb`` is part of the course.
"""
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))


def copy_course(directory: Path = DOCS / "course") -> None:
    """Copy the committed notebooks into ``directory`` (emptied first)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy2(notebook, directory / notebook.name)


copy_course()

project = "patternnet-toolkit"
author = "the patternnet-toolkit authors"
copyright = "the patternnet-toolkit authors, MIT licence"
release = version = "0.1.0"

extensions = [
    "myst_nb",                 # Markdown pages (MyST) and notebooks
    "numpydoc",                # NumPy-style docstrings
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax ships with the site: formulas render without a network
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# MyST: $...$ and $$...$$ math in Markdown, anchors for the numbered sections of math.md.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# Notebooks: shown as committed (outputs included), never executed by the build.
nb_execution_mode = "off"
nb_output_stderr = "show"

# API reference: members in source order; numpydoc without its own member tables, which
# would repeat every method that autodoc already documents.
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
# torch.autograd.Function.forward/backward docstrings cite labels of the PyTorch docs: not ours.
autodoc_inherit_docstrings = False
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()
nitpicky = False
# The notebooks' Markdown starts at any heading level; that is a choice of the lessons.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = "PatternNet toolkit"
html_static_path = []
