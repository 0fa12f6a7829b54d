"""The small networks of the tests, their data, and their forward pass taken apart by hand.

A plain module, not fixtures: the gloo workers of ``tests/_distributed.py`` run as
separate processes and build the same networks and batches from here.

* :func:`conv_net` -- strided, padded, dilated convolutions, a BatchNorm far from the
  identity, max pooling and a Linear head on 3x23x23 :func:`images`;
* :func:`tiny_residual` -- a ResNet in miniature (:class:`TinyResidual`) on 2x8x8
  :func:`residual_images`, with its forward pass written out (:func:`explicit_forward`);
* the pieces of a reference computation: :func:`fold_batchnorm`, the input patches of a
  convolution (:func:`patch_rows`), one row per sample and position (:func:`position_rows`), and
  every layer's input and output from forward hooks (:func:`layer_inputs_outputs`).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


def random_images(n: int, shape: tuple[int, ...], seed: int = 1,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` seeded normal inputs of per-sample ``shape`` with mean 0.3 (so the mean
    terms matter), drawn in float64 and cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)


# ----------------------------------------------------------------------------------
# the convolutional network
# ----------------------------------------------------------------------------------
IMAGE_SHAPE = (3, 23, 23)
N_IMAGES = 48
BATCH = 5  # 10 batches, the last one short


def images(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` inputs of :func:`conv_net`."""
    return random_images(n, IMAGE_SHAPE, seed, dtype)


def batches() -> list[torch.Tensor]:
    """The fitting data of :func:`conv_net`: ``N_IMAGES`` images in batches of ``BATCH``."""
    return list(torch.split(images(N_IMAGES), BATCH))


def conv_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv(stride 2, pad 1, dil 2, bias)-BN-ReLU(inplace)-MaxPool-Conv(stride 2, pad 1,
    dil 2, no bias)-ReLU-Flatten-Linear on 3x23x23 inputs, in eval mode, with BatchNorm
    statistics and affine parameters far from the identity."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2),
        bn1=nn.BatchNorm2d(6),
        relu1=nn.ReLU(inplace=True),
        pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 5, 3, stride=2, padding=1, dilation=2, bias=False),
        relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc=nn.Linear(5 * 2 * 2, 4),
    ))
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.3, 3.0)
        net.bn1.weight.uniform_(0.5, 2.0)
        net.bn1.bias.uniform_(-0.3, 0.3)
        net.conv1.bias.uniform_(-0.2, 0.2)
        net.double().eval()
        # centre the output neurons on typical inputs, so each is active on about half
        y = net[:-1](images(64, seed=99)) @ net.fc.weight.T
        net.fc.bias.copy_(-y.median(0).values)
    return net.to(dtype)


# ----------------------------------------------------------------------------------
# the residual network
# ----------------------------------------------------------------------------------
RESIDUAL_SHAPE = (2, 8, 8)
N_RESIDUAL_IMAGES = 40
RESIDUAL_BATCH = 6  # 7 batches, the last one short

#: (conv, batchnorm) of every neuron layer of TinyResidual, in forward order; then "fc".
CONVS = (("stem", "stem_bn"), ("a_conv1", "a_bn1"), ("a_conv2", "a_bn2"),
         ("a_down", "a_down_bn"), ("b_conv1", "b_bn1"), ("b_conv2", "b_bn2"))


