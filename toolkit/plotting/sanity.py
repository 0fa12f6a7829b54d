"""Figures of the sanity checks (:mod:`toolkit.sanity`) and of the ``mean_y`` evidence
(:mod:`toolkit.convention`), in the style of the papers that introduced the checks.

* :func:`invariance_grid` -- for one image, each method's explanation of the network and
  of its shifted twin, and their difference (Kindermans et al. 2017);
* :func:`randomization_grid` -- one image's explanations as the layers are randomised,
  one row per method, the original first (Adebayo et al. 2018, Figure 2);
* :func:`plot_randomization` -- the similarity to the original explanation against the
  randomised layers, one line per method with its bootstrap interval as a band;
* :func:`plot_toy_shift` -- the 2-D toy without and with a distractor mean: the masked
  ``a_+`` stays on the signal, the global one turns;
* :func:`plot_sample_size` -- the pattern error of both conventions against the number of
  fitting samples.

All draw on a new :class:`matplotlib.figure.Figure` (no pyplot, nothing global) and return it.
"""
from __future__ import annotations

from itertools import cycle
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from toolkit.linear import MEAN_Y_CONVENTIONS
from toolkit.plotting.images import heatmap, input_image, signal_image
from toolkit.plotting.toy import COLORS, plot_toy_panel

__all__ = ["CONVENTION_STYLES", "invariance_grid", "randomization_grid", "plot_randomization",
           "plot_toy_shift", "plot_sample_size"]

_DRAW = {"signal": signal_image, "attribution": heatmap}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")
_LINESTYLES = ("-", "-.", ":", "--", (0, (5, 1, 1, 1)), (0, (3, 1)))

#: How each ``mean_y`` convention is drawn: label, colour, line style.
CONVENTION_STYLES = {
    "masked": (r"$E_+[y]$ (masked)", "#7b3294", "-"),
    "global": (r"$E[y]$ (global)", "#e08214", "--"),
}


