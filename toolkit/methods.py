"""Explanation methods: one backward pass from an output neuron to the input.

:class:`Gradient`, :class:`DeconvNet`, :class:`GuidedBackprop`, :class:`PatternNet`,
:class:`PatternAttribution` and :class:`LRPZ` share Captum's signature
``attribute(inputs, target=None)`` (``target=None``: the predicted class). They differ
only in how a Conv2d/Linear layer and a ReLU pass the backward signal on (the weight, the
pattern, or their product; the forward mask, a ReLU of the signal, or both) and in the
value the pass starts from (``start="one"`` or ``"logit"``). The rules, the start
values and PatternAttribution as deep Taylor decomposition are in docs/math.md,
sections 6-7.

Example::

    from toolkit import PatternNet, fit_patterns
    patterns = fit_patterns(model, loader)
    signal = PatternNet(model, patterns).attribute(images, target=None)  # predicted class

How it is computed: during the forward pass :func:`toolkit.layers.intercept` replaces
the output of every Conv2d/Linear layer (and, for DeconvNet and Guided Backprop, every
ReLU) by a tensor with the same values whose backward pass is the method's rule, and one
call of :func:`torch.autograd.grad` runs the whole explanation for the whole batch.
The model is never changed: it runs in eval mode for the pass (each module's mode is
restored), the hooks are removed afterwards, and no ``.grad`` is written.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from toolkit.layers import Layer, Plan, evaluation_mode, intercept, trace

__all__ = [
    "Explainer",
    "Gradient",
    "DeconvNet",
    "GuidedBackprop",
    "PatternNet",
    "PatternAttribution",
    "LRPZ",
    "Target",
]

#: One class for all samples, one class per sample, or None for the predicted classes.
Target = Union[int, Sequence[int], Tensor, None]

STARTS = ("logit", "one")
PATTERN_KINDS = ("two_component", "linear")


# ----------------------------------------------------------------------------------
# the backward rules autograd does not know
# ----------------------------------------------------------------------------------
class _LinearRule(torch.autograd.Function):
    """Forward: the layer output ``z``. Backward: ``V^T grad``, for the layer input only.

    ``z`` comes in detached and goes out as a copy, so the layer's own graph (and with
    it the weight gradients) is cut; of the input only the shape is kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, rule_weight: Tensor, layer: Layer) -> Tensor:
        ctx.layer, ctx.input_shape = layer, x.shape
        ctx.save_for_backward(rule_weight)
        return z.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rule_weight,) = ctx.saved_tensors
        return ctx.layer.transpose(grad, rule_weight, ctx.input_shape), None, None, None


