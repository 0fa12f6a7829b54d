"""Signals and attributions of images, shown the way the paper shows them.

Two kinds of explanation need two kinds of picture:

* a **signal** (PatternNet, DeconvNet, Guided Backprop, the gradient) lives in input
  space, so it is drawn as an image: centred at 0, divided by its largest absolute
  value and mapped to ``[0, 1]`` (0 becomes mid-grey), channels last;
* an **attribution** (PatternAttribution, LRP) says how much each pixel contributes,
  so it is summed over the channels and drawn as a diverging heatmap with symmetric
  limits: red for positive, blue for negative, white for 0.

:func:`explanation_grid` puts several methods side by side for several images, like
the paper's Figures 3, 6 and 7. The figures are plain :class:`matplotlib.figure.Figure`
objects (no pyplot state, no ``plt.show``): save them with ``fig.savefig`` or let
Jupyter display the returned figure.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

__all__ = [
    "to_signal_image",
    "to_attribution_map",
    "to_input_image",
    "signal_image",
    "heatmap",
    "input_image",
    "explanation_grid",
    "prediction_labels",
    "OUTPUTS",
]

#: The outputs of the methods :func:`explanation_grid` draws, and how (as
#: :data:`toolkit.methods.OUTPUTS`, not imported, so that drawing needs no torch).
OUTPUTS = ("signal", "attribution")
HEATMAP_CMAP = "seismic"


# ----------------------------------------------------------------------------------
# arrays: from a (C, H, W) tensor to what is drawn
# ----------------------------------------------------------------------------------
def _as_chw(t, name: str = "t") -> np.ndarray:
    """A (C, H, W) float array from a tensor or array (a (H, W) one gets one channel)."""
    if hasattr(t, "detach"):  # a torch tensor, on any device
        t = t.detach().cpu().double().numpy()
    a = np.asarray(t, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be shaped (C, H, W) or (H, W), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return a


def _channels_last(a: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, C), or (H, W) for one channel."""
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)


def to_signal_image(t) -> np.ndarray:
    """A signal as image values in ``[0, 1]``: ``0.5 + 0.5 * t / max|t|``.

    Parameters
    ----------
    t : Tensor or array, shape (C, H, W) or (H, W)

    Returns
    -------
    ndarray, shape (H, W, C) or (H, W) for one channel
        0 maps to 0.5 (grey); an all-zero signal is all grey.
    """
    a = _as_chw(t)
    scale = np.abs(a).max()
    a = 0.5 + 0.5 * a / scale if scale > 0 else np.full_like(a, 0.5)
    return _channels_last(a)


def to_attribution_map(t) -> tuple[np.ndarray, float]:
    """An attribution summed over channels, with its symmetric colour limit.

    Returns
    -------
    map : ndarray, shape (H, W)
    limit : float
        ``max |map|`` (1 for an all-zero map), for colour limits ``(-limit, limit)``.
    """
    a = _as_chw(t).sum(axis=0)
    limit = float(np.abs(a).max())
    return a, (limit if limit > 0 else 1.0)


def to_input_image(t) -> np.ndarray:
    """An input image as values in ``[0, 1]``, channels last.

    An image already in ``[0, 1]`` is shown as it is; any other (a network input with
    the mean subtracted and divided by the standard deviation, say) is stretched from
    its minimum to its maximum, so it can be shown without knowing the normalisation.
    """
    a = _as_chw(t)
    low, high = a.min(), a.max()
    if low < 0 or high > 1:
        a = (a - low) / (high - low)
    return _channels_last(a)


# ----------------------------------------------------------------------------------
# drawing one picture
# ----------------------------------------------------------------------------------
def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        ax = Figure(figsize=(3, 3)).add_subplot()
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def signal_image(t, ax: Axes | None = None, title: str | None = None) -> AxesImage:
    """Draw a signal as an image (see :func:`to_signal_image`).

    Parameters
    ----------
    t : Tensor or array, shape (C, H, W) or (H, W)
    ax : matplotlib Axes, optional
        Where to draw; a new figure (``result.figure``) if not given.
    title : str, optional

    Returns
    -------
    matplotlib.image.AxesImage
    """
    ax = _axes(ax)
    image = to_signal_image(t)
    im = ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    if title is not None:
        ax.set_title(title)
    return im


def heatmap(t, ax: Axes | None = None, title: str | None = None,
            cmap: str = HEATMAP_CMAP) -> AxesImage:
    """Draw an attribution as a diverging heatmap (see :func:`to_attribution_map`).

    Parameters
    ----------
    t : Tensor or array, shape (C, H, W) or (H, W)
        Summed over the channels; the colour limits are ``(-max|.|, max|.|)``.
    ax : matplotlib Axes, optional
    title : str, optional
    cmap : str
        A diverging colormap, white at the centre ("seismic" or "bwr").

    Returns
    -------
    matplotlib.image.AxesImage
    """
    ax = _axes(ax)
    values, limit = to_attribution_map(t)
    im = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit)
    if title is not None:
        ax.set_title(title)
    return im