def _grid(rows: int, cols: int, size: float):
    figure = Figure(figsize=(size * cols, size * rows), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def invariance_grid(result, index: int = 0, keys: Sequence[tuple] | None = None, size: float = 1.6) -> Figure:
    """One image's explanations by ``f1`` at ``x`` and by the twin ``f2`` at ``x + c``.

    Parameters
    ----------
    result : toolkit.sanity.InvarianceResult
    index : int
        Which explained image.
    keys : sequence of (method, mean_y), optional
        The rows (keys of ``result.explanations``); default all.
    size : float
        Inches per picture.

    Returns
    -------
    Figure
        Rows: the methods; columns: ``f1(x)``, ``f2(x + c)`` (each drawn on its own
        scale) and ``f1 - f2`` on the scale of ``f1``'s explanation, so that an invariant
        method shows an empty third picture.
    """
    from toolkit.methods import REGISTRY

    keys = list(keys or result.explanations)
    figure, axes = _grid(len(keys), 3, size)
    for row, key in zip(axes, keys):
        e1, e2 = (t[index] for t in result.explanations[key])
        method = REGISTRY[key[0]]
        _DRAW[method.output](e1, row[0])
        _DRAW[method.output](e2, row[1])
        difference = (e1 - e2).double().sum(0)           # summed over channels, like a heatmap
        limit = float(e1.double().sum(0).abs().max()) or 1.0
        row[2].imshow(difference.numpy(), cmap="seismic", vmin=-limit, vmax=limit)
        row[2].set_xticks([])
        row[2].set_yticks([])
        row[0].set_ylabel(method.title + (f"\n{key[1]}" if key[1] else ""), fontsize=8)
    for ax, title in zip(axes[0], (r"$f_1$ at $x$", r"$f_2$ at $x + c$", "difference")):
        ax.set_title(title)
    return figure


def randomization_grid(result, order: str = "cascading", index: int = 0,
                       variants: Sequence[str] | None = None, image=None, size: float = 1.25) -> Figure:
    """One image's explanations as the layers are randomised (rows: methods).

    Parameters
    ----------
    result : toolkit.sanity.RandomizationResult
    order : {"cascading", "independent"}
    index : int
        Which explained image.
    variants : sequence of str, optional
        Rows (``result.variants``); default all.
    image : Tensor, optional
        The input, drawn above the first column.
    size : float

    Returns
    -------
    Figure
        Columns: the original network, then one per step of ``order`` (the named layer
        randomised, and for the cascading order every layer above it too).
    """
    variants = list(variants or result.variants)
    steps = result.steps[order]
    extra = 1 if image is not None else 0
    figure, axes = _grid(len(variants), 1 + len(steps) + extra, size)
    for number, (row, variant) in enumerate(zip(axes, variants)):
        draw = _DRAW[result.outputs[variant]]
        if image is not None and number == 0:
            input_image(image, row[0])
        elif image is not None:
            row[0].set_axis_off()
        draw(result.original[variant.removesuffix(" (stale)")][index], row[extra])
        for ax, step in zip(row[extra + 1:], steps):
            draw(result.randomized[order][step][variant][index], ax)
        row[extra].set_ylabel(result.titles[variant].replace(" (stale)", "\n(stale)"), fontsize=8)
    headers = (["input"] if image is not None else []) + ["original"] + list(steps)
    for ax, header in zip(axes[0], headers):
        ax.set_title(header, fontsize=8)
    figure.suptitle(f"{order} randomisation, top layer first" if order == "cascading"
                    else "independent randomisation, one layer at a time", fontsize=10)
    return figure


def plot_randomization(result, order: str = "cascading", metrics: Sequence[str] = ("spearman", "ssim"),
                       variants: Sequence[str] | None = None) -> Figure:
    """The mean similarity to the original explanation against the randomised layers.

    One panel per metric, one line per variant with its bootstrap interval as a band;
    the x axis starts at the original network (similarity 1).
    """
    variants = list(variants or result.variants)
    steps = result.steps[order]
    figure = Figure(figsize=(5.2 * len(metrics), 3.8), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    names = {"spearman": r"Spearman rank correlation of $|r|$", "ssim": r"SSIM of $|r|$"}
    for ax, metric in zip(axes, metrics):
        summary = result.summary(order, metric)
        styles = cycle(zip(_LINESTYLES, _MARKERS))
        x = np.arange(len(steps) + 1)
        for variant in variants:
            mean, low, high, _ = (np.array(v, dtype=float) for v in zip(*summary[variant]))
            linestyle, marker = next(styles)
            line, = ax.plot(x, np.r_[1.0, mean], linestyle=linestyle, marker=marker, markersize=4,
                            label=result.titles[variant])
            ax.fill_between(x[1:], low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xticks(x, ["original", *steps], rotation=40, ha="right", rotation_mode="anchor")
        ax.set_ylabel(names.get(metric, metric))
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("randomised " + ("down to this layer" if order == "cascading" else "layer"))
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8)
    return figure


def plot_toy_shift(shift, max_points: int = 600) -> Figure:
    """The toy without and with a distractor mean, ``a_+`` of both conventions
    (:func:`toolkit.convention.toy_shift`): one panel per noise mean, on the same scale."""
    figure = Figure(figsize=(4.4 * len(shift.noise_means), 4.4), layout="constrained")
    axes = figure.subplots(1, len(shift.noise_means), squeeze=False)[0]
    limits = []
    for ax, nu in zip(axes, shift.noise_means):
        data = shift.data[nu]
        plot_toy_panel(ax, data.x, data.y, shift.w[nu], a_s=shift.a_s, a_d=shift.a_d, legend=False,
                       max_points=max_points, title=rf"distractor mean $\nu = {nu:g}$")
        for convention in MEAN_Y_CONVENTIONS:
            label, color, linestyle = CONVENTION_STYLES[convention]
            a = shift.patterns[nu][convention]
            ax.annotate("", xy=tuple(a), xytext=(0, 0), annotation_clip=False,
                        arrowprops=dict(arrowstyle="-|>", color=color, lw=1.8, linestyle=linestyle,
                                        shrinkA=0, shrinkB=0, mutation_scale=13))
            ax.plot([], [], color=color, linestyle=linestyle, label=f"$a_+$ with {label}")
        ax.plot([], [], color=COLORS["a_s"], lw=4, alpha=0.45, label="signal $a_s$")
        ax.plot([], [], color=COLORS["w"], lw=2.2, label="filter $w$")
        ax.plot([], [], color=COLORS["a_d"], lw=1.6, ls="--", label="distractor $a_d$")
        limits.append(max(abs(np.asarray(ax.get_xlim())).max(), 1.15 * max(
            np.abs(shift.patterns[nu][c]).max() for c in MEAN_Y_CONVENTIONS)))
    for ax in axes:
        ax.set_xlim(-max(limits), max(limits))
        ax.set_ylim(-max(limits), max(limits))
    axes[0].legend(loc="upper left", fontsize="small", framealpha=0.85)
    return figure


def plot_sample_size(study, what: str = "error") -> Figure:
    """The mean pattern error ``|a_+ - a_s|`` (or ``rho`` in a regime: ``what="all"`` or
    ``"active"``) of both conventions against the number of fitting samples, with
    bootstrap bands (:func:`toolkit.convention.sample_size_study`)."""
    figure = Figure(figsize=(5.4, 3.6), layout="constrained")
    ax = figure.add_subplot()
    for convention in MEAN_Y_CONVENTIONS:
        label, color, linestyle = CONVENTION_STYLES[convention]
        mean, low, high, _ = (np.array(v, dtype=float) for v in zip(*study.summary(convention, what)))
        ax.plot(study.sizes, mean, color=color, linestyle=linestyle, marker="o", label=label)
        ax.fill_between(study.sizes, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    if what == "error":
        ax.set_yscale("log")
    ax.set_xlabel("fitting samples $n$")
    ax.set_ylabel(r"$|a_+ - a_s|$" if what == "error" else rf"$\rho(S_{{a\pm}})$, {what} samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(f"{study.seeds} fits per size, distractor mean {study.noise_mean:g}")
    return figure
