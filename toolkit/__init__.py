"""PatternNet and PatternAttribution: learning how to explain neural networks.

The toolkit follows the paper's three steps:

1. ``toolkit.linear`` -- the linear signal/distractor model in NumPy, where every
   estimator has a closed form;
2. ``toolkit.fit_patterns`` -- the same estimators learned for every neuron of a torch
   network (Linear layers, convolutions, BatchNorms) from streamed float64 statistics;
3. ``toolkit.methods`` -- the backward passes (Gradient, DeconvNet, Guided Backprop,
   PatternNet, PatternAttribution, LRP-z) and ``toolkit.quality`` /
   ``toolkit.perturbation`` to measure them.

Heavy or optional modules are imported on first use, so ``import toolkit`` needs
neither torch nor a Jupyter stack.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily on first access); the classes
# of the explanation methods come from the registry, toolkit.methods.REGISTRY
_LAZY = {
    "fit_patterns": "toolkit.patterns",
    "Patterns": "toolkit.patterns",
    "layer_quality": "toolkit.quality",
    "region_perturbation": "toolkit.perturbation",
}


# submodules reachable as attributes, e.g. ``toolkit.linear`` after ``import toolkit``
_SUBMODULES = (
    "linear", "estimators", "layers", "rules", "streaming", "patterns", "fingerprint", "precision",
    "methods", "quality", "perturbation", "intervals", "conservation", "experiment", "sanity", "similarity",
    "convention", "interop", "data", "models", "zoo", "imagenet", "compare", "plotting", "widgets",
    "reproduce", "course", "cli", "timeseries", "architectures",
)


def _explainers() -> dict:
    """The classes of the registered explanation methods by class name (imports torch)."""
    registry = import_module("toolkit.methods").REGISTRY
    return {m.explainer.__name__: m.explainer for m in registry.values()}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return import_module(f"toolkit.{name}")
    if name[:1].isupper() and name in _explainers():
        return _explainers()[name]
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def __dir__():
    import sys

    explainers = list(_explainers()) if "toolkit.methods" in sys.modules else []
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES) + explainers)