def input_image(t, ax: Axes | None = None, title: str | None = None) -> AxesImage:
    """Draw an input image stretched to its own range (see :func:`to_input_image`)."""
    ax = _axes(ax)
    image = to_input_image(t)
    im = ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    if title is not None:
        ax.set_title(title)
    return im


_DRAW = {"signal": signal_image, "attribution": heatmap}


# ----------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------
def _column_titles(names: list[str], titles) -> list[str]:
    if titles is None:
        return names
    if isinstance(titles, Mapping):
        return [titles.get(name, name) for name in names]
    titles = list(titles)
    if len(titles) != len(names):
        raise ValueError(f"got {len(titles)} titles for {len(names)} explanations")
    return titles


def explanation_grid(images, explanations: Mapping[str, object], kinds: Mapping[str, str],
                     titles: Mapping[str, str] | Sequence[str] | None = None,
                     row_labels: Sequence[str] | None = None, size: float = 2.0) -> Figure:
    """Methods side by side (columns) for several images (rows), input first.

    Parameters
    ----------
    images : Tensor or array, shape (N, C, H, W)
        The explained inputs, drawn in the first column.
    explanations : dict name -> Tensor or array, shape (N, C, H, W)
        One entry per method, in column order.
    kinds : dict name -> {"signal", "attribution"}
        Each method's output (:data:`OUTPUTS`; :data:`toolkit.compare.OUTPUTS` has them
        for the registered methods), and so how it is drawn: as an image
        (:func:`signal_image`) or as a heatmap (:func:`heatmap`).
    titles : dict name -> str or sequence of str, optional
        Column titles of the explanations; the names by default.
    row_labels : sequence of str, optional
        One label per image (the class, say), written left of each row.
    size : float
        Inches per picture.

    Returns
    -------
    matplotlib.figure.Figure
    """
    inputs = [_as_chw(image, "images[i]") for image in _batch(images, "images")]
    names = list(explanations)
    for name in names:
        if kinds.get(name) not in OUTPUTS:
            raise ValueError(f"kinds[{name!r}] must be one of {OUTPUTS}, got {kinds.get(name)!r}")
    columns = {name: _batch(explanations[name], name, len(inputs)) for name in names}
    for name, pictures in columns.items():
        if pictures[0].shape[1:] != inputs[0].shape[1:]:
            raise ValueError(f"{name} explanations are {pictures[0].shape[1:]} pixels, the images "
                             f"{inputs[0].shape[1:]}")
    if row_labels is not None and len(row_labels) != len(inputs):
        raise ValueError(f"got {len(row_labels)} row labels for {len(inputs)} images")
    headers = ["input", *_column_titles(names, titles)]

    rows, cols = len(inputs), 1 + len(names)
    fig = Figure(figsize=(size * cols, size * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, image in enumerate(inputs):
        input_image(image, axes[i, 0])
        for j, name in enumerate(names, start=1):
            _DRAW[kinds[name]](columns[name][i], axes[i, j])
        if row_labels is not None:
            axes[i, 0].set_ylabel(_fit_label(row_labels[i], size))
    for ax, header in zip(axes[0], headers):
        ax.set_title(header)
    return fig


def prediction_labels(true, predicted, probability, classes: Sequence[str] | None = None) -> list[str]:
    """Row labels ``"true - predicted (p)"``, as in the paper's Figure 6.

    Parameters
    ----------
    true, predicted : sequence of int (or of str)
        The true and the predicted class of each image (a class index is looked up in
        ``classes``; its text up to the first comma is used).
    probability : sequence of float
        The predicted class's probability.
    classes : sequence of str, optional
        Class names by index.

    Returns
    -------
    list of str
    """
    def name(c):
        c = c.item() if hasattr(c, "item") else c
        text = classes[c] if classes is not None and not isinstance(c, str) else str(c)
        return text.split(",")[0]

    true, predicted = list(true), list(predicted)
    probability = [float(p) for p in probability]
    if not len(true) == len(predicted) == len(probability):
        raise ValueError(f"got {len(true)} true classes, {len(predicted)} predictions and "
                         f"{len(probability)} probabilities")
    return [f"{name(t)} - {name(p)} ({q:.2f})" for t, p, q in zip(true, predicted, probability)]


def _fit_label(text: str, size: float) -> str:
    """Break a long row label (``"true - predicted (p)"``) after its dash, so that it fits
    beside a picture of ``size`` inches (about 9 characters per inch at 10 pt)."""
    lines = str(text).split("\n")
    fitted = []
    for line in lines:
        if len(line) > 9 * size and " - " in line:
            head, tail = line.split(" - ", 1)
            fitted += [f"{head} -", tail]
        else:
            fitted.append(line)
    return "\n".join(fitted)


def _batch(t, name: str, n: int | None = None) -> list:
    """Split an (N, C, H, W) tensor or array into its N pictures."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    a = np.asarray(t, dtype=float)
    if a.ndim != 4:
        raise ValueError(f"{name} must be shaped (N, C, H, W), got {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} holds {a.shape[0]} explanations for {n} images")
    return list(a)
