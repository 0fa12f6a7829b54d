"""Explanation methods: one backward pass from an output neuron to the input.

:class:`Gradient`, :class:`DeconvNet`, :class:`GuidedBackprop`, :class:`PatternNet`,
:class:`PatternAttribution` and :class:`LRPZ` share Captum's signature
``attribute(inputs, target=None)`` (``target=None``: the predicted class). They differ
only in how a neuron layer and a ReLU-family activation pass the backward signal on (the weight, the
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

How it is computed: during the forward pass (:func:`toolkit.layers.run`) the output of
every neuron layer (and, for DeconvNet and Guided Backprop, of every ReLU-family
activation) is replaced by a tensor with the same values whose backward pass is the
method's rule (:mod:`toolkit.rules`), and one call of :func:`torch.autograd.grad` runs
the whole explanation for the whole batch. The model is never changed: it runs in eval
mode for the pass (each module's mode is restored), no hook stays behind, and no
``.grad`` is written.

Overflow
--------
The backward signal is rescaled per sample by powers of two where every path passes
(:mod:`toolkit.rules`), so the result is exact whenever it is representable:

* :meth:`Explainer.attribute` returns the exact result for every sample whose result
  fits the dtype as a normal number. A sample whose result does not fit (larger than
  the dtype's maximum, or with a peak below its smallest normal number) is returned
  *normalised*, its peak ``|value|`` in [0.5, 1), and an :class:`ExplanationScaleWarning`
  names those samples and their scale. Nothing is ever inf or NaN: a float32 pass that
  overflows inside a block without a place to rescale (a long dense block) is computed
  again in float64.
* :meth:`Explainer.attribute_scaled` returns every sample normalised together with
  its scale: ``explanation = values * 2 ** log2_scale`` (:class:`ScaledExplanation`).
"""
from __future__ import annotations

import math
import numbers
import warnings
import copy
from dataclasses import dataclass, field, replace
from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.layers import Hooks, Layer, Plan, evaluation_mode, run, trace
from toolkit.targets import Target, as_target
from toolkit.rules import (DeconvRule, GuidedRule, LinearRule, MaskCell, Normalise, Scale,
                           times_power_of_two)

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
        return torch.where(values == 0, values, times_power_of_two(values, self.log2_scale))


