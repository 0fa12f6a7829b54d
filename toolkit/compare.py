"""All explanation methods of the paper on the same images, and their scores against a known truth.

The notebooks compare the methods side by side again and again; this module keeps that
bookkeeping out of them. The methods are those registered in
:data:`toolkit.methods.REGISTRY` (names, titles, outputs, the patterns they need), the
estimators those of :data:`toolkit.estimators.ESTIMATORS`:

* :func:`make_explainers` builds one explainer per method (:data:`METHODS`), the
  pattern-based ones with the linear (``S_a``) and the two-component (``S_a+-``)
  patterns;
* :func:`explain_all` runs them on a batch of images and returns ``{name: explanation}``,
  ready for :func:`toolkit.plotting.images.explanation_grid` (with :data:`OUTPUTS` and
  :data:`TITLES`);
* :func:`estimator_patterns` turns fitted patterns into those of another estimator
  (the filter ``S_w`` or the random baseline), so PatternNet / PatternAttribution can
  show the signal and attribution *of each estimator*, as in the paper;
* :func:`ground_truth_scores` scores explanations of images with a known signal
  (:func:`toolkit.data.make_ground_truth_images`) and returns a :class:`ScoreTable`;
* :func:`merge_quality` joins layer-quality results measured on different layers (few
  images for the convolutions, many for the dense layers), :func:`regime_table` puts
  several measurements side by side (the short table of one result is
  ``result.table(decimals=2, ideal=True)``);
* :func:`explain_estimators` gives the signal and attribution of each estimator
  (``S_x``, ``S_w``, ``S_a``, ``S_a+-``), :func:`perturb_all` the region-perturbation
  curves of several methods and the random order, :func:`perturbation_table` their AOPC.

What the scores mean
--------------------
A *signal* (Gradient, DeconvNet, Guided Backprop, PatternNet) lives in input space and
can be compared with the true signal ``s = y a_s`` pixel by pixel: ``signal corr`` is
their Pearson correlation per image, ``distractor corr`` the correlation with the true
distractor ``d`` of the same image (high: the method copies the distractor). An
*attribution* (PatternAttribution, LRP) says how much each pixel contributes to the
predicted class; its sign follows the class, not the sign of ``y``, so correlations with
``s`` are not shown for it. For every method, ``|r|`` summed over channels gives
``mass in signal`` (share of ``|r|`` on the signal's pixels), ``mass on distractor``
(share on the distractor's pixels that the signal does not cover) and
``precision@k`` (share of the ``k`` largest ``|r|`` on the signal, ``k`` = the
signal's area).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.estimators import ESTIMATORS
from toolkit.methods import LRPZ, REGISTRY, Explainer, PatternAttribution, PatternNet, Target

__all__ = [
    "METHODS",
    "PATTERN_METHODS",
    "OUTPUTS",
    "TITLES",
    "LABELS",
    "SCORES",
    "ESTIMATOR_NAMES",
    "make_explainers",
    "explain_all",
    "estimator_patterns",
    "explain_estimators",
    "estimator_kinds",
    "estimator_titles",
    "perturb_all",
    "perturbation_table",
    "ScoreTable",
    "ground_truth_scores",
    "merge_quality",
    "regime_table",
    "with_mean_y",
    "ESTIMATOR_METHODS",
    "ESTIMATOR_TITLES",
    "estimator_explainers",
    "estimator_aopc_table",
    "estimator_orderings",
    "CLAIM_OUTCOMES",
    "aopc_ordering",
    "better",
]

# Views of the registry, for tables and figures (they list the methods of toolkit.methods;
# a method registered later is known to make_explainers, but not to these).
#: Every method, in the order of the paper's comparison.
METHODS = tuple(REGISTRY)
#: The methods that need fitted patterns.
PATTERN_METHODS = tuple(name for name, m in REGISTRY.items() if m.needs_patterns)
#: What each method returns, ``"signal"`` or ``"attribution"``: how
#: :func:`toolkit.plotting.images.explanation_grid` draws it.
OUTPUTS = {name: m.output for name, m in REGISTRY.items()}
#: Column titles for tables.
TITLES = {name: m.title for name, m in REGISTRY.items()}
#: Column titles with mathtext, for figures.
LABELS = {name: m.label for name, m in REGISTRY.items()}


def _check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {tuple(REGISTRY)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} name a method twice")
    return methods


def make_explainers(model: nn.Module, patterns=None,
                    methods: Sequence[str] | None = None) -> dict[str, Explainer]:
    """One explainer per method, in the order of ``methods``.

    Parameters
    ----------
    model : nn.Module
    patterns : toolkit.patterns.Patterns, optional
        Fitted for ``model``; needed only for the :data:`PATTERN_METHODS`.
    methods : sequence of str, optional
        Names of :data:`toolkit.methods.REGISTRY` (default: all of them).

    Returns
    -------
    dict[str, toolkit.methods.Explainer]
    """
    methods = _check_methods(tuple(REGISTRY) if methods is None else methods)
    needs = [m for m in methods if REGISTRY[m].needs_patterns]
    if needs and patterns is None:
        raise ValueError(f"the methods {needs} need patterns: fit them with "
                         "toolkit.fit_patterns(model, data)")
    return {name: REGISTRY[name].make(model, patterns) for name in methods}


def explain_all(model: nn.Module, patterns, images: Tensor, target: Target = None,
                methods: Sequence[str] | None = None, batch_size: int = 256) -> dict[str, Tensor]:
    """Explain ``images`` with every method.

    Parameters
    ----------
    model : nn.Module
    patterns : toolkit.patterns.Patterns or None
        None is allowed when ``methods`` holds no pattern-based method.
    images : Tensor, (N, C, H, W)
    target : int, sequence of int, Tensor or None
        The class to explain (None: each image's predicted class).
    methods : sequence of str, optional
        Registered method names, in the order the result should have (default: all).
    batch_size : int
        Images explained at a time (the results do not depend on it).

    Returns
    -------
    dict[str, Tensor]
        ``{method: explanation}``, each shaped like ``images`` (detached, on the
        images' device).
    """
    explainers = make_explainers(model, patterns, methods)
    if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty batch tensor (N, C, H, W)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    if target is not None and not (isinstance(target, int) and not isinstance(target, bool)):
        target = torch.as_tensor(target)
        if target.dim() == 0:
            target = int(target)
        elif target.shape[0] != images.shape[0]:
            raise ValueError(f"got {target.shape[0]} targets for {images.shape[0]} images")
    results: dict[str, list[Tensor]] = {name: [] for name in explainers}
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        t = target if target is None or isinstance(target, int) else target[start:start + batch_size]
        for name, explainer in explainers.items():
            results[name].append(explainer.attribute(chunk, t))
    return {name: torch.cat(parts) for name, parts in results.items()}


def estimator_patterns(model: nn.Module, patterns, estimator: str, inputs: Tensor, seed: int = 0):
    """Patterns that make PatternNet / PatternAttribution use another signal estimator.

    Parameters
    ----------
    model : nn.Module
        The model ``patterns`` belong to (its weights give the filter patterns).
    patterns : toolkit.patterns.Patterns
    estimator : {"filter", "random", "linear", "two_component"}
        ``"filter"``: ``a = w / (w^T w)`` per neuron (S_w); ``"random"``: a random
        direction with ``w^T a = 1`` (:func:`toolkit.quality.random_pattern`);
        ``"linear"``: the fitted ``a`` also as ``a_+`` and ``a_-``;
        ``"two_component"``: ``patterns`` unchanged.
    inputs : Tensor
        A batch the model runs on (only its first sample is used, to find the layers
        and fold any BatchNorm into the weights).
    seed : int
        Seed of the random directions.

    Returns
    -------
    toolkit.patterns.Patterns
        With the same fingerprint, so the explainers accept it for ``model``. Use it
        with ``kind="two_component"`` (the default) or ``"linear"``: both read the
        estimator's pattern.
    """
    from toolkit.layers import trace
    from toolkit.patterns import LayerPatterns, Patterns
    from toolkit.quality import estimator_directions

    if estimator not in ESTIMATORS or ESTIMATORS[estimator].pattern == "none":
        choices = [name for name, e in ESTIMATORS.items() if e.pattern != "none"]
        raise ValueError(f"estimator must be one of {choices}, not {estimator!r}")
    if ESTIMATORS[estimator].pattern_kinds == ("positive", "negative"):
        return patterns
    plan = trace(model, inputs)
    patterns.check(model, plan)
    weights = {layer.name: layer.weight() for layer in plan}
    layers = {}
    for name, p in patterns.layers.items():  # a linear-type estimator: a_+ = a_- = a
        a, _ = estimator_directions(estimator, weights[name], p, seed)
        layers[name] = LayerPatterns(a.cpu(), a.cpu(), a.cpu())
    return Patterns(layers, patterns.fingerprint, mean_y=patterns.mean_y)


#: The paper's four estimators for the qualitative grids (those with a PatternAttribution
#: of their own), with figure labels.
ESTIMATOR_NAMES = {name: e.legend for name, e in ESTIMATORS.items() if e.attribution}


def explain_estimators(model: nn.Module, patterns, images: Tensor, target: Target = None,
                       estimators: Sequence[str] = tuple(ESTIMATOR_NAMES)) -> dict[str, Tensor]:
    """Signal and attribution of each estimator, as in the paper's qualitative figure.

    For the estimator ``S`` the *signal* is PatternNet and the *attribution*
    PatternAttribution with the patterns of ``S`` (:func:`estimator_patterns`). The
    identity ``S_x(x) = x`` has no pattern: its signal is the input itself and its
    attribution ``w * x`` through the network is gradient times input (LRP-z).

    Returns
    -------
    dict[str, Tensor]
        Keys ``"<estimator> signal"`` and ``"<estimator> attribution"`` in the order of
        ``estimators``; draw them with :func:`estimator_kinds` and :func:`estimator_titles`.
    """
    out: dict[str, Tensor] = {}
    for estimator in estimators:
        if estimator not in ESTIMATOR_NAMES:
            raise ValueError(f"unknown estimator {estimator!r}; choose from {tuple(ESTIMATOR_NAMES)}")
        if ESTIMATORS[estimator].pattern == "none":  # S_x(x) = x
            out[f"{estimator} signal"] = images.detach().clone()
            out[f"{estimator} attribution"] = LRPZ(model).attribute(images, target)
            continue
        p = estimator_patterns(model, patterns, estimator, images)
        kind = ESTIMATORS[estimator].kind
        out[f"{estimator} signal"] = PatternNet(model, p, kind=kind).attribute(images, target)
        out[f"{estimator} attribution"] = PatternAttribution(model, p, kind=kind).attribute(images, target)
    return out


def estimator_kinds(explanations: Mapping[str, Tensor]) -> dict[str, str]:
    """``{key: "signal" | "attribution"}`` for the result of :func:`explain_estimators`."""
    return {key: key.rsplit(" ", 1)[1] for key in explanations}


def estimator_titles(explanations: Mapping[str, Tensor]) -> dict[str, str]:
    """Figure titles such as ``"signal $S_w$"`` for the result of :func:`explain_estimators`."""
    titles = {}
    for key in explanations:
        estimator, kind = key.rsplit(" ", 1)
        titles[key] = f"{kind} {ESTIMATOR_NAMES[estimator]}"
    return titles


# ----------------------------------------------------------------------------------
# region perturbation of every method
# ----------------------------------------------------------------------------------
def perturb_all(model: nn.Module, explainers: Mapping[str, object], images: Tensor, *,
                patch: int, steps: int | None = None, random_repeats: int = 3,
                random_name: str | None = "random", seed: int = 0, batch_size: int = 256,
                **kwargs) -> dict:
    """Region perturbation (:func:`toolkit.perturbation.region_perturbation`) of every
    explainer, most relevant regions first, plus the random order.

    Parameters
    ----------
    model : nn.Module
    explainers : dict name -> explainer
        E.g. :func:`make_explainers`.
    images : Tensor (N, C, H, W)
    patch, steps : int
        Region side and number of regions perturbed.
    random_repeats : int
        Random orderings per image for the baseline.
    random_name : str or None
        Key of the random baseline in the result (None: leave it out).
    seed, batch_size, **kwargs
        Passed on (``replace=...``, for instance).

    Returns
    -------
    dict name -> toolkit.perturbation.PerturbationResult
    """
    from toolkit.perturbation import region_perturbation

    common = dict(patch=patch, steps=steps, seed=seed, batch_size=batch_size, progress=False, **kwargs)
    results = {name: region_perturbation(model, explainer, images, order="most_relevant", **common)
               for name, explainer in explainers.items()}
    if random_name is not None:
        results[random_name] = region_perturbation(model, None, images, order="random",
                                                   random_repeats=random_repeats, **common)
    return results


#: Figure 5 of the paper: PatternAttribution with each estimator, keyed as in
#: :func:`perturb_all`. ``S_x(x) = x`` makes PatternAttribution gradient x input, i.e. LRP-z.
ESTIMATOR_METHODS = {name: e.attribution for name, e in ESTIMATORS.items() if e.attribution}
#: Table names of those methods (the estimator's symbol, and the method's title where
#: it is not PatternAttribution) and of the random order.
ESTIMATOR_TITLES = {
    e.attribution: e.symbol if e.attribution not in REGISTRY
    or REGISTRY[e.attribution].explainer is PatternAttribution
    else f"{e.symbol} ({REGISTRY[e.attribution].title})"
    for e in ESTIMATORS.values() if e.attribution
} | {"random": "random order"}
#: Titles of the compared methods that are not registered: PatternAttribution with the
#: filter patterns, and the random order.
_EXTRA_TITLES = {e.attribution: f"PattAttr {e.symbol}" for e in ESTIMATORS.values()
                 if e.attribution and e.attribution not in REGISTRY} | {"random": "random order"}


def estimator_explainers(model: nn.Module, patterns, inputs: Tensor) -> dict[str, Explainer]:
    """PatternAttribution with each of the paper's estimators (:data:`ESTIMATOR_METHODS`).

    ``inputs``: a batch the model runs on (to find the layers for the filter patterns).
    """
    explainers = {}
    for estimator, name in ESTIMATOR_METHODS.items():
        if name in REGISTRY:
            explainers[name] = REGISTRY[name].make(model, patterns)
        else:
            explainers[name] = PatternAttribution(
                model, estimator_patterns(model, patterns, estimator, inputs[:1]),
                kind=ESTIMATORS[estimator].kind)
    return {name: explainers[name] for name in ESTIMATOR_METHODS.values()}


def estimator_aopc_table(results: Mapping[str, object], decimals: int = 3,
                         intervals: bool = False) -> str:
    """The AOPC of PatternAttribution per estimator and of the random order, in the
    paper's order (S_x, S_w, S_a, S_a+-, random), with the probability after the last step
    (and, with ``intervals=True``, the 95% bootstrap interval of each AOPC over the images)."""
    names = [n for n in (*ESTIMATOR_METHODS.values(), "random") if n in results]
    if not names:
        raise ValueError(f"results hold none of {tuple(ESTIMATOR_TITLES)}")
    last = next(iter(results.values())).steps
    span = 2 * decimals + 10
    head = (f"{'estimator':<14}{'AOPC':>8}" + (f"{'95% interval':>{span}}" if intervals else "")
            + f"{f'p @ {last}':>10}")
    lines = [head, "-" * len(head)]
    for name in names:
        r = results[name]
        bounds = f"{_bounds(r.aopc_interval(), decimals):>{span}}" if intervals else ""
        lines.append(f"{ESTIMATOR_TITLES[name]:<14}{_number(r.aopc, decimals):>8}{bounds}"
                     f"{_number(float(r.curve[-1]), decimals):>10}")
    return "\n".join(lines)


def _number(value: float, decimals: int) -> str:
    """``value`` rounded first, so that round-off never prints as ``-0.00``."""
    return f"{np.round(value, decimals) + 0.0:.{decimals}f}"


def _bounds(interval, decimals: int) -> str:
    return f"[{_number(interval.low, decimals)}, {_number(interval.high, decimals)}]"


#: What an ordering claim is with intervals: the paired interval of every difference it
#: names lies on its side of 0, one lies on the other side, or neither.
CLAIM_OUTCOMES = ("holds", "does not hold", "indistinguishable here")


def _claim(results: Mapping[str, object], larger: Sequence[str], smaller: Sequence[str]) -> str:
    """Whether every method of ``larger`` has a larger AOPC than every one of ``smaller``,
    judged by the paired bootstrap intervals of the differences."""
    signs = [results[a].aopc_difference(results[b]).sign for a in larger for b in smaller if a != b]
    if all(sign == ">" for sign in signs):
        return CLAIM_OUTCOMES[0]
    if any(sign == "<" for sign in signs):
        return CLAIM_OUTCOMES[1]
    return CLAIM_OUTCOMES[2]


def estimator_orderings(results: Mapping[str, object], intervals: bool = False) -> dict[str, object]:
    """The paper's Figure 5 orderings, by AOPC (larger: faster drop): S_a+- fastest,
    random slowest, S_x above S_w, S_a below both S_x and S_w.

    Parameters
    ----------
    results : mapping name -> toolkit.perturbation.PerturbationResult
        Keyed as :data:`ESTIMATOR_METHODS` and ``"random"``, on the same images.
    intervals : bool
        False: each claim is True or False by the mean AOPC alone. True: each claim is
        one of :data:`CLAIM_OUTCOMES`, judged by the paired bootstrap interval over the
        images of every difference it names (a claim "holds" only where all of them
        exclude 0 on its side).
    """
    x, w, a, pm = (ESTIMATOR_METHODS[e] for e in ("identity", "filter", "linear", "two_component"))
    everyone = (*ESTIMATOR_METHODS.values(), "random")
    claims = {
        "S_a+- drops fastest": ((pm,), [n for n in everyone if n != pm]),
        "random order slowest": ([n for n in everyone if n != "random"], ("random",)),
        "S_x above S_w": ((x,), (w,)),
        "S_a below S_x and S_w": ((x, w), (a,)),
    }
    if intervals:
        return {claim: _claim(results, larger, smaller) for claim, (larger, smaller) in claims.items()}
    aopc = {name: results[name].aopc for name in everyone}
    return {claim: all(aopc[g] > aopc[s] for g in larger for s in smaller)
            for claim, (larger, smaller) in claims.items()}


def aopc_ordering(results: Mapping[str, object], titles: Mapping[str, str] | None = None) -> str:
    """The methods ranked by AOPC, ``>`` only where the paired bootstrap interval of two
    neighbours' difference excludes 0 and ``~`` (indistinguishable here) otherwise
    (:func:`toolkit.intervals.ranking`)."""
    from toolkit.intervals import format_ranking, ranking

    titles = dict(TITLES) | _EXTRA_TITLES | dict(titles or {})
    return format_ranking(ranking({name: r.per_image_aopc for name, r in results.items()}), titles)


def perturbation_table(results: Mapping[str, object], at: Sequence[int] = (5, 10),
                       titles: Mapping[str, str] | None = None, decimals: int = 2,
                       best_first: bool = True, intervals: bool = False) -> str:
    """AOPC per method, best first (or in the order of ``results``), with the mean
    probability of the initial class after the regions in ``at`` were perturbed
    (``at`` may hold 0, the unperturbed images) and, with ``intervals=True``, the 95%
    bootstrap interval of the AOPC over the images
    (:meth:`toolkit.perturbation.PerturbationResult.aopc_interval`)."""
    titles = dict(TITLES) | _EXTRA_TITLES | dict(titles or {})
    names = sorted(results, key=lambda n: -results[n].aopc) if best_first else list(results)
    width = max([len("method")] + [len(titles.get(n, n)) for n in names]) + 2
    span = 2 * decimals + 10
    head = (f"{'method':<{width}}{'AOPC':>7}" + (f"{'95% interval':>{span}}" if intervals else "")
            + "".join(f"{f'p @ {k}':>9}" for k in at))
    lines = [head, "-" * len(head)]
    for name in names:
        r = results[name]
        cells = "".join(f"{_number(float(r.curve[k]), decimals):>9}" for k in at)
        bounds = f"{_bounds(r.aopc_interval(), decimals):>{span}}" if intervals else ""
        lines.append(f"{titles.get(name, name):<{width}}{_number(r.aopc, decimals):>7}{bounds}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# scores against a known truth
# ----------------------------------------------------------------------------------
#: The scores of :func:`ground_truth_scores`, and whether they apply to attributions.
SCORES = {
    "signal corr": False,
    "distractor corr": False,
    "mass in signal": True,
    "mass on distractor": True,
    "precision@k": True,
}


@dataclass
class ScoreTable:
    """Scores of several methods, averaged over images.

    Attributes
    ----------
    columns : tuple[str, ...]
        The score names (:data:`SCORES`).
    per_image : dict[str, dict[str, numpy.ndarray]]
        ``per_image[method][score]``: one value per image (absent for scores that do
        not apply to the method).
    titles : dict[str, str]
        Row titles used by :meth:`table`.
    """

    columns: tuple[str, ...]
    per_image: dict[str, dict[str, np.ndarray]]
    titles: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.per_image)

    @property
    def mean(self) -> dict[str, dict[str, float]]:
        """``{method: {score: mean over images}}``; NaN where a score does not apply."""
        return {m: {c: float(np.mean(v[c])) if c in v else math.nan for c in self.columns}
                for m, v in self.per_image.items()}

    def column(self, score: str) -> dict[str, float]:
        """``{method: mean}`` of one score, for the methods it applies to."""
        if score not in self.columns:
            raise KeyError(f"no score {score!r}; the table has {self.columns}")
        return {m: float(np.mean(v[score])) for m, v in self.per_image.items() if score in v}

    def ranking(self, score: str) -> list[str]:
        """The methods the score applies to, best (highest mean) first."""
        values = self.column(score)
        return sorted(values, key=lambda m: -values[m])

    def interval(self, method: str, score: str):
        """The mean of ``score`` for ``method`` with its bootstrap interval over the images
        (:func:`toolkit.intervals.bootstrap_mean`)."""
        from toolkit.intervals import bootstrap_mean

        return bootstrap_mean(self._values(method, score))

    def difference(self, score: str, a: str, b: str):
        """``mean(a) - mean(b)`` of ``score`` with the bootstrap interval of the paired
        difference over the images (:func:`toolkit.intervals.bootstrap_difference`)."""
        from toolkit.intervals import bootstrap_difference

        return bootstrap_difference(self._values(a, score), self._values(b, score))

    def ordering(self, score: str, methods: Sequence[str] | None = None) -> str:
        """The methods ranked by ``score``, ``>`` only where the paired interval of two
        neighbours' difference excludes 0, ``~`` (indistinguishable here) otherwise."""
        from toolkit.intervals import format_ranking, ranking

        names = [m for m in (methods or self.methods) if score in self.per_image[m]]
        return format_ranking(ranking({m: self._values(m, score) for m in names}), self.titles)

    def _values(self, method: str, score: str) -> np.ndarray:
        if method not in self.per_image:
            raise KeyError(f"no method {method!r}; the table has {self.methods}")
        if score not in self.per_image[method]:
            raise KeyError(f"the score {score!r} does not apply to {method!r}")
        return np.asarray(self.per_image[method][score], dtype=float)

    def table(self, decimals: int = 2, intervals: bool = False) -> str:
        """The means as a text table, one row per method ("-" where a score does not apply);
        with ``intervals=True`` every mean is followed by its 95% bootstrap interval over
        the images, ``[low, high]``."""
        names = [self.titles.get(m, m) for m in self.per_image]
        width = max([len("method")] + [len(n) for n in names]) + 2
        cell = (3 * decimals + 14) if intervals else decimals + 3
        col = max([len(c) for c in self.columns] + [cell]) + 2
        head = f"{'method':<{width}}" + "".join(f"{c:>{col}}" for c in self.columns)
        lines = [head, "-" * len(head)]
        for name, (method, values) in zip(names, self.mean.items()):
            cells = []
            for score, v in values.items():
                if math.isnan(v):
                    cells.append(f"{'-':>{col}}")
                elif intervals:
                    cells.append(f"{self.interval(method, score).format(decimals):>{col}}")
                else:
                    cells.append(f"{np.round(v, decimals) + 0.0:>{col}.{decimals}f}")
            lines.append(f"{name:<{width}}" + "".join(cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def ground_truth_scores(explanations: Mapping[str, Tensor], truth,
                        kinds: Mapping[str, str] | None = None, k: int | None = None,
                        titles: Mapping[str, str] | None = None) -> ScoreTable:
    """Score explanations of ground-truth images against their known signal.

    Parameters
    ----------
    explanations : dict name -> Tensor (N, C, H, W)
        E.g. the result of :func:`explain_all` on ``truth.images``.
    truth : toolkit.data.GroundTruthImages
        The explained images, in the same order (``len(truth) == N``).
    kinds : dict name -> {"signal", "attribution"}, optional
        Which methods produce signals; correlations are computed for those only.
        Defaults to :data:`OUTPUTS` (names not in it count as signals).
    k : int, optional
        For precision@k; defaults to the signal's area (pixels in ``truth.signal_mask``).
    titles : dict name -> str, optional
        Row titles of the table; defaults to :data:`TITLES`.

    Returns
    -------
    ScoreTable
        Columns :data:`SCORES`.
    """
    from toolkit.data import mass_inside, precision_at_k, signal_correlation

    kinds = dict(OUTPUTS if kinds is None else kinds)
    signal_mask = truth.signal_mask.bool()
    distractor_only = truth.distractor_mask.bool() & ~signal_mask
    k = int(signal_mask.sum()) if k is None else int(k)
    per_image = {}
    for name, r in explanations.items():
        if r.shape != truth.images.shape:
            raise ValueError(f"{name}: explanations of shape {tuple(r.shape)} do not match the "
                             f"{tuple(truth.images.shape)} ground-truth images")
        scores = {}
        if kinds.get(name, "signal") == "signal":
            scores["signal corr"] = signal_correlation(r, truth.signal)
            scores["distractor corr"] = signal_correlation(r, truth.distractor)
        scores["mass in signal"] = mass_inside(r, signal_mask)
        scores["mass on distractor"] = mass_inside(r, distractor_only)
        scores["precision@k"] = precision_at_k(r, signal_mask, k)
        per_image[name] = scores
    titles = dict(TITLES) | dict(titles or {})
    return ScoreTable(tuple(SCORES), per_image, titles)


# ----------------------------------------------------------------------------------
# layer quality: several measurements as one, side by side
# ----------------------------------------------------------------------------------
def merge_quality(*results):
    """Join :class:`toolkit.quality.QualityResult` objects measured on different layers.

    Convolutions see thousands of samples per image and need few images; a dense layer
    sees one sample per image and needs many (its ``D`` inputs must be well below the
    number of samples). Measure them separately, with ``layers=``, and join the results
    for one table and one figure. Layers are kept in the order given.

    Raises
    ------
    ValueError
        If the results measure different estimators or share a layer.
    """
    from dataclasses import fields

    if not results:
        raise ValueError("give at least one QualityResult")
    regimes = {getattr(r, "regime", "all") for r in results}
    if len(regimes) > 1:
        raise ValueError(f"results measure different regimes: {sorted(regimes)}")
    estimators = tuple(results[0].estimators)
    layers: list[str] = []
    for r in results:
        if tuple(r.estimators) != estimators:
            raise ValueError(f"results measure different estimators: {estimators} and {r.estimators}")
        twice = [layer for layer in r.layers if layer in layers]
        if twice:
            raise ValueError(f"layers {twice} are measured in more than one result")
        layers += list(r.layers)
    values = {}
    for f in fields(results[0]):
        first = getattr(results[0], f.name)
        if f.name == "layers":
            values[f.name] = layers
        elif isinstance(first, dict):  # per-layer entries
            values[f.name] = {k: v for r in results for k, v in getattr(r, f.name).items()}
        else:  # estimators and the settings
            values[f.name] = first
    return type(results[0])(**values)


def regime_table(results: Mapping[str, object], estimators: Sequence[str] = ("filter", "linear",
                                                                           "two_component"),
                 decimals: int = 2) -> str:
    """Mean ``rho`` per layer under several measurements side by side (e.g. over all
    samples and over the active ones), and whether ``S_a+-`` beats ``S_a`` in each.

    The column ``+- > a`` says ``yes`` or ``no``; for a result measured with intervals
    (``layer_quality(..., intervals=...)``) it says ``yes`` or ``no`` only where the
    interval of the paired difference ``rho(S_a+-) - rho(S_a)`` excludes 0, and ``~``
    (indistinguishable here) where it does not, and ``?`` for a layer measured without
    intervals in a result that has them for others.

    Parameters
    ----------
    results : mapping of column title -> toolkit.quality.QualityResult
        The first result's layers are the rows; a layer another result lacks shows "-".
    estimators : sequence of str
        Estimators shown per result.
    """
    if not results:
        raise ValueError("give at least one QualityResult")
    short = {name: e.symbol for name, e in ESTIMATORS.items()}
    layers = list(next(iter(results.values())).layers)
    width = max([len("layer")] + [len(n) for n in layers]) + 2
    col = max(7, decimals + 5)
    groups = []
    for title, r in results.items():
        cells = [f"{short.get(e, e):>{col}}" for e in estimators] + [f"{'+- > a':>8}"]
        groups.append((title, "".join(cells)))
    top = f"{'':<{width}}" + " | ".join(f"{title:^{len(cells)}}" for title, cells in groups)
    head = f"{'layer':<{width}}" + " | ".join(cells for _, cells in groups)
    lines = [top, head, "-" * len(head)]
    for layer in layers:
        parts = []
        for r in results.values():
            if layer not in r.mean:
                parts.append("".join(f"{'-':>{col}}" for _ in estimators) + f"{'-':>8}")
                continue
            m = r.mean[layer]
            values = "".join(f"{np.round(m[e], decimals) + 0.0:>{col}.{decimals}f}" for e in estimators)
            parts.append(values + f"{better(r, layer):>8}")
        lines.append(f"{layer:<{width}}" + " | ".join(parts))
    return "\n".join(lines)


def better(result, layer: str) -> str:
    """``yes``/``no``: does ``S_a+-`` beat ``S_a`` in ``layer`` (by the interval of the
    difference where the result has one: ``~`` when it holds 0, ``?`` when other layers
    have one and this one not); ``-`` if not measured."""
    m = result.mean[layer]
    if not {"linear", "two_component"} <= set(m):
        return "-"
    replicates = getattr(result, "replicates", {})
    if layer in replicates:
        return {">": "yes", "<": "no", "~": "~"}[result.difference(layer, "two_component", "linear").sign]
    if replicates:  # measured with intervals, but not this layer: no claim
        return "?"
    return "yes" if m["two_component"] > m["linear"] else "no"


def with_mean_y(model: nn.Module, patterns, mean_y: str, inputs: Tensor):
    """The same patterns with another convention for the mean of ``y`` in ``a_+-``.

    Recomputed from the statistics ``patterns`` keeps (no second pass over the data):
    ``"masked"`` (the default of :func:`toolkit.fit_patterns`) subtracts each side's own
    mean ``E_+[y]`` (each side's pattern is then the covariance of ``x`` and ``y`` over
    that side's samples), ``"global"`` the mean ``E[y]`` over all samples (the paper's
    formula and the authors' code). The patterns must keep
    their statistics: ``fit_patterns(..., keep_statistics=True)``, or a file written by
    ``save(..., statistics=True)``.
    """
    from toolkit.layers import trace
    from toolkit.patterns import Patterns

    if not patterns.statistics:
        raise ValueError("these patterns keep no statistics to recompute them from: fit them with "
                         "fit_patterns(..., keep_statistics=True), or save and load them with "
                         "save(..., statistics=True)")
    plan = trace(model, inputs[:1])
    patterns.check(model, plan)
    return Patterns.from_statistics(plan, patterns.statistics, patterns.fingerprint, mean_y=mean_y)
