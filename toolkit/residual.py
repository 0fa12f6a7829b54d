"""Residual networks: which ReLU decides whether a neuron is *active*.

In a VGG-style chain every Conv2d/Linear layer is followed by its own ReLU, so "the
neuron is active" means one thing: its output ``z > 0``, the ReLU lets its signal
pass. In a residual block (He et al., 2016) the last convolution of the branch -- and
the downsample convolution of the shortcut -- is not followed by a ReLU: its output
``z`` is first added to the other path, ``u = z + identity``, and the ReLU acts on the
sum. Two activity masks are then possible for such a layer (this module calls them by
the names the fitting code takes):

``"output"``
    the neuron's own output ``z > 0`` (the convention for a chain, and the one the
    seminar text writes);
``"relu_input"``
    the input of the ReLU that follows after the additions, ``u > 0``: the mask that
    decides, in the backward pass of PatternNet and PatternAttribution, whether the
    signal of this neuron's position passes at all.

For a layer directly followed by a ReLU both are the same tensor, so the choice only
matters in residual networks; for a layer whose output reaches no ReLU (the output
layer, or a layer followed by pooling) ``"relu_input"`` falls back to ``"output"``.

Which one is better was decided by a measurement on the shipped Fashion-MNIST
:class:`toolkit.models.SmallResNet` (notebook 05; patterns fitted on the first half of
the training subset, rho(S) on 500 images of the held-out half, region perturbation on
200 test images with 25 of 49 4x4 regions):

::

                                                     output   relu_input
    rho(S_a+-), mean of the 5 layers before an add.   0.916        0.916
    AOPC of PatternAttribution S_a+-                  0.086        0.103

The estimator quality is the same to three decimals (per layer, ``relu_input`` is equal
or 0.001 higher), but explanations built from ``relu_input`` patterns destroy the
prediction faster (AOPC 0.103 against 0.086; LRP-z 0.184, the random order 0.075). So
:data:`DEFAULT_MASK` is ``"relu_input"``: a neuron's pattern is learned from the samples
on which its signal actually passes the backward pass. ``mask="output"`` gives the other
choice everywhere (:func:`toolkit.fit_patterns`, :func:`toolkit.layer_quality`, the
command line's ``--mask``). A model that :mod:`torch.fx` cannot trace falls back to
``"output"`` with a warning (for a chain that is the same mask).

What an addition means for the methods
--------------------------------------
An addition ``u = z + identity`` is linear with weight 1 on each input, and every
backward rule passes the signal unchanged to both branches -- what autograd does.
For Gradient, DeconvNet and Guided Backprop that is the adjoint of the addition. For
LRP-z, computed as input times gradient, it is the z-rule: ``z g + s g = u g``, the
relevance of ``u`` splits in proportion to the summands and is conserved. For
PatternNet and PatternAttribution it amounts to the "pattern" ``(1, 1)`` of the
addition, which is no pattern (``w^T a = 2``, not 1): PatternNet adds the signal
reconstructed through the branch to the whole signal passed down the shortcut, and
PatternAttribution hands back twice the relevance that reached the addition. Deep
Taylor decomposition with PatternAttribution's root point asks instead for the split
``R_z = a_z R_u``, ``R_s = a_s R_u`` with the addition's own pattern
(``a_z + a_s = 1``). docs/math.md, section 6.1, gives the argument and the measurement;
tests/test_conservation.py holds the toolkit to the rule it applies.

How it is found
---------------
:func:`relu_after_additions` traces the model symbolically with :mod:`torch.fx` and
follows, for every planned layer, the uses of its output (after its folded BatchNorm)
through additions to the first ``nn.ReLU`` module call. :class:`ActivityMasks` then
observes a forward pass (:func:`toolkit.layers.intercept`): a layer whose mask comes
from a later ReLU is held back until that ReLU runs, and its callback receives that
ReLU's input ``> 0`` as the mask.
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from toolkit.layers import Layer, Plan, intercept

__all__ = [
    "MASKS",
    "DEFAULT_MASK",
    "RESIDUAL_ADDITIONS",
    "ReluCall",
    "relu_after_additions",
    "ActivityMasks",
    "MaskSourceError",
]

#: The activity masks a layer's patterns and quality can use (see the module docstring).
MASKS = ("output", "relu_input")

#: The mask :func:`toolkit.fit_patterns` and :func:`toolkit.layer_quality` use unless told
#: otherwise, decided by the measurement in the module docstring (notebook 05).
DEFAULT_MASK = "relu_input"

#: The functions an addition of two tensors appears as in a ``torch.fx`` graph
#: (``out += identity`` is traced as ``operator.add`` too).
RESIDUAL_ADDITIONS = (operator.add, operator.iadd, torch.add)
_ADDITION_METHODS = ("add", "add_")


class MaskSourceError(ValueError):
    """The ReLU that follows a layer cannot be found or observed."""


@dataclass(frozen=True)
class ReluCall:
    """One call of an ``nn.ReLU`` module in the forward pass.

    Attributes
    ----------
    module : str
        Qualified name of the ReLU module (torchvision's blocks call one module twice).
    call : int
        Which of its calls, counted from 0 in the order of the forward pass.
    after_addition : bool
        Whether the layer's output passes through an addition before it (if not, the
        ReLU's input is the layer's output itself).
    """

    module: str
    call: int
    after_addition: bool = False


def _is_addition(node) -> bool:
    return ((node.op == "call_function" and node.target in RESIDUAL_ADDITIONS)
            or (node.op == "call_method" and node.target in _ADDITION_METHODS))


def _is_relu_module(node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)


def _is_functional_relu(node) -> bool:
    return ((node.op == "call_function" and node.target in (torch.relu, torch.relu_,
                                                             nn.functional.relu))
            or (node.op == "call_method" and node.target in ("relu", "relu_")))


def relu_after_additions(model: nn.Module, plan: Plan) -> dict[str, ReluCall | None]:
    """For every layer of ``plan``, the ReLU whose input masks it, found with torch.fx.

    From the layer's output node (its folded BatchNorm, if any) the uses are followed
    while the output has exactly one use and that use is an addition; the first
    ``nn.ReLU`` module call reached is the layer's mask source. A layer whose output
    reaches anything else first (pooling, the model's output, a second use) gets None:
    its own output is its mask.

    Parameters
    ----------
    model : nn.Module
    plan : toolkit.layers.Plan
        From :func:`toolkit.layers.trace` on the same model.

    Returns
    -------
    dict[str, ReluCall or None]

    Raises
    ------
    MaskSourceError
        If the model cannot be traced symbolically, or a layer's output reaches a ReLU
        written as a function (``torch.relu``, ``F.relu``), whose input no hook sees.
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for data-dependent code
        raise MaskSourceError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}); "
            "the mask 'relu_input' needs a symbolically traceable forward"
        ) from error
    modules = dict(model.named_modules())
    calls: Counter = Counter()
    relu_calls, output_nodes = {}, {}
    for node in graph.nodes:
        if _is_relu_module(node, modules):
            relu_calls[node] = ReluCall(node.target, calls[node.target])
            calls[node.target] += 1
        if node.op == "call_module":
            output_nodes[node.target] = node
    sources = {}
    for layer in plan:
        name = layer.batchnorm_name or layer.name
        if name not in output_nodes:  # the model is the layer itself: nothing follows it
            sources[layer.name] = None
            continue
        node, through_addition = output_nodes[name], False
        source = None
        while len(node.users) == 1:
            (user,) = node.users
            if _is_relu_module(user, modules):
                call = relu_calls[user]
                source = ReluCall(call.module, call.call, through_addition)
                break
            if _is_functional_relu(user) and through_addition:
                raise MaskSourceError(
                    f"the output of layer '{layer.name}' reaches a functional ReLU "
                    f"('{user.name}') after an addition; the mask 'relu_input' needs nn.ReLU "
                    "modules, use mask='output'")
            if not _is_addition(user):
                break
            node, through_addition = user, True
        sources[layer.name] = source
    return sources


