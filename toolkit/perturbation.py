"""Region perturbation: does destroying the most relevant regions first hurt the model most?

The paper's degradation test (Samek et al. 2017): :func:`region_perturbation` explains
the predicted class of every image, sums the relevance over a grid of non-overlapping
``patch x patch`` regions (or windows of ``patch`` time steps, for recordings), replaces the regions one after another in the order of their
relevance (or at random, the baseline) by their per-channel mean (or 0), records the
softmax probability of the initially predicted class, and summarises the curve by its
AOPC (area over the perturbation curve). The procedure, the regions at the border and
the formula are in docs/math.md, section 5.

Every step is a tensor operation (region sums by a reshape, orders by ``argsort``,
perturbed images of many steps at once); the model sees chunks of ``batch_size``
perturbed images, with no Python loop over images, regions or steps. The random orders
come from one generator seeded with ``seed``, image after image, so the result does not
depend on the batch size. Each image costs one explanation and ``1 + repeats * L``
forward passes.

Recordings ``(N, channels, times)`` -- the input of a network with Conv1d layers -- are
perturbed in windows of ``patch`` time steps across all channels; so are their Conv2d form
``(N, channels, 1, times)``, with the same regions, orders and numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from toolkit.layers import evaluation_mode
from toolkit.streaming import input_batches

__all__ = ["ORDERS", "REPLACEMENTS", "PerturbationResult", "region_perturbation", "aopc",
           "region_relevance", "region_shape"]

ORDERS = ("most_relevant", "least_relevant", "random")
REPLACEMENTS = ("mean", "zero")


# ----------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------
def aopc(curves: Tensor) -> Tensor:
    """Area over the perturbation curve of each row: ``mean_k (f(x^(0)) - f(x^(k)))``.

    ``curves`` is ``(..., L + 1)`` with step 0 (the unperturbed image) first.
    """
    return (curves[..., :1] - curves).mean(-1)


@dataclass
class PerturbationResult:
    """Perturbation curves of one explanation method.

    Attributes
    ----------
    curve : Tensor
        ``(steps + 1,)`` mean over images of the probability of the initially predicted
        class after ``k = 0..steps`` regions were replaced.
    per_image : Tensor
        ``(N, steps + 1)``; for ``order="random"`` the mean over the orderings.
    per_ordering : Tensor
        ``(N, repeats, steps + 1)``: every ordering's curve (``repeats = 1`` unless random).
    per_image_aopc : Tensor
        ``(N,)``.
    aopc : float
        Mean of ``per_image_aopc``: ``1/(L+1) sum_k (f(x^(0)) - f(x^(k)))``, ``L = steps``.
    predicted : Tensor
        ``(N,)`` the initially predicted classes (the explained targets).
    order, replace : str
    patch : int or tuple[int, int]
        As given to :func:`region_perturbation`.
    steps, repeats : int
    grid : tuple[int, int]
        Regions per column and per row.
    region : tuple[int, int], optional
        Height and width of a region (default ``(patch, patch)``).
    one_row : bool
        Whether the inputs had one row (recordings): regions are then windows of time steps.
    """

    curve: Tensor
    per_image: Tensor
    per_ordering: Tensor
    per_image_aopc: Tensor
    aopc: float
    predicted: Tensor
    order: str
    replace: str
    patch: int
    steps: int
    repeats: int
    grid: tuple[int, int]
    region: tuple[int, int] | None = None
    one_row: bool = False

    def __post_init__(self):
        if self.region is None:
            self.region = (self.patch, self.patch)

    @property
    def images(self) -> int:
        return self.per_image.shape[0]

    @property
    def region_label(self) -> str:
        """What one region is, in words: ``"4x4 pixels"`` or ``"8 time steps"``."""
        height, width = self.region
        return f"{width} time steps" if self.one_row else f"{height}x{width} pixels"

    def __str__(self) -> str:
        orderings = f", {self.repeats} orderings per image" if self.order == "random" else ""
        grid = f"{self.grid[1]} windows" if self.one_row else f"a {self.grid[0]}x{self.grid[1]} grid"
        return (f"region perturbation ({self.order}{orderings}; regions of {self.region_label} "
                f"on {grid}, replaced by their {self.replace}): "
                f"{self.images} images, {self.steps} steps, probability "
                f"{float(self.curve[0]):.4f} -> {float(self.curve[-1]):.4f}, AOPC {self.aopc:.4f}")


# ----------------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------------
def region_shape(patch, height: int) -> tuple[int, int]:
    """The ``(height, width)`` of a region: ``patch`` itself if it is a pair; for an int,
    ``patch x patch``, or ``1 x patch`` on inputs of one row (recordings)."""
    if isinstance(patch, tuple):
        return patch
    return (1 if height == 1 else patch), patch


def region_relevance(relevance: Tensor, patch) -> Tensor:
    """Sum ``relevance`` ``(N, C, H, W)`` over channels and regions of
    :func:`region_shape` (``patch x patch``, or ``(height, width)`` for a pair).

    Returns ``(N, gh * gw)``, regions in row-major order; border rows and columns beyond
    the last whole region are left out.
    """
    n, _, h, w = relevance.shape
    ph, pw = region_shape(patch, h)
    gh, gw = h // ph, w // pw
    r = relevance[:, :, :gh * ph, :gw * pw].sum(1)
    return r.reshape(n, gh, ph, gw, pw).sum((2, 4)).reshape(n, gh * gw)


def _orders(regions: Tensor, order: str, repeats: int, generator: torch.Generator) -> Tensor:
    """Region indices in the order they are perturbed: ``(N, repeats, L)``."""
    n, count = regions.shape
    if order == "random":
        keys = torch.rand(n, repeats, count, generator=generator, dtype=torch.float64)
        return keys.argsort(-1).to(regions.device)
    ranking = regions.double().argsort(dim=1, descending=order == "most_relevant", stable=True)
    return ranking[:, None, :]


def _steps_of(orders: Tensor) -> Tensor:
    """Inverse permutation: ``step[i, r, region]`` = position of the region in the order."""
    positions = torch.arange(orders.shape[-1], device=orders.device).expand_as(orders)
    return torch.empty_like(orders).scatter_(-1, orders, positions)


def _replacement(x: Tensor, region: tuple[int, int], replace: str) -> Tensor:
    """The image every region is replaced from: each region's per-channel mean, or 0."""
    if replace == "zero":
        return torch.zeros_like(x)
    (ph, pw), (gh, gw) = region, (x.shape[2] // region[0], x.shape[3] // region[1])
    means = F.avg_pool2d(x[:, :, :gh * ph, :gw * pw], region)
    out = x.clone()
    out[:, :, :gh * ph, :gw * pw] = _upsample(means, region)
    return out


def _upsample(t: Tensor, region: tuple[int, int]) -> Tensor:
    """Repeat every entry of the last two dimensions as often as a region is high and wide
    (one value per region -> one per pixel)."""
    return t.repeat_interleave(region[0], -2).repeat_interleave(region[1], -1)


def _softmax(model, x: Tensor) -> Tensor:
    logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model returned {shape} for inputs of shape {tuple(x.shape)}; "
                         f"expected logits shaped ({x.shape[0]}, classes)")
    return logits.double().softmax(1)


