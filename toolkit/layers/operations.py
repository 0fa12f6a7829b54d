"""The operations a model may perform between its neuron layers, judged one by one.

Every method runs the model's own forward pass and takes autograd's backward for
everything that is not a neuron layer or a ReLU-family activation. That is the right
rule for exactly the operations listed in :data:`ALLOWED_OPERATIONS`: re-indexing
(views, permutes, indexing, concatenation and splitting along a non-batch axis),
pooling (max pooling by its switches, averages and means spread evenly), dropout in
eval mode, scaling by a constant (linear without an offset, so LRP-z's ``x * g``
identity and the per-sample rescaling of the backward pass still hold), and the sum of
two branches of the same shape (a residual connection: every rule passes the signal to
both summands). Each operation keeps the samples of a batch apart; one that mixes them
(along the batch axis) is refused. So is anything else, with its name and where it is
(:func:`refusal`, :func:`where`).
"""
from __future__ import annotations

import numbers
import os
import re

import torch
from torch import Tensor

__all__ = ["ALLOWED_OPERATIONS", "ALLOWED_SUMMARY", "category", "operation_name", "refusal",
           "where", "judge_addition"]

#: Operation name -> category. torch functions, torch.nn.functional, the operator module
#: (``x * 2`` is ``operator.mul``) and tensor methods share names.
ALLOWED_OPERATIONS = {
    **dict.fromkeys(("flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "unflatten",
                     "permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "narrow",
                     "select", "getitem", "clone"), "reshape"),
    **dict.fromkeys(("cat", "concat", "concatenate", "stack"), "concatenation"),
    **dict.fromkeys(("chunk", "split", "tensor_split", "unbind"), "split"),
    **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                     "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                     "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                     "mean", "sum", "pad"), "pooling"),
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                     "feature_alpha_dropout"), "dropout"),
    **dict.fromkeys(("mul", "truediv", "div", "neg", "__mul__", "__rmul__", "__truediv__", "__neg__"),
                    "scaling"),
    **dict.fromkeys(("add", "iadd", "add_", "__add__", "__iadd__", "__radd__", "sub", "isub", "sub_",
                     "__sub__", "__isub__"), "addition"),
}
ALLOWED_SUMMARY = ("views, reshapes, permutes and indexing, concatenation and splitting along a "
                   "non-batch axis, ReLU-family activations (ReLU, ReLU6, LeakyReLU), max/average/"
                   "adaptive pooling and means over non-batch axes, zero padding, dropout in eval "
                   "mode, multiplying or dividing by a Python number, sums of two same-shaped "
                   "branches, and shape arithmetic (x.size(), x.shape)")

_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                     "_operator", "operator", "torch.functional")
#: Frames of torch and of this package are not the model's code.
_OWN_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
#: Operations along one axis: where their axis argument is in ``args`` (for a tensor
#: method too, the tensor is ``args[0]``) and its default.
_AXIS_ARGUMENT = {"cat": (1, 0), "concat": (1, 0), "concatenate": (1, 0), "stack": (1, 0),
                  "chunk": (2, 0), "split": (2, 0), "tensor_split": (2, 0), "unbind": (1, 0),
                  "narrow": (1, None), "select": (1, None), "mean": (1, None), "sum": (1, None),
                  "unflatten": (1, None)}

def operation_name(node) -> str:
    """``torch.sigmoid``, ``operator.add`` or ``Tensor.view``: how messages name it."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", str(node.target))
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
              "torch._C._VariableFunctions": "torch", "torch.functional": "torch"}.get(module, module)
    return f"{module}.{name}" if module else name


def _name(node) -> str | None:
    if node.op == "call_method":
        return node.target
    if getattr(node.target, "__module__", None) not in _TORCH_NAMESPACES:
        return None
    return getattr(node.target, "__name__", None)


def category(node) -> str | None:
    """The entry of :data:`ALLOWED_OPERATIONS` this node's operation belongs to, if any."""
    name = _name(node)
    return ALLOWED_OPERATIONS.get(name) if name is not None else None


