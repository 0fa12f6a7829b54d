"""The paper's signal estimators on the network side, declared once.

:data:`toolkit.linear.ESTIMATORS` holds the estimators of the 2-D toy as NumPy
classes; :data:`ESTIMATORS` here says, for the same names, how a network gets each
estimator's pattern and how it is shown. :mod:`toolkit.quality` measures the estimators
with a defined quality (:data:`MEASURABLE`), :mod:`toolkit.compare` explains with each
one, and the figures (:mod:`toolkit.plotting.evaluation`, :mod:`toolkit.plotting.toy`)
and the explorer (:mod:`toolkit.widgets`) take their names from here.

Where the pattern of each estimator comes from (``pattern``):

* ``"none"``: the identity ``S_x(x) = x`` has no pattern; PatternAttribution with it is
  gradient times input, i.e. LRP-z, and its quality is undefined;
* ``"random"``: a random direction with ``w^T a = 1`` per neuron (the baseline);
* ``"filter"``: ``a = w / (w^T w)`` from the weights (``S_w``, what DeconvNet and the
  gradient assume);
* ``"fitted"``: the patterns of :func:`toolkit.fit_patterns`, of the kinds in
  ``pattern_kinds`` (``S_a``: the linear ``a``; ``S_a+-``: ``a_+`` and ``a_-``).

The module needs neither torch nor a Jupyter stack.
"""
from __future__ import annotations

from dataclasses import dataclass

from toolkit import linear

__all__ = ["Estimator", "ESTIMATORS", "MEASURABLE", "get_estimator"]

PATTERN_SOURCES = ("none", "random", "filter", "fitted")


@dataclass(frozen=True)
class Estimator:
    """One signal estimator ``S``, as the network side uses it.

    Attributes
    ----------
    name : str
        As in :data:`toolkit.linear.ESTIMATORS`.
    math : str
        Its symbol in mathtext, e.g. ``r"$S_{a\\pm}$"``.
    legend : str
        Its short name in the evaluation figures and tables (the symbol; ``"random"`` for
        the random baseline).
    pattern : {"none", "random", "filter", "fitted"}
        Where its pattern comes from (module docstring).
    pattern_kinds : tuple of str
        For ``"fitted"``: the kinds of fitted patterns it reads, ``(a_+, a_-)`` in that
        order (one kind: both are the same).
    kind : {"two_component", "linear"}
        The ``kind=`` PatternNet and PatternAttribution read its patterns with.
    attribution : str or None
        The name of PatternAttribution with this estimator among the compared methods
        (the paper's Figure 5), or None.
    """

    name: str
    math: str
    legend: str
    pattern: str
    pattern_kinds: tuple[str, ...] = ()
    kind: str = "two_component"
    attribution: str | None = None

    def __post_init__(self):
        if self.pattern not in PATTERN_SOURCES:
            raise ValueError(f"estimator {self.name!r}: pattern must be one of {PATTERN_SOURCES}, "
                             f"not {self.pattern!r}")

    @property
    def symbol(self) -> str:
        """Plain text, e.g. ``"S_a+-"`` (the toy estimator's symbol)."""
        return linear.ESTIMATORS[self.name].symbol

    @property
    def measurable(self) -> bool:
        """Whether its quality ``rho(S)`` is defined (not for the identity)."""
        return self.pattern != "none"

    @property
    def title(self) -> str:
        """Plain text with the name, e.g. ``"two-component S_a+-"``."""
        return f"{self.name.replace('_', '-')} {self.symbol}"

    @property
    def label(self) -> str:
        """Mathtext with the name, e.g. ``r"two-component $S_{a\\pm}$"``."""
        return f"{self.name.replace('_', '-')} {self.math}"


#: The estimators by name: the random baseline, then the paper's S_x, S_w, S_a, S_a+-.
ESTIMATORS = {e.name: e for e in (
    Estimator("random", r"$S_{rand}$", "random", "random"),
    Estimator("identity", r"$S_x$", r"$S_x$", "none", attribution="lrp_z"),
    Estimator("filter", r"$S_w$", r"$S_w$", "filter", attribution="patternattribution_filter"),
    Estimator("linear", r"$S_a$", r"$S_a$", "fitted", ("linear",), kind="linear",
              attribution="patternattribution_linear"),
    Estimator("two_component", r"$S_{a\pm}$", r"$S_{a\pm}$", "fitted", ("positive", "negative"),
              attribution="patternattribution"),
)}

#: The estimators whose quality is defined, in the order of the paper's Figure 4.
MEASURABLE = tuple(name for name, e in ESTIMATORS.items() if e.measurable)


def get_estimator(name: str) -> Estimator:
    """The estimator called ``name``; a ValueError naming the choices otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {tuple(ESTIMATORS)}")
    return ESTIMATORS[name]
