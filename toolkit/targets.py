"""Which output neuron an explanation starts from: the ``target`` of ``attribute``.

One class for all samples (an int), one class per sample (a sequence or an integer
tensor), or None for each sample's predicted class. :func:`as_target` turns any of them
into a long tensor of class indices, or refuses what is not one with a message that
says what it got (booleans, floats, strings, None inside a list, indices out of range).
"""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["Target", "as_target"]

#: One class for all samples, one class per sample, or None for the predicted classes.
Target = Union[int, Sequence[int], Tensor, None]


def as_target(target: Target, logits: Tensor) -> Tensor:
    """The class index of every sample as a long tensor on the logits' device."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    t = _target_tensor(target, classes).to(logits.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(
            f"got {t.numel()} targets (shape {tuple(t.shape)}) for {n} inputs; give one int, "
            f"one class per sample, or None"
        )
    bad = t[(t < 0) | (t >= classes)]
    if bad.numel():
        raise ValueError(
            f"target {bad[0].item()} is out of range: the model has {classes} classes "
            f"(0 to {classes - 1})"
        )
    return t.long()


def _target_tensor(target, classes: int) -> Tensor:
    """``target`` as an integer tensor, or a clear error about what it is instead."""
    if isinstance(target, (bool, np.bool_)) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError("target must be class indices, not booleans")
    if isinstance(target, (str, bytes)):
        raise TypeError(f"target must be an integer class index, not the string {target!r}; "
                        "map class names to indices first")
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must be integer class indices, got {target.dtype}")
        return target
    values = [target] if np.ndim(target) == 0 and not isinstance(target, (list, tuple)) else target
    if isinstance(values, (list, tuple)):
        for value in values:
            if value is None:
                raise TypeError("target holds None; give None itself (not a list of None) to explain "
                                "the predicted classes, or one class index per sample")
            if isinstance(value, (bool, np.bool_)):
                raise TypeError("target must be class indices, not booleans")
            if not isinstance(value, (numbers.Integral, Tensor, np.ndarray)):
                raise TypeError(f"target must be integer class indices, got {value!r} "
                                f"({type(value).__name__})")
            if isinstance(value, numbers.Integral) and not -2**63 <= int(value) < 2**63:
                raise ValueError(f"target {int(value)} is out of range: the model has {classes} "
                                 f"classes (0 to {classes - 1})")
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise TypeError(f"target must be an int, a sequence of ints, an integer tensor or None; "
                        f"cannot read {type(target).__name__} {target!r:.60}: {error}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"target must be integer class indices, got {t.dtype}")
    return t
