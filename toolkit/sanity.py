"""Can we trust an explanation? Two sanity checks every explanation method is asked to pass.

* **Input invariance** (Kindermans et al. 2017, *The (un)reliability of saliency
  methods*). Two networks that compute the same function of their own data should get the
  same explanation. :func:`shifted_twin` builds, from a network ``f1``, a twin ``f2`` whose
  first neuron layer absorbs a constant input shift ``c`` in its bias, so that
  ``f2(x + c) = f1(x)`` exactly; :func:`input_invariance` fits patterns for each network
  on its own data (``x`` for ``f1``, ``x + c`` for ``f2``), explains ``f1`` at ``x`` and
  ``f2`` at ``x + c`` with every method and both conventions for the mean of ``y``
  (:data:`toolkit.linear.MEAN_Y_CONVENTIONS`), and reports the difference per method.
* **Model-parameter randomisation** (Adebayo et al. 2018, *Sanity checks for saliency
  maps*). An explanation that does not change when the network's weights are replaced by
  random ones cannot be explaining what the network learned. :func:`model_randomization`
  redraws the weights of the neuron layers top-down, one more layer at each step
  (*cascading*), and one layer at a time (*independent*); per method and per step it
  measures how similar each image's explanation stays to the original one (Spearman
  rank correlation of ``|r|`` and SSIM), with the mean over images and a bootstrap
  interval.

Where a check changes the model, the patterns are fitted again on the changed model:
patterns belong to the weights, and PatternNet with the patterns of another network
would compare weights with stale patterns rather than explanations. The stale patterns
stay available as a labelled variant of the randomisation check (:func:`stale_patterns`
is the one documented way to use patterns with a model they were not fitted for).

Both checks take a model, the data to fit patterns on, the inputs to explain, the
methods (names of :data:`toolkit.methods.REGISTRY` or :class:`~toolkit.methods.Method`
objects) and, optionally, a function that builds an explainer,
``make_explainer(method, model, patterns)``. The derivation of the shift of ``a_+`` under
the global convention is in docs/math.md, section 3.3; the checks are described in
section 10. scikit-image (SSIM) is imported when the randomisation check runs, not when
this module is imported.

Example::

    from toolkit import sanity
    invariance = sanity.input_invariance(mlp, train_images[:3000], test_images[:32], shift=1.0)
    print(invariance.table())
    randomised = sanity.model_randomization(cnn, train_images[:256], test_images[:24])
    print(randomised.table("cascading", "spearman"))
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.layers import evaluation_mode, trace
from toolkit.linear import MEAN_Y_CONVENTIONS
from toolkit.methods import REGISTRY, Method, get_method
from toolkit.similarity import SIMILARITIES, SIMILARITY_FUNCTIONS, fixed, mean_interval, span
from toolkit.streaming import input_batches

__all__ = [
    "ShiftNotAbsorbableError",
    "default_explainer",
    "fit_quietly",
    "fitted_kinds",
    "SHIFT_COMMUTING",
    "shift_tensor",
    "shifted_twin",
    "InvarianceRow",
    "InvarianceResult",
    "input_invariance",
    "RANDOMIZATIONS",
    "SIMILARITIES",
    "randomized_copy",
    "stale_patterns",
    "RandomizationResult",
    "model_randomization",
]

#: Modules that may run before the first neuron layer: each maps ``x + c`` to its output
#: plus the same constant (a reshape, dropout in evaluation mode, max pooling).
SHIFT_COMMUTING = (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity, nn.MaxPool2d)

#: The two orders of the randomisation check: top-down, one more layer per step; one
#: layer at a time.
RANDOMIZATIONS = ("cascading", "independent")

# The twin must reproduce the model to this many units of the dtype's machine epsilon
# (relative to the largest logit): a forward pass of a few layers rounds a few times.
_TWIN_EPSILONS = 1e4


class ShiftNotAbsorbableError(ValueError):
    """The constant input shift of the invariance check cannot be absorbed exactly by the
    first neuron layer's bias (zero padding, a module before the first layer that does not
    commute with the shift, or a shift that is not constant where the layer reads it)."""


def default_explainer(method: Method, model: nn.Module, patterns):
    """The registered method's explainer; a pattern method explains an output neuron that
    was never active on the fitting data with its linear pattern (a randomised network has
    such neurons) instead of refusing."""
    options = {"never_active": "linear"} if method.needs_patterns else {}
    return method.make(model, patterns, **options)


def _as_methods(methods) -> list[Method]:
    if methods is None:
        return list(REGISTRY.values())
    if isinstance(methods, (str, Method)):
        methods = [methods]
    found = [m if isinstance(m, Method) else get_method(m) for m in methods]
    names = [m.name for m in found]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"methods must name each method once; got {names}")
    return found


def _fitting_batches(data, batch_size: int, dtype: torch.dtype, shift: Tensor | None = None) -> list[Tensor]:
    batches = []
    for x in input_batches(data, batch_size):
        x = x.to(dtype)
        batches.append(x + shift if shift is not None else x)
    if not batches:
        raise ValueError("data holds no inputs to fit patterns on")
    return batches


def fit_quietly(model: nn.Module, data, kinds: Sequence[str], **options):
    """:func:`toolkit.fit_patterns` without a progress bar and without the warning about
    output neurons that are never active (a randomised network has them; the checks
    explain such classes with their linear pattern, see :func:`default_explainer`)."""
    from toolkit.patterns import fit_patterns

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"output neurons \[", category=UserWarning)
        return fit_patterns(model, data, kinds=tuple(kinds), **{"progress": False, **options})


def fitted_kinds(methods: Sequence[Method]) -> tuple[str, ...]:
    """The pattern kinds to fit for ``methods``: those they read, and the linear one
    wherever ``a_+`` is read (an output neuron never active on the fitting data is
    explained with its linear pattern, see :func:`default_explainer`)."""
    kinds = {k for m in methods for k in m.patterns}
    if "positive" in kinds:
        kinds.add("linear")
    return tuple(k for k in ("linear", "positive", "negative") if k in kinds)


def _reads_two_component(method: Method) -> bool:
    """Whether the method reads a two-component pattern (``a_+`` or ``a_-``), whose value
    depends on the ``mean_y`` convention."""
    return any(kind in ("positive", "negative") for kind in method.patterns)


def _predicted(model: nn.Module, inputs: Tensor) -> Tensor:
    with evaluation_mode(model), torch.no_grad():
        return model(inputs).argmax(1)


# ----------------------------------------------------------------------------------
# input invariance
# ----------------------------------------------------------------------------------
def shift_tensor(shift, sample_shape: Sequence[int], dtype: torch.dtype = torch.float64,
                 device=None) -> Tensor:
    """The shift ``c`` as a tensor of one sample's shape: a number (the same for every
    input value), or a tensor that broadcasts to ``sample_shape`` (one value per channel
    as ``(C, 1, 1)``, say)."""
    c = torch.as_tensor(shift, dtype=dtype, device=device)
    if not torch.isfinite(c).all():
        raise ValueError("the shift contains NaN or Inf values")
    try:
        return torch.broadcast_to(c, tuple(sample_shape)).clone()
    except RuntimeError:
        raise ValueError(f"a shift of shape {tuple(c.shape)} does not broadcast to one input of "
                         f"shape {tuple(sample_shape)}") from None


def _run_recorded(model: nn.Module, x: Tensor, first: nn.Module
                  ) -> tuple[list[tuple[str, nn.Module]], Tensor]:
    """Run ``model`` on ``x``; return the leaf modules it calls before the neuron layer
    ``first`` (name and module, in order) and the input ``first`` receives."""
    names = {id(m): name for name, m in model.named_modules()}
    calls, received = [], []

    def hook(module, args, output):
        calls.append((names[id(module)], module))
        if module is first:
            received.append(args[0].detach().clone())

    with ExitStack() as stack, evaluation_mode(model), torch.no_grad():
        for module in model.modules():
            if not list(module.children()):
                stack.callback(module.register_forward_hook(hook).remove)
        model(x.clone())
    before = calls[:[m for _, m in calls].index(first)]
    return before, received[0]


def _check_absorbable(before: list[tuple[str, nn.Module]], layer) -> None:
    module = layer.module
    for name, other in before:
        if not isinstance(other, SHIFT_COMMUTING):
            raise ShiftNotAbsorbableError(
                f"module '{name}' ({type(other).__name__}) runs before the first neuron layer "
                f"'{layer.name}' and does not pass a constant shift through unchanged, so the "
                "shift cannot be absorbed into that layer's bias")
    padding = getattr(module, "padding", 0)
    if any(p > 0 for p in (padding if isinstance(padding, tuple) else (padding,))):
        raise ShiftNotAbsorbableError(
            f"the first neuron layer '{layer.name}' ({type(module).__name__}) pads its input with "
            f"zeros (padding={padding}): after a shift by c the padding still holds 0, not c, so "
            "the positions at the border see a different input and no bias can absorb the shift "
            "exactly; the check needs a network whose first convolution has padding=0")


def shifted_twin(model: nn.Module, shift, example: Tensor) -> nn.Module:
    """A copy ``f2`` of ``model`` (``f1``) with ``f2(x + c) = f1(x)`` for every ``x``.

    The first neuron layer computes ``W u + b`` of its input ``u``; the shift reaches it as
    ``u + c`` (the modules before it must commute with a constant shift:
    :data:`SHIFT_COMMUTING`), and ``W (u + c) + b - W c = W u + b``. So the twin is the
    model with the first layer's bias replaced by ``b - W c`` (a layer without a bias gets
    one); nothing else changes, and every later layer sees exactly the same values.

    Parameters
    ----------
    model : nn.Module
        A network of the supported modules (:func:`toolkit.layers.trace`).
    shift : float or Tensor
        ``c``: a number, or a tensor that broadcasts to one input (:func:`shift_tensor`).
    example : Tensor
        A batch of inputs the model runs on: it finds the first layer, and the twin is
        checked on it (``f2(x + c)`` against ``f1(x)``).

    Returns
    -------
    nn.Module
        The twin, in evaluation mode.

    Raises
    ------
    ShiftNotAbsorbableError
        Where the shift cannot be absorbed exactly, naming the layer and why: a first
        convolution with zero padding (the border would see 0 instead of ``c``), a module
        before the first layer that does not commute with the shift (a ReLU, a
        BatchNorm, ...), a per-pixel shift under a convolution, or a forward pass whose
        twin does not reproduce the model on ``example``.
    """
    first = trace(model, example).layers[0]
    before, unshifted = _run_recorded(model, example, first.module)
    _check_absorbable(before, first)
    c = shift_tensor(shift, example.shape[1:], example.dtype, example.device)
    moved = _run_recorded(model, example + c, first.module)[1] - unshifted
    raw = first.module.weight.detach()
    delta = first.ops.apply(moved, raw)                        # W c at every sample and position
    per_neuron = first.neuron_values(delta)                    # (samples x positions, J)
    mean = per_neuron.mean(0)
    spread = (per_neuron - mean).abs().max()
    if spread > _TWIN_EPSILONS * torch.finfo(example.dtype).eps * max(float(mean.abs().max()), 1.0):
        raise ShiftNotAbsorbableError(
            f"the shift reaches the first neuron layer '{first.name}' as different values at "
            f"different positions (W c varies by {float(spread):.3g}): a convolution can absorb a "
            "shift into its bias only when it is the same at every position (one value per "
            "channel at most)")
    twin = copy.deepcopy(model).eval()
    module = dict(twin.named_modules())[first.name]
    with torch.no_grad():
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(raw.shape[0], dtype=raw.dtype, device=raw.device))
        module.bias.sub_(mean.to(module.bias.dtype))
    with evaluation_mode(model), torch.no_grad():
        want, got = model(example), twin(example + c)
    error = float((want - got).abs().max())
    if error > _TWIN_EPSILONS * torch.finfo(example.dtype).eps * max(float(want.abs().max()), 1.0):
        raise ShiftNotAbsorbableError(
            f"the twin with the shift absorbed into the bias of '{first.name}' does not reproduce "
            f"the model (largest difference of the logits {error:.3g}): the forward pass "
            "transforms its input before the first layer in a way a bias cannot absorb")
    return twin


@dataclass(frozen=True)
class InvarianceRow:
    """The invariance of one method (and one ``mean_y`` convention).

    Attributes
    ----------
    method : str
        The registered name.
    title : str
    mean_y : str or None
        The convention of the patterns; None for a method without patterns.
    largest : float
        ``max |e1 - e2|`` over the explained inputs.
    relative : float
        ``||e1 - e2|| / ||e1||`` (Frobenius norms over all inputs).
    invariant : bool
        ``relative <= tolerance``.
    """

    method: str
    title: str
    mean_y: str | None
    largest: float
    relative: float
    invariant: bool


@dataclass
class InvarianceResult:
    """What :func:`input_invariance` found.

    Attributes
    ----------
    rows : list of InvarianceRow
        Per method (and convention, for the pattern methods).
    shift : Tensor
        The shift ``c`` (one input's shape).
    tolerance : float
    dtype : torch.dtype
        The dtype the check ran in.
    targets : Tensor
        The explained classes (``f1``'s predictions unless given).
    explanations : dict
        ``(method, mean_y) -> (e1, e2)``: the explanation of ``f1`` at ``x`` and of ``f2``
        at ``x + c``.
    patterns : dict
        ``"original"`` and ``"twin"``: the fitted patterns of each network (the default
        convention; the other is recomputed from their statistics).
    """

    rows: list[InvarianceRow]
    shift: Tensor
    tolerance: float
    dtype: torch.dtype
    targets: Tensor
    explanations: dict = field(repr=False)
    patterns: dict = field(repr=False)

    def row(self, method: str, mean_y: str | None = None) -> InvarianceRow:
        for r in self.rows:
            if r.method == method and (r.mean_y == mean_y or mean_y is None):
                return r
        raise KeyError(f"no row for method {method!r} with mean_y={mean_y!r}")

    def table(self, decimals: int = 3, below: float = 1e-10) -> str:
        """One line per method and convention: the relative and largest difference, and
        whether it is invariant. Values below ``below`` print as ``< below`` (round-off
        differs between machines; the verdict does not)."""
        def show(value):
            return f"< {below:.0e}" if value < below else f"{value:.{decimals}g}"

        head = f"{'method':<20}{'mean_y':>8}{'relative':>12}{'largest':>12}  invariant"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.title:<20}{r.mean_y or '-':>8}{show(r.relative):>12}{show(r.largest):>12}"
                         f"  {'yes' if r.invariant else 'no'}")
        return "\n".join(lines)


def _difference(e1: Tensor, e2: Tensor) -> tuple[float, float]:
    """``max |e1 - e2|`` and ``||e1 - e2|| / ||e1||`` (inf where ``e1`` is 0 and ``e2`` not)."""
    e1, e2 = e1.double(), e2.double()
    largest = float((e1 - e2).abs().max())
    norm = float(torch.linalg.vector_norm(e1))
    if norm == 0:
        return largest, (0.0 if largest == 0 else math.inf)
    return largest, float(torch.linalg.vector_norm(e1 - e2)) / norm


def input_invariance(model: nn.Module, data, inputs: Tensor, shift=1.0, methods=None,
                     conventions: Sequence[str] = MEAN_Y_CONVENTIONS,
                     make_explainer: Callable | None = None, target=None,
                     dtype: torch.dtype | None = torch.float64, tolerance: float = 1e-10,
                     batch_size: int = 256, fit_options: Mapping | None = None) -> InvarianceResult:
    """Explain ``f1`` at ``x`` and its shifted twin ``f2`` at ``x + c``; compare.

    ``f2 = shifted_twin(f1, c)`` computes ``f2(x + c) = f1(x)``. Patterns are fitted for
    each network on its own data (``data`` for ``f1``, ``data + c`` for ``f2``), the
    explained class is the same, and an input-invariant method gives the same
    explanation for both. With ``y = w^T x`` of the first layer, the shift leaves every
    covariance unchanged, and with it the linear pattern ``a`` and the masked ``a_+``
    (``E_+[y]``); the global ``a_+`` (``E[y]``) has its numerator moved by
    ``c (E_+[y] - E[y])`` (docs/math.md, section 3.3). Methods that multiply by the input
    (LRP-z, input times gradient) change by ``c`` times the gradient.

    Parameters
    ----------
    model : nn.Module
        ``f1``; not changed (the check runs on a copy in ``dtype``).
    data : Tensor or iterable
        The inputs the patterns of ``f1`` are fitted on (a tensor or an iterable of
        batches or ``(inputs, labels)`` pairs; held in memory); ``f2``'s are the same
        plus ``c``.
    inputs : Tensor
        The batch to explain.
    shift : float or Tensor
        ``c`` (:func:`shift_tensor`).
    methods : sequence of str or Method, optional
        Default: every registered method.
    conventions : sequence of {"masked", "global"}
        The ``mean_y`` conventions the pattern methods are checked with.
    make_explainer : callable, optional
        ``make_explainer(method, model, patterns) -> explainer`` with
        ``attribute(inputs, target)``; default: the registered class, with
        ``never_active="linear"`` for the pattern methods.
    target : int, sequence or Tensor, optional
        The classes to explain; default ``f1``'s predictions.
    dtype : torch.dtype or None
        The dtype of the check (float64 by default, so that an invariant method agrees
        to round-off, about 1e-15); None keeps the model's.
    tolerance : float
        A method is invariant where ``||e1 - e2|| / ||e1|| <= tolerance``.
    batch_size : int
        Batches of ``data`` when it is a tensor.
    fit_options : mapping, optional
        More keyword arguments of :func:`toolkit.fit_patterns` (``mask``, ``compute_dtype``).

    Returns
    -------
    InvarianceResult

    Raises
    ------
    ShiftNotAbsorbableError
        If the model's first layer cannot absorb the shift (:func:`shifted_twin`).
    """
    for convention in conventions:
        if convention not in MEAN_Y_CONVENTIONS:
            raise ValueError(f"conventions must be taken from {MEAN_Y_CONVENTIONS}, not {convention!r}")
    make_explainer = make_explainer or default_explainer
    methods = _as_methods(methods)
    dtype = dtype or next(model.parameters()).dtype
    f1 = copy.deepcopy(model).to(dtype).eval()
    x = inputs.detach().to(dtype)
    f2 = shifted_twin(f1, shift, x)
    c = shift_tensor(shift, x.shape[1:], dtype, x.device)
    targets = _predicted(f1, x) if target is None else target

    patterns = {}
    kinds = fitted_kinds(methods)
    if kinds:
        from toolkit.compare import with_mean_y

        options = {"mean_y": conventions[0], "keep_statistics": True, **(fit_options or {})}
        fitted = {"original": fit_quietly(f1, _fitting_batches(data, batch_size, dtype), kinds, **options),
                  "twin": fit_quietly(f2, _fitting_batches(data, batch_size, dtype, c), kinds, **options)}
        for convention in conventions:
            patterns[convention] = (with_mean_y(f1, fitted["original"], convention, x),
                                    with_mean_y(f2, fitted["twin"], convention, x + c))

    rows, explanations = [], {}
    for method in methods:
        for convention in (conventions if _reads_two_component(method) else (None,)):
            p1, p2 = patterns[convention or conventions[0]] if method.needs_patterns else (None, None)
            e1 = make_explainer(method, f1, p1).attribute(x, targets).detach()
            e2 = make_explainer(method, f2, p2).attribute(x + c, targets).detach()
            largest, relative = _difference(e1, e2)
            rows.append(InvarianceRow(method.name, method.title, convention, largest, relative,
                                      relative <= tolerance))
            explanations[method.name, convention] = (e1, e2)
    fitted_patterns = {"original": {k: v[0] for k, v in patterns.items()},
                       "twin": {k: v[1] for k, v in patterns.items()}}
    return InvarianceResult(rows, c, tolerance, dtype, torch.as_tensor(targets), explanations,
                            fitted_patterns)


# ----------------------------------------------------------------------------------
# model-parameter randomisation
# ----------------------------------------------------------------------------------
def _layer_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))


def randomized_copy(model: nn.Module, layers: Sequence[str], example: Tensor, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose neuron layers ``layers`` have random weights and biases.

    Each layer is redrawn from PyTorch's default initialisation of a Conv2d or Linear
    layer, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the weight and the bias, from a
    generator seeded with ``seed`` and the layer's position in the network: the same
    layer gets the same random weights whatever else is randomised, so the cascading
    and the independent orders share their steps where they coincide. A BatchNorm that
    follows a convolution keeps its statistics.

    Parameters
    ----------
    model : nn.Module
    layers : sequence of str
        Names of neuron layers (:attr:`toolkit.layers.Plan.names`).
    example : Tensor
        A batch the model runs on (to find its layers).
    seed : int

    Returns
    -------
    nn.Module
        The copy, in evaluation mode; ``model`` is not changed.
    """
    return _randomized(model, layers, trace(model, example).names, seed)


def _randomized(model: nn.Module, layers: Sequence[str], names: list[str], seed: int) -> nn.Module:
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(f"no neuron layers {unknown} in the model; its layers are {names}")
    twin = copy.deepcopy(model).eval()
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name in layers:
            module = modules[name]
            generator = _layer_generator(seed, names.index(name))
            bound = 1 / math.sqrt(module.weight[0].numel())
            for parameter in (module.weight, module.bias):
                if parameter is not None:
                    values = torch.rand(parameter.shape, generator=generator, dtype=torch.float64)
                    parameter.copy_((2 * values - 1) * bound)
    return twin


def stale_patterns(patterns, model: nn.Module):
    """The patterns of another model, bound to ``model``: for the randomisation check only.

    Patterns belong to the weights they were fitted for, and every pattern method checks
    that (:meth:`toolkit.patterns.Patterns.check`). The randomisation check asks, as a
    labelled variant, what PatternNet and PatternAttribution do with the *original*
    patterns on the randomised network (the rules then mix the new weights with the old
    patterns). This returns a shallow copy of ``patterns`` carrying ``model``'s
    fingerprint, with ``stale_from`` set to the fingerprint it was fitted for. Do not use
    it to explain with patterns of another network anywhere else.
    """
    from toolkit.patterns import Patterns, fingerprint

    if not isinstance(patterns, Patterns):
        raise TypeError(f"patterns must be a toolkit.patterns.Patterns, not {type(patterns).__name__}")
    stale = copy.copy(patterns)
    stale.stale_from = getattr(patterns, "stale_from", patterns.fingerprint)
    stale.fingerprint = fingerprint(model)
    return stale


@dataclass
class RandomizationResult:
    """What :func:`model_randomization` found.

    Attributes
    ----------
    layers : list of str
        The neuron layers, top-down: the order in which they are randomised.
    steps : dict
        Per order (``"cascading"``, ``"independent"``), the label of each step: for the
        cascading order the lowest randomised layer (it and every layer above it are
        random), for the independent order the one random layer.
    variants : list of str
        What is compared: the method names, then ``"<name> (stale)"`` for the pattern
        methods explained with the original patterns on the randomised network.
    titles : dict
        Per variant, a title for tables and figures.
    outputs : dict
        Per variant, ``"signal"`` or ``"attribution"`` (how it is drawn).
    similarity : dict
        ``similarity[order][metric]``: ``(steps, variants, images)`` float64, NaN where
        undefined (an explanation that is 0 everywhere).
    original : dict
        Per method, the explanation of the original network.
    randomized : dict
        ``randomized[order][step][variant]``: the explanation of the randomised network.
    targets : Tensor
        The explained classes (the original network's predictions unless given).
    seed : int
    n_resamples, confidence_level :
        Of the bootstrap intervals.
    """

    layers: list[str]
    steps: dict
    variants: list[str]
    titles: dict
    outputs: dict
    similarity: dict
    original: dict = field(repr=False)
    randomized: dict = field(repr=False)
    targets: Tensor = field(repr=False)
    seed: int = 0
    n_resamples: int = 1000
    confidence_level: float = 0.95

    def summary(self, order: str, metric: str) -> dict:
        """``{variant: [(mean, low, high, n) per step]}``: the mean similarity over the
        images where it is defined, with its bootstrap interval (:func:`mean_interval`)."""
        values = self.similarity[order][metric]
        return {variant: [mean_interval(values[s, v], self.n_resamples, self.confidence_level, self.seed)
                          for s in range(values.shape[0])]
                for v, variant in enumerate(self.variants)}

    def table(self, order: str, metric: str, decimals: int = 2, interval: bool = True) -> str:
        """The mean similarity per variant (rows) and step (columns), each with its
        bootstrap interval ``[low, high]`` when ``interval``."""
        summary = self.summary(order, metric)
        rows = {self.titles[v]: summary[v] for v in self.variants}
        first = max(len(t) for t in rows) + 2
        width = (3 * decimals + 13) if interval else max(decimals + 5, 9)
        width = max(width, max(len(s) for s in self.steps[order]) + 2)
        what = "the layer and all above it random" if order == "cascading" else "only the layer random"
        head = f"{'':<{first}}" + "".join(f"{step:>{width}}" for step in self.steps[order])
        lines = [f"{metric} to the original explanation, mean over {self.similarity[order][metric].shape[2]} "
                 f"images ({order}: {what})", head, "-" * len(head)]
        for title, cells in rows.items():
            text = [fixed(m, decimals) + (f" {span((lo, hi), decimals)}" if interval else "")
                    for m, lo, hi, _ in cells]
            lines.append(f"{title:<{first}}" + "".join(f"{t:>{width}}" for t in text))
        return "\n".join(lines)


def _randomization_plans(layers: list[str], orders: Sequence[str]) -> dict:
    """``{order: {step label: the layers randomised}}`` for ``layers`` in top-down order."""
    plans = {}
    for order in orders:
        if order == "cascading":
            plans[order] = {layer: tuple(layers[:k + 1]) for k, layer in enumerate(layers)}
        elif order == "independent":
            plans[order] = {layer: (layer,) for layer in layers}
        else:
            raise ValueError(f"unknown order {order!r}; choose from {RANDOMIZATIONS}")
    return plans


class _Explain:
    """Every variant's explanation of one network: the methods with the network's own
    patterns, and (for a randomised network) the pattern methods with the original
    patterns. One trace of the network serves all its explainers."""

    def __init__(self, methods, make_explainer, inputs: Tensor, targets: Tensor, stale_from=None):
        self.methods, self.make_explainer = methods, make_explainer
        self.inputs, self.targets, self.stale_from = inputs, targets, stale_from

    def __call__(self, network: nn.Module, patterns) -> dict[str, Tensor]:
        from toolkit.methods import Explainer

        plan = trace(network, self.inputs)
        variants = [(m.name, m, patterns) for m in self.methods]
        if self.stale_from is not None:
            old = stale_patterns(self.stale_from, network)
            variants += [(f"{m.name} (stale)", m, old) for m in self.methods if m.needs_patterns]
        out = {}
        for name, method, fitted in variants:
            explainer = self.make_explainer(method, network, fitted)
            if isinstance(explainer, Explainer) and explainer.model is network:
                explainer.use_plan(plan)
            out[name] = explainer.attribute(self.inputs, self.targets).detach()
        return out


def model_randomization(model: nn.Module, data, inputs: Tensor, methods=None,
                        orders: Sequence[str] = RANDOMIZATIONS,
                        make_explainer: Callable | None = None, patterns=None, target=None,
                        seed: int = 0, stale: bool = True, mean_y: str | None = None,
                        batch_size: int = 256, fit_options: Mapping | None = None,
                        n_resamples: int = 1000, confidence_level: float = 0.95,
                        progress: bool = False) -> RandomizationResult:
    """Randomise the network's layers and measure how much each explanation changes.

    The neuron layers are randomised top-down (:func:`randomized_copy`): in the
    *cascading* order step ``k`` randomises the top ``k`` layers, in the *independent*
    order step ``k`` only the ``k``-th layer from the top. At every step the patterns are
    fitted again on the randomised network (on ``data``); with ``stale=True`` the pattern
    methods are also run with the original patterns (:func:`stale_patterns`), as the
    variant ``"<name> (stale)"``. Each explanation of the randomised network is compared
    per image with the original one (:data:`SIMILARITIES`: the Spearman rank correlation
    of ``|r|`` and SSIM). The explained classes stay those of the original network.

    Parameters
    ----------
    model : nn.Module
        The trained network; not changed.
    data : Tensor or iterable
        Inputs to fit patterns on (held in memory).
    inputs : Tensor
        The images to explain.
    methods : sequence of str or Method, optional
        Default: every registered method.
    orders : sequence of {"cascading", "independent"}
    make_explainer : callable, optional
        ``make_explainer(method, model, patterns) -> explainer``; default: the registered
        class, with ``never_active="linear"`` for the pattern methods (a randomised output
        layer often has classes whose logit is never positive).
    patterns : toolkit.patterns.Patterns, optional
        The original network's patterns; fitted on ``data`` if not given (then the
        original and the randomised networks' patterns come from the same data).
    target : optional
        The classes to explain; default the original network's predictions.
    seed : int
        Seeds the random weights (and the bootstrap): the result is the same for a seed.
    stale : bool
        Also explain with the original patterns.
    mean_y : {"masked", "global"}, optional
        The convention of refitted patterns; default that of ``patterns``, or
        :data:`toolkit.linear.DEFAULT_MEAN_Y`.
    batch_size : int
        Batches of ``data`` when it is a tensor.
    fit_options : mapping, optional
        More keyword arguments of :func:`toolkit.fit_patterns`.
    n_resamples, confidence_level :
        Of the bootstrap intervals (:func:`mean_interval`).
    progress : bool
        A progress bar over the randomised networks.

    Returns
    -------
    RandomizationResult
    """
    from tqdm.auto import tqdm

    from toolkit.linear import DEFAULT_MEAN_Y

    methods = _as_methods(methods)
    kinds = fitted_kinds(methods)
    options = dict(fit_options or {})
    x = inputs.detach().to(next(model.parameters()).dtype)
    batches = _fitting_batches(data, batch_size, x.dtype) if kinds else []
    if kinds:
        if patterns is None:
            patterns = fit_quietly(model, batches, kinds, mean_y=mean_y or DEFAULT_MEAN_Y, **options)
        patterns.check(model)
        mean_y = mean_y or patterns.mean_y
    targets = _predicted(model, x) if target is None else torch.as_tensor(target)
    names = trace(model, x).names
    layers = list(reversed(names))
    plans = _randomization_plans(layers, orders)

    stale = stale and bool(kinds)
    variants = [m.name for m in methods]
    variants += [f"{m.name} (stale)" for m in methods if stale and m.needs_patterns]
    base = {v: v.removesuffix(" (stale)") for v in variants}
    by_name = {m.name: m for m in methods}
    titles = {v: by_name[b].title + (" (stale)" if v != b else "") for v, b in base.items()}
    outputs = {v: by_name[b].output for v, b in base.items()}

    explain = _Explain(methods, make_explainer or default_explainer, x, targets)
    original = explain(model, patterns)
    explain.stale_from = patterns if stale else None
    found: dict[tuple, dict] = {}
    unique = list(dict.fromkeys(chosen for plan in plans.values() for chosen in plan.values()))
    for chosen in tqdm(unique, desc="randomised networks", disable=not progress):
        network = _randomized(model, chosen, names, seed)
        fresh = fit_quietly(network, batches, kinds, mean_y=mean_y, **options) if kinds else None
        found[chosen] = explain(network, fresh)

    similarity = {order: {metric: np.stack([
        np.stack([SIMILARITY_FUNCTIONS[metric](original[base[v]], found[chosen][v]) for v in variants])
        for chosen in plan.values()]) for metric in SIMILARITIES} for order, plan in plans.items()}
    randomized = {order: {label: found[chosen] for label, chosen in plan.items()}
                  for order, plan in plans.items()}
    return RandomizationResult(layers, {o: list(p) for o, p in plans.items()}, variants, titles, outputs,
                               similarity, original, randomized, targets, seed, n_resamples,
                               confidence_level)
