"""Helpers of tests/test_resnet.py: a tiny residual network, its data, its forward pass
written out by hand, and a worker that fits its patterns in one process of a
``torch.distributed`` (gloo, CPU) group.

Run as a script, once per rank::

    python tests/_residual_net.py RANK WORLD INIT_FILE OUT_DIR

Every rank builds the same network and batches (seeded), fits the patterns with both
activity masks over the dealt batches and writes ``OUT_DIR/<mask>.rank<RANK>.safetensors``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

IMAGE_SHAPE = (2, 8, 8)

#: (conv, batchnorm) of every neuron layer, in forward order, and the Linear head.
CONVS = (("stem", "stem_bn"), ("a_conv1", "a_bn1"), ("a_conv2", "a_bn2"),
         ("a_down", "a_down_bn"), ("b_conv1", "b_bn1"), ("b_conv2", "b_bn2"))


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


def images(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *IMAGE_SHAPE, generator=g, dtype=torch.float64) + 0.3).to(dtype)


N_IMAGES = 40
BATCH = 6  # 7 batches, the last one short


def batches() -> list[torch.Tensor]:
    return list(torch.split(images(N_IMAGES), BATCH))


# ----------------------------------------------------------------------------------
# the forward pass written out
# ----------------------------------------------------------------------------------
def folded(net: TinyResidual, conv_name: str, bn_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv followed by BatchNorm (eval), folded by hand."""
    conv, bn = getattr(net, conv_name), getattr(net, bn_name)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
    return (conv.weight * scale[:, None, None, None]).detach(), \
        ((bias - bn.running_mean) * scale + bn.bias).detach()


def explicit_forward(net: TinyResidual, x: torch.Tensor, bias_probes: dict | None = None) -> dict:
    """Every tensor of the forward pass, computed with the folded weights.

    Returns ``{"logits", "layers": {name: (input, z, relu_input)}, "relu": {name of the
    tensor before a ReLU: tensor}}`` where ``relu_input`` is the input of the ReLU after
    the layer (after the addition for a_conv2, a_down and b_conv2; for fc its own
    output). ``bias_probes[name]``, if given, replaces the layer's bias (broadcast
    against z), so that autograd gives the bias's share of a gradient.
    """
    layers = {}

    def conv(name, bn_name, inputs):
        w, b = folded(net, name, bn_name)
        m = getattr(net, name)
        z = F.conv2d(inputs, w, None, m.stride, m.padding)
        bias = bias_probes[name] if bias_probes is not None else b[None, :, None, None]
        return z + bias

    z0 = conv("stem", "stem_bn", x)
    h0 = z0.clamp(min=0)
    z1 = conv("a_conv1", "a_bn1", h0)
    h1 = z1.clamp(min=0)
    z2 = conv("a_conv2", "a_bn2", h1)
    zd = conv("a_down", "a_down_bn", h0)
    u1 = z2 + zd
    h2 = u1.clamp(min=0)
    z3 = conv("b_conv1", "b_bn1", h2)
    h3 = z3.clamp(min=0)
    z4 = conv("b_conv2", "b_bn2", h3)
    u2 = z4 + h2
    h4 = u2.clamp(min=0)
    pooled = h4.mean((2, 3))
    fc_bias = bias_probes["fc"] if bias_probes is not None else net.fc.bias
    logits = pooled @ net.fc.weight.T + (fc_bias if fc_bias is not None else 0)
    layers.update(stem=(x, z0, z0), a_conv1=(h0, z1, z1), a_conv2=(h1, z2, u1),
                  a_down=(h0, zd, u1), b_conv1=(h2, z3, z3), b_conv2=(h3, z4, u2),
                  fc=(pooled, logits, logits))
    return {"logits": logits, "layers": layers,
            "relu": {"z0": z0, "z1": z1, "u1": u1, "z3": z3, "u2": u2}}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from toolkit.patterns import fit_patterns

    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = tiny_residual()
        for mask in ("output", "relu_input"):
            fit_patterns(net, batches(), progress=False, mask=mask).save(
                out / f"{mask}.rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
