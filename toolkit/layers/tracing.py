"""The forward pass of a model as a graph: torch.fx with the values of one example.

:func:`trace_graph` traces ``model.forward`` symbolically with :mod:`torch.fx` and runs
every recorded operation on a real example batch as it goes (:class:`_ValueTracer`).
The values make two things possible that a plain symbolic trace cannot do:

* control flow on *shapes* (``if x.size(2) == 1``, ``len(x.shape)``, unpacking
  ``x.size()``) follows the example, as the model would; control flow on tensor
  *values* still stops the trace (a branch on data would not hold for other inputs);
* every operation is judged on what it really gets (:mod:`toolkit.layers.operations`).

Modules the toolkit knows stay single calls in the graph: neuron layers
(:mod:`toolkit.layers.adapters`), the ReLU family (:mod:`toolkit.layers.activations`)
and the passive modules of :data:`PASSIVE_MODULES`. Any other module of ``torch.nn``
is refused by its type (SiLU, GELU, LayerNorm, attention ...), naming it; a module of
any other library (braindecode's ``Ensure4d``, einops' ``Rearrange``, the user's own
blocks) is traced into and judged by the operations it performs, and so are einops'
functions (``rearrange``). A layer with a parametrized weight
(``torch.nn.utils.parametrize``) is a layer like any other: its adapter reads the weight
the forward pass computes.

The result, :class:`ModelGraph`, says for every node what it is (a layer, an
activation, an allowed operation), which nodes carry the input's signal, and which of
them every path from the input to the output passes through (:attr:`ModelGraph.cuts`,
where the backward passes may rescale their signal).
"""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate

from toolkit.layers import operations
from toolkit.layers.activations import Activation, activation_of_call, activation_of_module, is_inplace
from toolkit.layers.adapters import BATCHNORMS, LinearOps, adapter_for

__all__ = ["PASSIVE_MODULES", "ModelGraph", "LayerCall", "trace_graph", "UnsupportedLayerError",
           "UntraceableError"]

#: Modules that only re-index, pool or pass their input (their gradient is every rule).
PASSIVE_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ChannelShuffle,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,   # with value 0 only (passive_refusal)
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class UnsupportedLayerError(TypeError):
    """A model uses a module (or a module setting, or an operation in its ``forward``)
    the estimators do not cover."""


class UntraceableError(RuntimeError):
    """torch.fx cannot trace the model's forward (control flow on data, say)."""


def unsupported(name: str, module: nn.Module, why: str = "") -> UnsupportedLayerError:
    """The error for a module the toolkit does not cover, naming it and why."""
    from toolkit.layers.adapters import LAYER_TYPES

    if not why:
        known = sorted({t.__name__ for t in (*LAYER_TYPES, *PASSIVE_MODULES)} |
                       {"ReLU", "ReLU6", "LeakyReLU", "Hardtanh(0, M)"})
        why = f"supported modules are {', '.join(known)}"
        return UnsupportedLayerError(f"layer '{name}' of type {type(module).__name__} is not supported; {why}")
    return UnsupportedLayerError(f"layer '{name}' of type {type(module).__name__} is not supported: {why}")


def passive_refusal(module: nn.Module) -> str | None:
    """Why a module of :data:`PASSIVE_MODULES` is refused with its settings, or None."""
    if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) and module.training:
        return "dropout in training mode is random"
    if isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)) and module.value != 0:
        return (f"it pads with the value {module.value}, an offset (only zero padding is linear in "
                "the signal)")
    return None


def _is_known(module: nn.Module) -> bool:
    return (adapter_for(module) is not None or activation_of_module(module) is not None
            or isinstance(module, PASSIVE_MODULES))


