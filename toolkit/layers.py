"""The network as the estimators see it: a list of Conv2d/Linear neuron layers.

Every part of the toolkit that works on a torch model -- fitting patterns, measuring
their quality, and the backward passes of the explanation methods -- needs the same
view of it: for each ``Conv2d`` or ``Linear`` layer, its input ``x``, its output
``z = W x + b`` (after a folded ``BatchNorm2d``, if one follows), and the linear map
``W`` between them. This module computes that view in one place:

* :func:`trace` runs one forward pass with temporary hooks, checks that every module
  the forward pass uses is supported, finds the BatchNorm layers that follow a
  convolution directly, checks the code *between* the modules (:func:`check_forward`)
  and returns a :class:`Plan` -- the ordered list of :class:`Layer` records.
* :func:`check_forward` traces the model's ``forward`` symbolically with ``torch.fx``
  and refuses every function or tensor method outside :data:`ALLOWED_OPERATIONS`
  (a ``torch.sigmoid`` or a residual addition written in ``forward`` is invisible to
  module hooks, and the rules would silently treat it as its gradient).
* :class:`Layer` knows its folded weight and bias; the linear operations the estimators
  need come from the adapter of its module type (:class:`NeuronOps`, one per type:
  :class:`LinearOps`, :class:`Conv2dOps`, registered in :data:`LAYER_TYPES`): the
  layer map itself, its transpose (the backward pass through the layer with any
  weight), and the *patch sums* ``sum_n g_n x_n^T`` over every sample and every
  spatial position -- for a convolution this is exactly the weight gradient.
* :func:`intercept` temporarily routes every planned layer (and optionally every ReLU)
  through callbacks during a forward pass. The hooks are removed when it exits, so the
  user's model is never changed.
* :func:`evaluation_mode` puts a model in eval mode and restores every module's own
  mode afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numbers
import os
import re
import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: Leaf modules a supported model may use. Containers (``nn.Sequential`` or a user's
#: own ``nn.Module`` with children) are fine; ``torch.flatten`` and views in
#: ``forward`` are fine too.
SUPPORTED_MODULES = (
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.BatchNorm2d,
    nn.Identity,
)


class UnsupportedLayerError(TypeError):
    """A model uses a module (or a module setting, or an operation in its ``forward``)
    the estimators do not cover."""


class UnverifiedForwardWarning(UserWarning):
    """The code of a model's ``forward`` could not be checked (torch.fx cannot trace it)."""


def _unsupported(name: str, module: nn.Module, why: str = "") -> UnsupportedLayerError:
    supported = ", ".join(t.__name__ for t in SUPPORTED_MODULES)
    detail = f": {why}" if why else f"; supported modules are {supported}"
    return UnsupportedLayerError(
        f"layer '{name}' of type {type(module).__name__} is not supported{detail}"
    )


# ----------------------------------------------------------------------------------
# one adapter per type of neuron layer
# ----------------------------------------------------------------------------------
#: The adapter class of each neuron-layer module type, filled by :func:`layer_type`.
LAYER_TYPES: dict[type, type["NeuronOps"]] = {}


def layer_type(module_type: type):
    """Register the decorated :class:`NeuronOps` subclass as the adapter of ``module_type``."""
    def register(cls):
        cls.module_type = module_type
        LAYER_TYPES[module_type] = cls
        return cls
    return register


