"""toolkit.course: the checks of the coding exercises."""
import numpy as np
import torch

from toolkit.course import TODO, check, check_function


def test_check_says_not_answered_correct_and_wrong(capsys):
    assert check("a", TODO, 1.0) is False
    assert check("a", ..., 1.0) is False
    assert check("b", torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])) is True
    assert check("c", [1.0, 2.5], [1.0, 2.0]) is False
    assert check("d", [1.0], [1.0, 2.0]) is False
    assert check("e", "text", 1.0) is False
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["a: not answered yet", "a: not answered yet", "b: correct"]
    assert lines[3] == "c: not yet right (largest difference 0.5)"
    assert "shape (1,), expected (2,)" in lines[4]
    assert lines[5].startswith("e: not yet right")


def test_check_function_runs_every_case(capsys):
    def todo(x):
        raise NotImplementedError

    def broken(x):
        return x + (x > 2)

    cases = [(np.arange(3.0),), (np.arange(5.0),)]
    assert check_function("f", todo, np.sqrt, cases) is False
    assert check_function("f", np.sqrt, np.sqrt, cases) is True
    assert check_function("g", broken, lambda x: x, cases) is False
    assert check_function("h", lambda x: 1 / 0, np.sqrt, cases) is False
    out = capsys.readouterr().out.splitlines()
    assert out == ["f: not answered yet", "f: correct",
                   "g: not yet right (case 1: largest difference 1)",
                   "h: not yet right (case 0 raised ZeroDivisionError: division by zero)"]