class _ExampleError(Exception):
    """The model itself fails on the example (raised again as it is, not as untraceable)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


_RANKS = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


class _ValueProxy(fx.Proxy):
    """A proxy that knows its example value: its length and a tensor's rank are concrete
    (the rank of every tensor is fixed once the input's is, as control flow on shapes is)."""

    def __len__(self) -> int:
        return len(self.node.meta["value"])

    def __getattr__(self, k: str):
        value = self.node.meta.get("value")
        if k == "ndim" and isinstance(value, Tensor):
            return value.ndim   # a plain int: einops looks its recipe up by the rank
        return _ValueAttribute(self, k)


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    """``x.shape``, ``x.view`` ...: an attribute whose value is known (``len(x.shape)``)."""

    def __call__(self, *args, **kwargs):
        value = self.root.node.meta.get("value")
        if self.attr in ("dim", "ndimension") and isinstance(value, Tensor) and not args and not kwargs:
            return value.dim()
        return super().__call__(*args, **kwargs)


#: Queries of a tensor's shape: their results carry no data, so control flow on them is fine.
_SHAPE_QUERIES = {"size", "dim", "ndimension", "numel", "shape", "ndim", "dtype", "device", "is_cuda",
                  "get_device", "is_floating_point"}


class _ValueTracer(fx.Tracer):
    """torch.fx's tracer, running every recorded operation on the example as it goes."""

    def __init__(self, example: Tensor, shape: tuple):
        super().__init__()
        self.record_stack_traces = True
        self.example = example
        self.shape = shape      # the caller's input shape, for messages
        self._placeholders = 0
        self._computing = False   # while an example value is computed, modules run for real

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_known(m):
            return True
        if isinstance(m, _CONTAINERS):
            return False
        return type(m).__module__.startswith("torch.nn")   # unknown torch.nn modules: refused by type

    def proxy(self, node):
        return _ValueProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            self._computing = True
            try:
                node.meta["value"] = self._value(node)
            except _ExampleError:
                raise
            except Exception as error:
                raise _ExampleError(error) from error
            finally:
                self._computing = False
            node.meta["from_data"] = self._from_data(node)
        return node

    def _value(self, node):
        real = lambda a: a.meta["value"] if isinstance(a, fx.Node) else a  # noqa: E731
        args, kwargs = map_aggregate(node.args, real), map_aggregate(node.kwargs, real)
        if node.op == "placeholder":
            self._placeholders += 1
            return self.example if self._placeholders == 1 else (args[0] if args else None)
        if node.op == "get_attr":
            value = self.root
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            self._check_rank(node.target, module, args)
            return module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _check_rank(self, name: str, module: nn.Module, args: tuple) -> None:
        """A neuron layer that needs a batch of a given rank gets one inside the model (a
        model may reshape its input first; an unbatched image would pass a convolution as
        one image with its channels as the batch)."""
        ops = adapter_for(module)
        rank = ops(module).input_rank if ops is not None else None
        x = args[0] if args else None
        if rank is not None and isinstance(x, Tensor) and x.dim() != rank:
            raise ValueError(
                f"inputs of shape {self.shape} are not {_RANKS.get(rank, f'of rank {rank}')}, as the "
                f"model's layer '{name}' ({type(module).__name__}) needs them (it gets a tensor of "
                f"rank {x.dim()}); give a batch shaped as the model expects")

    @staticmethod
    def _from_data(node) -> bool:
        """Whether a non-tensor value was computed from tensor values (``x.sum().item()``)
        rather than from shapes (``x.size(0)``)."""
        inputs = node.all_input_nodes
        if any(a.meta.get("from_data") for a in inputs):
            return True
        if isinstance(node.meta["value"], Tensor):
            return False
        query = node.target if node.op == "call_method" else (
            node.args[1] if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr"
            and len(node.args) > 1 else None)
        if query in _SHAPE_QUERIES:
            return False
        return any(isinstance(a.meta.get("value"), Tensor) for a in inputs)

    def to_bool(self, obj):
        value = obj.node.meta["value"]
        if isinstance(value, Tensor) or obj.node.meta.get("from_data"):
            raise fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to "
                                      "control flow (a branch on the values of a tensor)")
        return bool(value)

    def iter(self, obj):
        return iter([obj[i] for i in range(len(obj.node.meta["value"]))])


@dataclass
class LayerCall:
    """Where a neuron layer sits in the graph."""

    name: str
    node: str                       # the call of the layer's module
    output: str                     # the node whose value is the layer output z
    batchnorm: str | None = None    # the folded BatchNorm's module name


