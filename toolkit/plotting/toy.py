"""Figures of the 2-D signal/distractor toy (sections 2-4 of the paper).

Every function draws on axes it is given (or on a new :class:`matplotlib.figure.Figure`,
created without pyplot so nothing global is touched) and returns what it drew on;
nothing calls ``plt.show``.

* :func:`plot_toy_panel` -- one scatter of ``x`` coloured by ``y`` with the arrows of
  ``a_s``, ``a_d``, the filter ``w`` and any patterns; the building block of the rest.
* :func:`plot_exploration` -- that panel for one :class:`toolkit.linear.Exploration`,
  as the interactive explorer shows it.
* :func:`plot_filter_follows_distractor` -- the seminar's Figure 2: one signal
  direction, several distractor directions, and the filter turning with the distractor
  while the learned pattern stays on the signal.
* :func:`plot_estimator_comparison` -- signal, distractor and attribution of each
  estimator side by side, with ``rho(S)`` in the titles.
* :func:`plot_root_points` -- deep Taylor decomposition of one neuron: a sample, the
  neuron's boundary, and the root points of several estimators with the vector
  ``x - x0`` that each one distributes.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from toolkit import linear
from toolkit.estimators import ESTIMATORS

__all__ = [
    "ESTIMATOR_LABELS",
    "COLORS",
    "plot_toy_panel",
    "plot_exploration",
    "plot_filter_follows_distractor",
    "plot_estimator_comparison",
    "plot_root_points",
]

ESTIMATOR_LABELS = {name: ESTIMATORS[name].label for name in linear.ESTIMATORS}
"""Display names of the estimators, by the names of :data:`toolkit.linear.ESTIMATORS`."""

COLORS = {
    "a_s": "#1b9e77",       # signal direction: green
    "a_d": "#555555",       # distractor direction: grey
    "w": "#d62728",         # filter: red
    "a": "#7b3294",         # learned pattern: purple
    "a+": "#7b3294",
    "a-": "#e08214",        # negative-side pattern: orange
    "signal": "#222222",
}
"""Colours of the arrows, shared by every toy figure."""

_PATTERN_LABELS = {"a": "pattern $a$", "a+": "pattern $a_+$", "a-": "pattern $a_-$"}
_SCATTER_STYLE = dict(cmap="coolwarm", vmin=-1.0, vmax=1.0, s=7, alpha=0.55, linewidths=0)


def _new_axes(nrows, ncols, figsize, **subplot_kw):
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False, **subplot_kw)


def _thin(count, max_points):
    """Indices of at most ``max_points`` evenly spread samples (keeps big scatters fast)."""
    if max_points is None or count <= max_points:
        return slice(None)
    return np.linspace(0, count - 1, max_points).astype(int)


# How each kind of arrow is drawn: width, line style, opacity. The true signal is wide
# and pale so that a filter or pattern on top of it stays visible.
_ARROW_STYLES = {
    "a_s": dict(lw=5.0, linestyle="-", alpha=0.45),
    "a_d": dict(lw=2.0, linestyle="--", alpha=1.0),
    "w": dict(lw=2.6, linestyle="-", alpha=1.0),
    "pattern": dict(lw=1.5, linestyle=(0, (3, 2)), alpha=1.0),
}


def _arrow(ax, vector, color, kind):
    style = _ARROW_STYLES[kind]
    ax.annotate(
        "", xy=(vector[0], vector[1]), xytext=(0.0, 0.0),
        arrowprops=dict(arrowstyle="-|>", color=color, shrinkA=0, shrinkB=0,
                        mutation_scale=13, **style),
        annotation_clip=False,
    )


def _legend_handle(color, label, kind):
    return Line2D([], [], color=color, label=label, **_ARROW_STYLES[kind])


def _symmetric_limit(points, vectors, quantile=99.5):
    """Half-width of a square window that shows most points and every arrow."""
    extent = [np.percentile(np.abs(points), quantile)] if points.size else [1.0]
    extent += [np.abs(v).max() for v in vectors]
    return 1.12 * max(max(extent), 1e-9)


def _check_planar(x):
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"toy figures draw 2-D data; got x of shape {x.shape}")


def plot_toy_panel(ax, x, y, w, a_s=None, a_d=None, patterns=None, signal=None,
                   title=None, legend=True, max_points=800):
    """Draw one toy panel: samples coloured by ``y`` and the model's arrows.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    x : ndarray, shape (n, 2)
        Inputs, drawn as a scatter coloured by ``y`` (blue -1 ... red +1).
    y : ndarray, shape (n,)
    w : ndarray, shape (2,)
        The filter, drawn as a red arrow.
    a_s, a_d : ndarray, shape (2,), optional
        True signal (green) and distractor (grey, dashed) directions.
    patterns : dict[str, ndarray], optional
        Learned patterns by label (``"a"``, ``"a+"``, ``"a-"``), drawn as arrows.
    signal : ndarray, shape (n, 2), optional
        An estimated signal ``S(x)``, drawn as small dark dots.
    title : str, optional
    legend : bool
        Whether to draw the legend of the arrows.
    max_points : int or None
        Draw at most this many samples (evenly thinned); ``None`` draws all.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax``.
    """
    x = np.asarray(x, dtype=float)
    _check_planar(x)
    patterns = patterns or {}
    keep = _thin(len(x), max_points)
    ax.scatter(x[keep, 0], x[keep, 1], c=np.asarray(y)[keep], **_SCATTER_STYLE)
    handles = []
    if signal is not None:
        signal = np.asarray(signal, dtype=float)
        ax.scatter(signal[keep, 0], signal[keep, 1], s=3, color=COLORS["signal"], alpha=0.6,
                   linewidths=0)
        handles.append(Line2D([], [], ls="", marker="o", ms=3, color=COLORS["signal"],
                              label="estimated signal $S(x)$"))

    arrows = []
    if a_d is not None:
        ax.axline((0.0, 0.0), tuple(a_d), color=COLORS["a_d"], lw=0.8, ls=":", zorder=1)
        arrows.append((a_d, COLORS["a_d"], "distractor $a_d$", "a_d"))
    if a_s is not None:
        arrows.append((a_s, COLORS["a_s"], "signal $a_s$", "a_s"))
    arrows.append((w, COLORS["w"], "filter $w$", "w"))
    arrows += [(vector, COLORS.get(label, COLORS["a"]), _PATTERN_LABELS.get(label, label),
                "pattern") for label, vector in patterns.items()]
    for vector, color, label, kind in arrows:
        _arrow(ax, np.asarray(vector, dtype=float), color, kind)
        handles.append(_legend_handle(color, label, kind))

    limit = _symmetric_limit(x[keep], [np.asarray(v) for v, *_ in arrows])
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.85", lw=0.6, zorder=0)
    ax.axvline(0, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(handles=handles, loc="upper left", fontsize="small", framealpha=0.85)
    return ax


def _format_rho(value):
    return "undefined" if value is None else f"{value:.3f}"


def plot_exploration(ax, exploration, legend=True, max_points=800):
    """The explorer's panel: the toy with the highlighted estimator's pattern(s).

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    exploration : toolkit.linear.Exploration
        Result of :func:`toolkit.linear.explore`.
    legend : bool
        Whether to draw the legend of the arrows.
    max_points : int or None
        Draw at most this many samples.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax``, titled with the estimator and ``rho(S)`` (measured on held-out samples).
    """
    name = exploration.selected
    estimator = exploration.estimators[name]
    data = exploration.data
    plot_toy_panel(
        ax, data.x, data.y, exploration.w, a_s=exploration.a_s, a_d=exploration.a_d,
        patterns=exploration.patterns[name], signal=estimator.signal(data.x),
        legend=legend, max_points=max_points,
    )
    # Titles as texts of the axes, so that a redraw of the axes' artists updates them;
    # the value is plain text (no mathtext), cheap to lay out anew at every update.
    heading = dict(transform=ax.transAxes, va="bottom", fontsize="large")
    ax.text(0.0, 1.015, ESTIMATOR_LABELS[name], ha="left", **heading)
    ax.text(1.0, 1.015, f"ρ(S) = {_format_rho(exploration.rho[name])}", ha="right", **heading)
    return ax


def plot_filter_follows_distractor(distractor_angles=(90, 45, 135, 30), signal_angle=0.0,
                                   n=500, noise_mean=0.0, noise_std=1.0, seed=0, axes=None):
    """The seminar's Figure 2: one signal, several distractors, one panel each.

    For every distractor direction the filter ``w`` is learned by least squares and the
    linear pattern ``a`` by :class:`toolkit.linear.LinearEstimator`. ``w`` is orthogonal
    to the distractor, so it swings from panel to panel (only when ``a_d`` is orthogonal
    to ``a_s`` does it point along the signal); ``a`` stays on ``a_s``.

    Parameters
    ----------
    distractor_angles : sequence of float
        Directions of ``a_d`` in degrees, one panel each; none parallel to the signal.
    signal_angle : float
        Direction of ``a_s`` in degrees.
    n, noise_mean, noise_std, seed
        Passed to :func:`toolkit.linear.make_data` (the same seed in every panel).
    axes : sequence of Axes, optional
        One per distractor; by default a new figure with one row.

    Returns
    -------
    figure : matplotlib.figure.Figure
    axes : ndarray of Axes
    """
    if axes is None:
        count = len(distractor_angles)
        figure, grid = _new_axes(1, count, figsize=(3.4 * count, 3.9))
        axes = grid[0]
    axes = np.asarray(axes, dtype=object).ravel()
    if len(axes) != len(distractor_angles):
        raise ValueError(f"got {len(axes)} axes for {len(distractor_angles)} distractor angles")
    a_s = linear.direction(signal_angle)
    for index, (ax, angle) in enumerate(zip(axes, distractor_angles)):
        a_d = linear.direction(angle)
        data = linear.make_data(n, a_s, a_d, noise_mean, noise_std, seed=seed)
        w = linear.fit_filter(data.x, data.y)
        pattern = linear.LinearEstimator().fit(data.x, w).pattern_
        shown = np.round(w, 2) + 0.0  # + 0.0 turns -0.0 into 0.0
        plot_toy_panel(ax, data.x, data.y, w, a_s=a_s, a_d=a_d, patterns={"a": pattern},
                       title=f"$a_d$ at {angle:g}°:  $w$ = ({shown[0]:.2f}, {shown[1]:.2f})",
                       legend=False)
    limit = max(ax.get_xlim()[1] for ax in axes)  # one window for all panels
    for ax in axes:
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
    figure = axes[0].figure
    handles = _figure2_handles()
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                  fontsize="small")
    figure.colorbar(axes[0].collections[0], ax=list(axes), shrink=0.8, label="$y$", pad=0.01)
    return figure, axes


def _figure2_handles():
    return [
        _legend_handle(COLORS["a_s"], "signal $a_s$", "a_s"),
        _legend_handle(COLORS["a_d"], "distractor $a_d$", "a_d"),
        _legend_handle(COLORS["w"], "filter $w$", "w"),
        _legend_handle(COLORS["a"], "learned pattern $a$ (linear $S_a$)", "pattern"),
    ]


def _best_readout(distractor, y):
    """``v^T d`` for the ``v`` that correlates best with ``y``, standardised.

    The best ``v`` is the least-squares regression of ``y`` on ``d``, the same read-out
    whose correlation :func:`toolkit.linear.quality` measures.
    """
    d_centred = distractor - distractor.mean(axis=0)
    v = np.linalg.lstsq(d_centred, y - y.mean(), rcond=None)[0]
    readout = d_centred @ v
    spread = readout.std()
    return readout / spread if spread > 0 else readout


def plot_estimator_comparison(exploration, names=("identity", "filter", "linear", "two_component"),
                              axes=None, max_points=500):
    """Signal, distractor, distractor read-out and attribution of several estimators.

    One column per estimator, applied to the held-out samples of ``exploration`` (the
    samples ``rho`` is measured on), and four rows:

    1. the estimated signal ``S(x)``; the true signal lies on the green ``a_s`` line.
    2. the estimated distractor ``x - S(x)``; the true one lies on the grey ``a_d``
       line. In 2-D every estimator of the form ``a y`` with ``w^T a = 1`` leaves a
       distractor on that line -- whether it still carries ``y`` shows in the colours,
       and more clearly in
    3. the best linear read-out ``v^T (x - S(x))`` (standardised) against ``y``: what
       :func:`toolkit.linear.quality` measures. A tilted cloud means the distractor
       still contains signal, ``rho(S) = 1 - |corr|``.
    4. the attribution ``r = w * S(x)`` in the plane ``(r_1, r_2)``; the dashed line is
       the true attribution ``w * a_s y``. For ``a_s = (1, 0)`` it is the ``r_1`` axis:
       all of ``y`` is credited to the one input that carries the signal.

    Parameters
    ----------
    exploration : toolkit.linear.Exploration
        Result of :func:`toolkit.linear.explore`.
    names : sequence of str
        Estimators to show, by name.
    axes : ndarray of Axes, shape (4, len(names)), optional
    max_points : int or None
        Draw at most this many samples per panel.

    Returns
    -------
    figure : matplotlib.figure.Figure
    axes : ndarray of Axes, shape (4, len(names))
    """
    if axes is None:
        figure = Figure(figsize=(3.0 * len(names) + 0.6, 12.0), layout="constrained")
        axes = figure.subplots(4, len(names), squeeze=False)
    axes = np.asarray(axes, dtype=object).reshape(4, len(names))
    data, w = exploration.held_out, exploration.w
    keep = _thin(len(data.x), max_points)
    x, y = data.x, data.y
    planes = {0: [], 1: [], 3: []}  # rows drawn in a plane share one square window
    for column, name in enumerate(names):
        estimator = exploration.estimators[name]
        signal = estimator.signal(x)
        distractor = x - signal
        rows = {
            0: (signal, exploration.a_s, COLORS["a_s"]),
            1: (distractor, exploration.a_d, COLORS["a_d"]),
            3: (w * signal, w * exploration.a_s, COLORS["w"]),
        }
        for row, (points, reference, color) in rows.items():
            ax = axes[row, column]
            ax.axline((0.0, 0.0), tuple(reference), color=color, lw=1.2, ls="--", zorder=1)
            ax.scatter(points[keep, 0], points[keep, 1], c=y[keep], **_SCATTER_STYLE)
            planes[row].append(points[keep])

        ax = axes[2, column]
        rho = exploration.rho[name]
        if rho is None:
            ax.text(0.5, 0.5, "distractor is 0:\nnothing to read out", ha="center",
                    va="center", transform=ax.transAxes, color="0.35")
        else:
            readout = _best_readout(distractor, y)
            ax.scatter(y[keep], readout[keep], c=y[keep], **_SCATTER_STYLE)
            ax.text(0.03, 0.96, f"corr = {1.0 - rho:.3f}", transform=ax.transAxes, va="top",
                    fontsize="small")
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-4.0, 4.0)
        ax.set_xlabel("$y$")
        axes[0, column].set_title(f"{ESTIMATOR_LABELS[name]}\n$\\rho(S)$ = {_format_rho(rho)}")

    for row, points in planes.items():
        limit = _symmetric_limit(np.concatenate(points), [])
        for ax in axes[row]:
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
            ax.set_aspect("equal")
    labels = ("estimated signal $S(x)$", "estimated distractor $d = x - S(x)$",
              "best read-out $v^T d$ (standardised)", "attribution $r = w \\odot S(x)$")
    for ax, label in zip(axes[:, 0], labels):
        ax.set_ylabel(label)
    for ax in axes[:, 1:].ravel():
        ax.tick_params(labelleft=False)
    figure = axes[0, 0].figure
    figure.legend(
        handles=[Line2D([], [], color=COLORS[key], lw=1.2, ls="--", label=label) for key, label in (
            ("a_s", "true signal direction $a_s$"),
            ("a_d", "true distractor direction $a_d$"),
            ("w", "true attribution $w \\odot a_s\\, y$"))],
        loc="outside lower center", ncols=3, fontsize="small",
    )
    return figure, axes


#: Colours of the root points of :func:`plot_root_points`, in the order they are given.
ROOT_COLORS = ("#7b3294", "#1f78b4", "#d62728", "#e08214")


def plot_root_points(ax, x, y, w, sample, roots, bias=0.0, a_s=None, a_d=None, title=None,
                     legend=True, max_points=400):
    """Deep Taylor decomposition of one neuron ``z = w^T x + b`` in the plane.

    Draws the toy panel (:func:`plot_toy_panel`), the neuron's boundary ``w^T x + b = 0``
    (solid black), the explained ``sample`` (a star) and, for every root point ``x0``,
    a dot on it and an arrow from it to the sample: the vector ``x - x0`` whose
    elementwise product with ``w`` deep Taylor decomposition distributes over the inputs
    (docs/math.md, section 7).

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    x : ndarray, shape (n, 2)
    y : ndarray, shape (n,)
    w : ndarray, shape (2,)
    sample : ndarray, shape (2,)
        The explained input.
    roots : dict[str, ndarray]
        Root points by label, each of shape (2,); drawn in the colours of
        :data:`ROOT_COLORS` (at most four).
    bias : float
        The neuron's bias ``b``.
    a_s, a_d : ndarray, shape (2,), optional
        True signal and distractor directions, passed to :func:`plot_toy_panel`.
    title : str, optional
    legend : bool
    max_points : int or None
        Draw at most this many samples.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax``.
    """
    w = np.asarray(w, dtype=float)
    sample = np.asarray(sample, dtype=float)
    points = {label: np.asarray(point, dtype=float) for label, point in roots.items()}
    if w.shape != (2,) or sample.shape != (2,) or any(p.shape != (2,) for p in points.values()):
        raise ValueError("plot_root_points draws one neuron in the plane: w, sample and every "
                         "root point must have shape (2,)")
    if not np.any(w):
        raise ValueError("w is zero: the neuron has no boundary")
    if len(points) > len(ROOT_COLORS):
        raise ValueError(f"at most {len(ROOT_COLORS)} root points, got {len(points)}")
    plot_toy_panel(ax, x, y, w, a_s=a_s, a_d=a_d, title=title, legend=False,
                   max_points=max_points)
    nearest = -bias * w / (w @ w)  # the boundary's point nearest to 0; w turned by 90° runs along it
    ax.axline(tuple(nearest), tuple(nearest + [-w[1], w[0]]), color="black", lw=1.2, zorder=2)
    handles = [_legend_handle(COLORS[key], label, key) for key, label, vector in (
        ("a_s", "signal $a_s$", a_s), ("a_d", "distractor $a_d$", a_d)) if vector is not None]
    handles += [_legend_handle(COLORS["w"], "filter $w$", "w"),
                Line2D([], [], color="black", lw=1.2, label=r"boundary $w^\top x + b = 0$")]
    for (label, point), color in zip(points.items(), ROOT_COLORS):
        ax.annotate("", xy=tuple(sample), xytext=tuple(point), annotation_clip=False,
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=1.8, shrinkA=0, shrinkB=4,
                                    mutation_scale=12))
        ax.plot(*point, "o", color=color, ms=7, mec="white", zorder=4)
        handles.append(Line2D([], [], color=color, marker="o", lw=1.8, label=label))
    ax.plot(*sample, "*", color="black", ms=14, mec="white", zorder=5)
    handles.append(Line2D([], [], ls="", marker="*", ms=11, color="black", label="sample $x$"))
    if legend:
        ax.legend(handles=handles, loc="upper left", fontsize="small", framealpha=0.85)
    return ax
