"""The network as the estimators see it: its neuron layers in forward order (a :class:`Plan`).

:func:`trace` runs the model once on an example and returns the :class:`Plan`: every
neuron layer (:class:`Layer`: a Linear layer, a convolution of 1, 2 or 3 dimensions, or
a BatchNorm that does not directly follow one), with the BatchNorm that directly
follows a layer folded into it, and the traced graph of the whole forward pass
(:mod:`toolkit.layers.tracing`) that says what runs between the layers.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from toolkit.layers.activations import activation_of_module
from toolkit.layers.adapters import BATCHNORMS, ConvOps, NeuronOps, adapter_for, batchnorm_scale_shift
from toolkit.layers.tracing import (PASSIVE_MODULES, ModelGraph, UnsupportedLayerError, UntraceableError,
                                    passive_refusal, trace_graph, unsupported)
from toolkit.layers import operations

__all__ = ["Layer", "Plan", "trace", "evaluation_mode", "check_forward", "UnverifiedForwardWarning"]


class UnverifiedForwardWarning(UserWarning):
    """The code of a model's ``forward`` could not be checked (torch.fx cannot trace it)."""


@dataclass
class Layer:
    """One neuron layer, with the BatchNorm that directly follows it folded in.

    Attributes
    ----------
    name : str
        Qualified name of the module in ``model.named_modules()``; the key of the
        layer's patterns.
    module : nn.Module
        A Linear layer, a convolution, or a standalone BatchNorm.
    batchnorm : nn.Module or None
        The BatchNorm applied directly to this layer's output, folded into ``W``, ``b``.
    batchnorm_name : str or None
    node, output_node : str or None
        The layer's call and the node whose value is its output ``z`` in the traced graph.
    """

    name: str
    module: nn.Module
    batchnorm: nn.Module | None = None
    batchnorm_name: str | None = None
    node: str | None = None
    output_node: str | None = None
    #: The adapter of the layer's module type (:data:`toolkit.layers.LAYER_TYPES`), chosen once.
    ops: NeuronOps = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        kind = adapter_for(self.module)
        if kind is None:
            raise unsupported(self.name, self.module, "it is not a neuron layer")
        self.ops = kind(self.module)

    @property
    def is_conv(self) -> bool:
        """Whether the layer is a convolution (for messages and tests)."""
        return isinstance(self.ops, ConvOps)

    @property
    def output_module(self) -> nn.Module:
        """The module whose output is the layer output ``z`` (the BatchNorm, if folded)."""
        return self.batchnorm if self.batchnorm is not None else self.module

    @property
    def weight_shape(self) -> torch.Size:
        return self.ops.weight_shape

    @property
    def out_features(self) -> int:
        """Number of neurons (output channels of a convolution)."""
        return self.weight_shape[0]

    @property
    def groups(self) -> int:
        return self.ops.groups

    # -- folded parameters ----------------------------------------------------------
    def _batchnorm_scale_shift(self) -> tuple[Tensor, Tensor]:
        return batchnorm_scale_shift(self.batchnorm)

    def weight(self) -> Tensor:
        """The layer's linear map ``W`` (BatchNorm folded in), detached."""
        w = self.ops.weight()
        if self.batchnorm is not None:
            scale, _ = self._batchnorm_scale_shift()
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def bias(self) -> Tensor:
        """The layer's bias ``b`` (BatchNorm folded in; zeros if there is none), detached."""
        b = self.ops.bias()
        if b is None:
            w = self.ops.weight()
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if self.batchnorm is not None:
            scale, shift = self._batchnorm_scale_shift()
            b = b * scale + shift
        return b

    # -- the linear operations, from the layer type's adapter ------------------------
    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """``weight`` applied to ``x`` the way the layer applies ``W`` (no bias)."""
        return self.ops.apply(x, weight)

    def transpose(self, grad: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """``weight^T`` applied to ``grad``: the backward pass through the layer with ``weight``."""
        return self.ops.transpose(grad, weight, input_shape)

    def patch_sums(self, x: Tensor, g: Tensor) -> Tensor:
        """``sum over samples of g[j] * patch(x)``, shaped like a weight with
        ``g.shape[neuron_dim]`` rows (see :class:`toolkit.layers.NeuronOps`)."""
        return self.ops.patch_sums(x, g)

    def cover_sums(self, input_shape: torch.Size, g: Tensor) -> Tensor:
        """:meth:`patch_sums` of an all-ones input (see :class:`toolkit.layers.NeuronOps`)."""
        return self.ops.cover_sums(input_shape, g)

    def patches(self, x: Tensor) -> Tensor:
        """The layer's input samples as rows, ``(samples, D)`` (one group)."""
        return self.ops.patches(x)

    def group_patches(self, x: Tensor) -> Tensor:
        """The layer's input samples, ``(samples, groups, D)``."""
        return self.ops.group_patches(x)

    def neuron_values(self, t: Tensor) -> Tensor:
        """An output-shaped tensor as ``(samples, neurons)``."""
        return self.ops.neuron_values(t)


@dataclass
class Plan:
    """The neuron layers of a model in forward order, found by :func:`trace`.

    Attributes
    ----------
    layers : list of Layer
    input_shape : tuple
        The per-sample shape of the input it was traced for.
    forward_verified : bool
        False when torch.fx could not trace the model (only its modules were checked;
        it is run with module hooks and taken as a chain).
    graph : ModelGraph or None
        The traced forward pass (None when not verified).
    """

    layers: list[Layer]
    input_shape: tuple[int, ...] = field(default=())
    forward_verified: bool = True
    graph: ModelGraph | None = None
    _activities: dict | None = field(default=None, repr=False, compare=False)

    @property
    def activities(self) -> dict:
        """Per layer, its :class:`~toolkit.layers.activity.Activity` (computed once)."""
        if self._activities is None:
            from toolkit.layers.activity import activities

            self._activities = activities(self)
        return self._activities

    def is_cut(self, layer: Layer) -> bool:
        """Whether every path from the input to the output passes through the layer's
        output (so its backward signal may be rescaled there). Without a graph the model
        is taken as a chain."""
        return self.graph is None or layer.output_node in self.graph.cuts

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


@contextmanager
def evaluation_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block, then restore each module's own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def trace(model: nn.Module, example: Tensor) -> Plan:
    """Find the neuron layers of ``model`` by running it on (two samples of) ``example``.

    Returns
    -------
    Plan

    Raises
    ------
    UnsupportedLayerError
        For a module, a module setting or an operation that is not covered (see
        :mod:`toolkit.layers.tracing` and :mod:`toolkit.layers.operations`), naming it and
        where it is; for a layer called twice; for a model without a neuron layer.

    Warns
    -----
    UnverifiedForwardWarning
        If torch.fx cannot trace the model: then only its modules are checked, and it is
        explained as a chain.
    """
    modules = dict(model.named_modules())
    with evaluation_mode(model):
        if all(name == "parametrizations" for name, _ in model.named_children()):
            return _single_module(model, example)
        try:
            graph = trace_graph(model, example)
        except UntraceableError as error:
            warnings.warn(
                f"torch.fx cannot trace the forward of {type(model).__name__} ({error}); only its "
                "modules were checked -- the functions and tensor operations its forward calls "
                f"between them were not verified (allowed there: {operations.ALLOWED_SUMMARY})",
                UnverifiedForwardWarning, stacklevel=3)
            return _trace_by_hooks(model, example)
    layers = [Layer(call.name, modules[call.name],
                    modules[call.batchnorm] if call.batchnorm else None, call.batchnorm,
                    call.node, call.output) for call in graph.layers]
    if not layers:
        raise UnsupportedLayerError(f"model {type(model).__name__} has no neuron layer (Linear, "
                                    "convolution or BatchNorm)")
    return Plan(layers, tuple(example.shape[1:]), True, graph)


def _single_module(model: nn.Module, example: Tensor) -> Plan:
    """A model that is one neuron layer itself (nothing runs between modules)."""
    name = parametrize.type_before_parametrizations(model).__name__
    if adapter_for(model) is None:
        raise unsupported(name, model)
    layer = Layer(name, model)
    why = layer.ops.check()
    if why is not None:
        raise unsupported(name, model, why)
    with torch.no_grad():
        model(example[:1].clone())
    return Plan([layer], tuple(example.shape[1:]), True, None)


def _trace_by_hooks(model: nn.Module, example: Tensor) -> Plan:
    """The modules a forward pass calls, seen by hooks, for a model fx cannot trace:
    every leaf module must be known; a BatchNorm whose input is the previous layer's
    output is folded into it."""
    calls: list[tuple[str, nn.Module, Tensor, Tensor]] = []

    def record(name):
        def hook(module, inputs, output):
            calls.append((name, module, inputs[0] if inputs else None, output))
        return hook

    inside = _parametrizations(model)
    leaves = [(n, m) for n, m in model.named_modules() if n not in inside
              and (next(m.children(), None) is None or adapter_for(m) is not None)]
    handles = [m.register_forward_hook(record(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            model(example[:1].clone())
    finally:
        for h in handles:
            h.remove()
    layers: list[Layer] = []
    previous = None
    for name, module, inp, out in calls:
        if adapter_for(module) is None and activation_of_module(module) is None and \
                not isinstance(module, PASSIVE_MODULES):
            raise unsupported(name, module)
        why = passive_refusal(module) if isinstance(module, PASSIVE_MODULES) else None
        if why is not None:
            raise unsupported(name, module, why)
        if isinstance(module, BATCHNORMS) and previous is not None and previous[3] is inp \
                and layers and layers[-1].module is previous[1] and layers[-1].batchnorm is None \
                and not isinstance(previous[1], BATCHNORMS):
            layers[-1].batchnorm, layers[-1].batchnorm_name = module, name
        elif adapter_for(module) is not None:
            if any(layer.name == name for layer in layers):
                raise unsupported(name, module, "it is called more than once in the forward pass")
            layers.append(Layer(name, module))
            why = layers[-1].ops.check()
            if why is not None:
                raise unsupported(name, module, why)
        previous = (name, module, inp, out)
    if not layers:
        raise UnsupportedLayerError(f"model {type(model).__name__} has no neuron layer")
    return Plan(layers, tuple(example.shape[1:]), False, None)


def _parametrizations(model: nn.Module) -> set[str]:
    """The names of the modules that compute a parametrized weight
    (``torch.nn.utils.parametrize``): they are part of their layer's weight, not of the
    forward pass between layers."""
    names = set()
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            prefix = f"{name}.parametrizations" if name else "parametrizations"
            names |= {f"{prefix}.{n}" if n else prefix for n, _ in module.parametrizations.named_modules()}
    return names


def check_forward(model: nn.Module, example: Tensor) -> bool:
    """Whether the code of ``model.forward`` between its modules was verified: True when
    torch.fx traced it and every operation is allowed, False (with an
    :class:`UnverifiedForwardWarning`) when it cannot be traced.

    Raises
    ------
    UnsupportedLayerError
        For an operation or module that is not covered.
    """
    return trace(model, example).forward_verified
