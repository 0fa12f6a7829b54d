"""The network as the estimators see it: neuron layers, activations, and what runs between.

Every part of the toolkit that works on a torch model -- fitting patterns, measuring
their quality, and the backward passes of the explanation methods -- needs the same
view of it. This package computes that view in one place, one job per module:

* :mod:`~toolkit.layers.adapters`: one adapter per neuron-layer type (Linear, Conv1d/2d/3d
  with any stride, padding, dilation and groups, a standalone BatchNorm), registered in
  :data:`LAYER_TYPES`: the layer map, its transpose, the patch sums the estimators need;
* :mod:`~toolkit.layers.activations`: the ReLU family (ReLU, ReLU6, LeakyReLU), as
  modules or functions;
* :mod:`~toolkit.layers.operations`: the operations allowed between layers, judged one
  by one;
* :mod:`~toolkit.layers.tracing`: the forward pass traced with torch.fx on an example,
  every node judged;
* :mod:`~toolkit.layers.plan`: :func:`trace` and the :class:`Plan` of :class:`Layer`
  records;
* :mod:`~toolkit.layers.activity`: which activation decides that a layer's neuron is
  active (through additions, concatenations, BatchNorms), and whether its inactive side
  passes the signal;
* :mod:`~toolkit.layers.runner`: running the forward pass with the callbacks of fitting,
  measuring and explaining in place (:func:`run`, :func:`observe`).
"""
from toolkit.layers.activations import Activation
from toolkit.layers.activity import (DEFAULT_MASK, MASKS, Activity, MaskSourceError, Source, activities,
                                     check_mask)
from toolkit.layers.adapters import (LAYER_TYPES, BatchNormOps, ConvOps, LinearOps, NeuronOps, layer_type,
                                     per_neuron)
from toolkit.layers.operations import ALLOWED_OPERATIONS, ALLOWED_SUMMARY
from toolkit.layers.plan import Layer, Plan, UnverifiedForwardWarning, check_forward, evaluation_mode, trace
from toolkit.layers.runner import Hooks, observe, run
from toolkit.layers.tracing import PASSIVE_MODULES, UnsupportedLayerError

__all__ = [
    "Activation", "Activity", "ALLOWED_OPERATIONS", "ALLOWED_SUMMARY", "BatchNormOps", "ConvOps",
    "DEFAULT_MASK", "Hooks", "LAYER_TYPES", "Layer", "LinearOps", "MASKS", "MaskSourceError",
    "NeuronOps", "PASSIVE_MODULES", "Plan", "Source", "UnsupportedLayerError",
    "UnverifiedForwardWarning", "activities", "check_forward", "check_mask", "evaluation_mode",
    "layer_type", "observe", "per_neuron", "run", "trace",
]