# ----------------------------------------------------------------------------------
# the shared machinery
# ----------------------------------------------------------------------------------
class Explainer:
    """Base class: explain the outputs of ``model`` by one modified backward pass.

    A subclass states its rules and nothing else: the weight whose transpose carries
    the signal back through each neuron layer (:meth:`rule_weights`, ``W`` by default),
    the autograd function that replaces each ReLU-family activation
    (``activation_rule``, from :mod:`toolkit.rules`; None keeps autograd's own backward,
    the forward mask), and how the pass starts and ends.

    Parameters
    ----------
    model : nn.Module
        A classifier of neuron layers, ReLU-family activations and the operations
        :mod:`toolkit.layers` allows between them, that returns logits shaped
        ``(N, classes)``.
    start : {"logit", "one"}, optional
        The value the backward pass starts from at the selected output neuron: the
        logit's own value, or 1. Each method documents its default.

    Notes
    -----
    The traced layers of the model (:class:`toolkit.layers.Plan`) are cached and traced
    again only when the per-sample input shape changes.
    """

    default_start = "one"
    activation_rule: type[torch.autograd.Function] | None = None

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

    def use_plan(self, plan: Plan) -> "Explainer":
        """Use ``plan``, made once by :func:`toolkit.layers.trace` of this explainer's
        model, instead of tracing the model again; for many explainers of one model (the
        sanity checks explain every randomised network with every method). Returns self.
        """
        if not any(module is plan.layers[0].module for module in self.model.modules()):
            raise ValueError("the plan was traced from another model than this explainer's")
        self._check_plan(plan)
        self._plan = plan
        return self

    # -- the rules (overridden by the methods) --------------------------------------
    @property
    def _pattern_kind(self) -> str:
        """The pattern of the active side: ``linear`` for S_a, ``positive`` for S_a+-."""
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
        return times_power_of_two(values, exact)

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
            result = self._explain(inputs, target)
        if not bool(torch.isfinite(result.values).all()) and inputs.dtype != torch.float64:
            result = self._in_float64()._explain(inputs.double(), target)
            result = ScaledExplanation(result.values.to(inputs.dtype), result.log2_scale)
        if not bool(torch.isfinite(result.values).all()):
            raise FloatingPointError(
                f"{type(self).__name__}: the backward signal overflows even in float64 (it grows "
                "beyond 1e308 inside a block where it cannot be rescaled); the explanation is not "
                "representable")
        return result

    def _explain(self, inputs: Tensor, target: Target) -> ScaledExplanation:
        plan = self._plan_for(inputs)
        x = inputs.detach().clone().requires_grad_(True)
        scale = Scale(x.shape[0], x.device)
        logits = self._forward(x, plan, scale)
        self._check_logits(logits, inputs)
        target = as_target(target, logits)
        self._check_target(plan, target, logits)
        seed = scale.normalise(self._seed(logits.detach(), target))
        (grad,) = torch.autograd.grad(logits, x, seed)
        values = scale.normalise(self.finish(x.detach(), grad))
        return ScaledExplanation(values, scale.log2)

    def _in_float64(self) -> "Explainer":
        """This explainer on a float64 copy of the model (for a float32 pass that overflows)."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model).double()
        twin._plan = None
        if hasattr(twin, "_weights_cache"):
            twin._weights_cache = None
        return twin

    def _forward(self, x: Tensor, plan: Plan, scale: Scale) -> Tensor:
        """The model's forward pass (eval mode) with the rules in place (:func:`toolkit.layers.run`).

        The model gets a copy of ``x``, so that an in-place first operation changes the
        copy, not the leaf the gradient is taken for."""
        weights = self.rule_weights(plan, x)
        layer_activities = plan.activities
        cells: dict[str, MaskCell] = {}
        own_mask = self._own_masks(plan)

        def on_layer(layer: Layer, layer_input: Tensor, z: Tensor) -> Tensor:
            weight, cell = weights[layer.name], None
            if isinstance(weight, tuple):
                cell = cells.setdefault(layer.name, MaskCell())
                if layer.name in own_mask:
                    cell.mask = z.detach() > 0
            own = scale if plan.is_cut(layer) else None
            return LinearRule.apply(layer_input, z.detach(), weight, layer, own, cell)

        def on_activity(layer: Layer, active: Tensor) -> None:
            if layer.name in cells and layer.name not in own_mask:
                cells[layer.name].mask = active

        def on_activation(activation, u: Tensor, out: Tensor) -> Tensor:
            return self.activation_rule.apply(u, out.detach(), activation)

        two_sided = {name: a for name, a in layer_activities.items() if isinstance(weights[name], tuple)}
        hooks = Hooks(on_layer=on_layer, on_activity=on_activity, activities=two_sided,
                      on_activation=on_activation if self.activation_rule is not None else None,
                      normalise=lambda t: Normalise.apply(t, scale))
        with evaluation_mode(self.model), torch.enable_grad():
            return run(self.model, plan, x.clone(), hooks)

    def _own_masks(self, plan: Plan) -> set[str]:
        """The layers whose two-sided rule takes its mask from their own output ``z > 0``."""
        return set()

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

    Rules: ``W^T`` through every neuron layer, the forward derivative at each activation. Equal to
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

    Rules: ``W^T`` through every neuron layer; at each ReLU-family activation the
    backward signal is rectified, ``relu(r)`` (a LeakyReLU's shape with its slope), and
    the forward mask is ignored. Max-pooling switches come
    from the forward pass. Equal to Captum's ``Deconvolution``. In the paper's terms it
    reconstructs the signal with the filter-based estimator ``S_w``.

    Parameters
    ----------
    model : nn.Module
    start : {"one", "logit"}, default "one"
        The backward pass starts from 1 at the selected logit.
    """

    activation_rule = DeconvRule


@register(Method("guided_backprop", "Guided BP", "Guided Backprop", "signal",
                 aliases=("guidedbackprop",)))
