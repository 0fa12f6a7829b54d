"""Figures of the paper's two evaluations: layer-wise estimator quality and region perturbation.

* :func:`plot_layer_quality` -- ``rho(S)`` per layer, one line per estimator (the
  paper's Figure 3 style: random, S_w, S_a, S_a+-), from :func:`toolkit.quality.layer_quality`.
* :func:`plot_perturbation` -- the probability of the initially predicted class against
  the number of perturbed regions, one line per method, the random baseline dashed, AOPC
  in the legend, from :func:`toolkit.perturbation.region_perturbation`.

Both draw on axes they are given, or on a new :class:`matplotlib.figure.Figure` created
without pyplot (nothing global is touched, no display is needed), and return the axes.
Nothing calls ``plt.show``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure

__all__ = ["QUALITY_LABELS", "QUALITY_STYLES", "plot_layer_quality", "plot_perturbation"]

#: Legend names of the estimators, as in the paper.
QUALITY_LABELS = {
    "random": "random",
    "filter": r"$S_w$",
    "linear": r"$S_a$",
    "two_component": r"$S_{a\pm}$",
}
#: Colour and marker per estimator.
QUALITY_STYLES = {
    "random": dict(color="0.55", marker="x", linestyle="--"),
    "filter": dict(color="tab:blue", marker="s"),
    "linear": dict(color="tab:orange", marker="o"),
    "two_component": dict(color="tab:red", marker="^"),
}


def _axes(ax, size=(6.4, 3.6)):
    if ax is not None:
        return ax
    return Figure(figsize=size, layout="constrained").add_subplot()


def plot_layer_quality(result, ax=None, estimators: Sequence[str] | None = None,
                       title: str | None = None):
    """Draw ``rho(S)`` for every layer: layers on the x axis, one line per estimator.

    Parameters
    ----------
    result : toolkit.quality.QualityResult
    ax : matplotlib Axes, optional
    estimators : sequence of str, optional
        Which of ``result.estimators`` to draw (default all, in the result's order).
    title : str, optional

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    estimators = result.estimators if estimators is None else tuple(estimators)
    missing = [e for e in estimators if e not in result.estimators]
    if missing:
        raise ValueError(f"the result holds no values for {missing}; it has {result.estimators}")
    positions = range(len(result.layers))
    for name in estimators:
        style = QUALITY_STYLES.get(name, dict(marker="o"))
        ax.plot(positions, [result.mean[layer][name] for layer in result.layers],
                label=QUALITY_LABELS.get(name, name), **style)
    ax.set_xticks(list(positions), result.layers, rotation=45 if len(result.layers) > 6 else 0,
                  ha="right" if len(result.layers) > 6 else "center")
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\rho(S)$")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", frameon=False)
    if title:
        ax.set_title(title)
    return ax


def plot_perturbation(curves: Mapping[str, object], ax=None, title: str | None = None):
    """Draw perturbation curves: probability of the initial class vs perturbed regions.

    Parameters
    ----------
    curves : mapping of name -> toolkit.perturbation.PerturbationResult
        One line each, in the mapping's order; results with ``order="random"`` are drawn
        dashed and grey-toned. The legend shows each method's AOPC.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    if not curves:
        raise ValueError("give at least one perturbation result to plot")
    for name, result in curves.items():
        steps = range(len(result.curve))
        random = result.order == "random"
        style = dict(linestyle="--", color="0.45") if random else dict(linestyle="-")
        ax.plot(list(steps), result.curve.tolist(), label=f"{name} (AOPC {result.aopc:.3f})", **style)
    first = next(iter(curves.values()))
    ax.set_xlabel(f"perturbed regions ({first.patch}x{first.patch} pixels)")
    ax.set_ylabel("probability of the initial class")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", frameon=False)
    if title:
        ax.set_title(title)
    return ax