@dataclass
class ModelGraph:
    """The traced forward pass (see the module docstring).

    Attributes
    ----------
    module : fx.GraphModule
        The model as a graph; it calls the model's own submodules.
    layers : list of LayerCall
        The neuron layers in forward order.
    activations : dict
        Node name -> :class:`Activation` for every ReLU-family call.
    inplace : set of str
        The activation nodes that overwrite their input.
    signal : set of str
        The nodes whose value carries the input's signal (tensors that depend on it).
    cuts : set of str
        The signal nodes every path from the input to the output passes through.
    batch : int
        The batch size it was traced with.
    """

    module: fx.GraphModule
    layers: list[LayerCall]
    activations: dict[str, Activation]
    inplace: set[str]
    signal: set[str]
    cuts: set[str]
    batch: int
    nodes: dict[str, fx.Node] = field(default_factory=dict)

    def value(self, name: str):
        """The example value of a node."""
        return self.nodes[name].meta.get("value")


def trace_graph(model: nn.Module, example: Tensor) -> ModelGraph:
    """Trace ``model`` on ``example`` (two samples of it are used) and judge every node.

    Raises
    ------
    UntraceableError
        If torch.fx cannot trace the forward (the caller decides what to do).
    UnsupportedLayerError
        For the first module or operation that is not covered, naming it and where.
    """
    batch = example[:2] if example.shape[0] >= 2 else torch.cat([example[:1], example[:1]])
    tracer = _ValueTracer(batch.clone(), tuple(example.shape))
    try:
        with torch.no_grad(), _einops_traced():
            graph = tracer.trace(model, concrete_args=_defaults(model))
    except UnsupportedLayerError:
        raise
    except _ExampleError as error:
        raise error.error from None
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError ...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UntraceableError(first) from error
    module = fx.GraphModule(tracer.root, graph)
    judged = _Judge(model, module, batch.shape[0]).run()
    for node in module.graph.nodes:  # from here on only their shapes are read
        if "value" in node.meta:
            node.meta["value"] = map_aggregate(node.meta["value"], _shape_only)
    return judged


def _shape_only(value):
    """A tensor as a tensor of its shape and dtype without data (the example's values
    of every node would stay in memory as long as the plan: 120 MB for VGG16)."""
    return value.to("meta") if isinstance(value, Tensor) else value


@contextmanager
def _einops_traced():
    """einops' functions (``rearrange(x, "b c t -> b 1 c t")``) take the traced values
    for torch tensors while tracing, so that they are traced into the reshapes and
    permutes they perform (einops is used only when the model has imported it)."""
    backends = sys.modules.get("einops._backends")
    if backends is None:
        yield
        return
    known = backends._type2backend
    torch_backend = backends.get_backend(torch.zeros(()))
    added = [t for t in (_ValueProxy, _ValueAttribute) if t not in known]
    known.update(dict.fromkeys(added, torch_backend))
    try:
        yield
    finally:
        for t in added:
            known.pop(t, None)


