"""The main job: ``toolkit reproduce`` executes notebooks and saves their figures."""
import nbformat
import pytest

from toolkit.cli import main
from toolkit.reproduce import course_notebooks


def _tiny_notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n%matplotlib inline"),
        nbformat.v4.new_code_cell("print(6 * 7)"),
        nbformat.v4.new_code_cell("plt.plot([0, 1], [1, 0]); plt.show()"),
    ]
    nbformat.write(nb, path)


def test_reproduce_writes_executed_notebook_and_png(tmp_path, capsys):
    notebook = tmp_path / "01_tiny.ipynb"
    _tiny_notebook(notebook)
    out = tmp_path / "out"
    assert main(["reproduce", "--out", str(out), "--notebooks", str(notebook)]) == 0
    executed = nbformat.read(out / "01_tiny.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"] == "42\n"
    figures = sorted((out / "figures").glob("*.png"))
    assert [f.name for f in figures] == ["01_tiny_cell02_0.png"]
    assert figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out.resolve()) in capsys.readouterr().out


def test_course_notebooks_are_found_in_order():
    names = [p.name for p in course_notebooks()]
    assert names and names == sorted(names) and names[0].startswith("01_")


def test_missing_notebook_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebooks found"):
        course_notebooks(tmp_path)
