"""Recordings and their explanations: channel x time images and scalp topographies.

A multichannel recording, its true signal and every explanation of it are
``channels x time`` arrays; they are drawn as images with one row per electrode
(:func:`channel_time_image`, :func:`channel_time_grid`) and, at one moment, as a
topography: the values at the electrodes interpolated over a disc seen from above, nose
up (:func:`topography`). :func:`maps_and_topographies` puts both side by side for several
maps -- the figure of Haufe et al. (2014): a decoder's filter against its pattern.

Every value is drawn with a diverging colour map and limits symmetric about 0 (red
positive, blue negative). Figures are plain :class:`matplotlib.figure.Figure` objects
(no pyplot state). The topography interpolates with a thin-plate spline (SciPy) inside
the head's outline; nothing else is needed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Polygon

__all__ = ["CMAP", "channel_time_image", "topography", "maps_and_topographies", "channel_time_grid"]

#: The diverging colour map of every figure here.
CMAP = "RdBu_r"
#: Radius of the drawn head outline, in the units of the electrode positions (the ring
#: through Fp1, T7, Oz and T8 lies at 1).
HEAD_RADIUS = 1.08


def _values(values, name: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    a = np.asarray(values, dtype=float)
    if a.ndim == ndim + 1 and a.shape[0] == 1:  # one map with a leading channel axis
        a = a[0]
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return a


def _limit(a: np.ndarray) -> float:
    limit = float(np.abs(a).max())
    return limit if limit > 0 else 1.0


def _axes(ax, size=(4.0, 2.5)):
    return ax if ax is not None else Figure(figsize=size, layout="constrained").add_subplot()


def channel_time_image(values, times: Sequence[float], channels: Sequence[str], ax=None,
                       title: str | None = None, limit: float | None = None, labels: bool = True):
    """Draw a ``(channels, times)`` map as an image, one row per electrode.

    Parameters
    ----------
    values : array or tensor, (channels, times) (or (1, channels, times))
    times : sequence of float
        The time of every column in seconds.
    channels : sequence of str
        The electrode of every row, drawn top to bottom.
    ax : matplotlib Axes, optional
    title : str, optional
    limit : float, optional
        Colour limits ``(-limit, limit)``; default the largest absolute value.
    labels : bool
        Write the electrode names and the time axis.

    Returns
    -------
    matplotlib.image.AxesImage
    """
    a = _values(values, "values", 2)
    times = np.asarray(times, dtype=float)
    if a.shape != (len(channels), len(times)):
        raise ValueError(f"values of shape {a.shape} do not match {len(channels)} channels x "
                         f"{len(times)} times")
    ax = _axes(ax)
    step = times[1] - times[0] if len(times) > 1 else 1.0
    limit = _limit(a) if limit is None else limit
    image = ax.imshow(a, cmap=CMAP, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest",
                      extent=(times[0] - step / 2, times[-1] + step / 2, len(channels) - 0.5, -0.5))
    if labels:
        ax.set_yticks(range(len(channels)), channels, fontsize=6)
        ax.set_xlabel("time (s)")
    else:
        ax.set_yticks([])
        ax.set_xticks([])
    if title is not None:
        ax.set_title(title)
    return image


def topography(values, positions, ax=None, title: str | None = None, limit: float | None = None,
               names: Sequence[str] | None = None, resolution: int = 64):
    """Draw values at the electrodes as a scalp map seen from above, nose up.

    Parameters
    ----------
    values : array or tensor, (channels,)
    positions : array, (channels, 2)
        Electrode positions (x to the right, y to the front), as
        :attr:`toolkit.timeseries.Recordings.positions`.
    ax : matplotlib Axes, optional
    title : str, optional
    limit : float, optional
        Colour limits ``(-limit, limit)``; default the largest absolute value.
    names : sequence of str, optional
        Electrode names, written next to their dots.
    resolution : int
        Grid points across the head.

    Returns
    -------
    matplotlib.image.AxesImage
    """
    from scipy.interpolate import RBFInterpolator

    v = _values(values, "values", 1)
    positions = np.asarray(positions, dtype=float)
    if positions.shape != (len(v), 2):
        raise ValueError(f"positions must be shaped ({len(v)}, 2), got {positions.shape}")
    ax = _axes(ax, size=(2.5, 2.5))
    grid = np.linspace(-HEAD_RADIUS, HEAD_RADIUS, resolution)
    gx, gy = np.meshgrid(grid, grid)
    points = np.column_stack([gx.ravel(), gy.ravel()])
    surface = RBFInterpolator(positions, v, kernel="thin_plate_spline")(points).reshape(gx.shape)
    surface[gx ** 2 + gy ** 2 > HEAD_RADIUS ** 2] = np.nan
    limit = _limit(v) if limit is None else limit
    image = ax.imshow(surface, cmap=CMAP, vmin=-limit, vmax=limit, origin="lower", interpolation="bilinear",
                      extent=(-HEAD_RADIUS, HEAD_RADIUS, -HEAD_RADIUS, HEAD_RADIUS))
    ax.contour(gx, gy, surface, levels=np.linspace(-limit, limit, 9), colors="k", linewidths=0.3, alpha=0.5)
    _head(ax)
    ax.plot(positions[:, 0], positions[:, 1], "k.", markersize=2.5)
    for name, (x, y) in zip(names or (), positions):
        ax.annotate(name, (x, y), xytext=(0, 2.5), textcoords="offset points", ha="center", fontsize=5)
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.25, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")
    if title is not None:
        ax.set_title(title)
    return image


def _head(ax) -> None:
    """The outline of the head, the nose (up) and the ears."""
    r = HEAD_RADIUS
    ax.add_patch(Circle((0, 0), r, fill=False, linewidth=1))
    ax.add_patch(Polygon([(-0.12, r - 0.01), (0, r + 0.17), (0.12, r - 0.01)], closed=False, fill=False,
                         linewidth=1))
    for side in (-1, 1):
        ax.add_patch(Polygon([(side * r, 0.15), (side * (r + 0.08), 0.1), (side * (r + 0.08), -0.1),
                              (side * r, -0.15)], closed=False, fill=False, linewidth=1))


def maps_and_topographies(maps: Mapping[str, object], times: Sequence[float], channels: Sequence[str],
                          positions, at: float, title: str | None = None, size: float = 2.4) -> Figure:
    """Several ``(channels, times)`` maps side by side: each as a channel x time image
    (top) and as a topography at the time ``at`` (bottom), the moment marked by a line.

    Each map keeps its own colour limits: the figure compares shapes, not sizes (a
    filter and a pattern live in different units).

    Parameters
    ----------
    maps : dict title -> array (channels, times)
    times, channels, positions
        As for :func:`channel_time_image` and :func:`topography`.
    at : float
        The time, in seconds, of the topographies (the nearest column is drawn).
    title : str, optional
    size : float
        Inches per column.
    """
    if not maps:
        raise ValueError("give at least one map")
    times = np.asarray(times, dtype=float)
    column = int(np.argmin(np.abs(times - at)))
    fig = Figure(figsize=(size * len(maps), 2 * size), layout="constrained")
    axes = fig.subplots(2, len(maps), squeeze=False, height_ratios=(1.1, 1))
    for j, (name, values) in enumerate(maps.items()):
        a = _values(values, name, 2)
        channel_time_image(a, times, channels, axes[0, j], title=name, labels=j == 0)
        axes[0, j].axvline(times[column], color="k", linewidth=0.6, linestyle="--")
        if j:
            axes[0, j].set_xticks([])
        topography(a[:, column], positions, axes[1, j], names=channels if j == 0 else None)
    axes[1, 0].set_title(f"at {times[column]:.2f} s", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def channel_time_grid(columns: Mapping[str, object], times: Sequence[float], channels: Sequence[str],
                      titles: Mapping[str, str] | None = None, row_labels: Sequence[str] | None = None,
                      size: tuple[float, float] = (1.9, 1.3)) -> Figure:
    """Maps of several samples (rows) by several methods (columns), one row per electrode
    in each picture, each picture with its own symmetric colour limits.

    Parameters
    ----------
    columns : dict name -> array or tensor, (N, channels, times)
        One entry per column; ``(N, 1, channels, times)`` and ``(N, channels, 1, times)``
        are read alike.
    times, channels
        As for :func:`channel_time_image`.
    titles : dict name -> str, optional
        Column titles (default the names).
    row_labels : sequence of str, optional
        One label per sample.
    size : (float, float)
        Inches per picture.
    """
    if not columns:
        raise ValueError("give at least one column")
    arrays = {}
    for name, values in columns.items():
        a = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(values, float)
        arrays[name] = a.reshape(a.shape[0], len(channels), len(times))
    rows = len(next(iter(arrays.values())))
    if any(len(a) != rows for a in arrays.values()):
        raise ValueError("every column must hold the same number of samples")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} samples")
    titles = dict(titles or {})
    fig = Figure(figsize=(size[0] * len(arrays), size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, len(arrays), squeeze=False)
    for j, (name, a) in enumerate(arrays.items()):
        for i in range(rows):
            channel_time_image(a[i], times, channels, axes[i, j], labels=False)
        axes[0, j].set_title(titles.get(name, name), fontsize=8)
    for i in range(rows):
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
    return fig