def _probabilities(model, x: Tensor, classes: Tensor) -> Tensor:
    """Softmax probability of ``classes`` (one per image)."""
    return _softmax(model, x).gather(1, classes[:, None])[:, 0]


def _perturbed_curves(model, x: Tensor, replacement: Tensor, step: Tensor,
                      classes: Tensor, steps: int, region: tuple[int, int], batch_size: int) -> Tensor:
    """``f_c(x^(k))`` for ``k = 1..steps`` and every ordering: ``(N, repeats, steps)``.

    All ``N * repeats * steps`` perturbed images are enumerated by one flat index and
    evaluated in chunks of ``batch_size``: image ``i``, ordering ``o`` and step ``k``
    replace the regions whose position in ordering ``o`` is below ``k``.
    """
    n, repeats, _ = step.shape
    h, w = x.shape[2:]
    (ph, pw), (gh, gw) = region, (h // region[0], w // region[1])
    out = torch.empty(n * repeats * steps, dtype=torch.float64, device=x.device)
    for start in range(0, out.numel(), batch_size):
        flat = torch.arange(start, min(start + batch_size, out.numel()), device=x.device)
        image, ordering, k = flat // (repeats * steps), flat // steps % repeats, flat % steps + 1
        regions = (step[image, ordering] < k[:, None]).reshape(-1, 1, gh, gw)
        mask = torch.zeros(len(flat), 1, h, w, dtype=torch.bool, device=x.device)
        mask[:, :, :gh * ph, :gw * pw] = _upsample(regions, region)
        perturbed = torch.where(mask, replacement[image], x[image])
        out[flat] = _probabilities(model, perturbed, classes[image])
    return out.reshape(n, repeats, steps)


# ----------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------
def _check_settings(explainer, patch, steps, replace, order, random_repeats, batch_size) -> None:
    needs_explainer = not (order == "random" and explainer is None)
    if needs_explainer and not callable(getattr(explainer, "attribute", None)):
        raise TypeError(f"explainer must have a method attribute(inputs, target), e.g. "
                        f"toolkit.PatternAttribution(model, patterns); got {type(explainer).__name__}")
    sizes = patch if isinstance(patch, tuple) and len(patch) == 2 else (patch,)
    for name, value in (*(("patch", size) for size in sizes), ("random_repeats", random_repeats),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer or None (all regions), not {steps!r}")
    if replace not in REPLACEMENTS:
        raise ValueError(f"unknown replace={replace!r}; choose from {REPLACEMENTS}")
    if order not in ORDERS:
        raise ValueError(f"unknown order={order!r}; choose from {ORDERS}")


def _check_images(x: Tensor, index: int, patch, steps: int | None, shape) -> int:
    """Validate one batch (images ``(N, C, H, W)``); return the number of steps (all
    regions if ``steps`` is None)."""
    if not x.is_floating_point():
        raise TypeError(f"batch {index}: images must be floating point, got {x.dtype}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"batch {index}: expected images shaped (N, C, H, W) or recordings "
                         f"(N, C, T) with N >= 1, got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(f"batch {index}: images of shape {tuple(x.shape[1:])} differ from the "
                         f"first batch's {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"batch {index} contains NaN or Inf values")
    h, w = x.shape[2:]
    ph, pw = region_shape(patch, h)
    if ph > h or pw > w:
        raise ValueError(f"patch={patch} is larger than the {h}x{w} images")
    count = (h // ph) * (w // pw)
    if steps is not None and steps > count:
        raise ValueError(f"steps={steps} is more than the {count} regions of {ph}x{pw} "
                         f"pixels in a {h}x{w} image")
    return count if steps is None else steps


def _check_relevance(relevance, x: Tensor) -> Tensor:
    if not isinstance(relevance, Tensor) or relevance.shape != x.shape:
        shape = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance).__name__
        raise ValueError(f"explainer.attribute returned {shape} for images of shape {tuple(x.shape)}; "
                         "expected one relevance per input value")
    if not torch.isfinite(relevance).all():
        raise ValueError("explainer.attribute returned NaN or Inf values")
    return relevance.detach()


# ----------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------
def region_perturbation(model: nn.Module, explainer, data, patch: int | tuple[int, int] = 9,
                        steps: int | None = None, replace: str = "mean",
                        order: str = "most_relevant", random_repeats: int = 10, seed: int = 0,
                        batch_size: int = 64, progress: bool = True) -> PerturbationResult:
    """Perturb image regions in the order an explanation ranks them; record the output.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``(N, classes)``; evaluated in eval mode (each
        module's own mode is restored afterwards).
    explainer : object with ``attribute(inputs, target)``
        E.g. ``toolkit.PatternAttribution(model, patterns)``. Called once per batch with
        the predicted classes as targets; must return a relevance shaped like the inputs.
        Unused (and may be None) for ``order="random"``.
    data : Tensor or iterable
        Images ``(N, C, H, W)`` or recordings ``(N, C, T)``, or an iterable of such
        batches or of ``(inputs, labels)`` pairs (labels are ignored: the explained class
        is the predicted one).
    patch : int or (int, int)
        Side of the square regions (9 in the paper), or their ``(height, width)``. On
        inputs of one row -- recordings ``(N, C, T)`` or their Conv2d form
        ``(N, C, 1, T)`` -- an int is the length of a window of time steps (all channels).
    steps : int, optional
        Number of regions to perturb, ``L`` (default: all regions of the grid).
    replace : {"mean", "zero"}
        Replace a region by its own per-channel mean, or by 0.
    order : {"most_relevant", "least_relevant", "random"}
    random_repeats : int
        Orderings per image for ``order="random"``; the curve is their mean.
    seed : int
        Seed of the random orderings.
    batch_size : int
        Images per explanation when ``data`` is a tensor, and perturbed images per
        forward pass.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    PerturbationResult

    Raises
    ------
    TypeError
        If ``explainer`` has no ``attribute`` method, or the images are not floating point.
    ValueError
        For a patch larger than the images, more steps than regions, an unknown
        ``replace`` or ``order``, NaN/Inf in the data or the relevance, no data.
    """
    _check_settings(explainer, patch, steps, replace, order, random_repeats, batch_size)
    repeats = random_repeats if order == "random" else 1
    generator = torch.Generator().manual_seed(int(seed))
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    per_ordering, predicted, shape, length = [], [], None, None
    with tqdm(desc=f"region perturbation ({order})", unit="image", disable=not progress) as bar:
        for index, inputs in enumerate(input_batches(data, batch_size)):
            one_row = inputs.dim() == 3  # recordings (N, C, T), seen as images (N, C, 1, T)
            x = inputs.unsqueeze(2) if one_row else inputs
            forward = (lambda t: model(t.squeeze(2))) if one_row else model
            length = _check_images(x, index, patch, steps, shape)
            shape, region = tuple(x.shape[1:]), region_shape(patch, x.shape[2])
            x, inputs = x.to(device), inputs.to(device)
            with evaluation_mode(model), torch.no_grad():
                probabilities = _softmax(forward, x)
            classes = probabilities.argmax(1)
            start = probabilities.gather(1, classes[:, None])[:, 0]
            if order == "random":  # the relevance is not needed
                regions = region_relevance(torch.zeros_like(x), region)
            else:
                relevance = _check_relevance(explainer.attribute(inputs, classes), inputs)
                regions = region_relevance(relevance.reshape(x.shape), region)
            step = _steps_of(_orders(regions, order, repeats, generator))
            with evaluation_mode(model), torch.no_grad():
                later = _perturbed_curves(forward, x, _replacement(x, region, replace), step, classes,
                                          length, region, batch_size)
            per_ordering.append(torch.cat([start[:, None, None].expand(-1, repeats, 1), later], 2).cpu())
            predicted.append(classes.cpu())
            bar.update(x.shape[0])
    if not per_ordering:
        raise ValueError("data holds no images: nothing to perturb")

    curves = torch.cat(per_ordering)
    per_image = curves.mean(1)
    per_image_aopc = aopc(per_image)
    (h, w), (ph, pw) = shape[1:], region
    return PerturbationResult(
        curve=per_image.mean(0), per_image=per_image, per_ordering=curves,
        per_image_aopc=per_image_aopc, aopc=float(per_image_aopc.mean()),
        predicted=torch.cat(predicted), order=order, replace=replace, patch=patch, steps=length,
        repeats=repeats, grid=(h // ph, w // pw), region=region, one_row=h == 1)
