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

from typing import Callable, Sequence

import numpy as np

__all__ = ["TODO", "check", "check_function"]


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
