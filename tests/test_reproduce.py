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


def test_a_lesson_between_two_keeps_its_place(tmp_path):
    from toolkit.reproduce import find_notebook

    for name in ("02_images.ipynb", "01b_from_neuron_to_network.ipynb", "01_linear_toy.ipynb",
                 "notes.ipynb", "10_late.ipynb"):
        (tmp_path / name).write_text("{}")
    names = [p.name for p in course_notebooks(tmp_path)]
    assert names == ["01_linear_toy.ipynb", "01b_from_neuron_to_network.ipynb", "02_images.ipynb",
                     "10_late.ipynb"]
    assert find_notebook("01", tmp_path).name == "01_linear_toy.ipynb"
    assert find_notebook("01b", tmp_path).name == "01b_from_neuron_to_network.ipynb"


def test_missing_notebook_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebooks found"):
        course_notebooks(tmp_path)


def _png_output(payload: bytes):
    import base64

    return nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(payload).decode()})


def test_figures_are_named_after_the_comment_line(tmp_path):
    from toolkit.reproduce import save_figures

    named = nbformat.v4.new_code_cell("# Figure: fig2_distractor_directions\nplot()")
    named.outputs = [_png_output(b"first"), nbformat.v4.new_output("stream", text="x"), _png_output(b"second"),
                     _png_output(b"third")]
    plain = nbformat.v4.new_code_cell("plot()  # Figure: not_a_name, not on the first line")
    plain.outputs = [_png_output(b"plain")]
    markdown = nbformat.v4.new_markdown_cell("# Figure: ignored")
    nb = nbformat.v4.new_notebook(cells=[markdown, named, plain])
    figures = save_figures(nb, tmp_path, "01_toy")
    assert [f.name for f in figures] == ["fig2_distractor_directions.png", "fig2_distractor_directions_2.png",
                                         "fig2_distractor_directions_3.png", "01_toy_cell02_0.png"]
    assert [f.read_bytes() for f in figures] == [b"first", b"second", b"third", b"plain"]


def test_figure_name_rules():
    from toolkit.reproduce import figure_name

    code = nbformat.v4.new_code_cell
    assert figure_name(code("\n#  Figure:  fig5_perturbation_fashion \nx = 1")) == "fig5_perturbation_fashion"
    assert figure_name(code("#Figure: fig1_toy")) == "fig1_toy"
    assert figure_name(code("# Figure: ../escape")) is None      # a name, never a path
    assert figure_name(code("# a comment\n# Figure: late")) is None
    assert figure_name(code("")) is None


def test_course_notebooks_are_found_by_number_or_name(tmp_path):
    from toolkit.reproduce import find_notebook

    first = course_notebooks()[0]
    assert find_notebook("01") == first
    assert find_notebook(first.stem) == first and find_notebook(first.name) == first
    assert find_notebook(str(first)) == first
    with pytest.raises(FileNotFoundError, match="neither a file nor one course notebook"):
        find_notebook("99")
    with pytest.raises(FileNotFoundError, match="neither a file nor one course notebook"):
        find_notebook("0")                                  # not the whole number of any notebook


def test_copy_course_copies_once_and_keeps_existing_work(tmp_path):
    from toolkit.reproduce import copy_course

    course = tmp_path / "course"
    course.mkdir()
    for name in ("01_a.ipynb", "02_b.ipynb"):
        (course / name).write_text(name)
    (course / "notes.txt").write_text("not a lesson")
    mine = tmp_path / "home" / "patternnet-course"
    copied = copy_course(mine, course)
    assert [p.name for p in copied] == ["01_a.ipynb", "02_b.ipynb"]
    assert sorted(p.name for p in mine.iterdir()) == ["01_a.ipynb", "02_b.ipynb"]
    (mine / "01_a.ipynb").write_text("my answers")
    (mine / "02_b.ipynb").unlink()
    assert [p.name for p in copy_course(mine, course)] == ["02_b.ipynb"]
    assert (mine / "01_a.ipynb").read_text() == "my answers"


def test_a_repeated_figure_name_is_reported(tmp_path):
    from toolkit.reproduce import save_figures

    cells = []
    for payload in (b"one", b"two"):
        cell = nbformat.v4.new_code_cell("# Figure: fig1_same\nplot()")
        cell.outputs = [_png_output(payload)]
        cells.append(cell)
    with pytest.warns(UserWarning, match="cell 1 writes fig1_same.png again"):
        figures = save_figures(nbformat.v4.new_notebook(cells=cells), tmp_path, "01_toy")
    assert [f.name for f in figures] == ["fig1_same.png", "fig1_same.png"]
    assert (tmp_path / "fig1_same.png").read_bytes() == b"two"


def test_a_figure_name_repeated_across_notebooks_is_reported(tmp_path, monkeypatch):
    import toolkit.reproduce as reproduce_module

    notebooks = [tmp_path / "01_a.ipynb", tmp_path / "02_b.ipynb"]
    for notebook in notebooks:
        notebook.write_text("{}")
    shared = tmp_path / "out" / "figures" / "fig4_layer_quality.png"
    monkeypatch.setattr(reproduce_module, "execute_notebook",
                        lambda path, out, timeout: (out / path.name, [shared]))
    with pytest.warns(UserWarning, match="02_b.ipynb writes fig4_layer_quality.png, replacing the figure of 01_a"):
        reproduce_module.reproduce(tmp_path / "out", notebooks)


def test_the_shipped_course_includes_every_chapter():
    stems = [p.name.split("_", 1)[0] for p in course_notebooks()]
    assert stems[:2] == ["01", "01b"] and {"07", "08"} <= set(stems)