class _DeconvReLU(torch.autograd.Function):
    """Forward: the ReLU output. Backward: ``relu(grad)``, ignoring the forward mask."""

    @staticmethod
    def forward(ctx, x: Tensor, output: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.clamp(min=0), None


class _GuidedReLU(torch.autograd.Function):
    """Forward: the ReLU output. Backward: ``relu(grad)`` where the ReLU was active."""

    @staticmethod
    def forward(ctx, x: Tensor, output: Tensor) -> Tensor:
        ctx.save_for_backward(output > 0)
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (active,) = ctx.saved_tensors
        return grad.clamp(min=0) * active, None


# ----------------------------------------------------------------------------------
# the shared machinery
# ----------------------------------------------------------------------------------
class Explainer:
    """Base class: explain the outputs of ``model`` by one modified backward pass.

    A subclass states its rules and nothing else: the weight whose transpose carries
    the signal back through each Conv2d/Linear layer (:meth:`rule_weights`, ``W`` by
    default), the autograd function that replaces each ReLU (``relu_rule``; None keeps
    autograd's own ReLU backward, the forward mask), and how the pass starts and ends.

    Parameters
    ----------
    model : nn.Module
        A classifier built from the modules of :data:`toolkit.layers.SUPPORTED_MODULES`
        that returns logits shaped ``(N, classes)``.
    start : {"logit", "one"}, optional
        The value the backward pass starts from at the selected output neuron: the
        logit's own value, or 1. Each method documents its default.

    Notes
    -----
    The traced layers of the model (:class:`toolkit.layers.Plan`) are cached and traced
    again only when the per-sample input shape changes.
    """

    default_start = "one"
    relu_rule: type[torch.autograd.Function] | None = None

    def __init__(self, model: nn.Module, start: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        start = self.default_start if start is None else start
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, not {start!r}")
        self.model = model
        self.start = start
        self._plan: Plan | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, start={self.start!r})"

    # -- the rules (overridden by the methods) --------------------------------------
    @property
    def _pattern_kind(self) -> str:
        """The pattern the rules use: ``linear`` for S_a, ``positive`` for S_a+- (only
        active neurons pass the signal, so ``a_-`` is never needed)."""
        return "linear" if self.kind == "linear" else "positive"

    def rule_weights(self, plan: Plan, like: Tensor) -> dict[str, Tensor]:
        """Per layer name, the weight ``V`` of the backward step ``r -> V^T r``."""
        return {layer.name: layer.weight() for layer in plan}

    def start_values(self, logits: Tensor) -> Tensor:
        """The value the backward pass starts from, given each sample's selected logit."""
        return logits if self.start == "logit" else torch.ones_like(logits)

    def finish(self, inputs: Tensor, grad: Tensor) -> Tensor:
        """Turn the signal that arrives at the input into the method's result."""
        return grad

    # -- the pass ---------------------------------------------------------------------
    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        """Explain the selected output of every sample in ``inputs``.

        Parameters
        ----------
        inputs : Tensor
            A batch shaped as the model expects, ``(N, C, H, W)`` or ``(N, features)``,
            on the model's device and in its dtype. It is neither changed nor made to
            require a gradient.
        target : int, sequence of int, Tensor or None
            The output neuron to explain: one class for all samples, one class per
            sample, or None for each sample's predicted class.

        Returns
        -------
        Tensor
            The explanation, shaped like ``inputs`` (detached).

        Raises
        ------
        ValueError
            For inputs of the wrong shape or with NaN/Inf values, targets out of range or
            of the wrong count.
        TypeError
            For inputs that are not floating point or not in the model's dtype, targets
            that are not integers.
        toolkit.layers.UnsupportedLayerError
            If the model uses a module the rules do not cover.
        """
        self._check_inputs(inputs)
        plan = self._plan_for(inputs)
        _check_input_rank(inputs, plan)
        x = inputs.detach().clone().requires_grad_(True)
        logits = self._forward(x, plan)
        self._check_logits(logits, inputs)
        seed = self._seed(logits.detach(), _as_target(target, logits))
        (grad,) = torch.autograd.grad(logits, x, seed)
        return self.finish(x.detach(), grad)

    def _forward(self, x: Tensor, plan: Plan) -> Tensor:
        """The model's forward pass (eval mode) with the rules' functions in place."""
        weights = self.rule_weights(plan, x)

        def on_layer(layer: Layer, layer_input: Tensor, z: Tensor) -> Tensor:
            return _LinearRule.apply(layer_input, z.detach(), weights[layer.name], layer)

        def on_relu(relu: nn.ReLU, relu_input: Tensor, output: Tensor) -> Tensor:
            return self.relu_rule.apply(relu_input, output.detach())

        relu_hook = on_relu if self.relu_rule is not None else None
        with evaluation_mode(self.model), torch.enable_grad(), \
                intercept(self.model, plan, on_layer=on_layer, on_relu=relu_hook):
            return self.model(x)

    def _seed(self, logits: Tensor, target: Tensor) -> Tensor:
        """The output gradient that starts the backward pass: the start value at each
        sample's target, 0 elsewhere."""
        index = target[:, None]
        start = self.start_values(logits.gather(1, index))
        return torch.zeros_like(logits).scatter_(1, index, start)

    # -- checks -----------------------------------------------------------------------
    def _plan_for(self, inputs: Tensor) -> Plan:
        if self._plan is None or self._plan.input_shape != tuple(inputs.shape[1:]):
            try:
                plan = trace(self.model, inputs)
            except RuntimeError as error:
                raise ValueError(
                    f"the model cannot run on inputs of shape {tuple(inputs.shape)}; give a "
                    f"batch shaped as the model expects, (N, C, H, W) or (N, features): {error}"
                ) from error
            self._check_plan(plan)
            self._plan = plan
        return self._plan

    def _check_plan(self, plan: Plan) -> None:
        """Hook for methods that need something of every layer (their patterns)."""

    def _check_inputs(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, not {type(inputs).__name__}")
        if not inputs.is_floating_point():
            raise TypeError(f"inputs must be floating point, got {inputs.dtype}")
        if inputs.dim() < 2 or inputs.shape[0] == 0:
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} are not a batch: give (N, C, H, W) "
                "or (N, features) with N >= 1"
            )
        parameter = next(self.model.parameters(), None)
        if parameter is not None and parameter.dtype != inputs.dtype:
            raise TypeError(
                f"inputs are {inputs.dtype} but the model's weights are {parameter.dtype}; "
                "cast one of them (e.g. model.double() or inputs.float())"
            )
        if parameter is not None and parameter.device != inputs.device:
            raise ValueError(f"inputs are on {inputs.device} but the model is on {parameter.device}")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or Inf values")

    @staticmethod
    def _check_logits(logits: Tensor, inputs: Tensor) -> None:
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"for inputs of shape {tuple(inputs.shape)} the model returned {shape}; "
                f"expected logits shaped ({inputs.shape[0]}, classes)"
            )


