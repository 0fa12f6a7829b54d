"""Which activation decides that a neuron is *active*, and what its inactive side does.

In a VGG-style chain every neuron layer is followed by its own ReLU, so "the neuron is
active" means one thing: its output ``z > 0``, the ReLU lets its signal pass. In the
networks people use today a layer's output often reaches its activation only through
other operations:

* an addition (a residual block: the last convolution of the branch and the shortcut's
  convolution are added, ``u = z + identity``, and the ReLU acts on the sum);
* a concatenation (Inception and DenseNet concatenate branches along the channels, and
  the activation acts on the concatenated tensor);
* a standalone BatchNorm (DenseNet's pre-activation BN-ReLU-Conv: the BN is a layer of
  its own between the concatenation and the ReLU);
* a reshape (a view, a flatten, dropout in eval mode).

:func:`activities` follows the output of every layer through such operations, as long
as it has exactly one use, to the first ReLU-family activation it reaches: that
activation's *source* decides whether the signal of this neuron's position passes the
backward pass at all. Two activity masks are then possible for such a layer (the names
the fitting code takes):

``"relu_input"`` (the default, :data:`DEFAULT_MASK`)
    the activation's own rule (``u > 0``, or ``0 < u < 6`` for ReLU6) on its input,
    mapped back through the concatenations and reshapes to the layer's outputs;
``"output"``
    the layer's own output ``z > 0`` (the convention for a chain, and the one the
    seminar text writes).

For a layer directly followed by a ReLU both are the same tensor. The default was
decided by a measurement on a residual network (notebook 05): explanations built from
the activation's mask destroy the prediction faster in region perturbation.

**The inactive side.** A ReLU or ReLU6 stops the signal of an inactive neuron, so the
rules need only the pattern ``a_+`` there. A LeakyReLU passes it with its slope, and a
hidden layer whose output reaches no single activation (a linear bottleneck, an output
used by several concatenations, pooling before the activation) passes it unchanged: for
those, PatternNet and PatternAttribution use ``a_-`` on the inactive positions
(:attr:`Activity.passes_inactive`). The output layer keeps the authors' convention, ``a_+``
for the explained neuron whatever its sign.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, fx, nn

from toolkit.layers import operations
from toolkit.layers.activations import Activation
from toolkit.layers.adapters import BATCHNORMS

__all__ = ["MASKS", "DEFAULT_MASK", "Source", "Activity", "activities", "check_mask", "MaskSourceError"]

#: The activity masks a layer's patterns and quality can use (see the module docstring).
MASKS = ("output", "relu_input")
#: The mask :func:`toolkit.fit_patterns` and :func:`toolkit.layer_quality` use unless told otherwise.
DEFAULT_MASK = "relu_input"

#: Operations a layer's output may pass unchanged in shape on its way to the activation.
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone"}


class MaskSourceError(ValueError):
    """The activation that follows a layer cannot be observed."""


def check_mask(mask: str) -> str:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, not {mask!r}")
    return mask


@dataclass(frozen=True)
class Source:
    """The activation a layer's output reaches, and how to map its input back.

    Attributes
    ----------
    node : str
        The activation's node in the traced graph.
    activation : Activation
    steps : tuple
        From the layer outward: ``("narrow", axis, start, length)`` where the layer's
        output is a part of a concatenation, ``("reshape", shape)`` where it was reshaped
        (``shape``: the per-sample shape before).
    direct : bool
        Whether the activation's input is the layer's output itself.
    """

    node: str
    activation: Activation
    steps: tuple = ()
    direct: bool = True

    def mask(self, activation_input: Tensor) -> Tensor:
        """The layer's activity mask from the activation's input (bool, shaped like the
        layer's output)."""
        active = self.activation.active(activation_input)
        for step in reversed(self.steps):
            if step[0] == "narrow":
                active = active.narrow(step[1], step[2], step[3])
            else:
                active = active.reshape(active.shape[0], *step[1])
        return active


@dataclass(frozen=True)
class Activity:
    """How a layer's neurons are active: its :class:`Source` (None: its own output
    decides) and whether its inactive side passes the backward signal."""

    source: Source | None
    passes_inactive: bool
    last: bool = False


def activities(plan) -> dict[str, Activity]:
    """The :class:`Activity` of every layer of ``plan`` (see the module docstring).

    Without a traced graph (a model torch.fx cannot trace) every layer but the last is
    taken as a chain's: stopped by a ReLU on its own output.
    """
    result = {}
    last = plan.layers[-1].name if plan.layers else None
    for layer in plan:
        source = _follow(plan, layer) if plan.graph is not None else None
        if layer.name == last:
            result[layer.name] = Activity(source, False, True)
        elif plan.graph is None:
            result[layer.name] = Activity(None, False)
        else:
            passes = source is None or source.activation.passes_inactive
            result[layer.name] = Activity(source, passes)
    return result


def _follow(plan, layer) -> Source | None:
    graph = plan.graph
    nodes = graph.nodes
    standalone = {other.node for other in plan if isinstance(other.module, BATCHNORMS)
                  and other.batchnorm is None}
    node, steps, direct = nodes[layer.output_node], [], True
    while True:
        users = [u for u in node.users if u.name in graph.signal or u.op == "output"]
        if len(users) != 1:
            return None
        (user,) = users
        if user.name in graph.activations:
            return Source(user.name, graph.activations[user.name], tuple(steps), direct)
        step = _step(graph, node, user, standalone)
        if step is None:
            return None
        if step != ():
            steps.append(step)
        node, direct = user, False


_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _step(graph, node: fx.Node, user: fx.Node, standalone: set[str]):
    """How ``user`` passes ``node`` on: ``()`` unchanged, a step of :class:`Source`, or
    None if it does not."""
    if user.name in standalone:
        return ()
    shape = tuple(node.meta["value"].shape[1:])
    if user.op == "call_module":
        module = graph.module.get_submodule(user.target)
        if isinstance(module, _PASS_MODULES):
            return ()
        return ("reshape", shape) if isinstance(module, (nn.Flatten, nn.Unflatten)) else None
    kind = operations.category(user)
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    if kind in ("addition", "dropout"):
        return ()
    if kind == "reshape" and name in _RESHAPES:
        return ("reshape", shape)
    if kind == "concatenation" and name in ("cat", "concat", "concatenate"):
        parts = user.args[0]
        if sum(part is node for part in parts) != 1:
            return None
        values = [part.meta["value"] for part in parts]
        axis = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        axis %= values[0].dim()
        index = next(i for i, part in enumerate(parts) if part is node)
        start = sum(value.shape[axis] for value in values[:index])
        return ("narrow", axis, start, values[index].shape[axis])
    return None
