"""Exercises of the course: the student's answer and its check.

A coding exercise in a notebook has three cells:

1. the exercise, which the student edits: ``answer = TODO`` (or a function whose body
   raises ``NotImplementedError``);
2. the solution, tagged ``solution`` in the cell's metadata (the student version of the
   course leaves it out);
3. the check: ``check("name", answer, expected)`` or ``check_function("name", fn, reference,
   inputs)``.

On the solution the check prints ``name: correct``; on an unanswered exercise it prints
``name: not answered yet`` and the notebook goes on; on a wrong answer it says how far off
the answer is, without stopping the notebook either.

The *student version* of the course (``toolkit course student DIR``,
:func:`write_student_course`) is every notebook without its solutions: the cells tagged
``solution`` and the folded ``<details>`` solution blocks of the predict-then-check boxes
are removed and the outputs cleared (:func:`student_notebook`, with nbconvert's
preprocessors). It runs top to bottom, every unanswered check saying so.

Examples
--------
>>> answer = TODO
>>> check("slope", answer, 2.0)
slope: not answered yet
False
>>> check("slope", 2.0 + 1e-12, 2.0)
slope: correct
True
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["TODO", "check", "check_function", "SOLUTION_TAG", "student_notebook",
           "write_student_course"]

#: The cell tag of a solution cell (removed from the student version).
SOLUTION_TAG = "solution"
#: A folded solution in a markdown cell: ``<details>`` ... ``</details>``.
DETAILS = re.compile(r"\n*<details\b[^>]*>.*?</details>[ \t]*", re.DOTALL | re.IGNORECASE)


class _Todo:
    """The placeholder of an unanswered exercise (a single object, compared by identity)."""

    def __repr__(self) -> str:
        return "TODO"


#: Assign this to the answer of an exercise the student has not done yet.
TODO = _Todo()


def _unanswered(value) -> bool:
    return value is TODO or value is Ellipsis


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=float)


def check(name: str, answer, expected, *, rtol: float = 1e-6, atol: float = 1e-9) -> bool:
    """Compare ``answer`` with ``expected`` (numbers, arrays or tensors) and say so.

    Parameters
    ----------
    name : str
        How the exercise is called in the message.
    answer, expected
        Array-likes of the same shape (torch tensors are converted); ``answer`` may be
        :data:`TODO` (or ``...``) when the exercise is not done yet.
    rtol, atol : float
        Tolerances of :func:`numpy.allclose`.

    Returns
    -------
    bool
        Whether the answer is right. Never raises for a wrong or missing answer.
    """
    if _unanswered(answer):
        print(f"{name}: not answered yet")
        return False
    try:
        got, want = _as_array(answer), _as_array(expected)
    except (TypeError, ValueError) as error:
        print(f"{name}: not yet right (the answer is not a number or an array: {error})")
        return False
    if got.shape != want.shape:
        print(f"{name}: not yet right (shape {got.shape}, expected {want.shape})")
        return False
    if np.allclose(got, want, rtol=rtol, atol=atol):
        print(f"{name}: correct")
        return True
    error = float(np.max(np.abs(got - want))) if got.size else 0.0
    print(f"{name}: not yet right (largest difference {error:.3g})")
    return False


def check_function(name: str, function: Callable, reference: Callable, inputs: Sequence[tuple],
                   *, rtol: float = 1e-6, atol: float = 1e-9) -> bool:
    """Call the student's ``function`` and ``reference`` on every argument tuple of
    ``inputs`` and compare the results with :func:`check`'s rule.

    A function that raises ``NotImplementedError`` (or is :data:`TODO`) counts as not
    answered yet; any other exception is reported, not raised.
    """
    if _unanswered(function):
        print(f"{name}: not answered yet")
        return False
    for index, args in enumerate(inputs):
        try:
            got = function(*args)
        except NotImplementedError:
            print(f"{name}: not answered yet")
            return False
        except Exception as error:  # the student's code: report, do not stop the notebook
            print(f"{name}: not yet right (case {index} raised {type(error).__name__}: {error})")
            return False
        got, want = _as_array(got), _as_array(reference(*args))
        if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
            detail = (f"shape {got.shape}, expected {want.shape}" if got.shape != want.shape
                      else f"largest difference {float(np.max(np.abs(got - want))):.3g}")
            print(f"{name}: not yet right (case {index}: {detail})")
            return False
    print(f"{name}: correct")
    return True


# ----------------------------------------------------------------------------------
# the student version of the course
# ----------------------------------------------------------------------------------
def _details_remover():
    """An nbconvert preprocessor that removes the ``<details>`` blocks of markdown cells."""
    from nbconvert.preprocessors import Preprocessor

    class RemoveDetails(Preprocessor):
        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type == "markdown":
                cell.source = DETAILS.sub("", cell.source).rstrip()
            return cell, resources

    return RemoveDetails()


def student_notebook(notebook):
    """The student version of one notebook (an ``nbformat`` notebook; a copy is returned).

    Cells tagged :data:`SOLUTION_TAG` are removed (nbconvert's ``TagRemovePreprocessor``),
    so are the ``<details>`` blocks of markdown cells and markdown cells left empty by
    that; every output and execution count is cleared (``ClearOutputPreprocessor``), and
    saved widget state is dropped.
    """
    import copy

    from nbconvert.preprocessors import ClearOutputPreprocessor, TagRemovePreprocessor

    nb = copy.deepcopy(notebook)
    resources: dict = {}
    for preprocessor in (TagRemovePreprocessor(remove_cell_tags={SOLUTION_TAG}, enabled=True),
                         _details_remover(), ClearOutputPreprocessor(enabled=True)):
        nb, resources = preprocessor.preprocess(nb, resources)
    nb.cells = [cell for cell in nb.cells if cell.cell_type != "markdown" or cell.source.strip()]
    nb.metadata.pop("widgets", None)
    return nb


def write_student_course(directory, notebooks: Sequence | None = None, overwrite: bool = False) -> list[Path]:
    """Write the student version of every course notebook into ``directory``.

    Parameters
    ----------
    directory : path
        Created if missing.
    notebooks : sequence of paths or names, optional
        Course notebooks (``toolkit.reproduce.find_notebook``); default: the whole course.
    overwrite : bool
        Replace notebooks already in ``directory`` (default: refuse, they may hold a
        student's work).

    Returns
    -------
    list[pathlib.Path]
        The notebooks written.

    Raises
    ------
    FileExistsError
        If a notebook exists in ``directory`` and ``overwrite`` is False (nothing is
        written then).
    """
    import nbformat

    from toolkit.reproduce import course_notebooks, find_notebook

    directory = Path(directory).expanduser()
    sources = [find_notebook(n) for n in notebooks] if notebooks else course_notebooks()
    targets = [directory / source.name for source in sources]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); give another "
                              "folder, or overwrite (--force)")
    directory.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets):
        nbformat.write(student_notebook(nbformat.read(source, as_version=4)), target)
    return targets
