"""Explanation methods: one backward pass from an output neuron to the input.

:class:`Gradient`, :class:`DeconvNet`, :class:`GuidedBackprop`, :class:`PatternNet`,
:class:`PatternAttribution` and :class:`LRPZ` share Captum's signature
``attribute(inputs, target=None)`` (``target=None``: the predicted class). They differ
only in how a Conv2d/Linear layer and a ReLU pass the backward signal on (the weight, the
pattern, or their product; the forward mask, a ReLU of the signal, or both) and in the
value the pass starts from (``start="one"`` or ``"logit"``). The rules, the start
values and PatternAttribution as deep Taylor decomposition are in docs/math.md,
sections 6-7.

Every method declares itself once, on its class, with :func:`register`: its name (one
spelling for :mod:`toolkit.compare`, the ``toolkit`` command, the benchmarks and the
README), its titles, whether it returns a signal or an attribution, and which fitted
patterns it reads (:class:`Method`, collected in :data:`REGISTRY`). A class may register
several variants, as PatternNet does with the linear and the two-component patterns.

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

Overflow
--------
The backward signal of PatternNet grows by about ``|a_+| |w|`` per layer (50-65 for a
random VGG, close to ``sqrt(D)``), which overflows float32 after some 20 layers. So
the signal is rescaled per sample: before each Conv2d/Linear rule, every sample's
signal is divided by the power of two that brings its largest value into [0.5, 1),
and the exponents are summed per sample (:class:`_Scale`). Everything between two
rules (ReLU masks, pooling, views, scaling by a constant) is positively homogeneous
per sample, so this changes nothing but the scale; and a power of two scales exactly
in binary floating point, so a result that is representable comes back bit for bit
(up to values below the smallest normal number).

* :meth:`Explainer.attribute` returns the exact result for every sample whose result
  fits the dtype as a normal number. A sample whose result does not fit (larger than
  the dtype's maximum, or with a peak below its smallest normal number) is returned
  *normalised*, its peak ``|value|`` in [0.5, 1), and an :class:`ExplanationScaleWarning`
  names those samples and their scale. Nothing is ever inf or NaN.
* :meth:`Explainer.attribute_scaled` returns every sample normalised together with
  its scale: ``explanation = values * 2 ** log2_scale`` (:class:`ScaledExplanation`).

The rescaling relies on the backward pass being a chain (one path from the output to
the input), which :func:`toolkit.layers.check_forward` ensures by refusing residual
additions.
"""
from __future__ import annotations

import math
import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.layers import Layer, Plan, UnsupportedLayerError, evaluation_mode, intercept, trace

__all__ = [
    "Method",
    "REGISTRY",
    "OUTPUTS",
    "register",
    "get_method",
    "Explainer",
    "ScaledExplanation",
    "ExplanationScaleWarning",
    "NeverActiveOutputError",
    "Gradient",
    "DeconvNet",
    "GuidedBackprop",
    "PatternNet",
    "PatternAttribution",
    "LRPZ",
    "Absolute",
    "Target",
]

#: One class for all samples, one class per sample, or None for the predicted classes.
Target = Union[int, Sequence[int], Tensor, None]

STARTS = ("logit", "one")
#: The estimators whose fitted patterns PatternNet and PatternAttribution use (``kind=``).
PATTERN_ESTIMATORS = ("two_component", "linear")
NEVER_ACTIVE = ("raise", "linear")
#: What a method returns: a signal lives in input space (an image of what the output
#: detects), an attribution says how much each input contributes to the output.
OUTPUTS = ("signal", "attribution")
#: The fitted pattern kinds a method may read (those of :data:`toolkit.patterns.KINDS`).
_FITTED = ("linear", "positive", "negative")


class ExplanationScaleWarning(RuntimeWarning):
    """Some explanations do not fit the dtype and are returned normalised."""


class NeverActiveOutputError(ValueError):
    """A two-component pattern explainer was asked about an output neuron that was never
    active on the fitting data (its pattern ``a_+`` is 0)."""