def _defaults(model: nn.Module) -> dict:
    """The optional parameters of ``model.forward`` after the input, fixed to their
    defaults: the toolkit calls ``model(x)``, so ``if mask is None:`` takes the branch
    the call takes (a proxy in their place would never be None)."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters
            if p.default is None or isinstance(p.default, (bool, int, float, str))}


class _Judge:
    """Go through the nodes once: what each is, and whether it is allowed."""

    def __init__(self, model: nn.Module, module: fx.GraphModule, batch: int):
        self.model, self.module, self.batch = model, module, batch
        self.modules = dict(model.named_modules())
        self.layers: list[LayerCall] = []
        self.activations: dict[str, Activation] = {}
        self.inplace: set[str] = set()
        self.signal: set[str] = set()
        self.seen_modules: set[str] = set()

    def run(self) -> ModelGraph:
        nodes = list(self.module.graph.nodes)
        for node in nodes:
            self._judge(node)
        self._fold_batchnorms()
        cuts = _cuts(nodes, self.signal)
        return ModelGraph(self.module, self.layers, self.activations, self.inplace, self.signal, cuts,
                          self.batch, {n.name: n for n in nodes})

    def _carries(self, value) -> bool:
        if isinstance(value, Tensor):
            return True
        return isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value)

    def _judge(self, node) -> None:
        if node.op == "placeholder":
            if self._carries(node.meta.get("value")):
                self.signal.add(node.name)
            return
        if node.op in ("get_attr", "output"):
            return
        inputs = [a for a in node.all_input_nodes if a.name in self.signal]
        if not inputs:
            return  # constants and shape arithmetic: no signal flows through them
        value = node.meta["value"]
        if self._carries(value):
            self.signal.add(node.name)
        if node.op == "call_module":
            self._module_call(node)
        else:
            self._operation(node)

    def _module_call(self, node) -> None:
        name = node.target
        module = self.modules[name] if name in self.modules else self.module.get_submodule(name)
        activation = activation_of_module(module)
        if isinstance(activation, str):
            raise unsupported(name, module, activation)
        if activation is not None:
            self.activations[node.name] = activation
            if is_inplace(None, (), {}, module):
                self.inplace.add(node.name)
            return
        if isinstance(module, PASSIVE_MODULES):
            why = passive_refusal(module)
            if why is not None:
                raise unsupported(name, module, why)
            return
        ops = adapter_for(module)
        if ops is None:
            raise unsupported(name, module)
        why = ops(module).check()
        if why is not None:
            raise unsupported(name, module, why)
        if name in self.seen_modules:
            raise unsupported(name, module, "it is called more than once in the forward pass")
        self.seen_modules.add(name)
        self.layers.append(LayerCall(name, node.name, node.name))

    def _operation(self, node) -> None:
        real = lambda a: a.meta["value"] if isinstance(a, fx.Node) else a  # noqa: E731
        args, kwargs = map_aggregate(node.args, real), map_aggregate(node.kwargs, real)
        activation = activation_of_call(node.target, args, kwargs)
        if isinstance(activation, str):
            raise UnsupportedLayerError(f"operation '{operations.operation_name(node)}' at "
                                        f"{operations.where(node, self.model)} is not supported: {activation}")
        if activation is not None:
            self.activations[node.name] = activation
            if is_inplace(node.target, args, kwargs):
                self.inplace.add(node.name)
            return
        signals = [isinstance(a, fx.Node) and a.name in self.signal       # one per tensor argument
                   for a in (*node.args, *node.kwargs.values())
                   if isinstance(a.meta.get("value") if isinstance(a, fx.Node) else a, Tensor)]
        why = operations.refusal(node, args, kwargs, node.meta["value"], signals, self.batch)
        if why is not None:
            raise UnsupportedLayerError(
                f"operation '{operations.operation_name(node)}' at {operations.where(node, self.model)} "
                f"is not supported: {why}. Allowed between layers: {operations.ALLOWED_SUMMARY}")

    def _fold_batchnorms(self) -> None:
        """A BatchNorm whose input is the output of a convolution or Linear layer used by
        nothing else is folded into it; every other BatchNorm is a layer of its own."""
        nodes = {node.name: node for node in self.module.graph.nodes}
        by_node = {call.node: call for call in self.layers}
        kept = []
        for call in self.layers:
            source = nodes[call.node].args[0]
            into = by_node.get(source.name) if isinstance(source, fx.Node) else None
            if isinstance(self.modules[call.name], BATCHNORMS) and into is not None \
                    and into.batchnorm is None and len(source.users) == 1 and self._foldable(into, source):
                into.batchnorm, into.output = call.name, call.node
                continue
            kept.append(call)
        self.layers = kept

    def _foldable(self, call: LayerCall, output) -> bool:
        """Whether a BatchNorm after ``call`` normalises its neurons: a convolution's
        channels, or a Linear layer's features of a batch of vectors (not of sequences)."""
        module = self.modules[call.name]
        if isinstance(module, BATCHNORMS):
            return False
        value = output.meta.get("value")
        return not (adapter_for(module) is LinearOps and isinstance(value, Tensor) and value.dim() != 2)


def _cuts(nodes: list, signal: set[str]) -> set[str]:
    """The signal nodes every path from the input to the output passes through: in
    topological order, a node is such a cut when no edge between signal nodes jumps over
    its position."""
    position = {node.name: i for i, node in enumerate(nodes)}
    furthest = {}
    for node in nodes:
        for source in node.all_input_nodes:
            if source.name in signal and (node.name in signal or node.op == "output"):
                furthest[source.name] = max(furthest.get(source.name, -1), position[node.name])
    cuts, reach = set(), -1
    for node in nodes:
        i = position[node.name]
        if node.name in signal and reach <= i:
            cuts.add(node.name)
        reach = max(reach, furthest.get(node.name, -1))
    return cuts
