"""Execute notebooks in place, top to bottom, and strip widget state before committing.

Usage: .venv/bin/python scripts/execute_notebooks.py notebooks/01_linear_toy.ipynb [...]
"""
import sys
import time
from pathlib import Path

import nbformat

from toolkit.reproduce import run_notebook

for name in sys.argv[1:]:
    started = time.perf_counter()
    notebook = run_notebook(Path(name))
    nbformat.write(notebook, name)
    print(f"{name}: executed in {time.perf_counter() - started:.0f} s")
