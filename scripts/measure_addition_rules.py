"""Which rule should PatternAttribution use at a residual addition? The measurement of
docs/math.md, section 6.1, on the shipped Fashion-MNIST ResNet.

PatternAttribution is written out here as one linear map per image (the ReLU masks of
the forward pass fixed, every convolution's weight replaced by ``W * A_+``), so that the
rule at the addition ``u = z + s`` can be chosen:

* ``adjoint``: the backward signal of ``u`` passes unchanged to both summands (what the
  toolkit does; checked against ``toolkit.PatternAttribution`` to round-off);
* ``pattern``: deep Taylor decomposition with the root point ``u - S(u)``: the relevance
  of ``u`` is split with the addition's own two-component pattern, per channel
  ``a_z = cov_+[z, u] / var_+(u)`` and ``a_s = cov_+[s, u] / var_+(u)`` (means over the
  samples with ``u > 0``; ``a_z + a_s = 1``);
* ``z``: the z-rule at the addition only (root point 0): shares ``z / u`` and ``s / u``.

It prints, per rule, the relevance leaving each addition over the relevance entering it
(summed over the images),
and the AOPC of region perturbation (200 test images, 4x4 regions, 25 steps) with the
paired bootstrap intervals of the differences. Float64, about five minutes on 2 cores:

    python scripts/measure_addition_rules.py
"""
import torch
from torch.nn import functional as F

from toolkit.data import load_fashion_mnist
from toolkit.intervals import bootstrap_difference
from toolkit.layers import trace
from toolkit.methods import LRPZ, PatternAttribution
from toolkit.models import load_fashion_resnet
from toolkit.patterns import fit_patterns
from toolkit.perturbation import region_perturbation

BLOCKS = ("layer1", "layer2", "layer3")
RULES = ("adjoint", "pattern", "z")


def forward(layers, x):
    """The ResNet's forward pass with folded weights; per block (input, z1, z, s, u), and
    the stem's output."""
    def conv(name, h):
        m = layers[name].module
        return F.conv2d(h, layers[name].weight(), layers[name].bias(), m.stride, m.padding)

    stem = conv("conv1", x)
    h, inside = torch.relu(stem), {"stem": stem}
    for b in BLOCKS:
        z1 = conv(f"{b}.conv1", h)
        z = conv(f"{b}.conv2", torch.relu(z1))
        s = conv(f"{b}.downsample.0", h) if f"{b}.downsample.0" in layers else h
        inside[b] = (h, z1, z, s, z + s)
        h = torch.relu(z + s)
    return F.linear(h.mean((2, 3)), layers["fc"].weight(), layers["fc"].bias()), inside


def addition_patterns(layers, images):
    """Per block and channel, the shares ``(a_z, a_s)`` of the addition's pattern."""
    sums = {}
    with torch.no_grad():
        for x in images.split(500):
            inside = forward(layers, x)[1]
            for b in BLOCKS:
                _, _, z, s, u = inside[b]
                m = (u > 0).double()
                for key, t in (("n", m), ("z", m * z), ("s", m * s), ("u", m * u), ("zu", m * z * u),
                               ("su", m * s * u), ("uu", m * u * u)):
                    sums.setdefault(b, {}).setdefault(key, 0)
                    sums[b][key] = sums[b][key] + t.sum((0, 2, 3))
    shares = {}
    for b, t in sums.items():
        n = t["n"].clamp(min=1)
        var_u = t["uu"] / n - (t["u"] / n) ** 2
        valid = var_u > 0  # a channel never active passes no relevance: any shares do
        safe = torch.where(valid, var_u, torch.ones_like(var_u))
        a_z = torch.where(valid, (t["zu"] / n - t["z"] / n * t["u"] / n) / safe, torch.full_like(var_u, 0.5))
        a_s = torch.where(valid, (t["su"] / n - t["s"] / n * t["u"] / n) / safe, torch.full_like(var_u, 0.5))
        shares[b] = (a_z, a_s)
    return shares


