"""Figures of the paper's two evaluations: layer-wise estimator quality and region perturbation.

* :func:`plot_layer_quality` -- ``rho(S)`` per layer, one line per estimator (the
  paper's Figure 4 style: random, S_w, S_a, S_a+-), from :func:`toolkit.quality.layer_quality`;
  :func:`plot_layer_quality_regimes` puts several measurements side by side (all samples,
  active samples) with a panel of the difference ``rho(S_a+-) - rho(S_a)``, where the two
  lines would otherwise hide each other.
* :func:`plot_perturbation` -- the probability of the initially predicted class against
  the number of perturbed regions, one line per method, the random baseline dashed, AOPC
  in the legend, from :func:`toolkit.perturbation.region_perturbation`;
  :data:`ESTIMATOR_CURVES` names and styles the paper's Figure 5, PatternAttribution
  with each estimator.

Every line has its own colour, marker and line style, so lines stay apart in grey print
too; lines of the layer-quality figure are shifted sideways a little (:data:`OFFSET`)
so that equal values do not hide each other, and region counts get integer ticks. All
draw on axes they are given, or on a new :class:`matplotlib.figure.Figure` created
without pyplot (nothing global is touched, no display is needed). Nothing calls
``plt.show``.
"""
from __future__ import annotations

import math
from itertools import cycle
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from toolkit.estimators import ESTIMATORS, MEASURABLE

__all__ = ["QUALITY_LABELS", "QUALITY_STYLES", "ESTIMATOR_CURVES", "OFFSET", "plot_layer_quality",
           "plot_layer_quality_regimes", "plot_perturbation"]

#: Legend names of the estimators, as in the paper (:data:`toolkit.estimators.ESTIMATORS`).
QUALITY_LABELS = {name: ESTIMATORS[name].legend for name in MEASURABLE}
#: Colour, marker and line style per estimator.
QUALITY_STYLES = {
    "random": dict(color="0.45", marker="x", linestyle="--"),
    "filter": dict(color="tab:blue", marker="s", linestyle="-."),
    "linear": dict(color="tab:orange", marker="o", linestyle="-", markerfacecolor="none",
                   markersize=8),
    "two_component": dict(color="tab:red", marker="^", linestyle=":"),
}
#: Sideways shift between the estimators' lines in the layer-quality figure (in layers).
OFFSET = 0.07

#: The identity estimator has no pattern: PatternAttribution with it is LRP-z.
_IDENTITY_CURVE = (r"$S_x$ (gradient $\times$ input, LRP-z)",
                   dict(color="tab:green", marker="D", linestyle="-."))
#: The paper's Figure 5: PatternAttribution with each estimator (keys as in
#: :func:`toolkit.compare.perturb_all`), with legend labels and styles.
ESTIMATOR_CURVES = {
    e.attribution: _IDENTITY_CURVE if e.pattern == "none" else (e.legend, QUALITY_STYLES[e.name])
    for e in ESTIMATORS.values() if e.attribution
} | {"random": ("random order", QUALITY_STYLES["random"])}

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_LINESTYLES = ("-", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1)))


def _axes(ax, size=(6.4, 3.6)):
    if ax is not None:
        return ax
    return Figure(figsize=size, layout="constrained").add_subplot()


def _layer_ticks(ax, layers: Sequence[str]) -> None:
    """Layer names as x ticks, slanted when they would not fit side by side."""
    slanted = len(layers) > 6 or sum(len(name) for name in layers) > 36
    ax.set_xticks(list(range(len(layers))), layers, rotation=40 if slanted else 0,
                  ha="right" if slanted else "center", rotation_mode="anchor" if slanted else "default")
    ax.set_xlabel("layer")


def _mean(result, layer: str, name: str) -> float:
    """The layer's mean, NaN where the result does not hold the layer."""
    return result.mean[layer][name] if layer in result.mean else math.nan