def _check_input_rank(inputs: Tensor, plan: Plan) -> None:
    """A convolutional network needs (N, C, H, W): an unbatched (C, H, W) image would
    otherwise pass through the convolutions as one sample with C rows."""
    first = plan.layers[0]
    if first.is_conv and inputs.dim() != 4:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} are not (N, C, H, W), as the model's "
            f"first layer '{first.name}' (Conv2d) needs"
        )


def _as_target(target: Target, logits: Tensor) -> Tensor:
    """The class index of every sample as a long tensor on the logits' device."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError("target must be class indices, not booleans")
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"target must be integer class indices, got {t.dtype}")
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


# ----------------------------------------------------------------------------------
# gradient-type methods
# ----------------------------------------------------------------------------------
class Gradient(Explainer):
    """The gradient of the selected output with respect to the input (saliency map).

    Rules: ``W^T`` through Conv2d/Linear layers, the forward mask at each ReLU. Equal to
    Captum's ``Saliency(abs=False)``.

    Parameters
    ----------
    model : nn.Module
    start : {"one", "logit"}, default "one"
        The backward pass starts from 1 at the selected logit (the gradient itself);
        "logit" multiplies each sample's result by its logit.

    Examples
    --------
    >>> grad = Gradient(model).attribute(images, target=3)       # doctest: +SKIP
    """


class DeconvNet(Explainer):
    """DeconvNet (Zeiler & Fergus, 2014): the gradient with ReLUs applied to the signal.

    Rules: ``W^T`` through Conv2d/Linear layers; at each ReLU the backward signal is
    rectified, ``relu(r)``, and the forward mask is ignored. Max-pooling switches come
    from the forward pass. Equal to Captum's ``Deconvolution``. In the paper's terms it
    reconstructs the signal with the filter-based estimator ``S_w``.

    Parameters
    ----------
    model : nn.Module
    start : {"one", "logit"}, default "one"
        The backward pass starts from 1 at the selected logit.
    """

    relu_rule = _DeconvReLU


class GuidedBackprop(Explainer):
    """Guided Backprop (Springenberg et al., 2015): gradient and DeconvNet combined.

    Rules: ``W^T`` through Conv2d/Linear layers; at each ReLU the signal passes only
    where the forward ReLU was active *and* the signal is positive. Equal to Captum's
    ``GuidedBackprop``.

    Parameters
    ----------
    model : nn.Module
    start : {"one", "logit"}, default "one"
        The backward pass starts from 1 at the selected logit.
    """

    relu_rule = _GuidedReLU


# ----------------------------------------------------------------------------------
# pattern-based methods
# ----------------------------------------------------------------------------------
class _PatternExplainer(Explainer):
    """Shared part of PatternNet and PatternAttribution: checking and casting patterns."""

    default_start = "logit"

    def __init__(self, model: nn.Module, patterns, kind: str = "two_component",
                 start: str | None = None):
        super().__init__(model, start)
        if patterns is None:
            raise ValueError(
                f"{type(self).__name__} needs the patterns of the model; fit them with "
                "toolkit.fit_patterns(model, data)"
            )
        from toolkit.patterns import Patterns

        if not isinstance(patterns, Patterns):
            raise TypeError(
                f"patterns must be a toolkit.patterns.Patterns (from toolkit.fit_patterns), "
                f"not {type(patterns).__name__}"
            )
        if kind not in PATTERN_KINDS:
            raise ValueError(f"kind must be one of {PATTERN_KINDS}, not {kind!r}")
        patterns.check(model)
        self.patterns = patterns
        self.kind = kind
        self._weights_cache: tuple[tuple, dict[str, Tensor]] | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.model).__name__}, kind={self.kind!r}, "
                f"start={self.start!r})")

    def _check_plan(self, plan: Plan) -> None:
        from toolkit.patterns import PatternMismatchError

        for layer in plan:
            if layer.name not in self.patterns:
                raise PatternMismatchError(
                    f"no patterns for layer '{layer.name}'; the patterns hold {self.patterns.names}"
                )
            shape = getattr(self.patterns[layer.name], self._pattern_kind).shape
            if shape != layer.weight_shape:
                raise PatternMismatchError(
                    f"the patterns of layer '{layer.name}' are shaped {tuple(shape)}, its weight "
                    f"{tuple(layer.weight_shape)}"
                )

    @property
    def _pattern_kind(self) -> str:
        """The pattern the rules use: ``linear`` for S_a, ``positive`` for S_a+- (only
        active neurons pass the signal, so ``a_-`` is never needed)."""
        return "linear" if self.kind == "linear" else "positive"

    def rule_weights(self, plan: Plan, like: Tensor) -> dict[str, Tensor]:
        """The rule weight of every layer, made from its pattern (cast to the dtype and
        device of ``like``) by :meth:`combine`; kept for the next call on the same dtype
        and device, since patterns are bound to the model's weights anyway."""
        key = (like.dtype, like.device, tuple(plan.names))
        if self._weights_cache is None or self._weights_cache[0] != key:
            weights = {}
            for layer in plan:
                pattern = getattr(self.patterns[layer.name], self._pattern_kind)
                weights[layer.name] = self.combine(layer, pattern.to(device=like.device, dtype=like.dtype))
            self._weights_cache = (key, weights)
        return self._weights_cache[1]

    def combine(self, layer: Layer, pattern: Tensor) -> Tensor:
        """The rule weight of ``layer`` given its pattern ``A``."""
        raise NotImplementedError


