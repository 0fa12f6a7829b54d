"""The fingerprint of a model: which architecture and weights patterns belong to.

Patterns, checkpoints and pattern files record the fingerprint of the model they were
fitted for, and refuse another model. It sits below :mod:`toolkit.streaming` (which
binds checkpoints to a model) and :mod:`toolkit.patterns` (which binds patterns to
one), so neither imports the other for it.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["fingerprint"]


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture and weights.

    Covers every module's qualified name and type, and every tensor of the state dict
    (names, shapes and values rounded to float32, so a model cast to float64 keeps its
    fingerprint).
    """
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point():
            t = t.detach().to("cpu", torch.float32)
        h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()[:32]