class NeuronOps:
    """What the estimators and rules need from one type of neuron layer, in one place.

    A neuron layer maps its input ``x`` linearly to its output ``z = W x + b``; every
    sample is one row of the layer's input (a Linear layer) or one receptive-field patch
    at one output position (a convolution). An adapter knows, for its module type, the
    layer map with any weight (:meth:`apply`), its transpose (:meth:`transpose`), the
    *patch sums* ``sum_n g_n x_n^T`` over all samples (:meth:`patch_sums`, with
    :meth:`cover_sums` for zero padding), and how samples are laid out
    (:meth:`patches`, :meth:`neuron_values`). Chosen once per layer by module type
    (:data:`LAYER_TYPES`); to support a new layer type, register a subclass with
    :func:`layer_type` and add the module type to :data:`SUPPORTED_MODULES`.
    """

    module_type: type = nn.Module
    #: Dimension of an output tensor that indexes the neurons.
    neuron_dim: int = -1
    #: Whether the patch sums of several batches should be made in one product (the
    #: products are small, so gathering rows first saves passes over the float64 sums).
    gathers_rows: bool = False
    #: The input rank the layer needs (None: any, with features last).
    input_rank: int | None = None

    def __init__(self, module: nn.Module):
        self.module = module

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """``weight`` applied to ``x`` the way the layer applies ``W`` (no bias)."""
        raise NotImplementedError

    def transpose(self, grad: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """``weight^T`` applied to ``grad``: the backward pass through the layer."""
        raise NotImplementedError

    def patch_sums(self, x: Tensor, g: Tensor) -> Tensor:
        """``sum over samples of g[:, r] * patch(x)``, shaped like a weight with
        ``g.shape[neuron_dim]`` rows."""
        raise NotImplementedError

    def cover_sums(self, input_shape: torch.Size, g: Tensor) -> Tensor:
        """:meth:`patch_sums` of an all-ones input of one channel (``input_shape`` is
        the real input's) for the output-shaped ``g``: per row and kernel position, the
        sum of ``g`` over the samples whose patch covers the input there rather than
        zero padding."""
        raise NotImplementedError

    def input_sums(self, x: Tensor, output_shape: torch.Size) -> Tensor:
        """:meth:`patch_sums` with one all-ones output row: the float64 sum of every
        sample's patch, shaped ``(1, *W[1:])``, without a product over the outputs."""
        raise NotImplementedError

    def input_shift(self, x: Tensor) -> Tensor:
        """The float64 mean of ``x`` per input channel, shaped like one row of the weight
        with the patch positions broadcast: ``(1, D)`` or ``(1, C, 1, 1)``."""
        raise NotImplementedError

    def patches(self, x: Tensor) -> Tensor:
        """The layer's input samples as rows, ``(samples, D)``, in the order of
        :meth:`neuron_values`."""
        raise NotImplementedError

    def neuron_values(self, t: Tensor) -> Tensor:
        """An output-shaped tensor as ``(samples, neurons)``."""
        return t.movedim(self.neuron_dim, -1).reshape(-1, t.shape[self.neuron_dim])

    def neuron_means(self, z: Tensor) -> Tensor:
        """The float64 mean of an output-shaped tensor per neuron, ``(J,)``."""
        dims = tuple(d for d in range(z.dim()) if d != self.neuron_dim % z.dim())
        return z.mean(dims, dtype=torch.float64)


@layer_type(nn.Linear)
class LinearOps(NeuronOps):
    """A Linear layer: every row of its input is one sample; no padding."""

    neuron_dim = -1
    gathers_rows = True

    def apply(self, x, weight):
        return F.linear(x, weight)

    def transpose(self, grad, weight, input_shape):
        return grad @ weight

    def patch_sums(self, x, g):
        return self.neuron_values(g).T @ self.patches(x)

    def cover_sums(self, input_shape, g):
        return self.neuron_values(g).sum(0)[:, None]

    def input_sums(self, x, output_shape):
        return self.patches(x).sum(0, dtype=torch.float64)[None]

    def input_shift(self, x):
        return self.patches(x).mean(0, dtype=torch.float64)[None]

    def patches(self, x):
        return x.reshape(-1, x.shape[-1])


@contextmanager
def _without_onednn(switch: bool):
    """oneDNN off for the block (if ``switch``), and back as it was. Only the one switch:
    ``torch.backends.mkldnn.flags`` would set its TF32 flag too, which warns."""
    before = torch.backends.mkldnn.enabled
    if switch:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@layer_type(nn.Conv2d)
class Conv2dOps(NeuronOps):
    """A convolution: every output position of every image is one sample, whose input
    is the receptive-field patch (zero padding included) flattened like
    ``weight[j].reshape(-1)``; the patch sums are the weight gradient."""

    neuron_dim = 1
    input_rank = 4

    def _geometry(self) -> tuple:
        m = self.module
        return m.stride, m.padding, m.dilation

    def apply(self, x, weight):
        return F.conv2d(x, weight, None, *self._geometry())

    def transpose(self, grad, weight, input_shape):
        return torch.nn.grad.conv2d_input(input_shape, weight, grad, *self._geometry())

    def patch_sums(self, x, g):
        """The weight gradient. On the CPU through torch's own kernel (im2col and a
        matrix product), not oneDNN's: oneDNN's float32 weight gradient adds the
        ``N H' W'`` products of a batch with an error that grows with their number (5e-5
        relative on the active-side sums of 32 images of 32x32, against 9e-7), and is no
        faster on VGG16's layers (docs/math.md, section 3.2)."""
        shape = (g.shape[1], x.shape[1], *self.module.kernel_size)
        with _without_onednn(x.device.type == "cpu"):
            return torch.nn.grad.conv2d_weight(x, shape, g, *self._geometry())

    def cover_sums(self, input_shape, g):
        """Shaped ``(rows, 1, kh, kw)``. Whether kernel position ``(a, b)`` of output
        position ``(i, j)`` covers the input factorises into one condition per axis, so
        the sums are two small matrix products with those 0/1 conditions (much cheaper
        than the convolution of a one-channel image)."""
        per_position = g.sum(0)                                   # (rows, H', W')
        rows, cols = (self._covers(axis, input_shape[2 + axis], g.shape[2 + axis], g.device).to(g.dtype)
                      for axis in (0, 1))
        return torch.einsum("rij,ai,bj->rab", per_position, rows, cols)[:, None]

    def input_sums(self, x, output_shape):
        """The same factorisation as :meth:`cover_sums`, from the input side: kernel
        position ``(a, b)`` sums the input over the positions it reads, one 0/1
        condition per axis."""
        per_position = x.sum(0, dtype=torch.float64)              # (C, H, W)
        rows, cols = (self._reads(axis, x.shape[2 + axis], output_shape[2 + axis], x.device)
                      for axis in (0, 1))
        return torch.einsum("cuv,au,bv->cab", per_position, rows.double(), cols.double())[None]

    def _positions(self, axis: int, out_size: int, device) -> Tensor:
        """``(k, out_size)``: the input position that kernel position ``a`` of output
        position ``i`` reads along ``axis`` (negative or beyond the input: padding)."""
        m = self.module
        start = torch.arange(out_size, device=device) * m.stride[axis] - m.padding[axis]
        offset = torch.arange(m.kernel_size[axis], device=device) * m.dilation[axis]
        return start[None, :] + offset[:, None]

    def _covers(self, axis: int, size: int, out_size: int, device) -> Tensor:
        """``(k, out_size)`` bool: kernel position ``a`` of output position ``i`` lies
        inside the input (not in the zero padding) along ``axis``."""
        where = self._positions(axis, out_size, device)
        return (where >= 0) & (where < size)

    def _reads(self, axis: int, size: int, out_size: int, device) -> Tensor:
        """``(k, size)`` bool: kernel position ``a`` reads input position ``u`` for some
        output position along ``axis`` (at most once: the positions grow with ``i``)."""
        where = self._positions(axis, out_size, device)
        return (where[:, :, None] == torch.arange(size, device=device)).any(1)

    def input_shift(self, x):
        return x.mean((0, 2, 3), dtype=torch.float64).reshape(1, -1, 1, 1)

    def patches(self, x):
        m = self.module
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class Layer:
    """One Conv2d or Linear layer, with the BatchNorm2d that directly follows it folded in.

    Attributes
    ----------
    name : str
        Qualified name of the Conv2d/Linear module in ``model.named_modules()``; the key
        of the layer's patterns.
    module : nn.Conv2d or nn.Linear
    batchnorm : nn.BatchNorm2d or None
        The BatchNorm2d applied directly to this layer's output, folded into ``W``, ``b``.
    batchnorm_name : str or None
    """

    name: str
    module: nn.Module
    batchnorm: nn.BatchNorm2d | None = None
    batchnorm_name: str | None = None
    #: The adapter of the layer's module type (:data:`LAYER_TYPES`), chosen once.
    ops: NeuronOps = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        kind = next((t for t in type(self.module).__mro__ if t in LAYER_TYPES), None)
        if kind is None:
            raise _unsupported(self.name, self.module, "it is not a neuron layer")
        self.ops = LAYER_TYPES[kind](self.module)

    @property
    def is_conv(self) -> bool:
        """Whether the layer is a convolution (for messages and tests; the operations
        come from :attr:`ops`)."""
        return isinstance(self.ops, Conv2dOps)

    @property
    def output_module(self) -> nn.Module:
        """The module whose output is the layer output ``z`` (the BatchNorm, if folded)."""
        return self.batchnorm if self.batchnorm is not None else self.module

    @property
    def weight_shape(self) -> torch.Size:
        return self.module.weight.shape

    @property
    def out_features(self) -> int:
        """Number of neurons (output channels of a convolution)."""
        return self.module.weight.shape[0]

    # -- folded parameters ----------------------------------------------------------
    def _batchnorm_scale_shift(self) -> tuple[Tensor, Tensor]:
        bn = self.batchnorm
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale, shift

    def weight(self) -> Tensor:
        """The layer's linear map ``W`` (BatchNorm folded in), detached."""
        w = self.module.weight.detach()
        if self.batchnorm is not None:
            scale, _ = self._batchnorm_scale_shift()
            w = w * scale.detach().reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def bias(self) -> Tensor:
        """The layer's bias ``b`` (BatchNorm folded in; zeros if there is none), detached."""
        w = self.module.weight
        b = self.module.bias
        b = b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if self.batchnorm is not None:
            scale, shift = self._batchnorm_scale_shift()
            b = b * scale.detach() + shift.detach()
        return b

    # -- the linear operations, from the layer type's adapter ------------------------
    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """``weight`` applied to ``x`` the way the layer applies ``W`` (no bias)."""
        return self.ops.apply(x, weight)

    def transpose(self, grad: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """``weight^T`` applied to ``grad``: the backward pass through the layer with ``weight``."""
        return self.ops.transpose(grad, weight, input_shape)

    def patch_sums(self, x: Tensor, g: Tensor) -> Tensor:
        """``sum over samples and positions of g[j] * patch(x)``, shaped like a weight with
        ``g.shape[neuron_dim]`` rows: ``g^T x`` for a Linear layer, the weight gradient
        for the output gradient ``g`` for a convolution (see :class:`NeuronOps`)."""
        return self.ops.patch_sums(x, g)

    def cover_sums(self, input_shape: torch.Size, g: Tensor) -> Tensor:
        """:meth:`patch_sums` of an all-ones input of one channel (``input_shape`` the
        real input's) for the output-shaped ``g``; ``(rows, 1, kh, kw)`` for a
        convolution, ``(rows, 1)`` for a Linear layer (no padding: the sums of ``g``)."""
        return self.ops.cover_sums(input_shape, g)

    def patches(self, x: Tensor) -> Tensor:
        """The layer's input samples as rows, ``(samples, D)``, in the order of
        :meth:`neuron_values`."""
        return self.ops.patches(x)

    def neuron_values(self, t: Tensor) -> Tensor:
        """Reshape an output-shaped tensor to ``(samples, neurons)``, one row per sample
        and spatial position."""
        return self.ops.neuron_values(t)


@dataclass
class Plan:
    """The neuron layers of a model in forward order, found by :func:`trace`."""

    layers: list[Layer]
    input_shape: tuple[int, ...] = field(default=())
    #: Where ``forward`` calls a ReLU as a function (``F.relu``, ``x.relu()``) rather
    #: than through an ``nn.ReLU`` module (found by :func:`check_forward`).
    relu_calls: list[str] = field(default_factory=list)
    #: False when :func:`check_forward` could not trace the model (only its modules
    #: were checked).
    forward_verified: bool = True
    #: The modules whose forward adds two branches (residual blocks; "" for the model's
    #: own forward), found by :func:`check_forward`.
    residual_modules: list[str] = field(default_factory=list)

    def in_branch(self, layer: Layer) -> bool:
        """Whether ``layer`` lies inside a module that adds branches (a residual block):
        its backward signal is only one of the summands at the block's input."""
        return any(m == "" or layer.name.startswith(m + ".") for m in self.residual_modules)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


@contextmanager
def evaluation_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block, then restore each module's own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            yield name or type(model).__name__, module


def _check_settings(name: str, module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED_MODULES):
        raise _unsupported(name, module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise _unsupported(name, module, f"groups={module.groups} (only groups=1)")
        if module.padding_mode != "zeros":
            raise _unsupported(name, module, f"padding_mode='{module.padding_mode}' (only 'zeros')")
        if isinstance(module.padding, str):
            raise _unsupported(name, module, f"padding='{module.padding}' (give the padding as numbers)")


# ----------------------------------------------------------------------------------
# the code between the modules: torch.fx
# ----------------------------------------------------------------------------------
# Module hooks see the modules a forward pass calls, not the functions and tensor
# methods written in ``forward`` itself. Those run through autograd's own backward in
# every method, which is right only for operations the rules treat as their gradient:
# re-indexing (views), the ReLU mask, pooling switches and averages, dropout in eval
# mode, and scaling by a constant (linear without an offset, so LRP-z's x * g identity
# and the per-sample rescaling of the backward pass still hold). Each entry maps an
# operation's name to the category it belongs to; torch functions, torch.nn.functional,
# the operator module (``x * 2`` is ``operator.mul``) and tensor methods share names.
ALLOWED_OPERATIONS = {
    **dict.fromkeys(("flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"), "reshape"),
    **dict.fromkeys(("relu", "relu_"), "relu"),
    **dict.fromkeys(("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"), "pooling"),
    **dict.fromkeys(("dropout",), "dropout"),
    **dict.fromkeys(("mul", "truediv", "div", "neg", "__mul__", "__rmul__", "__truediv__", "__neg__"),
                    "scaling"),
    **dict.fromkeys(("add", "iadd", "add_", "__add__", "__iadd__", "__radd__"), "addition"),
}
ALLOWED_SUMMARY = ("flatten/view/reshape/contiguous/squeeze/unsqueeze, relu, max/avg/adaptive-avg "
                   "pooling, dropout in eval mode, multiplying or dividing by a Python number, and "
                   "shape arithmetic (x.size(), x.shape)")
_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                     "_operator", "operator")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _operation_name(node) -> str:
    """``torch.sigmoid``, ``operator.add`` or ``Tensor.view``: how the message names it."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", str(node.target))
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
              "torch._C._VariableFunctions": "torch"}.get(module, module)
    return f"{module}.{name}" if module else name


def _category(node) -> str | None:
    """The entry of :data:`ALLOWED_OPERATIONS` this node's operation belongs to, if any."""
    if node.op == "call_method":
        return ALLOWED_OPERATIONS.get(node.target)
    module = getattr(node.target, "__module__", None)
    if module not in _TORCH_NAMESPACES:
        return None
    return ALLOWED_OPERATIONS.get(getattr(node.target, "__name__", None))


def _where(node, model: nn.Module) -> str:
    """The node, the module whose forward holds it, and its source line if fx kept it."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1] if stack else None
    if owner is not None:
        path, cls = owner if isinstance(owner, tuple) else (owner, None)
        cls_name = getattr(cls, "__name__", str(cls)) if cls is not None else "?"
        place = f"in the forward of module '{path}' ({cls_name})" if path else f"in {cls_name}.forward"
    else:
        place = f"in {type(model).__name__}.forward"
    frames = [f for f in _FRAME.findall(node.stack_trace or "") if not f[0].startswith(_TORCH_DIR)]
    line = ""
    if frames:
        file, number, function, code = frames[-1]
        line = f", {os.path.basename(file)} line {number}: '{code.strip()}'"
    return f"node '{node.name}' {place}{line}"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _scaling_is_linear(node, args: tuple, kwargs: dict) -> bool:
    """``x * c``, ``c * x``, ``x / c``, ``-x`` with one tensor ``x`` and a Python number ``c``."""
    values = [*args, *kwargs.values()]
    tensors = [v for v in values if isinstance(v, Tensor)]
    if len(tensors) != 1 or not all(isinstance(v, Tensor) or _is_number(v) for v in values):
        return False
    divides = str(node.target) in ("truediv", "div", "__truediv__") or \
        getattr(node.target, "__name__", None) in ("truediv", "div")
    return not divides or isinstance(args[0], Tensor)


def _refuse_residual_addition(node, args: tuple, kwargs: dict) -> str | None:
    """The one place where additions are judged: the sum of two same-shaped tensors is a
    residual connection (allowed: every rule passes the signal to both summands, and
    :mod:`toolkit.methods` rescales the backward signal only where the branches have
    joined); adding a constant is an offset, which the rules do not cover."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
    if len(tensors) >= 2:
        if len(tensors) == 2 and tensors[0].shape == tensors[1].shape:
            return None
        return "a sum of tensors of different shapes (broadcasting) is not a residual connection"
    return "an offset (adding a constant is affine, not linear; the rules assume no offset between layers)"


def _owner(node) -> str:
    """Qualified name of the module whose forward holds ``node`` ("" for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    owner = list(stack.values())[-1]
    return owner[0] if isinstance(owner, tuple) else str(owner)


def _refusal(node, args: tuple, kwargs: dict, result) -> str | None:
    """None if the operation is allowed, else why it is refused."""
    if not isinstance(result, Tensor):
        return None  # shape arithmetic: x.size(0), x.shape[1] * 2 -- carries no signal
    category = _category(node)
    if category in ("reshape", "relu", "pooling"):
        return None
    if category == "dropout":
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return None if training is False else "dropout in training mode (training=True) is random"
    if category == "scaling":
        if _scaling_is_linear(node, args, kwargs):
            return None
        return ("a product or quotient with a tensor is not linear in the signal (only scaling "
                "by a Python number is)")
    if category == "addition":
        return _refuse_residual_addition(node, args, kwargs)
    return "the explanation rules do not cover it"


def check_forward(model: nn.Module, example: Tensor) -> tuple[bool, list[str], list[str]]:
    """Check the functions and tensor methods ``model.forward`` calls between modules.

    The forward is traced symbolically with ``torch.fx`` and the graph is run once on
    ``example`` (so every operation is judged on the values it really gets: a tensor or
    a Python number). Modules are left to :func:`trace`'s own checks. Allowed are the
    operations of :data:`ALLOWED_OPERATIONS` (summarised in :data:`ALLOWED_SUMMARY`);
    an addition of two tensors is refused as a residual connection.

    Parameters
    ----------
    model : nn.Module
        Put in eval mode for the check (each module's mode is restored).
    example : Tensor
        An input batch; only its first sample is used.

    Returns
    -------
    verified : bool
        False if torch.fx cannot trace the model; an :class:`UnverifiedForwardWarning`
        then says what was not checked.
    relu_calls : list of str
        Where ``forward`` calls a ReLU as a function (allowed, but DeconvNet and Guided
        Backprop apply their ReLU rule to ``nn.ReLU`` modules only).
    residual_modules : list of str
        The modules whose forward adds two branches (a residual block; "" for the
        model's own forward).

    Raises
    ------
    UnsupportedLayerError
        Naming the operation, the node, the module whose forward calls it and the line.
    """
    from torch import fx

    if next(model.children(), None) is None:
        return True, [], []  # a single module: nothing runs between modules
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    try:
        with evaluation_mode(model):
            graph = tracer.trace(model)
        module = fx.GraphModule(tracer.root, graph)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError ...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(
            f"torch.fx cannot trace the forward of {type(model).__name__} ({first}); only its "
            "modules were checked -- the functions and tensor operations its forward calls "
            f"between them were not verified (allowed there: {ALLOWED_SUMMARY})",
            UnverifiedForwardWarning, stacklevel=3)
        return False, [], []
    relu_calls: list[str] = []
    refused: list[str] = []
    residual: list[str] = []

    class Checker(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op in ("call_function", "call_method"):
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                why = _refusal(node, args, kwargs, result)
                if why is not None:
                    refused.append(f"operation '{_operation_name(node)}' at {_where(node, model)} "
                                   f"is not supported: {why}. Allowed between layers: {ALLOWED_SUMMARY}")
                    raise _Refused
                if _category(node) == "relu":
                    relu_calls.append(_where(node, model))
                if _category(node) == "addition" and _owner(node) not in residual:
                    residual.append(_owner(node))
            return result

    try:
        with evaluation_mode(model), torch.no_grad():
            Checker(module).run(example[:1].clone())
    except _Refused:
        raise UnsupportedLayerError(refused[0]) from None
    return True, relu_calls, residual


class _Refused(Exception):
    """Stops :func:`check_forward`'s run at the first refused operation."""


def trace(model: nn.Module, example: Tensor) -> Plan:
    """Find the neuron layers of ``model`` by running it once on ``example``.

    Parameters
    ----------
    model : nn.Module
        Any module whose forward pass runs through the :data:`SUPPORTED_MODULES`.
    example : Tensor
        An input batch; only its first sample is used, and only a copy of it (an inplace
        first module does not change the caller's tensor).

    Returns
    -------
    Plan

    Raises
    ------
    UnsupportedLayerError
        If the forward pass calls a module of another type, a convolution with groups,
        a BatchNorm2d that does not directly follow a Conv2d, one neuron layer twice,
        or a function / tensor method outside :data:`ALLOWED_OPERATIONS`
        (:func:`check_forward`).

    Warns
    -----
    UnverifiedForwardWarning
        If torch.fx cannot trace the model, so the code between its modules is not checked.
    """
    calls: list[tuple[str, nn.Module, Tensor, Tensor]] = []

    def record(name):
        def hook(module, inputs, output):
            calls.append((name, module, inputs[0] if inputs else None, output))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in _leaf_modules(model)]
    try:
        with evaluation_mode(model), torch.no_grad():
            model(example[:1].clone())
    finally:
        for h in handles:
            h.remove()

    layers: list[Layer] = []
    seen: set[str] = set()
    previous = None
    for name, module, inp, out in calls:
        _check_settings(name, module)
        if isinstance(module, tuple(LAYER_TYPES)):
            if name in seen:
                raise _unsupported(name, module, "it is called more than once in the forward pass")
            seen.add(name)
            layers.append(Layer(name, module))
        elif isinstance(module, nn.BatchNorm2d):
            follows_conv = (
                previous is not None
                and isinstance(previous[1], nn.Conv2d)
                and previous[3] is inp
                and layers[-1].batchnorm is None
            )
            if not follows_conv:
                raise _unsupported(
                    name, module, "a BatchNorm2d must directly follow a Conv2d to be folded into it"
                )
            layers[-1].batchnorm, layers[-1].batchnorm_name = module, name
        previous = (name, module, inp, out)
    if not layers:
        raise UnsupportedLayerError(f"model {type(model).__name__} has no Conv2d or Linear layer")
    verified, relu_calls, residual = check_forward(model, example)
    return Plan(layers, tuple(example.shape[1:]), relu_calls, verified, residual)


LayerCallback = Callable[[Layer, Tensor, Tensor], "Tensor | None"]
ReluCallback = Callable[[nn.ReLU, Tensor, Tensor], "Tensor | None"]


@contextmanager
def intercept(model: nn.Module, plan: Plan, on_layer: LayerCallback | None = None,
              on_relu: ReluCallback | None = None):
    """Route the forward pass of every planned layer (and every ReLU) through callbacks.

    ``on_layer(layer, x, z)`` is called with the layer input ``x`` and the layer output
    ``z`` (after the folded BatchNorm, bias included); ``on_relu(relu, x, out)`` with a
    ReLU's input and output. A callback that returns a tensor replaces the module's
    output in the rest of the forward pass (this is how the explanation methods swap in
    their backward rules); one that returns None only observes. An inplace ReLU gets a
    copy of its input when ``on_relu`` is given, so ``x`` is the value before the ReLU.

    All hooks are removed when the block exits, also on errors.
    """
    inputs: dict[int, list[Tensor]] = {}
    handles = []

    def keep_input(key, copy=False):
        def pre_hook(module, args):
            x = args[0]
            inputs.setdefault(key, []).append(x)
            if copy:
                return (x.clone(), *args[1:])
        return pre_hook

    try:
        if on_layer is not None:
            for layer in plan:
                key = id(layer.module)
                handles.append(layer.module.register_forward_pre_hook(keep_input(key)))

                def post_hook(module, args, output, layer=layer, key=key):
                    return on_layer(layer, inputs[key].pop(), output)

                handles.append(layer.output_module.register_forward_hook(post_hook))
        if on_relu is not None:
            for _, module in _leaf_modules(model):
                if isinstance(module, nn.ReLU):
                    key = id(module)
                    handles.append(module.register_forward_pre_hook(keep_input(key, module.inplace)))

                    def relu_hook(module, args, output, key=key):
                        return on_relu(module, inputs[key].pop(), output)

                    handles.append(module.register_forward_hook(relu_hook))
        yield
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
