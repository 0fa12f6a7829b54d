"""Tiny members of the network families issue 19 opens the toolkit to, for the tests.

Each is written plainly with torch modules and functions, as their authors write them
(functional ReLUs, ``torch.cat``, ``chunk``, views for a channel shuffle, depthwise and
grouped convolutions, pre-activation BatchNorm, ReLU6, linear bottlenecks), in float64,
on 3 x 12 x 12 inputs, with random weights and BatchNorm statistics. For every network
:data:`TWO_SIDED` says by hand which layers' inactive side passes the backward signal
(their outputs reach no single ReLU), which the explicit reference in tests/test_reach.py
uses instead of the toolkit's own analysis.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SHAPE = (3, 12, 12)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (trained-looking, not identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                module.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                module.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
    return model.eval()


class ConvBN(nn.Module):
    """Conv2d - BatchNorm2d, the BatchNorm folded into the convolution."""

    def __init__(self, cin, cout, k, stride=1, groups=1, padding=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


# ----------------------------------------------------------------------------------
# Inception: branches concatenated along the channels, functional ReLU and pooling
# ----------------------------------------------------------------------------------
class Relus(nn.Module):
    """``n`` ReLU modules, or none (then ``self(i, x)`` is the functional ``F.relu``): the
    same network written with modules (what Captum's rules see) or with functions."""

    def __init__(self, n: int, modules: bool):
        super().__init__()
        self.modules_ = nn.ModuleList([nn.ReLU() for _ in range(n)]) if modules else None

    def forward(self, i: int, x):
        return self.modules_[i](x) if self.modules_ is not None else F.relu(x, inplace=i % 2 == 1)


class InceptionBlock(nn.Module):
    def __init__(self, cin, modules=False):
        super().__init__()
        self.b1 = ConvBN(cin, 4, 1)
        self.b3a, self.b3b = ConvBN(cin, 3, 1), ConvBN(3, 4, 3)
        self.pool_proj = ConvBN(cin, 2, 1)
        self.relu = Relus(4, modules)

    def forward(self, x):
        one = self.relu(0, self.b1(x))
        three = self.relu(2, self.b3b(self.relu(1, self.b3a(x))))
        pooled = self.relu(3, self.pool_proj(F.max_pool2d(x, 3, stride=1, padding=1)))
        return torch.cat([one, three, pooled], 1)


class InceptionLike(nn.Module):
    def __init__(self, classes=5, modules=False):
        super().__init__()
        self.stem = ConvBN(3, 6, 3)
        self.block1, self.block2 = InceptionBlock(6, modules), InceptionBlock(10, modules)
        self.relu = Relus(1, modules)
        self.fc = nn.Linear(10, classes)

    def forward(self, x):
        x = F.max_pool2d(self.relu(0, self.stem(x)), 2)
        x = self.block2(self.block1(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.fc(torch.flatten(x, 1))


# ----------------------------------------------------------------------------------
# DenseNet: pre-activation BN-ReLU-Conv, every layer reads the concatenation of all before
# ----------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin, growth=3):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 4, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseLike(nn.Module):
    def __init__(self, classes=5, modules=False):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(4)
        self.layer1, self.layer2 = DenseLayer(4), DenseLayer(7)
        self.norm5 = nn.BatchNorm2d(10)
        self.relu = Relus(2, modules)
        self.fc = nn.Linear(10, classes)

    def forward(self, x):
        x = F.max_pool2d(self.relu(0, self.norm0(self.conv0(x))), 2)
        features = [x]
        for layer in (self.layer1, self.layer2):
            features.append(layer(features))
        x = self.relu(1, self.norm5(torch.cat(features, 1)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


# ----------------------------------------------------------------------------------
# MobileNetV2: inverted residuals, depthwise convolutions, ReLU6, linear bottlenecks
# ----------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=3, act=nn.ReLU6):
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBN(cin, hidden, 1)
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBN(hidden, cout, 1)
        self.act1, self.act2 = act(inplace=True), act(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.act2(self.depthwise(self.act1(self.expand(x)))))
        return x + y if self.residual else y


class MobileLike(nn.Module):
    """``act=nn.ReLU`` makes the same network with ReLUs (equal where nothing reaches 6)."""

    def __init__(self, classes=5, act=nn.ReLU6):
        super().__init__()
        self.stem = ConvBN(3, 4, 3, stride=2)
        self.act, self.head_act = act(inplace=True), act()
        self.blocks = nn.Sequential(InvertedResidual(4, 4, 1, act=act), InvertedResidual(4, 6, 2, act=act))
        self.head = ConvBN(6, 8, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, classes))
        self.functional = act is nn.ReLU6

    def forward(self, x):
        x = self.blocks(self.act(self.stem(x)))
        x = F.relu6(self.head(x)) if self.functional else self.head_act(self.head(x))
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------------------
# ShuffleNetV2: chunk, branch, concatenate, shuffle the channels with views
# ----------------------------------------------------------------------------------
def channel_shuffle(x, groups: int):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(ConvBN(half, half, 1), nn.ReLU(inplace=True),
                                    ConvBN(half, half, 3, groups=half), ConvBN(half, half, 1),
                                    nn.ReLU(inplace=True))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 6, 3, stride=2), nn.ReLU(inplace=True))
        self.units = nn.Sequential(ShuffleUnit(6), ShuffleUnit(6))
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = self.units(self.stem(x))
        return self.fc(x.mean([2, 3]))


FAMILIES = {"inception": InceptionLike, "densenet": DenseLike, "mobilenet": MobileLike, "shufflenet": ShuffleLike}

#: Per family, the layers (by their module names in the toolkit's plan) whose outputs reach
#: no single ReLU-family activation, worked out by reading the code above: their inactive
#: side passes the signal (the output layer aside, which keeps the authors' a_+).
TWO_SIDED = {
    "inception": set(),
    # layer1's new features feed layer2's concatenation and the last one; layer2's only
    # the last one, then norm5 (a layer of its own), then its ReLU: a single path
    "densenet": {"layer1.conv2"},
    # linear bottlenecks, and the first block's projection is added to its input
    "mobilenet": {"blocks.0.project.conv", "blocks.1.project.conv"},
    # the depthwise convolution goes straight into the 1x1 convolution
    "shufflenet": {"units.0.branch.2.conv", "units.1.branch.2.conv"},
}


def family(name: str, seed: int = 0, **options) -> nn.Module:
    """The family's tiny network (``options`` as its class takes them: ``modules=True``
    for Inception and DenseNet, ``act=nn.ReLU`` for MobileNet); the same seed gives the
    same weights whatever the options."""
    torch.manual_seed(seed)
    return _randomise(FAMILIES[name](**options).double(), seed)


def family_images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=torch.float64) + 0.2
