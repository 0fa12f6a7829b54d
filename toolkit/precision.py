"""How precise a fit is: the TF32 switch, two fits compared, the tolerances of the fast settings.

Fitting patterns keeps its sums in float64 (:mod:`toolkit.patterns`), but the per-batch
products may be computed in float32, the model may run in float32, and on a GPU cuBLAS
and cuDNN may use TF32 (10 of float32's 23 mantissa bits). Whether such fast settings
hurt the patterns is measured, not assumed: fit the same images twice, with the fast
settings and in float64 throughout, and compare every neuron's pattern with
:func:`pattern_difference`. :data:`FLOAT32_TOLERANCE` and :data:`TF32_TOLERANCE` are the
largest differences notebook 04 accepts; ``tests/test_precision.py`` pins them down.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "tf32",
    "model_dtype",
    "pattern_difference",
    "FLOAT32_TOLERANCE",
    "TF32_TOLERANCE",
]

#: Largest :func:`pattern_difference` from a float64 fit allowed for a float32 model and
#: float32 products on a CPU, and with TF32 on a GPU. The weak spot is ``a_-``: its sums
#: are the differences of the all-sample and the active-sample sums, each accumulated in
#: float32 within a batch, so where the inactive part's covariance is small next to the
#: total, ``a_-`` loses about three digits (up to 1e-3 on notebook 04's stand-in; the
#: other patterns agree to about 1e-5). tests/test_precision.py checks both settings.
FLOAT32_TOLERANCE = 5e-3
#: The same bound with TF32 on a GPU (TF32 keeps 10 of float32's 23 mantissa bits).
TF32_TOLERANCE = 5e-2


@contextmanager
def tf32(enabled: bool):
    """Allow (``True``) or forbid (``False``) TF32 in cuBLAS and cuDNN for the block.

    Both switches (``torch.backends.cuda.matmul.allow_tf32`` and
    ``torch.backends.cudnn.allow_tf32``) are set on entry and restored on exit, also when
    the block raises. They matter only for float32 work on a CUDA GPU; note that PyTorch
    allows TF32 in cuDNN's convolutions by default, so ``tf32(False)`` is what makes a
    float32 convolution exact float32.
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's first parameter.

    Raises
    ------
    ValueError
        If the model has no parameters.
    """
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no dtype")
    return parameter.dtype


def pattern_difference(patterns, reference, min_samples: int = 100,
                       min_fraction: float = 0.01) -> dict[str, float]:
    """Per layer, the largest relative difference of any neuron's pattern from ``reference``.

    For every neuron and each of ``linear``, ``positive`` and ``negative``:
    ``|a - a_ref| / |a_ref|`` (Euclidean norms of the neuron's pattern). A component fitted
    on fewer than ``min_samples`` samples, or fewer than ``min_fraction`` of the layer's
    samples, in the reference (``positive``: active samples, ``negative``: inactive ones)
    is left out: a pattern from a handful of samples is ill-conditioned -- its covariance
    is a small difference of large sums, its denominator ``w^T cov`` nearly 0 -- and moves
    with any round-off, whatever the precision. Zero reference patterns count the absolute
    difference.

    Parameters
    ----------
    patterns, reference : toolkit.patterns.Patterns
        ``reference`` must carry its sample counts (``n`` and ``n_pos`` of each layer's
        patterns, as fitted and loaded patterns do).
    min_samples : int
    min_fraction : float

    Returns
    -------
    dict[str, float]
        ``{layer: largest relative difference}`` (0.0 if every component was left out).
    """
    out = {}
    for name in reference.names:
        counted = reference[name]
        if counted.n is None or counted.n_pos is None:
            raise ValueError(f"the reference patterns of layer '{name}' carry no sample counts: "
                             "compare with fitted (or loaded) patterns")
        n = torch.tensor(float(counted.n), dtype=torch.float64)
        counts = {"linear": n.expand_as(counted.n_pos), "positive": counted.n_pos,
                  "negative": n - counted.n_pos}
        worst = 0.0
        for kind, ref in counted.tensors().items():
            ref = ref.to(torch.float64).reshape(ref.shape[0], -1)
            a = getattr(patterns[name], kind).to(torch.float64).reshape(ref.shape)
            norm = ref.norm(dim=1)
            diff = (a - ref).norm(dim=1)
            relative = torch.where(norm > 0, diff / torch.where(norm > 0, norm, 1.0), diff)
            kept = counts[kind].cpu() >= max(min_samples, min_fraction * float(n))
            if kept.any():
                worst = max(worst, float(relative[kept].max()))
        out[name] = worst
    return out