class ScaledExplanation(NamedTuple):
    """Explanations normalised per sample, with their scale.

    Attributes
    ----------
    values : Tensor
        Shaped like the inputs, in their dtype; each sample's peak ``|value|`` lies in
        [0.5, 1) (or the sample is exactly 0).
    log2_scale : Tensor
        ``(N,)`` int64: the explanation of sample ``i`` is ``values[i] * 2 ** log2_scale[i]``.
    """

    values: Tensor
    log2_scale: Tensor

    def exact(self, dtype=torch.float64) -> Tensor:
        """``values * 2 ** log2_scale`` in ``dtype`` (inf where it does not fit, 0 where
        ``values`` is 0)."""
        values = self.values.to(dtype)
        return torch.where(values == 0, values, _times_power_of_two(values, self.log2_scale))


# ----------------------------------------------------------------------------------
# per-sample powers of two
# ----------------------------------------------------------------------------------
def _peak_exponent(t: Tensor) -> Tensor:
    """Per sample, the ``e`` with ``max |t| = m * 2**e``, ``m`` in [0.5, 1) (0 for zeros)."""
    peak = t.detach().abs().reshape(t.shape[0], -1).amax(1) if t.dim() > 1 else t.detach().abs()
    return torch.frexp(peak).exponent.long()


def _times_power_of_two(t: Tensor, exponent: Tensor) -> Tensor:
    """``t * 2**exponent`` per sample, exactly while the result is representable.

    The factor is applied in two halves so that each is representable in ``t``'s dtype
    (half of the widest exponent range of an IEEE type still fits in it)."""
    shape = (-1, *([1] * (t.dim() - 1)))
    half = torch.div(exponent, 2, rounding_mode="floor")
    for k in (half, exponent - half):
        t = t * torch.exp2(k.to(torch.float64)).to(t.dtype).reshape(shape)
    return t


class _Scale:
    """The power of two each sample's backward signal has been divided by so far."""

    def __init__(self, samples: int, device):
        self.log2 = torch.zeros(samples, dtype=torch.long, device=device)

    def normalise(self, t: Tensor) -> Tensor:
        """``t`` divided per sample by the power of two that puts its peak in [0.5, 1)."""
        exponent = _peak_exponent(t)
        self.log2 += exponent
        return _times_power_of_two(t, -exponent)


