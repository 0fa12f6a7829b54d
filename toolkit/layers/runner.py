"""Running a model's forward pass with the toolkit's callbacks in place.

Fitting, measuring and explaining all run the model's forward pass and need, at every
neuron layer, its input ``x`` and output ``z`` (the explanation methods replace ``z``
by a tensor whose backward pass is their rule), at every ReLU-family activation its
input (the methods that rectify the backward signal replace its output), and for every
layer its activity mask. :func:`run` does that for a :class:`~toolkit.layers.Plan`:

* a traced model (``plan.graph``) is run node by node (a :class:`torch.fx.Interpreter`
  over the traced graph, which calls the model's own modules), so functional
  activations, additions and concatenations are seen as well as modules;
* a model torch.fx cannot trace is run as it is, with module hooks on its neuron layers
  and activation modules.

Activations are computed out of place (an in-place activation's input is rebound to its
output for the nodes after it, as the in-place call would have it), so the caller's
tensors and a layer's output are never overwritten by an activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, fx, nn

from toolkit.layers.activations import Activation, activation_of_module
from toolkit.layers.activity import Activity
from toolkit.layers import operations

__all__ = ["Hooks", "run", "observe"]

LayerCallback = Callable[["Layer", Tensor, Tensor], "Tensor | None"]  # noqa: F821
ActivationCallback = Callable[[Activation, Tensor, Tensor], "Tensor | None"]
ActivityCallback = Callable[["Layer", Tensor], None]  # noqa: F821


@dataclass
class Hooks:
    """What :func:`run` calls during the forward pass (each optional).

    Attributes
    ----------
    on_layer : callable
        ``on_layer(layer, x, z)``; a returned tensor replaces ``z`` in the rest of the pass.
    on_activation : callable
        ``on_activation(activation, u, out)`` with the activation's input and output; a
        returned tensor replaces the output.
    on_activity : callable
        ``on_activity(layer, active)`` with the layer's activity mask from its source
        activation (bool, shaped like ``z``), for the layers in ``activities`` that have
        a source, when that activation runs.
    activities : dict
        Layer name -> :class:`~toolkit.layers.activity.Activity` (from
        :func:`~toolkit.layers.activity.activities`), for ``on_activity``.
    normalise : callable
        Applied to the value of every activation and every join (addition,
        concatenation) that all paths from the input to the output pass through.
    """

    on_layer: LayerCallback | None = None
    on_activation: ActivationCallback | None = None
    on_activity: ActivityCallback | None = None
    activities: dict[str, Activity] = field(default_factory=dict)
    normalise: Callable[[Tensor], Tensor] | None = None


def run(model: nn.Module, plan, x: Tensor, hooks: Hooks):
    """The model's output on ``x``, computed with ``hooks`` in place (see the module
    docstring). The caller chooses the mode (eval) and the gradient mode."""
    if plan.graph is not None:
        return _GraphRun(plan, hooks).run(x)
    return _hooked_run(model, plan, x, hooks)


class _GraphRun(fx.Interpreter):
    """The traced graph, node by node, with the callbacks at layers, activations and joins."""

    def __init__(self, plan, hooks: Hooks):
        graph = plan.graph
        super().__init__(graph.module)
        self.extra_traceback = False
        self.graph_info, self.hooks = graph, hooks
        self.layer_calls = {layer.node: layer for layer in plan}
        self.layer_outputs = {layer.output_node: layer for layer in plan}
        self.inputs: dict[str, Tensor] = {}
        self.waiting: dict[str, list] = {}
        if hooks.on_activity is not None:
            for layer in plan:
                activity = hooks.activities.get(layer.name)
                if activity is not None and activity.source is not None:
                    self.waiting.setdefault(activity.source.node, []).append((layer, activity.source))
        self.joins = {name for name in graph.cuts if name in graph.activations or
                      operations.category(graph.nodes[name]) in ("addition", "concatenation")}

    def run_node(self, node):
        name = node.name
        if name in self.graph_info.activations:
            return self._activation(node)
        if name in self.layer_calls:
            self.inputs[name] = self.env[node.args[0]]
        result = super().run_node(node)
        layer = self.layer_outputs.get(name)
        if layer is not None and self.hooks.on_layer is not None:
            replaced = self.hooks.on_layer(layer, self.inputs.pop(layer.node), result)
            result = result if replaced is None else replaced
        elif layer is not None:
            self.inputs.pop(layer.node, None)
        if self.hooks.normalise is not None and name in self.joins:
            result = self.hooks.normalise(result)
        return result

    def _activation(self, node):
        activation = self.graph_info.activations[node.name]
        u = self.env[node.args[0]]
        out = activation(u)
        for layer, source in self.waiting.get(node.name, ()):
            self.hooks.on_activity(layer, source.mask(u))
        if self.hooks.on_activation is not None:
            replaced = self.hooks.on_activation(activation, u, out)
            out = out if replaced is None else replaced
        if self.hooks.normalise is not None and node.name in self.joins:
            out = self.hooks.normalise(out)
        if node.name in self.graph_info.inplace:
            self.env[node.args[0]] = out
        return out


def _hooked_run(model: nn.Module, plan, x: Tensor, hooks: Hooks):
    """The model itself, with module hooks on its neuron layers and activation modules
    (a model torch.fx cannot trace: functional activations are not seen)."""
    inputs: dict[int, list[Tensor]] = {}
    handles = []

    def keep_input(key, copy=False):
        def pre_hook(module, args):
            inputs.setdefault(key, []).append(args[0])
            if copy:
                return (args[0].clone(), *args[1:])
        return pre_hook

    try:
        if hooks.on_layer is not None:
            for layer in plan:
                key = id(layer.module)
                handles.append(layer.module.register_forward_pre_hook(keep_input(key)))

                def post_hook(module, args, output, layer=layer, key=key):
                    return hooks.on_layer(layer, inputs[key].pop(), output)

                handles.append(layer.output_module.register_forward_hook(post_hook))
        if hooks.on_activation is not None:
            for module in model.modules():
                activation = activation_of_module(module)
                if not isinstance(activation, Activation):
                    continue
                key = id(module)
                handles.append(module.register_forward_pre_hook(keep_input(key, module.inplace)))

                def activation_hook(module, args, output, key=key, activation=activation):
                    return hooks.on_activation(activation, inputs[key].pop(), output)

                handles.append(module.register_forward_hook(activation_hook))
        return model(x)
    finally:
        for h in handles:
            h.remove()
        inputs.clear()


def observe(model: nn.Module, plan, x: Tensor, mask: str, activities: dict[str, Activity],
            callback: Callable) -> None:
    """Run the forward pass and call ``callback(layer, x, z, active)`` once per layer,
    with the activity mask ``mask`` chooses (:mod:`toolkit.layers.activity`): ``active``
    is None where the layer's own ``z > 0`` is the mask, else a bool tensor shaped like
    ``z``. A layer whose mask comes from an activation after other operations is held
    back until that activation runs (its output copied: an addition may overwrite it)."""
    pending: dict[str, tuple] = {}

    def on_layer(layer, layer_input, z):
        activity = activities[layer.name]
        source = activity.source if mask == "relu_input" else None
        if source is None:
            callback(layer, layer_input, z, None)
        elif source.direct:
            own = source.activation.kind != "clipped"
            callback(layer, layer_input, z, None if own else source.mask(z))
        else:
            pending[layer.name] = (layer_input, z.detach().clone())

    def on_activity(layer, active):
        if layer.name in pending:
            layer_input, z = pending.pop(layer.name)
            callback(layer, layer_input, z, active)

    deferred = {name: a for name, a in activities.items()
                if mask == "relu_input" and a.source is not None and not a.source.direct}
    run(model, plan, x, Hooks(on_layer=on_layer, on_activity=on_activity if deferred else None,
                              activities=deferred))
    if pending:
        from toolkit.layers.activity import MaskSourceError

        raise MaskSourceError(f"the activations after the layers {sorted(pending)} did not run in "
                              "the forward pass; use mask='output'")