def owner(node) -> str:
    """Qualified name of the module whose forward holds ``node`` ("" for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def where(node, model) -> str:
    """The node, the module whose forward holds it, and its source line if fx kept it."""
    stack = node.meta.get("nn_module_stack") or {}
    last = list(stack.values())[-1] if stack else None
    if last is not None:
        path, cls = last if isinstance(last, tuple) else (last, None)
        cls_name = getattr(cls, "__name__", str(cls)) if cls is not None else "?"
        place = f"in the forward of module '{path}' ({cls_name})" if path else f"in {cls_name}.forward"
    else:
        place = f"in {type(model).__name__}.forward"
    frames = [f for f in _FRAME.findall(node.stack_trace or "") if not f[0].startswith(_OWN_DIRS)]
    line = ""
    if frames:
        file, number, _, code = frames[-1]
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
    divides = _name(node) in ("truediv", "div", "__truediv__") or \
        getattr(node.target, "__name__", None) in ("truediv", "div")
    return not divides or isinstance(args[0], Tensor)


def judge_addition(args: tuple, kwargs: dict, signals: list[bool]) -> str | None:
    """The one place where additions are judged: the sum (or difference) of two
    same-shaped tensors that both carry the input's signal is a residual connection
    (every rule passes the signal to both summands); adding anything else is an offset."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
    if len(tensors) < 2 or not all(signals[:len(tensors)]):
        return ("an offset (adding a constant, or a tensor that does not depend on the input, is "
                "affine, not linear; the rules assume no offset between layers)")
    if len(tensors) == 2 and tensors[0].shape == tensors[1].shape:
        return None
    return "a sum of tensors of different shapes (broadcasting) is not a residual connection"


def _axes(node, args: tuple, kwargs: dict, rank: int) -> list[int] | None:
    """The axes an operation along axes works on, normalised (None: all of them, or an
    operation of another kind)."""
    name = _name(node)
    if name not in _AXIS_ARGUMENT:
        return None
    position, default = _AXIS_ARGUMENT[name]
    value = args[position] if len(args) > position else kwargs.get("dim", kwargs.get("axis", default))
    if value is None:
        return None
    values = value if isinstance(value, (tuple, list)) else (value,)
    rank = rank + 1 if name == "stack" else rank
    return [int(v) % rank for v in values]


def _mixes_samples(node, args: tuple, kwargs: dict, result, batch: int) -> bool:
    """Whether the operation works along the batch axis (and so mixes the samples)."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], Tensor):
        first = first[0]
    rank = first.dim() if isinstance(first, Tensor) else 0
    name = _name(node)
    axes = _axes(node, args, kwargs, rank)
    if name in ("mean", "sum") and axes is None:
        return True
    if axes is not None and 0 in axes:
        return True
    if name in ("permute",):
        order = args[1:] if len(args) > 1 and not isinstance(args[1], (tuple, list)) else args[1]
        return int(order[0]) % rank != 0
    if name in ("transpose", "swapaxes", "swapdims", "movedim", "moveaxis"):
        axes = [a for a in args[1:3] if isinstance(a, numbers.Integral)]
        return any(int(a) % rank == 0 for a in axes)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    return any(isinstance(o, Tensor) and (o.dim() == 0 or o.shape[0] != batch) for o in outputs)


def refusal(node, args: tuple, kwargs: dict, result, signals: list[bool], batch: int) -> str | None:
    """None if the operation (on the input's signal) is allowed, else why it is refused.

    ``args``/``kwargs`` are the real values the operation got, ``signals`` says which
    tensor arguments carry the input's signal, ``batch`` is the batch size it was traced
    with (the output must keep the samples apart)."""
    if not isinstance(result, (Tensor, tuple, list)) or (
            isinstance(result, (tuple, list)) and not any(isinstance(r, Tensor) for r in result)):
        return None  # shape arithmetic: x.size(0), x.shape[1] * 2 -- carries no signal
    kind = category(node)
    if kind is None and node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" \
            and not isinstance(args[0], Tensor):
        return None  # picking one tensor of a tuple (chunk, split)
    if kind is None:
        return "the explanation rules do not cover it"
    if kind == "dropout":
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return None if training is False else "dropout in training mode (training=True) is random"
    if kind == "scaling":
        if _scaling_is_linear(node, args, kwargs):
            return None
        return ("a product or quotient with a tensor is not linear in the signal (only scaling "
                "by a Python number is)")
    if kind == "addition":
        return judge_addition(args, kwargs, signals)
    if kind == "pooling" and _name(node) == "pad":
        value = args[3] if len(args) > 3 else kwargs.get("value", 0)
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        if mode != "constant" or (value or 0) != 0:
            return "padding with anything but zeros is not linear in the signal"
    if _mixes_samples(node, args, kwargs, result, batch):
        return "it works along the batch axis, which mixes the samples of a batch"
    return None
