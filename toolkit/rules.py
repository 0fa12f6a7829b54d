"""The backward rules autograd does not know, and the per-sample rescaling they share.

The explanation methods (:mod:`toolkit.methods`) run the model's forward pass with the
output of every neuron layer, and for some methods of every activation, replaced by a
tensor with the same values whose backward pass is the method's rule:

* :class:`LinearRule` -- at a neuron layer: ``V^T r`` with the rule's weight ``V`` (the
  weight, the pattern, or their product); for a layer whose inactive side passes the
  signal (a LeakyReLU, no activation at all), ``V_+^T (r m) + V_-^T (r (1 - m))`` with the
  activity mask ``m`` (docs/math.md, section 5);
* :class:`DeconvRule`, :class:`GuidedRule` -- at a ReLU-family activation: the
  activation's shape applied to the backward signal, ignoring the forward mask
  (DeconvNet), or times the forward derivative (Guided Backprop).

Overflow
--------
The backward signal of PatternNet grows by about ``|a_+| |w|`` per layer (50-65 for a
random VGG), which overflows float32 after some 20 layers. So the signal is rescaled per
sample: where every path from the input to the output passes (a *cut* of the graph), each
sample's signal is divided by the power of two that brings its largest value into
[0.5, 1), and the exponents are summed per sample (:class:`Scale`). Everything between two
rules is positively homogeneous per sample, so this changes nothing but the scale, and a
power of two scales exactly in binary floating point. Inside a block whose branches
join (a residual block, an Inception or a dense block) the signal is not rescaled, since
it could not be added to the other branches' any more.
"""
from __future__ import annotations

import torch
from torch import Tensor

from toolkit.layers import Activation, Layer

__all__ = ["Scale", "LinearRule", "Normalise", "DeconvRule", "GuidedRule", "MaskCell",
           "times_power_of_two", "peak_exponent"]


# ----------------------------------------------------------------------------------
# per-sample powers of two
# ----------------------------------------------------------------------------------
def peak_exponent(t: Tensor) -> Tensor:
    """Per sample, the ``e`` with ``max |t| = m * 2**e``, ``m`` in [0.5, 1) (0 for zeros)."""
    peak = t.detach().abs().reshape(t.shape[0], -1).amax(1) if t.dim() > 1 else t.detach().abs()
    return torch.frexp(peak).exponent.long()


def times_power_of_two(t: Tensor, exponent: Tensor) -> Tensor:
    """``t * 2**exponent`` per sample, exactly while the result is representable.

    The factor is applied in two halves so that each is representable in ``t``'s dtype
    (half of the widest exponent range of an IEEE type still fits in it)."""
    shape = (-1, *([1] * (t.dim() - 1)))
    half = torch.div(exponent, 2, rounding_mode="floor")
    for k in (half, exponent - half):
        t = t * torch.exp2(k.to(torch.float64)).to(t.dtype).reshape(shape)
    return t


class Scale:
    """The power of two each sample's backward signal has been divided by so far."""

    def __init__(self, samples: int, device):
        self.log2 = torch.zeros(samples, dtype=torch.long, device=device)

    def normalise(self, t: Tensor) -> Tensor:
        """``t`` divided per sample by the power of two that puts its peak in [0.5, 1)."""
        exponent = peak_exponent(t)
        self.log2 += exponent
        return times_power_of_two(t, -exponent)


class MaskCell:
    """A layer's activity mask, filled in during the forward pass (possibly after the
    layer itself ran: by the activation that decides) and read by its backward rule."""

    def __init__(self, mask: Tensor | None = None):
        self.mask = mask


# ----------------------------------------------------------------------------------
# neuron layers
# ----------------------------------------------------------------------------------
class LinearRule(torch.autograd.Function):
    """Forward: the layer output ``z``. Backward: ``V^T grad`` for the layer input only
    (``V`` a tensor), or ``V_+^T (grad m) + V_-^T (grad (1 - m))`` (``V`` a pair, ``m``
    the mask in ``cell``), after dividing each sample's ``grad`` by a power of two
    (recorded in ``scale``; None: not rescaled here).

    ``z`` comes in detached and goes out as a copy, so the layer's own graph (and with
    it the weight gradients) is cut; of the input only the shape is kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, weight, layer: Layer, scale: Scale | None,
                cell: MaskCell | None = None) -> Tensor:
        ctx.layer, ctx.input_shape, ctx.scale, ctx.cell = layer, x.shape, scale, cell
        ctx.two_sided = isinstance(weight, tuple)
        ctx.save_for_backward(*(weight if ctx.two_sided else (weight,)))
        return z.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.scale is not None:
            grad = ctx.scale.normalise(grad)
        layer, shape = ctx.layer, ctx.input_shape
        if ctx.two_sided:
            positive, negative = ctx.saved_tensors
            active = ctx.cell.mask
            on = grad * active
            result = layer.transpose(on, positive, shape) + layer.transpose(grad - on, negative, shape)
        else:
            (weight,) = ctx.saved_tensors
            result = layer.transpose(grad, weight, shape)
        return result, None, None, None, None, None


class Normalise(torch.autograd.Function):
    """Forward: identity. Backward: the signal divided per sample by a power of two
    (recorded in ``scale``). Put where all paths pass (a cut that is not a layer)."""

    @staticmethod
    def forward(ctx, output: Tensor, scale: Scale) -> Tensor:
        ctx.scale = scale
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.scale.normalise(grad), None


# ----------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------
class DeconvRule(torch.autograd.Function):
    """Forward: the activation's output. Backward: the activation's shape applied to the
    signal (``relu(grad)``; a LeakyReLU's slope on the negative side), the forward mask
    ignored (DeconvNet)."""

    @staticmethod
    def forward(ctx, u: Tensor, output: Tensor, activation: Activation) -> Tensor:
        ctx.activation = activation
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.activation.rectify(grad), None, None


class GuidedRule(torch.autograd.Function):
    """Forward: the activation's output. Backward: the forward derivative times the
    rectified signal: ``relu(grad)`` where the neuron was active (Guided Backprop)."""

    @staticmethod
    def forward(ctx, u: Tensor, output: Tensor, activation: Activation) -> Tensor:
        ctx.activation = activation
        ctx.save_for_backward(activation.derivative(u.detach()))
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (derivative,) = ctx.saved_tensors
        return ctx.activation.rectify(grad) * derivative, None, None
