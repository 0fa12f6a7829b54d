"""Tests of the toy explorer (toolkit.widgets) and the toy figures it draws with."""
import io
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from toolkit.linear import explore
from toolkit.plotting import toy
from toolkit.widgets import PanelRenderer, explorer, summary_table_html


def test_modules_import_without_jupyter():
    # Block ipywidgets and IPython, then import the toy modules in a fresh interpreter.
    code = (
        "import sys\n"
        "sys.modules['ipywidgets'] = None\n"
        "sys.modules['IPython'] = None\n"
        "import toolkit.linear, toolkit.plotting.toy, toolkit.widgets\n"
        "assert sys.modules['ipywidgets'] is None and sys.modules['IPython'] is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_summary_table_lists_filter_patterns_and_rho():
    result = explore(n=500, seed=0)
    table = summary_table_html(result)
    assert "(+1.000, -1.000)" in table  # w
    assert "a+ = (" in table and "a- = (" in table
    assert f"{result.rho['linear']:.3f}" in table
    assert "undefined" in table  # the identity estimator
    assert "font-weight:bold'><td>two-component" in table


def test_explorer_builds_and_updates_without_a_kernel():
    ipywidgets = pytest.importorskip("ipywidgets")
    panel = explorer(n=300)
    assert isinstance(panel, ipywidgets.VBox)
    assert set(panel.controls) == {"signal_angle", "distractor_angle", "noise_mean",
                                   "noise_std", "n", "estimator", "mean_y"}
    before_table, before_image = panel.table.value, panel.image.value
    assert "(+1.000, -1.000)" in before_table
    assert before_image[:8] == b"\x89PNG\r\n\x1a\n"

    panel.controls["distractor_angle"].value = 90.0  # orthogonal distractor: w = a_s
    assert panel.table.value != before_table
    assert panel.image.value != before_image
    assert "(+1.000, +0.000)" in panel.table.value

    panel.controls["estimator"].value = "filter"
    assert "font-weight:bold'><td>filter" in panel.table.value

    panel.controls["distractor_angle"].value = 0.0  # parallel to the signal: no filter
    assert "parallel" in panel.table.value


def _grey_share(png):
    """Share of the image's pixels that are the invalid panel's grey (0.85 * 255)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float((np.abs(pixels - 217) <= 1).all(axis=2).mean())


def test_invalid_setting_greys_the_figure_and_clears_the_table():
    pytest.importorskip("ipywidgets")
    from toolkit.widgets import INVALID_CLASS
    panel = explorer(n=300)
    valid_image = panel.image.value
    assert _grey_share(valid_image) < 0.05
    panel.controls["distractor_angle"].value = 0.0  # parallel to the signal at 0 degrees
    assert _grey_share(panel.image.value) > 0.9
    assert "&rho; =" not in panel.table.value and "parallel" in panel.table.value
    assert INVALID_CLASS in panel.image._dom_classes and INVALID_CLASS in panel.table._dom_classes
    panel.controls["distractor_angle"].value = 45.0  # valid again: the default view is back
    assert panel.image.value == valid_image
    assert INVALID_CLASS not in panel.image._dom_classes
    assert "&rho; =" in panel.table.value


def test_figure2_buttons_set_the_distractor_angle():
    pytest.importorskip("ipywidgets")
    panel = explorer(n=300, signal_angle=20.0)
    assert [b.description for b in panel.buttons] == ["90°", "45°", "135°", "30°"]
    panel.buttons[3].click()
    assert panel.controls["signal_angle"].value == 0.0
    assert panel.controls["distractor_angle"].value == 30.0
    assert "(+1.000, -1.732)" in panel.table.value  # w at 30 degrees, as in notebook 01
    panel.buttons[0].click()
    assert "(+1.000, +0.000)" in panel.table.value


def test_blitted_render_equals_a_fresh_render():
    renderer = PanelRenderer()
    for angle in (10, 80, 150):  # windows of different sizes
        renderer.render(explore(distractor_angle=angle, noise_std=1.5, n=200))
    result = explore(distractor_angle=60, noise_mean=0.5, estimator="filter", n=200)
    reused = np.asarray(Image.open(io.BytesIO(renderer.render(result))))
    fresh = np.asarray(Image.open(io.BytesIO(PanelRenderer().render(result))))
    np.testing.assert_array_equal(reused, fresh)


# ---------------------------------------------------------------------------
# Toy figures
# ---------------------------------------------------------------------------

def test_filter_follows_distractor_figure():
    figure, axes = toy.plot_filter_follows_distractor(distractor_angles=(90, 45), n=200)
    assert isinstance(figure, Figure) and len(axes) == 2
    assert "(1.00, 0.00)" in axes[0].get_title()
    assert "(1.00, -1.00)" in axes[1].get_title()
    assert all(ax.get_aspect() == 1.0 for ax in axes)


def test_estimator_comparison_figure():
    result = explore(n=300)
    figure, axes = toy.plot_estimator_comparison(result)
    assert axes.shape == (4, 4)
    titles = [ax.get_title() for ax in axes[0]]
    assert "undefined" in titles[0]
    assert f"{result.rho['linear']:.3f}" in titles[2]


def test_toy_panel_draws_on_given_axes_and_rejects_other_dimensions():
    ax = Figure().add_subplot()
    result = explore(n=100)
    assert toy.plot_exploration(ax, result) is ax
    assert ax.get_legend() is not None
    with pytest.raises(ValueError, match="2-D data"):
        toy.plot_toy_panel(ax, np.zeros((5, 3)), np.zeros(5), np.ones(3))


def test_root_points_lie_where_given_with_the_boundary_through_them():
    data_x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    w, bias = np.array([1.0, -1.0]), 0.5
    sample = np.array([2.0, 1.0])
    roots = {"first": np.array([0.0, 0.5]), "second": np.array([1.0, 1.5])}  # both on w^T x + b = 0
    ax = Figure().add_subplot()
    assert toy.plot_root_points(ax, data_x, np.zeros(3), w, sample, roots, bias=bias) is ax
    (boundary,) = [line for line in ax.lines if hasattr(line, "get_xy1")]
    for point in (boundary.get_xy1(), boundary.get_xy2()):
        assert w @ np.asarray(point) + bias == pytest.approx(0)
    dots = {tuple(line.get_xydata()[0]) for line in ax.lines if line.get_marker() == "o"}
    assert dots == {(0.0, 0.5), (1.0, 1.5)}
    arrows = [a for a in ax.texts if a.xy == tuple(sample)]  # one arrow from every root point to the sample
    assert sorted(a.xyann for a in arrows) == [(0.0, 0.5), (1.0, 1.5)]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"first", "second", "sample $x$"} <= set(labels)
    with pytest.raises(ValueError, match="shape"):
        toy.plot_root_points(ax, data_x, np.zeros(3), w, sample, {"3-D": np.zeros(3)})
    with pytest.raises(ValueError, match="no boundary"):
        toy.plot_root_points(ax, data_x, np.zeros(3), np.zeros(2), sample, roots)
