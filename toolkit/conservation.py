"""How much relevance enters a residual block, and how much leaves it.

An attribution method is *conservative* across a part of a network when the relevance
that leaves the part at its input adds up to the relevance that entered it at its
output. Deep Taylor decomposition redistributes every neuron's relevance over the
neuron's inputs with shares that add up to one, so it is conservative wherever no bias
takes a share (docs/math.md, sections 6.1 and 7). :func:`block_relevance` measures it
for the residual blocks of a network, per image, with any explainer of
:mod:`toolkit.methods`:

* the relevance at a point of the network is what the method would return if that point
  were the input: ``explainer.finish(activation, backward signal)`` summed over the
  point's values -- the backward signal itself for PatternAttribution, activation times
  gradient for LRP-z (for the signal methods, Gradient to PatternNet, it is a signal,
  not a relevance, and its sum is shown only for comparison);
* ``entering``: at the block's output; ``at_addition``: the same after the block's last
  ReLU (the relevance of the sum ``u`` that the addition splits); ``leaving``: at the
  block's input, where the branch and the shortcut have added up.

The measurement watches the traced graph's nodes at the block's input and output
(:func:`toolkit.layers.runner.watching` and an identity autograd function that records the
backward signal); the explainer, the model and the result of ``attribute`` are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["BlockRelevance", "block_relevance", "residual_blocks"]


@dataclass
class BlockRelevance:
    """The relevance around one residual block, one value per image.

    The explainers rescale the backward signal of every image by powers of two between
    blocks (:mod:`toolkit.methods`, "Overflow"), so the three values of an image share a
    unit within its block but not across blocks: compare them through the ratios.

    Attributes
    ----------
    entering : Tensor
        ``(N,)`` summed over the block's output.
    at_addition : Tensor
        ``(N,)`` summed over the output where its ReLU is active: the relevance of the
        sum ``u = z + s`` (the ReLU passes none where ``u <= 0``).
    leaving : Tensor
        ``(N,)`` summed over the block's input: what the branch and the shortcut pass on.
    """

    entering: Tensor
    at_addition: Tensor
    leaving: Tensor

    @property
    def ratio(self) -> Tensor:
        """``leaving / entering`` per image: 1 for a conservative block."""
        return self.leaving / self.entering

    @property
    def reaching_ratio(self) -> Tensor:
        """``at_addition / entering`` per image: the share of the relevance that the
        block's last ReLU lets through to the addition."""
        return self.at_addition / self.entering

    @property
    def addition_ratio(self) -> Tensor:
        """``leaving / at_addition`` per image: what the addition and the branch do to the
        relevance of the sum (1 if they conserve it)."""
        return self.leaving / self.at_addition


class _Record(torch.autograd.Function):
    """Forward: identity (the value is kept). Backward: the signal is kept, passed on unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, store: dict, key: str) -> Tensor:
        ctx.store, ctx.key = store, key
        store[key] = [x.detach().clone(), None]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.store[ctx.key][1] = grad.detach().clone()
        return grad, None, None


def block_relevance(explainer, inputs: Tensor, blocks: Sequence[str], target=None) -> dict[str, BlockRelevance]:
    """Measure the relevance entering and leaving residual blocks during one explanation.

    Parameters
    ----------
    explainer : toolkit.methods.Explainer
        Any method (its model is ``explainer.model``).
    inputs : Tensor
        The images explained.
    blocks : sequence of str
        Names of modules of the model whose forward adds two branches (torchvision's
        ``BasicBlock`` s: ``"layer1"``, ...).
    target : optional
        As for ``explainer.attribute``.

    Returns
    -------
    dict[str, BlockRelevance]

    Raises
    ------
    ValueError
        For a name that is not a residual block of the model.
    """
    from toolkit.layers.runner import watching

    model = explainer.model
    residual = residual_blocks(model, inputs[:1])
    wrong = [name for name in blocks if name not in residual]
    if wrong:
        raise ValueError(f"{wrong} are not residual blocks of {type(model).__name__}; its blocks are "
                         f"{[m for m in residual if m]}")
    ends = _block_ends(model, inputs[:1], blocks)
    store: dict[str, list] = {}
    callbacks: dict[str, list] = {}
    for name in blocks:
        start, end = ends[name]  # the output before its rescaling: the block's own unit
        callbacks.setdefault(start, []).append(f"{name}.input")
        callbacks.setdefault(end + ":before", []).append(f"{name}.output")

    def recorder(keys):
        def record(value):
            for key in keys:
                value = _Record.apply(value, store, key)
            return value
        return record

    with watching({node: recorder(keys) for node, keys in callbacks.items()}):
        explainer.attribute(inputs, target)

    def total(values: Tensor, signal: Tensor) -> Tensor:
        return explainer.finish(values, signal).flatten(1).sum(1).detach()

    result = {}
    for name in blocks:
        x, g_in = store[name + ".input"]
        out, g_out = store[name + ".output"]
        result[name] = BlockRelevance(entering=total(out, g_out),
                                      at_addition=total(out, g_out * (out > 0)),
                                      leaving=total(x, g_in))
    return result


def residual_blocks(model, example: Tensor) -> list[str]:
    """The modules of ``model`` whose own forward adds two tensors that carry the input's
    signal (a residual block; ``""`` for the model itself), in forward order."""
    from toolkit.layers import operations, trace

    graph = trace(model, example).graph
    if graph is None:
        return []
    found = []
    for name, node in graph.nodes.items():
        if name in graph.signal and operations.category(node) == "addition":
            joined = [a for a in node.all_input_nodes if a.name in graph.signal]
            if len(joined) == 2 and operations.owner(node) not in found:
                found.append(operations.owner(node))
    return found


def _block_ends(model, example: Tensor, blocks) -> dict[str, tuple[str, str]]:
    """Per block, the graph node that enters it (its input) and its last node (its output)."""
    from toolkit.layers import operations, trace

    graph = trace(model, example).graph
    order = list(graph.nodes)
    ends = {}
    for block in blocks:
        def inside(node, block=block):
            owner = operations.owner(node)
            return node.op not in ("placeholder", "get_attr", "output") and (
                owner == block or owner.startswith(block + ".") or block == "")
        owned = [graph.nodes[n] for n in order if inside(graph.nodes[n])]
        entering = {a.name for node in owned for a in node.all_input_nodes
                    if not inside(a) and a.name in graph.signal}
        if len(entering) != 1:
            raise ValueError(f"block {block!r} does not have one input ({sorted(entering)})")
        ends[block] = (entering.pop(), owned[-1].name)
    return ends