def _relu_calls_per_pass(model: nn.Module) -> dict[str, int]:
    """How often each ReLU module is called in one forward pass (from the fx graph)."""
    from torch import fx

    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph
    return Counter(node.target for node in graph.nodes if _is_relu_module(node, modules))


def check_mask(mask: str) -> str:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, not {mask!r}")
    return mask


#: ``observe(layer, x, z, active)``: ``active`` is None for the layer's own ``z > 0``.
MaskedCallback = Callable[[Layer, Tensor, Tensor, "Tensor | None"], None]


class ActivityMasks:
    """The activity mask of every layer of ``plan``, for one choice of :data:`MASKS`.

    Parameters
    ----------
    model : nn.Module
    plan : toolkit.layers.Plan
    mask : {"output", "relu_input"}

    Attributes
    ----------
    sources : dict[str, ReluCall or None]
        Per layer, the ReLU call whose input is its mask (None: its own output). All
        None for ``mask="output"``.

    Examples
    --------
    >>> masks = ActivityMasks(model, plan, "relu_input")             # doctest: +SKIP
    >>> with masks.observe(model, lambda layer, x, z, active: ...):  # doctest: +SKIP
    ...     model(images)
    """

    def __init__(self, model: nn.Module, plan: Plan, mask: str = DEFAULT_MASK):
        self.mask = check_mask(mask)
        self.plan = plan
        self.sources = {layer.name: None for layer in plan}
        if mask == "relu_input":
            try:
                self.sources = relu_after_additions(model, plan)
            except MaskSourceError as error:
                if error.__cause__ is None:  # traced, but the ReLU cannot be observed
                    raise
                warnings.warn(f"{error}; every layer is masked by its own output z > 0 (for a "
                              "network without additions that is the same mask)",
                              RuntimeWarning, stacklevel=3)
        # a ReLU reached without an addition sees z itself: only the others wait for it
        self._waiting: dict[tuple[str, int], list[str]] = defaultdict(list)
        for layer_name, source in self.sources.items():
            if source is not None and source.after_addition:
                self._waiting[(source.module, source.call)].append(layer_name)
        self._module_names = {id(m): n for n, m in model.named_modules()}
        self._calls_per_pass = _relu_calls_per_pass(model) if self._waiting else {}

    @property
    def deferred(self) -> list[str]:
        """The layers whose mask comes from a later ReLU."""
        return [name for names in self._waiting.values() for name in names]

    @contextmanager
    def observe(self, model: nn.Module, callback: MaskedCallback):
        """Call ``callback(layer, x, z, active)`` for every layer during the forward
        passes run in the block; ``active`` is a bool tensor shaped like ``z``, or None
        where the layer's own ``z > 0`` is the mask."""
        if not self._waiting:
            with intercept(model, self.plan, on_layer=lambda layer, x, z: callback(layer, x, z, None)):
                yield
            return
        deferred = set(self.deferred)
        pending: dict[str, tuple[Layer, Tensor, Tensor]] = {}
        calls: Counter = Counter()

        def on_layer(layer: Layer, x: Tensor, z: Tensor) -> None:
            if layer.name in deferred:
                # z is added to in place (out += identity) before the ReLU: keep a copy
                pending[layer.name] = (layer, x, z.detach().clone())
            else:
                callback(layer, x, z, None)

        def on_relu(relu: nn.ReLU, relu_input: Tensor, output: Tensor) -> None:
            name = self._module_names[id(relu)]
            key = (name, calls[name] % self._calls_per_pass.get(name, 1))
            calls[name] += 1
            for layer_name in self._waiting.get(key, ()):
                layer, x, z = pending.pop(layer_name)
                if relu_input.shape != z.shape:
                    raise MaskSourceError(
                        f"layer '{layer_name}' has outputs shaped {tuple(z.shape)} but the ReLU "
                        f"'{name}' after it gets {tuple(relu_input.shape)} (a broadcasting "
                        "addition?); use mask='output'")
                callback(layer, x, z, relu_input.detach() > 0)

        with intercept(model, self.plan, on_layer=on_layer, on_relu=on_relu):
            yield
        if pending:
            raise MaskSourceError(f"the ReLUs after the layers {sorted(pending)} did not run in "
                                  "the forward pass; use mask='output'")