# ----------------------------------------------------------------------------------
# the backward rules autograd does not know
# ----------------------------------------------------------------------------------
class _LinearRule(torch.autograd.Function):
    """Forward: the layer output ``z``. Backward: ``V^T grad``, for the layer input only,
    after dividing each sample's ``grad`` by a power of two (recorded in ``scale``).

    ``z`` comes in detached and goes out as a copy, so the layer's own graph (and with
    it the weight gradients) is cut; of the input only the shape is kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, rule_weight: Tensor, layer: Layer, scale: _Scale) -> Tensor:
        ctx.layer, ctx.input_shape, ctx.scale = layer, x.shape, scale
        ctx.save_for_backward(rule_weight)
        return z.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rule_weight,) = ctx.saved_tensors
        if ctx.scale is not None:  # None inside a residual block (see _Normalise)
            grad = ctx.scale.normalise(grad)
        return ctx.layer.transpose(grad, rule_weight, ctx.input_shape), None, None, None, None


class _Normalise(torch.autograd.Function):
    """Forward: identity. Backward: the signal divided per sample by a power of two
    (recorded in ``scale``). Put on the output of a residual block: there the signal of
    both branches is one tensor, so every path below it is divided alike, while the
    layers inside the block leave the scale alone (a signal rescaled on one branch only
    could not be added to the other's)."""

    @staticmethod
    def forward(ctx, output: Tensor, scale: _Scale) -> Tensor:
        ctx.scale = scale
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.scale.normalise(grad), None


@contextmanager
def _normalised_blocks(model: nn.Module, plan: Plan, scale: _Scale):
    """Rescale the backward signal at the output of every outermost residual block."""
    blocks = [m for m in plan.residual_modules
              if m and not any(o == "" or m.startswith(o + ".") for o in plan.residual_modules if o != m)]
    if "" in plan.residual_modules:
        blocks = []
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda module, args, output: _Normalise.apply(output, scale))
               for name in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
            The explanation, shaped like ``inputs`` (detached), in their dtype and always
            finite. A sample whose explanation does not fit the dtype as a normal number
            is returned normalised (peak ``|value|`` in [0.5, 1)) with an
            :class:`ExplanationScaleWarning`; :meth:`attribute_scaled` gives the scale.

        Raises
        ------
        ValueError
            For inputs of the wrong shape or with NaN/Inf values, targets out of range or
            of the wrong count.
        TypeError
            For inputs that are not floating point or not in the model's dtype, targets
            that are not integers.
        toolkit.layers.UnsupportedLayerError
            If the model uses a module or an operation the rules do not cover.

        Notes
        -----
        Works under ``torch.no_grad()`` and ``torch.inference_mode()`` (the pass turns
        autograd on for itself).
        """
        values, log2_scale = self.attribute_scaled(inputs, target)
        info = torch.finfo(values.dtype)
        largest, smallest = math.frexp(info.max)[1], math.frexp(info.tiny)[1]
        zero = values.reshape(values.shape[0], -1).abs().amax(1) == 0
        fits = zero | ((log2_scale <= largest) & (log2_scale >= smallest))
        if not bool(fits.all()):
            bad = (~fits).nonzero().flatten().tolist()
            decades = [round(int(log2_scale[i]) * math.log10(2)) for i in bad[:5]]
            warnings.warn(
                f"{type(self).__name__}: the explanations of samples {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''} have peaks of about "
                f"{', '.join(f'1e{d}' for d in decades)}, outside the normal range of "
                f"{values.dtype} ({info.tiny:.3g} to {info.max:.3g}); they are returned "
                "normalised to a peak |value| in [0.5, 1). attribute_scaled() gives every "
                "sample with its scale (log2); a float64 model gives the exact values",
                ExplanationScaleWarning, stacklevel=2)
        exact = torch.where(fits & ~zero, log2_scale, torch.zeros_like(log2_scale))
        return _times_power_of_two(values, exact)

    def attribute_scaled(self, inputs: Tensor, target: Target = None) -> ScaledExplanation:
        """Like :meth:`attribute`, but every sample normalised, with its scale.

        Returns
        -------
        ScaledExplanation
            ``values`` (peak ``|value|`` of each sample in [0.5, 1), or 0) and
            ``log2_scale``: the explanation is ``values * 2 ** log2_scale``, whatever
            its size.
        """
        self._check_inputs(inputs)
        with torch.inference_mode(False):
            plan = self._plan_for(inputs)
            _check_input_rank(inputs, plan)
            x = inputs.detach().clone().requires_grad_(True)
            scale = _Scale(x.shape[0], x.device)
            logits = self._forward(x, plan, scale)
            self._check_logits(logits, inputs)
            target = _as_target(target, logits)
            self._check_target(plan, target, logits)
            seed = scale.normalise(self._seed(logits.detach(), target))
            (grad,) = torch.autograd.grad(logits, x, seed)
            values = scale.normalise(self.finish(x.detach(), grad))
        return ScaledExplanation(values, scale.log2)

    def _forward(self, x: Tensor, plan: Plan, scale: _Scale) -> Tensor:
        """The model's forward pass (eval mode) with the rules' functions in place.

        The model gets a copy of ``x``, so that an inplace ReLU as its first module
        changes the copy, not the leaf the gradient is taken for."""
        weights = self.rule_weights(plan, x)

        def on_layer(layer: Layer, layer_input: Tensor, z: Tensor) -> Tensor:
            own = None if plan.in_branch(layer) else scale
            return _LinearRule.apply(layer_input, z.detach(), weights[layer.name], layer, own)

        def on_relu(relu: nn.ReLU, relu_input: Tensor, output: Tensor) -> Tensor:
            return self.relu_rule.apply(relu_input, output.detach())

        relu_hook = on_relu if self.relu_rule is not None else None
        with evaluation_mode(self.model), torch.enable_grad(), \
                intercept(self.model, plan, on_layer=on_layer, on_relu=relu_hook), \
                _normalised_blocks(self.model, plan, scale):
            return self.model(x.clone())

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
        if self.relu_rule is not None and plan.relu_calls:
            raise UnsupportedLayerError(
                f"{type(self).__name__} applies its ReLU rule at nn.ReLU modules, but the forward "
                f"calls a ReLU as a function at {plan.relu_calls[0]}; write it as an nn.ReLU module"
            )

    def _check_target(self, plan: Plan, target: Tensor, logits: Tensor) -> None:
        """Hook for methods that cannot explain some output neurons."""

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
    rank = first.ops.input_rank
    if rank is not None and inputs.dim() != rank:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} are not (N, C, H, W), as the model's "
            f"first layer '{first.name}' ({type(first.module).__name__}) needs"
        )


def _as_target(target: Target, logits: Tensor) -> Tensor:
    """The class index of every sample as a long tensor on the logits' device."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    t = _target_tensor(target, classes).to(logits.device)
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