class GuidedBackprop(Explainer):
    """Guided Backprop (Springenberg et al., 2015): gradient and DeconvNet combined.

    Rules: ``W^T`` through every neuron layer; at each ReLU-family activation the signal passes only
    where the forward ReLU was active *and* the signal is positive. Equal to Captum's
    ``GuidedBackprop``.

    Parameters
    ----------
    model : nn.Module
    start : {"one", "logit"}, default "one"
        The backward pass starts from 1 at the selected logit.
    """

    activation_rule = GuidedRule


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
        from toolkit.patterns import MissingPatternsError, PatternMismatchError

        two_sided = self._two_sided(plan)
        for layer in plan:
            if layer.name not in self.patterns:
                raise PatternMismatchError(
                    f"no patterns for layer '{layer.name}'; the patterns hold {self.patterns.names}"
                )
            kinds = [self._pattern_kind] + (["negative"] if layer.name in two_sided else [])
            held = self.patterns[layer.name].kinds
            for kind in kinds:
                if kind not in held:
                    why = (f", whose inactive side passes the signal (a LeakyReLU, or an output that "
                           "reaches no single ReLU: docs/math.md, section 5)" if kind == "negative" else "")
                    raise MissingPatternsError(
                        f"{type(self).__name__} needs the '{kind}' pattern of layer '{layer.name}'{why}, "
                        f"but the patterns hold only {list(held)}; fit them with "
                        f"fit_patterns(..., kinds={tuple(dict.fromkeys((*held, *kinds)))})")
                shape = getattr(self.patterns[layer.name], kind).shape
                if shape != layer.weight_shape:
                    raise PatternMismatchError(
                        f"the patterns of layer '{layer.name}' are shaped {tuple(shape)}, its weight "
                        f"{tuple(layer.weight_shape)}"
                    )

    @property
    def _pattern_kind(self) -> str:
        """The pattern of the active side: ``linear`` for S_a, ``positive`` for S_a+-."""
        return "linear" if self.kind == "linear" else "positive"

    @property
    def _mask(self) -> str:
        from toolkit.layers import DEFAULT_MASK

        return self.patterns.mask or DEFAULT_MASK

    def _two_sided(self, plan: Plan) -> set[str]:
        """The layers whose rule uses ``a_+`` on the active and ``a_-`` on the inactive
        positions: with the two-component estimator, every hidden layer whose inactive side
        passes the signal (:class:`toolkit.layers.Activity`)."""
        if self.kind == "linear":
            return set()
        return {name for name, a in plan.activities.items() if a.passes_inactive}

    def _own_masks(self, plan: Plan) -> set[str]:
        found = plan.activities
        return {name for name in self._two_sided(plan)
                if found[name].source is None or self._mask == "output"}

    def rule_weights(self, plan: Plan, like: Tensor) -> dict[str, Tensor]:
        """The rule weight of every layer, made from its pattern (cast to the dtype and
        device of ``like``) by :meth:`combine` -- a pair (active, inactive side) for the
        layers of :meth:`_two_sided`; kept for the next call on the same dtype and device,
        since patterns are bound to the model's weights anyway.

        With ``never_active="linear"`` the output neurons found by :meth:`never_active_outputs`
        use their linear pattern instead of ``a_+ = 0``."""
        key = (like.dtype, like.device, tuple(plan.names))
        if self._weights_cache is None or self._weights_cache[0] != key:
            dead = self.never_active_outputs(plan)
            two_sided = self._two_sided(plan)
            weights = {}
            for layer in plan:
                patterns = self.patterns[layer.name]
                pattern = getattr(patterns, self._pattern_kind)
                if layer is plan.layers[-1] and dead.any() and self.never_active == "linear":
                    pattern = torch.where(dead.reshape(-1, *([1] * (pattern.dim() - 1))),
                                          patterns.linear, pattern)
                weight = self.combine(layer, pattern.to(device=like.device, dtype=like.dtype))
                if layer.name in two_sided:
                    negative = patterns.negative.to(device=like.device, dtype=like.dtype)
                    weight = (weight, self.combine(layer, negative))
                weights[layer.name] = weight
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

    Rules: ``A^T`` through every neuron layer (``A`` = the layer's pattern), the forward
    derivative at each activation. With ``kind="two_component"`` (default) ``A = a_+``,
    the pattern of the active neurons, where a ReLU or ReLU6 stops the signal of the
    inactive ones (as in the authors' code; this holds for the output layer too,
    whatever the sign of the logit). A layer whose inactive side passes the signal -- a
    LeakyReLU, or an output that reaches no single activation, such as a linear
    bottleneck -- sends each position back with the pattern of its side,
    ``A_+^T (r m) + A_-^T (r (1 - m))`` with the activity mask ``m`` (docs/math.md,
    section 6.2), and needs the negative patterns. ``kind="linear"`` uses the pattern
    ``a`` of the linear estimator ``S_a`` everywhere.

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

    Rules: ``(W * A)^T`` through every neuron layer (elementwise product of weight and
    pattern; on the inactive side of a layer that passes it, ``W * a_-``, as for
    :class:`PatternNet`), the forward derivative at each activation. This is deep Taylor
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

    For networks of neuron layers, ReLU-family activations, max and average pooling,
    concatenations and additions this is exactly
    *input times gradient*, applied once at the input. Let ``g`` be the gradient of the
    selected logit (seeded as below) and suppose the relevance at a layer's output is
    ``R_j = z_j g_j``. Then

        R_i = x_i sum_j w_ij g_j = x_i g_i,

    because ``sum_j w_ij g_j`` is the gradient at the layer input. A ReLU passes the
    relevance unchanged and so keeps the form: where it is active ``a = z`` and the
    gradient passes, where it is not ``a = 0`` and both sides are 0 (a LeakyReLU's
    ``a = alpha z`` has the gradient ``alpha g``: ``a g`` keeps the form; a saturated
    ReLU6's constant output takes no relevance down, like a bias). Max pooling gives
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