def residual_images(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` inputs of :func:`tiny_residual`."""
    return random_images(n, RESIDUAL_SHAPE, seed, dtype)


def residual_batches() -> list[torch.Tensor]:
    """The fitting data of :func:`tiny_residual`."""
    return list(torch.split(residual_images(N_RESIDUAL_IMAGES), RESIDUAL_BATCH))


class TinyResidual(nn.Module):
    """stem conv-BN-ReLU on 2x8x8; block a (stride 2, 1x1 downsample conv-BN on the
    shortcut, ``out = out + identity``); block b (identity shortcut, ``out += identity``);
    global average pooling; Linear(5 -> 3). One ReLU module is shared by every call, as
    in torchvision."""

    def __init__(self, biases: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.a_conv1 = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=biases)
        self.a_bn1 = nn.BatchNorm2d(5)
        self.a_conv2 = nn.Conv2d(5, 5, 3, padding=1, bias=False)
        self.a_bn2 = nn.BatchNorm2d(5)
        self.a_down = nn.Conv2d(4, 5, 1, stride=2, bias=False)
        self.a_down_bn = nn.BatchNorm2d(5)
        self.b_conv1 = nn.Conv2d(5, 5, 3, padding=1, bias=False)
        self.b_bn1 = nn.BatchNorm2d(5)
        self.b_conv2 = nn.Conv2d(5, 5, 3, padding=1, bias=biases)
        self.b_bn2 = nn.BatchNorm2d(5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(5, 3, bias=biases)

    def forward(self, x):
        x = self.relu(self.stem_bn(self.stem(x)))
        out = self.relu(self.a_bn1(self.a_conv1(x)))
        out = self.a_bn2(self.a_conv2(out))
        out = out + self.a_down_bn(self.a_down(x))
        x = self.relu(out)
        out = self.relu(self.b_bn1(self.b_conv1(x)))
        out = self.b_bn2(self.b_conv2(out))
        out += x
        x = self.relu(out)
        return self.fc(self.flatten(self.pool(x)))


def tiny_residual(seed: int = 0, biases: bool = True, dtype=torch.float64) -> TinyResidual:
    """The network in eval mode with BatchNorm statistics far from the identity; without
    ``biases`` every bias and BatchNorm shift is 0 (so LRP-z conserves exactly)."""
    torch.manual_seed(seed)
    net = TinyResidual(biases)
    with torch.no_grad():
        for _, bn_name in CONVS:
            bn = getattr(net, bn_name)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 2.0)
            if biases:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.bias.uniform_(-0.3, 0.3)
            else:
                bn.running_mean.zero_()
                bn.bias.zero_()
    return net.to(dtype).eval()


def folded(net: TinyResidual, conv_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution ``conv_name`` of ``net`` with its BatchNorm folded in."""
    conv = getattr(net, conv_name)
    return fold_batchnorm(conv, getattr(net, dict(CONVS)[conv_name]))


def explicit_forward(net: TinyResidual, x: torch.Tensor, bias_probes: dict | None = None) -> dict:
    """Every tensor of the forward pass, computed with the folded weights.

    Returns ``{"logits", "layers": {name: (input, z, relu_input)}, "relu": {name of the
    tensor before a ReLU: tensor}}`` where ``relu_input`` is the input of the ReLU after
    the layer (after the addition for a_conv2, a_down and b_conv2; for fc its own
    output). ``bias_probes[name]``, if given, replaces the layer's bias (broadcast
    against z), so that autograd gives the bias's share of a gradient.
    """
    def conv(name, inputs):
        w, b = folded(net, name)
        m = getattr(net, name)
        z = F.conv2d(inputs, w, None, m.stride, m.padding)
        bias = bias_probes[name] if bias_probes is not None else b[None, :, None, None]
        return z + bias

    z0 = conv("stem", x)
    h0 = z0.clamp(min=0)
    z1 = conv("a_conv1", h0)
    h1 = z1.clamp(min=0)
    z2 = conv("a_conv2", h1)
    zd = conv("a_down", h0)
    u1 = z2 + zd
    h2 = u1.clamp(min=0)
    z3 = conv("b_conv1", h2)
    h3 = z3.clamp(min=0)
    z4 = conv("b_conv2", h3)
    u2 = z4 + h2
    h4 = u2.clamp(min=0)
    pooled = h4.mean((2, 3))
    fc_bias = bias_probes["fc"] if bias_probes is not None else net.fc.bias
    logits = pooled @ net.fc.weight.T + (fc_bias if fc_bias is not None else 0)
    layers = dict(stem=(x, z0, z0), a_conv1=(h0, z1, z1), a_conv2=(h1, z2, u1),
                  a_down=(h0, zd, u1), b_conv1=(h2, z3, z3), b_conv2=(h3, z4, u2),
                  fc=(pooled, logits, logits))
    return {"logits": logits, "layers": layers,
            "relu": {"z0": z0, "z1": z1, "u1": u1, "z3": z3, "u2": u2}}


# ----------------------------------------------------------------------------------
# the pieces of a reference computation
# ----------------------------------------------------------------------------------
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` followed by ``bn`` (eval mode), folded by hand."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
    return (conv.weight * scale[:, None, None, None]).detach(), \
        ((bias - bn.running_mean) * scale + bn.bias).detach()


def patch_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patch of every output position of ``conv`` on ``x`` (by ``F.unfold``),
    one row per sample and position: ``(N L, C k k)``."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)
    return cols.permute(0, 2, 1).reshape(-1, cols.shape[1])


def position_rows(z: torch.Tensor) -> torch.Tensor:
    """``(N, J, H, W)`` as ``(N H W, J)``: one row per sample and position, in the order
    of :func:`patch_rows`."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def layer_inputs_outputs(model: nn.Module, x: torch.Tensor, outputs: dict[str, str] | None = None
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every convolution (1, 2 or 3-D) and Linear layer of ``model``
    on ``x``, in forward order, from forward hooks on the model itself (cloned: an inplace
    ReLU may follow).

    ``outputs`` maps a layer to the module whose output counts as the layer's (the
    BatchNorm after a convolution).
    """
    outputs = outputs or {}
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    layers = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    seen = {name: [None, None] for name in layers}
    modules = dict(model.named_modules())

    def keep(name: str, index: int):
        def hook(module, args, output):
            seen[name][index] = (args[0] if index == 0 else output).clone()
        return hook

    hooks = []
    for name in layers:
        hooks.append(modules[name].register_forward_hook(keep(name, 0)))
        hooks.append(modules[outputs.get(name, name)].register_forward_hook(keep(name, 1)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: tuple(io) for name, io in seen.items()}