class PatternNet(_PatternExplainer):
    """PatternNet: the signal ``S(x)`` of the input that the selected output detects.

    Rules: ``A^T`` through every Conv2d/Linear layer (``A`` = the layer's pattern), the
    forward mask at each ReLU. With ``kind="two_component"`` (default) ``A = a_+``, the
    pattern of the active neurons: the signal of inactive neurons is stopped by the
    forward mask anyway, so ``a_-`` is never needed (as in the authors' code; this holds
    for the output layer too, whatever the sign of the logit). ``kind="linear"`` uses
    the pattern ``a`` of the linear estimator ``S_a``.

    Scaling: with ``start="logit"`` (default, the authors' choice) the pass starts from
    the logit's value ``y``. For one linear neuron ``y = w^T x`` this gives exactly the
    estimated signal ``S_a(x) = a y``; through a network it gives the signal the
    selected output sees. With ``start="one"`` the result is per unit of the output:
    PatternNet with ``start="logit"`` equals it times the logit.

    With the patterns replaced by the weights (``A = W``) PatternNet is the gradient,
    times the logit.

    Parameters
    ----------
    model : nn.Module
    patterns : toolkit.patterns.Patterns
        Fitted for this model (:func:`toolkit.fit_patterns`); checked against the model's
        architecture and weights (fingerprint) when the explainer is made. Patterns
        belong to the weights: after changing the weights, fit and make anew.
    kind : {"two_component", "linear"}
    start : {"logit", "one"}, default "logit"
    """

    def combine(self, layer: Layer, pattern: Tensor) -> Tensor:
        return pattern