class LinearisedPatternAttribution:
    """PatternAttribution with a chosen rule at the additions (``attribute(x, target)``)."""

    def __init__(self, layers, patterns, rule, shares=None):
        self.layers, self.patterns, self.rule, self.shares = layers, patterns, rule, shares
        self.flow = {}

    def attribute(self, x, target=None):
        layers = self.layers
        with torch.no_grad():
            logits, inside = forward(layers, x)
        target = logits.argmax(1) if target is None else target

        def conv(name, h):
            m = layers[name].module
            return F.conv2d(h, layers[name].weight() * self.patterns[name].positive, None, m.stride, m.padding)

        leaf = x.detach().clone().requires_grad_(True)
        h = conv("conv1", leaf) * (inside["stem"] > 0)
        h.retain_grad()
        kept = {}
        for b in BLOCKS:
            _, z1, z, s, u = inside[b]
            zz = conv(f"{b}.conv2", conv(f"{b}.conv1", h) * (z1 > 0))
            ss = conv(f"{b}.downsample.0", h) if f"{b}.downsample.0" in layers else h.clone()
            if self.rule == "adjoint":
                a_z, a_s = 1.0, 1.0
            elif self.rule == "pattern":
                a_z, a_s = (a[None, :, None, None] for a in self.shares[b])
            else:
                a_z, a_s = z / u, s / u
            kept[b] = (h, zz, ss)  # the block's input and the two summands
            for t in (zz, ss):
                t.retain_grad()
            h = (a_z * zz + a_s * ss) * (u > 0)
            h.retain_grad()
            kept[b] += (h, u > 0)
        out = F.linear(h.mean((2, 3)), layers["fc"].weight() * self.patterns["fc"].positive)
        seed = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
        out.backward(seed)
        # per image: the relevance of u, what the addition passes to z and s, what leaves the block
        def total(t):
            return t.flatten(1).sum(1).detach()

        self.flow = {b: (total(h.grad * active), total(zz.grad + ss.grad), total(block_input.grad))
                     for b, (block_input, zz, ss, h, active) in kept.items()}
        return leaf.grad


def main():
    torch.set_num_threads(2)
    resnet = load_fashion_resnet().double().eval()
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    train, test = train.double(), test.double()
    patterns = fit_patterns(resnet, train[:3000].split(100), progress=False)
    layers = {layer.name: layer for layer in trace(resnet, test[:1])}
    shares = addition_patterns(layers, train[:3000])
    images = test[:200]
    target = resnet(images).argmax(1)
    adjoint = LinearisedPatternAttribution(layers, patterns, "adjoint")
    difference = (adjoint.attribute(images[:20], target[:20])
                  - PatternAttribution(resnet, patterns).attribute(images[:20], target[:20])).abs().max()
    print(f"adjoint rule against toolkit.PatternAttribution: largest difference {float(difference):.1e}")
    for b, (a_z, a_s) in shares.items():
        print(f"{b}: addition pattern a_z from {float(a_z.min()):.2f} to {float(a_z.max()):.2f} "
              f"(mean {float(a_z.mean()):.2f}), a_z + a_s = 1 to {float((a_z + a_s - 1).abs().max()):.0e}")
    aopc = {}
    for rule in RULES:
        explainer = LinearisedPatternAttribution(layers, patterns, rule, shares)
        explainer.attribute(images, target)
        flows = ", ".join(f"{b} {float(leave.sum() / enter.sum()):.3f}"
                          for b, (enter, leave, _) in explainer.flow.items())
        print(f"{rule:8s} relevance leaving each addition / entering it: {flows}")
        aopc[rule] = region_perturbation(resnet, explainer, images, patch=4, steps=25, progress=False)
    aopc["lrp_z"] = region_perturbation(resnet, LRPZ(resnet), images, patch=4, steps=25, progress=False)
    for name, result in aopc.items():
        print(f"AOPC {name:8s} {result.aopc_interval()}")
    for a, b in (("pattern", "adjoint"), ("z", "adjoint"), ("lrp_z", "pattern"), ("lrp_z", "adjoint")):
        print(f"AOPC {a} - {b}: {bootstrap_difference(aopc[a].per_image_aopc, aopc[b].per_image_aopc)}")


if __name__ == "__main__":
    main()
