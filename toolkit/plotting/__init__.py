"""Figures in the style of the paper.

``toy``: the 2-D signal/distractor figures; ``images``: signals and heatmaps of
images; ``evaluation``: layer quality and perturbation curves; ``sanity``: the sanity
checks and the ``mean_y`` evidence; ``timeseries``: channel x time images and scalp
topographies of recordings; ``style``: the resolution and font sizes of the course's
figures.
"""
from importlib import import_module

_SUBMODULES = ("toy", "images", "evaluation", "sanity", "timeseries", "style")


def __getattr__(name):
    for sub in _SUBMODULES:
        try:
            module = import_module(f"toolkit.plotting.{sub}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'toolkit.plotting' has no attribute {name!r}")