def plot_layer_quality(result, ax=None, estimators: Sequence[str] | None = None,
                       title: str | None = None, layers: Sequence[str] | None = None,
                       legend: bool = True):
    """Draw ``rho(S)`` for every layer: layers on the x axis, one line per estimator.

    Parameters
    ----------
    result : toolkit.quality.QualityResult
    ax : matplotlib Axes, optional
    estimators : sequence of str, optional
        Which of ``result.estimators`` to draw (default all, in the result's order).
    title : str, optional
    layers : sequence of str, optional
        The x axis (default ``result.layers``); layers the result lacks are gaps.
    legend : bool
        Draw the legend.

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    estimators = result.estimators if estimators is None else tuple(estimators)
    missing = [e for e in estimators if e not in result.estimators]
    if missing:
        raise ValueError(f"the result holds no values for {missing}; it has {result.estimators}")
    layers = list(result.layers if layers is None else layers)
    middle = (len(estimators) - 1) / 2
    for k, name in enumerate(estimators):
        style = QUALITY_STYLES.get(name, dict(marker=_MARKERS[k % len(_MARKERS)]))
        ax.plot([i + (k - middle) * OFFSET for i in range(len(layers))],
                [_mean(result, layer, name) for layer in layers],
                label=QUALITY_LABELS.get(name, name), **style)
    _layer_ticks(ax, layers)
    ax.set_ylabel(r"$\rho(S)$")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, axis="y", alpha=0.3)
    if legend:
        ax.legend(loc="best", frameon=False)
    if title:
        ax.set_title(title)
    return ax


def plot_layer_quality_regimes(results: Mapping[str, object], title: str | None = None,
                               difference: bool = True, size: tuple[float, float] = (4.2, 3.4),
                               columns: int = 3) -> Figure:
    """Several layer-quality measurements side by side, and ``rho(S_a+-) - rho(S_a)``.

    Parameters
    ----------
    results : mapping of panel title -> toolkit.quality.QualityResult
        E.g. ``{"all samples": layer_quality(...), "active samples":
        layer_quality(..., regime="active")}``. The first result's layers are the x axis
        of every panel; a layer another result lacks is a gap.
    title : str, optional
        Title of the whole figure.
    difference : bool
        Add a last panel with ``rho(S_a+-) - rho(S_a)`` per layer, one line per result
        (needs both estimators): above 0 the two-component estimator is better.
    size : (float, float)
        Inches per panel.
    columns : int
        Panels per row (more panels wrap to further rows).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not results:
        raise ValueError("give at least one QualityResult")
    first = next(iter(results.values()))
    layers = list(first.layers)
    panels = len(results) + bool(difference)
    cols = min(panels, columns)
    rows = -(-panels // cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in grid[panels:]:
        ax.remove()
    axes = grid[:panels]
    for ax, (name, result) in zip(axes, results.items()):
        plot_layer_quality(result, ax, title=name, layers=layers, legend=ax is axes[0])
    if difference:
        ax = axes[-1]
        styles = cycle(zip(_MARKERS, _LINESTYLES, ("k", "tab:purple", "tab:brown", "tab:cyan")))
        for name, result in results.items():
            missing = {"linear", "two_component"} - set(result.estimators)
            if missing:
                raise ValueError(f"the difference panel needs {sorted(missing)} in {name!r}")
            marker, linestyle, color = next(styles)
            ax.plot(range(len(layers)),
                    [_mean(result, layer, "two_component") - _mean(result, layer, "linear")
                     for layer in layers], marker=marker, linestyle=linestyle, color=color, label=name)
        ax.axhline(0, color="0.6", linewidth=0.8)
        _layer_ticks(ax, layers)
        ax.set_ylabel(r"$\rho(S_{a\pm}) - \rho(S_a)$")
        ax.set_title(r"$S_{a\pm}$ better above 0")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="best", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_perturbation(curves: Mapping[str, object], ax=None, title: str | None = None,
                      styles: Mapping[str, dict] | None = None, labels: Mapping[str, str] | None = None):
    """Draw perturbation curves: probability of the initial class vs perturbed regions.

    Parameters
    ----------
    curves : mapping of name -> toolkit.perturbation.PerturbationResult
        One line each, in the mapping's order; results with ``order="random"`` are drawn
        dashed and grey unless ``styles`` says otherwise. The legend shows each AOPC.
    ax : matplotlib Axes, optional
    title : str, optional
    styles : mapping of name -> dict, optional
        Line properties per name (e.g. the styles of :data:`ESTIMATOR_CURVES`); the
        others get a marker and line style of their own in turn.
    labels : mapping of name -> str, optional
        Legend labels (default the names).

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    if not curves:
        raise ValueError("give at least one perturbation result to plot")
    styles, labels = dict(styles or {}), dict(labels or {})
    own = cycle(zip(_LINESTYLES, _MARKERS))
    for name, result in curves.items():
        steps = list(range(len(result.curve)))
        if name in styles:
            style = dict(styles[name])
        elif result.order == "random":
            style = dict(linestyle="--", color="black", marker="x")
        else:
            linestyle, marker = next(own)
            style = dict(linestyle=linestyle, marker=marker)
        style.setdefault("markevery", max(1, len(steps) // 10))
        ax.plot(steps, result.curve.tolist(), label=f"{labels.get(name, name)} (AOPC {result.aopc:.3f})",
                **style)
    first = next(iter(curves.values()))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"perturbed regions ({first.region_label})")
    ax.set_ylabel("probability of the initial class")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", frameon=False)
    if title:
        ax.set_title(title)
    return ax
