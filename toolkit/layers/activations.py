"""The ReLU family: the nonlinearities the explanation rules cover, declared once.

PatternNet and PatternAttribution are defined for piecewise-linear networks whose
nonlinearity passes the signal of a neuron's *active* regime and stops (or scales) the
rest. Three kinds are covered, as modules (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0,
M)``, ``nn.LeakyReLU``) or as functions (``F.relu``, ``torch.relu``, ``x.relu()``,
``F.relu6``, ``F.hardtanh``, ``F.leaky_relu``, ``x.clamp(min=0)``), in place or not:

``relu``
    ``max(u, 0)``: active where ``u > 0``; the inactive side is stopped.
``clipped`` (ReLU6 is ``upper = 6``)
    ``min(max(u, 0), upper)``: active where the output moves with its input,
    ``0 < u < upper``; below, the output is 0, above it is the constant ``upper``, and
    both sides are stopped.
``leaky``
    ``u`` where ``u > 0``, ``slope * u`` elsewhere: active where ``u > 0``; the inactive
    side *passes* with the slope, so the rules use the negative pattern ``a_-`` there.

What each method propagates through them is derived in docs/math.md, section 5.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Activation", "activation_of_module", "activation_of_call", "ACTIVATION_MODULES"]

KINDS = ("relu", "clipped", "leaky")


@dataclass(frozen=True)
class Activation:
    """One ReLU-family nonlinearity (see the module docstring)."""

    kind: str = "relu"
    upper: float | None = None
    slope: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"activation kind must be one of {KINDS}, not {self.kind!r}")

    def __call__(self, u: Tensor) -> Tensor:
        """The activation of ``u`` (never in place)."""
        if self.kind == "leaky":
            return F.leaky_relu(u, self.slope)
        if self.kind == "clipped":
            return u.clamp(0, self.upper)
        return F.relu(u)

    def active(self, u: Tensor) -> Tensor:
        """Where a neuron is active, given the activation's input: bool, shaped like ``u``."""
        if self.kind == "clipped":
            return (u > 0) & (u < self.upper)
        return u > 0

    @property
    def passes_inactive(self) -> bool:
        """Whether the inactive side passes a signal (a leaky activation with a slope)."""
        return self.kind == "leaky" and self.slope != 0

    def derivative(self, u: Tensor) -> Tensor:
        """``d activation / d u``: 1 where active, the slope (or 0) elsewhere."""
        active = self.active(u).to(u.dtype)
        if self.passes_inactive:
            return active + self.slope * (u <= 0).to(u.dtype)
        return active

    def rectify(self, signal: Tensor) -> Tensor:
        """The activation's shape applied to a backward signal (DeconvNet): ``relu`` for
        the ReLU and the clipped ReLU (a clip of the signal would depend on its scale),
        the leaky ReLU with its slope."""
        if self.passes_inactive:
            return F.leaky_relu(signal, self.slope)
        return signal.clamp(min=0)

    def __str__(self) -> str:
        if self.kind == "clipped":
            return "ReLU6" if self.upper == 6 else f"clipped ReLU (0, {self.upper:g})"
        if self.kind == "leaky":
            return f"LeakyReLU({self.slope:g})"
        return "ReLU"


#: The activation modules, by type (a Hardtanh is accepted when it clips at 0 from below).
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)


def activation_of_module(module: nn.Module) -> Activation | str | None:
    """The :class:`Activation` a module computes, a string saying why such a module is
    refused, or None for a module of another kind."""
    if isinstance(module, nn.ReLU):
        return Activation("relu")
    if isinstance(module, nn.Hardtanh):   # nn.ReLU6 is a Hardtanh(0, 6)
        return _clipped(module.min_val, module.max_val)
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky", slope=float(module.negative_slope))
    return None


def _clipped(low, high) -> Activation | str:
    if low != 0 or not high > 0:
        return (f"a clip to [{low:g}, {high:g}] is not of the ReLU family (only clips from 0 "
                "up to a positive bound, like ReLU6, are)")
    return Activation("clipped", upper=float(high))


_RELU = {F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_"}
_RELU6 = {F.relu6, "relu6"}
_HARDTANH = {F.hardtanh, F.hardtanh_, "hardtanh", "hardtanh_"}
_LEAKY = {F.leaky_relu, F.leaky_relu_, "leaky_relu", "leaky_relu_"}
_CLAMP = {torch.clamp, torch.clip, torch.clamp_min, "clamp", "clip", "clamp_", "clip_",
          "clamp_min", "clamp_min_"}


def _key(target):
    try:
        hash(target)
    except TypeError:
        return None
    return target


def activation_of_call(target, args: tuple, kwargs: dict) -> Activation | str | None:
    """The :class:`Activation` a function or tensor-method call computes (``target`` a
    function, or a method name), a string saying why it is refused, or None for a call
    of another kind. ``args`` hold the real values the call gets."""
    target = _key(target)
    if target is None:
        return None
    if target in _RELU:
        return Activation("relu")
    if target in _RELU6:
        return Activation("clipped", upper=6.0)
    if target in _HARDTANH:
        low = _argument(args, kwargs, 1, "min_val", -1.0)
        high = _argument(args, kwargs, 2, "max_val", 1.0)
        return _clipped(low, high)
    if target in _LEAKY:
        return Activation("leaky", slope=float(_argument(args, kwargs, 1, "negative_slope", 0.01)))
    if target in _CLAMP:
        low = _argument(args, kwargs, 1, "min", None)
        high = _argument(args, kwargs, 2, "max", None)
        if target in ("clamp_min", "clamp_min_") or target is torch.clamp_min:
            low, high = _argument(args, kwargs, 1, "min", None), None
        if not isinstance(low, numbers.Real) or low != 0 or isinstance(high, Tensor):
            return "a clamp other than clamp(min=0) or clamp(0, upper) is not of the ReLU family"
        return Activation("relu") if high is None else _clipped(0, high)
    return None


def _argument(args: tuple, kwargs: dict, position: int, name: str, default):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def is_inplace(target, args: tuple, kwargs: dict, module: nn.Module | None = None) -> bool:
    """Whether an activation call overwrites its input."""
    if module is not None:
        return bool(getattr(module, "inplace", False))
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") or bool(kwargs.get("inplace", False)) or \
        (target in (F.relu, F.relu6, F.leaky_relu, F.hardtanh) and _inplace_positional(target, args))


def _inplace_positional(target, args: tuple) -> bool:
    position = {F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.hardtanh: 3}[target]
    return len(args) > position and bool(args[position])
