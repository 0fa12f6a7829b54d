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


# ----------------------------------------------------------------------------------
# the student version of the course
# ----------------------------------------------------------------------------------
import ast  # noqa: E402

import nbformat  # noqa: E402
import pytest  # noqa: E402

from toolkit.course import SOLUTION_TAG, student_notebook, write_student_course  # noqa: E402
from toolkit.reproduce import course_notebooks, run_notebook  # noqa: E402

#: The notebooks whose student version the tests execute: they run in well under a minute
#: (the others take one to three minutes each; nbval executes their teacher version, and
#: the pattern test below checks that removing their solutions leaves every name a later
#: cell needs).
FAST = ("01_linear_toy.ipynb", "01b_from_neuron_to_network.ipynb")
#: The notebooks that must have two or three exercises, one of them with a self-check.
WITH_EXERCISES = ("01_", "01b_", "02_", "03_", "04_", "05_", "06_")


def _solution(cell) -> bool:
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def _tree(source: str) -> ast.AST:
    return ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


def _assigned(source: str) -> set[str]:
    """The names a cell defines at the notebook's top level (not those local to a function)."""
    names = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        if not isinstance(node, _SCOPES):
            for child in ast.iter_child_nodes(node):
                visit(child)

    visit(_tree(source))
    return names


def _used(source: str) -> set[str]:
    return {node.id for node in ast.walk(_tree(source)) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def _teacher_notebook():
    nb = nbformat.v4.new_notebook()
    exercise = nbformat.v4.new_code_cell("answer = TODO")
    exercise.outputs = [nbformat.v4.new_output("stream", text="old output\n")]
    exercise.execution_count = 3
    solution = nbformat.v4.new_code_cell("answer = 2.0", metadata={"tags": [SOLUTION_TAG]})
    checked = nbformat.v4.new_code_cell('check("answer", answer, 2.0)')
    box = nbformat.v4.new_markdown_cell("> **Predict, then check.** How much?\n\n<details><summary>Solution"
                                        "</summary>\n\nThe secret number.\n</details>\n\nAfter the box.")
    folded = nbformat.v4.new_markdown_cell("<details open>\nOnly a solution.\n</DETAILS>")
    nb.cells = [box, exercise, solution, checked, folded]
    nb.metadata["widgets"] = {"state": {}}
    return nb


def test_student_notebook_removes_solutions_folded_answers_and_outputs():
    teacher = _teacher_notebook()
    student = student_notebook(teacher)
    assert [cell.source for cell in student.cells] == [
        "> **Predict, then check.** How much?\n\nAfter the box.", "answer = TODO", 'check("answer", answer, 2.0)']
    assert all(cell.outputs == [] and cell.execution_count is None
               for cell in student.cells if cell.cell_type == "code")
    assert "widgets" not in student.metadata
    assert len(teacher.cells) == 5 and teacher.cells[1].outputs  # the teacher's notebook is untouched


def test_every_course_notebook_follows_the_exercise_pattern():
    """A solution cell sits between its exercise (TODO or NotImplementedError) and a check,
    and every name it defines that a later cell uses is defined by the exercise too, so
    that the student version still runs top to bottom."""
    for path in course_notebooks():
        nb = nbformat.read(path, as_version=4)
        solutions = [i for i, cell in enumerate(nb.cells) if _solution(cell)]
        if path.name.startswith(WITH_EXERCISES):
            assert solutions, f"{path.name} has no coding exercise with a solution cell"
            boxes = sum(cell.source.count("<details") for cell in nb.cells if cell.cell_type == "markdown")
            assert 2 <= boxes + len(solutions) <= 3, f"{path.name} has {boxes + len(solutions)} exercises, not 2 or 3"
        for i in solutions:
            exercise, check_cell = nb.cells[i - 1], nb.cells[i + 1]
            assert exercise.cell_type == "code" and ("TODO" in exercise.source
                                                     or "NotImplementedError" in exercise.source), (path.name, i)
            assert check_cell.cell_type == "code" and ("check(" in check_cell.source
                                                       or "check_function(" in check_cell.source), (path.name, i)
            later = set().union(*(_used(cell.source) for cell in nb.cells[i + 1:]
                                  if cell.cell_type == "code" and not _solution(cell)))
            missing = (_assigned(nb.cells[i].source) & later) - _assigned(exercise.source)
            assert not missing, f"{path.name}, cell {i}: later cells use {missing}, defined only by the solution"


def test_student_course_keeps_no_solution(tmp_path):
    written = write_student_course(tmp_path / "class")
    assert [p.name for p in written] == [p.name for p in course_notebooks()]
    for path in written:
        nb = nbformat.read(path, as_version=4)
        assert not any(_solution(cell) for cell in nb.cells), path.name
        assert not any("<details" in cell.source.lower() for cell in nb.cells if cell.cell_type == "markdown")
        assert all(not cell.outputs for cell in nb.cells if cell.cell_type == "code")
        teacher = nbformat.read(next(p for p in course_notebooks() if p.name == path.name), as_version=4)
        checks = sum("check(" in c.source or "check_function(" in c.source for c in teacher.cells)
        assert sum("check(" in c.source or "check_function(" in c.source for c in nb.cells) == checks
    with pytest.raises(FileExistsError, match="exists"):
        write_student_course(tmp_path / "class")
    assert write_student_course(tmp_path / "class", ["01"], overwrite=True) == [tmp_path / "class" / written[0].name]


@pytest.mark.parametrize("name", FAST)
def test_the_student_version_runs_and_says_what_is_unanswered(tmp_path, name):
    if not any(path.name == name for path in course_notebooks()):
        pytest.skip(f"{name} is not in this course")
    (path,) = write_student_course(tmp_path, [name])
    executed = run_notebook(path, timeout=300)
    printed = "".join(output.get("text", "") for cell in executed.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    errors = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors
    teacher = nbformat.read(next(p for p in course_notebooks() if p.name == name), as_version=4)
    assert printed.count("not answered yet") == sum(_solution(cell) for cell in teacher.cells)
    assert ": correct" not in printed


def test_the_command_writes_the_student_course(tmp_path, capsys):
    from toolkit.cli import main

    assert main(["course", "student", str(tmp_path / "out"), "--notebooks", "01"]) == 0
    assert capsys.readouterr().out.strip().endswith("01_linear_toy.ipynb")
    assert main(["course", "student", str(tmp_path / "out"), "--notebooks", "01"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("toolkit course: error:") and "--force" in error[0]
    assert main(["course", "student", str(tmp_path / "out"), "--notebooks", "01", "--force"]) == 0