def _target_tensor(target, classes: int) -> Tensor:
    """``target`` as an integer tensor, or a clear error about what it is instead."""
    if isinstance(target, (bool, np.bool_)) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError("target must be class indices, not booleans")
    if isinstance(target, (str, bytes)):
        raise TypeError(f"target must be an integer class index, not the string {target!r}; "
                        "map class names to indices first")
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must be integer class indices, got {target.dtype}")
        return target
    values = [target] if np.ndim(target) == 0 and not isinstance(target, (list, tuple)) else target
    if isinstance(values, (list, tuple)):
        for value in values:
            if value is None:
                raise TypeError("target holds None; give None itself (not a list of None) to explain "
                                "the predicted classes, or one class index per sample")
            if isinstance(value, (bool, np.bool_)):
                raise TypeError("target must be class indices, not booleans")
            if not isinstance(value, (numbers.Integral, Tensor, np.ndarray)):
                raise TypeError(f"target must be integer class indices, got {value!r} "
                                f"({type(value).__name__})")
            if isinstance(value, numbers.Integral) and not -2**63 <= int(value) < 2**63:
                raise ValueError(f"target {int(value)} is out of range: the model has {classes} "
                                 f"classes (0 to {classes - 1})")
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise TypeError(f"target must be an int, a sequence of ints, an integer tensor or None; "
                        f"cannot read {type(target).__name__} {target!r:.60}: {error}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"target must be integer class indices, got {t.dtype}")
    return t


# ----------------------------------------------------------------------------------
# the registry: every method declares itself once, on its class
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One explanation method: how it is named, shown and made.

    Attributes
    ----------
    name : str
        The one spelling used everywhere: :mod:`toolkit.compare`, the ``toolkit``
        command, the benchmarks and the README.
    title : str
        Plain text, for tables (``"PatternNet S_a+-"``).
    label : str
        With mathtext, for figures (``r"PatternNet $S_{a\\pm}$"``).
    output : {"signal", "attribution"}
        What it returns (:data:`OUTPUTS`), and so how it is drawn.
    patterns : tuple of str
        The fitted pattern kinds it reads (of :data:`toolkit.patterns.KINDS`); empty for
        the methods that need no patterns.
    options : dict
        Keyword arguments of the class that make this variant, e.g. ``{"kind": "linear"}``.
    aliases : tuple of str
        Other spellings :func:`get_method` accepts (the command's ``guidedbackprop``).
    explainer : type
        The :class:`Explainer` subclass, filled in by :func:`register`.
    """

    name: str
    title: str
    label: str
    output: str
    patterns: tuple[str, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    explainer: type | None = None

    @property
    def needs_patterns(self) -> bool:
        return bool(self.patterns)

    def make(self, model: nn.Module, patterns=None, **options) -> "Explainer":
        """The explainer of this method for ``model``.

        ``patterns`` is passed only to the methods that need it; ``options`` go to the
        class, except that the variant's own :attr:`options` win (``kind=`` does not
        turn ``patternnet_linear`` into the two-component variant).
        """
        options = {**options, **self.options}
        if self.needs_patterns:
            return self.explainer(model, patterns, **options)
        options.pop("kind", None)  # the pattern estimator means nothing without patterns
        return self.explainer(model, **options)


#: Every registered method by name, in the order of registration: the paper's comparison.
REGISTRY: dict[str, Method] = {}


def register(*methods: Method):
    """Class decorator: register ``methods`` (one per variant) as made by the class.

    Examples
    --------
    >>> @register(Method("my_gradient", "My gradient", "My gradient", "signal"))  # doctest: +SKIP
    ... class MyGradient(Explainer):
    ...     pass
    """
    def decorate(cls: type) -> type:
        for m in methods:
            if m.output not in OUTPUTS:
                raise ValueError(f"method {m.name!r}: output must be one of {OUTPUTS}, not {m.output!r}")
            unknown = [k for k in m.patterns if k not in _FITTED]
            if unknown:
                raise ValueError(f"method {m.name!r}: unknown pattern kinds {unknown}; choose from {_FITTED}")
            taken = [n for n in (m.name, *m.aliases) if n in _spellings()]
            if taken:
                raise ValueError(f"method {m.name!r}: the name {taken[0]!r} is registered already")
            REGISTRY[m.name] = replace(m, explainer=cls)
        return cls
    return decorate


def _spellings() -> dict[str, str]:
    """Every accepted spelling (names and aliases) -> the registered name."""
    return {spelling: m.name for m in REGISTRY.values() for spelling in (m.name, *m.aliases)}


def get_method(name: str) -> Method:
    """The registered method called ``name`` or one of its aliases (any case).

    Raises
    ------
    ValueError
        If no method is registered under that spelling.
    """
    spellings = _spellings()
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in spellings:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[spellings[key]]


# ----------------------------------------------------------------------------------
# gradient-type methods
# ----------------------------------------------------------------------------------
@register(Method("gradient", "Gradient", "Gradient", "signal"))
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


@register(Method("deconvnet", "DeconvNet", "DeconvNet", "signal"))
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


@register(Method("guided_backprop", "Guided BP", "Guided Backprop", "signal",
                 aliases=("guidedbackprop",)))
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
                 start: str | None = None, never_active: str = "raise"):
        super().__init__(model, start)
        if never_active not in NEVER_ACTIVE:
            raise ValueError(f"never_active must be one of {NEVER_ACTIVE}, not {never_active!r}")
        self.never_active = never_active
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
        if kind not in PATTERN_ESTIMATORS:
            raise ValueError(f"kind must be one of {PATTERN_ESTIMATORS}, not {kind!r}")
        patterns.check(model)
        self.patterns = patterns
        self.kind = kind
        self._check_finite()
        self._weights_cache: tuple[tuple, dict[str, Tensor]] | None = None

    def _check_finite(self) -> None:
        """Refuse, once, patterns with a NaN or an infinity among those the rules use:
        every rule weight is a pattern, so a finite explanation needs finite patterns
        (fitted and loaded patterns are finite by construction and by checking)."""
        kinds = {self._pattern_kind, *(("linear",) if self.never_active == "linear" else ())}
        for name, layer_patterns in self.patterns.layers.items():
            for kind in kinds & set(layer_patterns.kinds):
                if not torch.isfinite(layer_patterns.get(kind)).all():
                    raise ValueError(
                        f"the {kind} pattern of layer '{name}' holds NaN or Inf, so every "
                        f"explanation by {type(self).__name__} would: fit the patterns again with "
                        "toolkit.fit_patterns, or read them with Patterns.load, which checks them")

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
        and device, since patterns are bound to the model's weights anyway.

        With ``never_active="linear"`` the output neurons found by :meth:`never_active_outputs`
        use their linear pattern instead of ``a_+ = 0``."""
        key = (like.dtype, like.device, tuple(plan.names))
        if self._weights_cache is None or self._weights_cache[0] != key:
            dead = self.never_active_outputs(plan)
            weights = {}
            for layer in plan:
                pattern = getattr(self.patterns[layer.name], self._pattern_kind)
                if layer is plan.layers[-1] and dead.any() and self.never_active == "linear":
                    pattern = torch.where(dead.reshape(-1, *([1] * (pattern.dim() - 1))),
                                          self.patterns[layer.name].linear, pattern)
                weights[layer.name] = self.combine(layer, pattern.to(device=like.device, dtype=like.dtype))
            self._weights_cache = (key, weights)
        return self._weights_cache[1]

    def never_active_outputs(self, plan: Plan) -> Tensor:
        """Which neurons of the last layer were never active (``z > 0``) on the fitting
        data, as a bool tensor: their two-component pattern ``a_+`` is 0. Read from the
        fit's statistics (``n_pos == 0``) or, without statistics, from an all-zero row of
        ``a_+``. All False for ``kind="linear"``."""
        dead = torch.zeros(plan.layers[-1].out_features, dtype=torch.bool)
        if self.kind != "linear" and self.patterns.names[-1] == plan.layers[-1].name:
            dead[self.patterns.inactive_outputs()] = True
        return dead

    def _check_target(self, plan: Plan, target: Tensor, logits: Tensor) -> None:
        if self.never_active != "raise" or plan.layers[-1].out_features != logits.shape[1]:
            return
        dead = self.never_active_outputs(plan)
        asked = sorted({int(t) for t in target.tolist() if dead[int(t)]})
        if asked:
            listed = ", ".join(map(str, asked[:10])) + (" ..." if len(asked) > 10 else "")
            raise NeverActiveOutputError(
                f"{type(self).__name__} cannot explain class {listed}: its output neuron in layer "
                f"'{plan.layers[-1].name}' was never active (logit > 0) on the data the patterns "
                "were fitted on, so its two-component pattern a_+ is 0 and the explanation would "
                "be 0 everywhere. Fit the patterns on data where this class's logit is positive, "
                "use kind='linear', or pass never_active='linear' to use the linear pattern for "
                "such output neurons"
            )

    def combine(self, layer: Layer, pattern: Tensor) -> Tensor:
        """The rule weight of ``layer`` given its pattern ``A``."""
        raise NotImplementedError


@register(Method("patternnet_linear", "PatternNet S_a", r"PatternNet $S_a$", "signal",
                 patterns=("linear",), options={"kind": "linear"}),
          Method("patternnet", "PatternNet S_a+-", r"PatternNet $S_{a\pm}$", "signal",
                 patterns=("positive",)))
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
    never_active : {"raise", "linear"}, default "raise"
        What to do with an output neuron that was never active on the fitting data
        (two-component patterns only; its ``a_+`` is 0, so its explanation would be 0
        everywhere): raise a :class:`NeverActiveOutputError` naming the class, or use
        that neuron's linear pattern ``a`` in the output layer (the other layers keep
        ``a_+``).
    """

    def combine(self, layer: Layer, pattern: Tensor) -> Tensor:
        return pattern


@register(Method("patternattribution_linear", "PattAttr S_a", r"PattAttr $S_a$", "attribution",
                 patterns=("linear",), options={"kind": "linear"}),
          Method("patternattribution", "PattAttr S_a+-", r"PattAttr $S_{a\pm}$", "attribution",
                 patterns=("positive",)))
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
    never_active : {"raise", "linear"}, default "raise"
        As for :class:`PatternNet`.
    """

    def combine(self, layer: Layer, pattern: Tensor) -> Tensor:
        return layer.weight() * pattern


# ----------------------------------------------------------------------------------
# LRP
# ----------------------------------------------------------------------------------
@register(Method("lrp_z", "LRP-z", "LRP-z", "attribution", aliases=("lrpz",)))
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
        if self.start == "logit":
            return torch.ones_like(logits)
        zero = (logits == 0).flatten().nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"LRPZ with start='one' divides by the selected logit, which is exactly 0 "
                             f"for samples {zero[:10]}; use start='logit' for them")
        return 1 / logits

    def finish(self, inputs: Tensor, grad: Tensor) -> Tensor:
        return inputs * grad


# ----------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------
class Absolute:
    """An explainer whose relevance is the absolute value of another's: ``|r|``.

    A signal (the gradient, say) is signed by direction, not by relevance; ranking
    regions by ``|r|`` asks where the method sees *something*, whatever its sign.
    """

    def __init__(self, explainer):
        self.explainer = explainer

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self.explainer.attribute(inputs, target).abs()

    def __repr__(self) -> str:
        return f"Absolute({self.explainer!r})"
