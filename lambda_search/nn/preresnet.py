"""The paper's pre-activation ResNets (Table 2): CIFAR PreResNet-20/56/110 and PreResNet-164.

As the official SimAM code builds them (``networks/cifar/preresnet.py``): a 3x3 stem
convolution (no BatchNorm after it), three stages of pre-activation basic blocks with
16, 32, 64 channels (stride 2 at the start of stages 2 and 3), then BatchNorm, ReLU,
global average pool and the classifier. SimAM sits right after each block's second
convolution, before the residual sum:

    bn1 -> relu -> conv1 -> bn2 -> relu -> conv2 -> SimAM -> (+ shortcut)
    bn1 -> relu -> conv1 -> bn2 -> relu -> conv2 -> SimAM -> bn3 -> relu -> conv3 -> (+ shortcut)

(the second, PreResNet-164's bottleneck block: 1x1, 3x3 with the stride, 1x1 to 4x the width).
The shortcut, where the shape changes, is a strided 1x1 convolution without BatchNorm.
PyTorch's default initialisation, as the official code. Layer names are the official
code's (``shortcut.0``, ``bn``, ``linear``), the attention a child of its own (``attn``),
so a SimAM network's state dict equals its baseline's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["PreBasicBlock", "PreBottleneck", "PreResNet", "preresnet20", "preresnet56", "preresnet110",
           "preresnet164"]

LayerFactory = Callable[[], nn.Module]


class PreBasicBlock(nn.Module):
    """bn1 -> relu -> conv1 -> bn2 -> relu -> conv2 -> attention -> (+ shortcut)."""

    expansion = 1  # output channels per width

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 attn_layer: LayerFactory | None = None) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.attn = attn_layer() if attn_layer is not None else nn.Identity()
        self.shortcut = nn.Sequential()  # the identity, or (the official code's) a 1x1 conv alone
        if stride != 1 or in_channels != out_channels:
            self.shortcut.append(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.attn(self.conv2(self.relu(self.bn2(out))))
        return out + self.shortcut(x)


class PreBottleneck(nn.Module):
    """bn1 -> relu -> conv1 (1x1) -> bn2 -> relu -> conv2 (3x3, the stride) -> attention -> bn3 -> relu
    -> conv3 (1x1, 4x the width) -> (+ shortcut)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1,
                 attn_layer: LayerFactory | None = None) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.relu = nn.ReLU(inplace=True)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.attn = attn_layer() if attn_layer is not None else nn.Identity()
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut.append(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.attn(self.conv2(self.relu(self.bn2(out))))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + self.shortcut(x)


class PreResNet(nn.Module):
    """3x3 stem, three stages of PreBasicBlocks (or ``block``; ``blocks`` each), bn -> relu -> pool -> linear."""

    # For load_official_checkpoint: our names are the official code's; with SimAM it wraps each block's conv2 as
    # Sequential(conv, SimAM), PreBasicBlock's and PreBottleneck's alike
    OFFICIAL_RENAMES = ()
    OFFICIAL_SIMAM_CONV = "conv2"

    def __init__(self, blocks: int, num_classes: int, attn_layer: LayerFactory | None = None,
                 block: type[PreBasicBlock] | type[PreBottleneck] = PreBasicBlock) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        channels = 16
        for i, width in enumerate((16, 32, 64)):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(block(channels, width, stride, attn_layer))
                channels = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn(out)))
        return self.linear(torch.flatten(out, 1))


# Each network: a two-line factory, registered in lambda_search.nn.registry
def preresnet20(num_classes: int, attn_layer: LayerFactory | None = None) -> PreResNet:
    return PreResNet(3, num_classes, attn_layer)


def preresnet56(num_classes: int, attn_layer: LayerFactory | None = None) -> PreResNet:
    return PreResNet(9, num_classes, attn_layer)


def preresnet110(num_classes: int, attn_layer: LayerFactory | None = None) -> PreResNet:
    return PreResNet(18, num_classes, attn_layer)


def preresnet164(num_classes: int, attn_layer: LayerFactory | None = None) -> PreResNet:
    return PreResNet(18, num_classes, attn_layer, PreBottleneck)