class PatternAttribution(_PatternExplainer):
    """PatternAttribution: how much each input dimension contributes to the output.

    Rules: ``(W * A)^T`` through every Conv2d/Linear layer (elementwise product of
    weight and pattern), the forward mask at each ReLU. This is deep Taylor
    decomposition with the root point ``x0 = x - S_a+(x)``: the part of the input the
    pattern does not explain is the reference, so the relevance per layer is
    ``r^{l-1} = (w * a_+) r^l``. ``kind`` picks ``a_+`` (default) or the linear ``a``,
    as for :class:`PatternNet`.

    Scaling: with ``start="logit"`` (default) the pass starts from the logit's value
    ``y``; for one linear neuron ``y = w^T x`` the result is ``w * a * y``, the
    elementwise product of the filter and the estimated signal. ``start="one"`` gives
    it per unit of the output. With all patterns set to one this is the gradient, times
    the logit.

    Parameters
    ----------
    model : nn.Module
    patterns : toolkit.patterns.Patterns
    kind : {"two_component", "linear"}
    start : {"logit", "one"}, default "logit"
    """

    def combine(self, layer: Layer, pattern: Tensor) -> Tensor:
        return layer.weight() * pattern


# ----------------------------------------------------------------------------------
# LRP
# ----------------------------------------------------------------------------------
class LRPZ(Explainer):
    """LRP with the z-rule: deep Taylor decomposition with the root point 0.

    The z-rule sends the relevance ``R_j`` of a neuron ``z_j = sum_i x_i w_ij + b_j`` to
    its inputs in proportion to their contributions (bias in ``z_j``, no epsilon)::

        R_i = sum_j  x_i w_ij / z_j  R_j

    For networks of Conv2d/Linear layers, ReLUs, max and average pooling this is exactly
    *input times gradient*, applied once at the input. Let ``g`` be the gradient of the
    selected logit (seeded as below) and suppose the relevance at a layer's output is
    ``R_j = z_j g_j``. Then

        R_i = x_i sum_j w_ij g_j = x_i g_i,

    because ``sum_j w_ij g_j`` is the gradient at the layer input. A ReLU passes the
    relevance unchanged and so keeps the form: where it is active ``a = z`` and the
    gradient passes, where it is not ``a = 0`` and both sides are 0. Max pooling gives
    all relevance to the winner, whose value and gradient are those of the output; average
    pooling is a linear layer with weights ``1/k``. At the top, ``R = logit * 1`` starts
    the induction. So at every layer ``R = a * g``, in particular at the input.

    Scaling: ``start="logit"`` (default, the authors' choice) puts the logit's value at
    the output, so the relevances sum to the logit minus the bias contributions
    ``sum over layers of b_j g_j`` (conservation holds without biases).
    ``start="one"`` puts relevance 1 at the output (the gradient is seeded with
    ``1 / logit``; undefined where a logit is exactly 0).

    Parameters
    ----------
    model : nn.Module
    start : {"logit", "one"}, default "logit"
    """

    default_start = "logit"

    def start_values(self, logits: Tensor) -> Tensor:
        # the gradient seed s gives output relevance logit * s
        return torch.ones_like(logits) if self.start == "logit" else 1 / logits

    def finish(self, inputs: Tensor, grad: Tensor) -> Tensor:
        return inputs * grad
