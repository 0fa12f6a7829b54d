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

The measurement hooks the block's input and output (forward hooks and an identity
autograd function that records the backward signal); the explainer, the model and the
result of ``attribute`` are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["BlockRelevance", "block_relevance"]


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
    from toolkit.layers import trace

    model = explainer.model
    residual = trace(model, inputs[:1]).residual_modules
    modules = dict(model.named_modules())
    wrong = [name for name in blocks if name not in modules or name not in residual]
    if wrong:
        raise ValueError(f"{wrong} are not residual blocks of {type(model).__name__}; its blocks are "
                         f"{[m for m in residual if m]}")
    explainer.attribute(inputs[:1], target if target is None or isinstance(target, int) else target[:1])
    store: dict[str, list] = {}
    handles = []
    for name in blocks:  # registered before the explainer's own hooks, so they run first
        handles.append(modules[name].register_forward_pre_hook(
            lambda module, args, name=name: (_Record.apply(args[0], store, name + ".input"), *args[1:])))
        handles.append(modules[name].register_forward_hook(
            lambda module, args, output, name=name: _Record.apply(output, store, name + ".output")))
    try:
        explainer.attribute(inputs, target)
    finally:
        for handle in handles:
            handle.remove()

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
