"""Small members of three modern CNN families, for 28 x 28 grey images (Fashion-MNIST).

The paper measured its estimators on VGG16 only. The course compares them across the
families most networks in use are built from, each reduced to a few tens of thousands of
parameters so that fitting and explaining take seconds on a laptop CPU:

* :class:`SmallInception` -- GoogLeNet's idea: parallel branches (1x1, 3x3, 5x5 as two
  3x3, and a pooling branch) whose outputs are **concatenated** along the channels;
* :class:`SmallDenseNet` -- DenseNet's idea: every layer reads the concatenation of all
  earlier outputs of its block, through **pre-activation** BatchNorm -> ReLU -> Conv
  (a BatchNorm that follows a concatenation, not a convolution);
* :class:`SmallMobileNetV2` -- MobileNetV2's idea: **inverted residual** blocks (1x1
  expansion, 3x3 **depthwise** convolution, 1x1 linear projection), **ReLU6**, and an
  addition where the block keeps its shape.

They are built only from ``nn.Conv2d`` (with ``groups`` for the depthwise ones),
``nn.BatchNorm2d``, ``nn.ReLU`` / ``nn.ReLU6``, pooling, ``torch.cat``, additions and
flatten: nothing but piecewise-linear maps, so PatternNet and PatternAttribution are
defined for all of them. The shipped weights are made by
``scripts/train_fashion_family.py`` and read by :func:`toolkit.models.load_fashion_model`.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallInception", "SmallDenseNet", "SmallMobileNetV2"]


def _conv_bn(inputs: int, outputs: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             activation: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, padding that keeps the size) -> BatchNorm [-> activation]."""
    layers = [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(outputs)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class _Configured(nn.Module):
    """Keeps the constructor's arguments as ``config`` (what :func:`toolkit.models.save_model`
    stores) and shows them in ``repr``."""

    config: dict

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


# ----------------------------------------------------------------------------------
# Inception
# ----------------------------------------------------------------------------------
class InceptionBlock(nn.Module):
    """Four branches on the same input, concatenated: ``1x1``; ``1x1 -> 3x3``;
    ``1x1 -> 3x3 -> 3x3`` (a 5x5 field); ``3x3 max-pool (stride 1) -> 1x1``. Every
    convolution is followed by BatchNorm and ReLU, so each branch ends in a ReLU before
    the concatenation (as in GoogLeNet)."""

    def __init__(self, inputs: int, single: int, double: int, triple: int, pool: int):
        super().__init__()
        reduce = max(inputs // 2, 4)
        self.branch1 = _conv_bn(inputs, single)
        self.branch3 = nn.Sequential(_conv_bn(inputs, reduce), _conv_bn(reduce, double, 3))
        self.branch5 = nn.Sequential(_conv_bn(inputs, reduce), _conv_bn(reduce, triple, 3),
                                     _conv_bn(triple, triple, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(inputs, pool))
        self.outputs = single + double + triple + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class SmallInception(_Configured):
    """An Inception-like network (GoogLeNet's concatenated branches).

    Layout (``w = width``)::

        stem:    conv3x3(c -> w) bn relu
        block1:  Inception(w -> 2w: branches w/2, w/2 + w/4 ... see InceptionBlock)
        pool1:   maxpool 2                          (28 -> 14)
        block2:  Inception(2w -> 4w)
        pool2:   maxpool 2                          (14 -> 7)
        head:    global average pooling, flatten, linear(4w -> num_classes)
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 24):
        super().__init__()
        if width % 8:
            raise ValueError(f"width must be divisible by 8, not {width}")
        w = width
        self.stem = _conv_bn(in_channels, w, 3)
        self.block1 = InceptionBlock(w, w // 2, w // 2 + w // 4, w // 4 + w // 8, w // 8 + w // 4)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = InceptionBlock(self.block1.outputs, w, 3 * w // 2, w // 2 + w // 4, w // 4 + w // 2)
        self.pool2 = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.block2.outputs, num_classes)
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(self.stem(x)))
        x = self.pool2(self.block2(x))
        return self.fc(self.flatten(self.avgpool(x)))


# ----------------------------------------------------------------------------------
# DenseNet
# ----------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """DenseNet's layer: ``BN -> ReLU -> conv1x1 (bottleneck) -> BN -> ReLU -> conv3x3``
    on the concatenation of everything before it; returns its ``growth`` new channels."""

    def __init__(self, inputs: int, growth: int, bottleneck: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(inputs), nn.ReLU()
        self.conv1 = nn.Conv2d(inputs, bottleneck, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bottleneck), nn.ReLU()
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    """``layers`` dense layers; each one's output is concatenated to its input."""

    def __init__(self, inputs: int, layers: int, growth: int, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(inputs + i * growth, growth, bottleneck)
                                    for i in range(layers))
        self.outputs = inputs + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """Between dense blocks: ``BN -> ReLU -> conv1x1 (halve the channels) -> avgpool 2``."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__(nn.BatchNorm2d(inputs), nn.ReLU(), nn.Conv2d(inputs, outputs, 1, bias=False),
                         nn.AvgPool2d(2))


class SmallDenseNet(_Configured):
    """A DenseNet-like network (pre-activation, concatenation).

    Layout (``w = width``, growth ``g = w / 2`` channels per dense layer, bottleneck ``w``)::

        stem:        conv3x3(c -> w)                     (28 x 28)
        block1:      3 dense layers, w -> w + 3g channels
        transition1: bn relu conv1x1 (-> half) avgpool 2  (14 x 14)
        block2:      3 dense layers
        transition2: bn relu conv1x1 (-> half) avgpool 2  (7 x 7)
        block3:      3 dense layers
        head:        bn relu, global average pooling, flatten, linear(-> num_classes)

    The stem convolution is not followed by a BatchNorm of its own: the first dense
    layer's BatchNorm reads it (and, through the concatenation, so does every later one).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 24, layers: int = 3):
        super().__init__()
        channels, growth, bottleneck = width, width // 2, width
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        stages = []
        for index in range(3):
            block = DenseBlock(channels, layers, growth, bottleneck)
            stages.append(block)
            channels = block.outputs
            if index < 2:
                stages.append(Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stages)
        self.norm, self.relu = nn.BatchNorm2d(channels), nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, layers=layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(x)))


# ----------------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2's block: ``conv1x1 (expand t times) bn relu6 -> depthwise conv3x3
    (stride s) bn relu6 -> conv1x1 (project) bn``, the projection linear (no activation);
    the input is added where the block keeps its shape (stride 1, same channels)."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        layers = [] if expansion == 1 else [_conv_bn(inputs, hidden, activation=nn.ReLU6)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
                   _conv_bn(hidden, outputs, activation=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


#: MobileNetV2's table for 28 x 28 inputs: (expansion t, channels c, repeats n, stride s).
MOBILENET_STAGES = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1))


class SmallMobileNetV2(_Configured):
    """A MobileNetV2-like network (inverted residuals, depthwise convolutions, ReLU6).

    Layout: ``conv3x3(c -> w) bn relu6``, the inverted-residual stages of
    :data:`MOBILENET_STAGES` (28 -> 14 -> 7), ``conv1x1(-> 4w) bn relu6``, global average
    pooling, flatten, linear(4w -> num_classes). The stage widths are scaled by
    ``width / 16``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        scale = width / 16
        channels = width
        blocks = [_conv_bn(in_channels, channels, 3, activation=nn.ReLU6)]
        for expansion, outputs, repeats, stride in MOBILENET_STAGES:
            outputs = max(int(outputs * scale), 4)
            for index in range(repeats):
                blocks.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
                channels = outputs
        blocks.append(_conv_bn(channels, 4 * width, activation=nn.ReLU6))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))
