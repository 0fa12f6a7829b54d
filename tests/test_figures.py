"""Tests of the evaluation figures' readability features and the grid's row labels."""
import math

import matplotlib
import pytest
import torch

from toolkit.perturbation import PerturbationResult
from toolkit.plotting.evaluation import (ESTIMATOR_CURVES, OFFSET, plot_layer_quality,
                                         plot_layer_quality_regimes, plot_perturbation)
from toolkit.plotting.images import prediction_labels
from toolkit.plotting.style import COURSE_STYLE, use_course_style
from toolkit.quality import QualityResult

ESTIMATORS = ("random", "filter", "linear", "two_component")


def result(values, layers=("a", "b", "c"), regime="all"):
    mean = {layer: dict(zip(ESTIMATORS, row)) for layer, row in zip(layers, values)}
    return QualityResult(list(layers), ESTIMATORS, {}, {}, mean, {k: 100 for k in layers},
                         {k: 4 for k in layers}, regime=regime)


def test_equal_lines_are_shifted_apart_and_styled_differently():
    r = result([(0.0, 0.1, 0.9, 0.9)] * 3)
    ax = plot_layer_quality(r)
    lines = ax.get_lines()
    xs = [tuple(line.get_xdata()) for line in lines]
    assert len(set(xs)) == 4  # every estimator at its own x offset
    assert xs[3][0] - xs[2][0] == pytest.approx(OFFSET)
    assert len({(line.get_marker(), str(line.get_linestyle())) for line in lines}) == 4
    assert list(lines[2].get_ydata()) == list(lines[3].get_ydata()) == [0.9] * 3


def test_regime_panels_and_the_difference_panel():
    everything = result([(0, 0.1, 0.9, 0.9), (0, 0.0, 0.8, 0.81), (0, 0, 0.5, 0.5)])
    active = result([(0, 0.2, 0.5, 0.9), (0, 0.0, 0.1, 0.7)], layers=("a", "b"), regime="active")
    fig = plot_layer_quality_regimes({"all samples": everything, "active samples": active})
    axes = fig.axes
    assert len(axes) == 3 and axes[1].get_title() == "active samples"
    gap = axes[1].get_lines()[2].get_ydata()
    assert math.isnan(gap[2])  # layer c not measured on the active samples
    diff = axes[2].get_lines()
    assert [round(v, 6) for v in diff[0].get_ydata()] == [0.0, 0.01, 0.0]
    assert [round(v, 6) for v in diff[1].get_ydata()[:2]] == [0.4, 0.6]
    with pytest.raises(ValueError, match="needs"):
        plot_layer_quality_regimes({"x": QualityResult(["a"], ("random",), {}, {}, {"a": {"random": 0}},
                                                       {"a": 1}, {"a": 1})})


def curve(values, order="most_relevant"):
    c = torch.tensor(values, dtype=torch.float64)
    return PerturbationResult(curve=c, per_image=c[None], per_ordering=c[None, None],
                              per_image_aopc=(c[0] - c).mean()[None], aopc=float((c[0] - c).mean()),
                              predicted=torch.zeros(1, dtype=torch.long), order=order, replace="mean",
                              patch=4, steps=len(c) - 1, repeats=1, grid=(7, 7))


def test_perturbation_figure_integer_ticks_and_estimator_styles():
    curves = {name: curve([0.9, 0.8, 0.7, 0.6, 0.5, 0.45], "random" if name == "random" else "most_relevant")
              for name in ESTIMATOR_CURVES}
    ax = plot_perturbation(curves, styles={k: v[1] for k, v in ESTIMATOR_CURVES.items()},
                           labels={k: v[0] for k, v in ESTIMATOR_CURVES.items()})
    ticks = ax.get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    lines = ax.get_lines()
    assert len({(line.get_marker(), str(line.get_linestyle())) for line in lines}) == 5
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("$S_x$") and legend[-1].startswith("random order (AOPC")


def test_prediction_labels_and_the_style():
    labels = prediction_labels([0, 2], torch.tensor([0, 1]), [0.912, 0.5], ["T-shirt/top", "Trouser", "Pullover"])
    assert labels == ["T-shirt/top - T-shirt/top (0.91)", "Pullover - Trouser (0.50)"]
    assert prediction_labels(["cat"], ["dog, puppy"], [1.0]) == ["cat - dog (1.00)"]
    with pytest.raises(ValueError, match="2 true classes, 1 predictions"):
        prediction_labels([0, 1], [0], [0.5])
    use_course_style()
    assert matplotlib.rcParams["savefig.dpi"] >= 150 and matplotlib.rcParams["figure.dpi"] >= 150
    assert COURSE_STYLE["legend.fontsize"] >= 8


def test_grid_breaks_long_row_labels():
    from toolkit.plotting.images import explanation_grid
    x = torch.rand(2, 1, 6, 6)
    fig = explanation_grid(x, {"a": x}, {"a": "attribution"},
                           row_labels=["Pullover - Pullover (0.98)", "Bag - Bag"], size=1.5)
    assert fig.axes[0].get_ylabel() == "Pullover -\nPullover (0.98)"
    assert fig.axes[2].get_ylabel() == "Bag - Bag"  # short enough for one line
