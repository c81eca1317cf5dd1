"""The paper's MobileNetV2 (Table 2), in its CIFAR form.

As the official SimAM code builds it (``networks/cifar/mobilenetv2.py``, Kuang Liu's CIFAR
version of Sandler et al.): a stride-1 3x3 stem with 32 channels, seventeen inverted
residual blocks (the second stage at stride 1 too), a 1x1 convolution to 1280 channels,
global average pool (the official 4x4 average pool at 32 px) and the classifier. SimAM sits
right after each block's depthwise convolution, on its ``planes`` channels:

    conv1 (1x1 expand) -> bn1 -> relu -> conv2 (3x3 depthwise) -> SimAM -> bn2 -> relu
    -> conv3 (1x1 project) -> bn3 -> (+ shortcut, stride-1 blocks only)

``bn2`` is a :class:`~lambda_search.nn.simam.SimAMBatchNorm` (the two fuse on the CPU as in
the ResNets). PyTorch's default initialisation, as the official code. Layer names are the
official code's, the attention a child of its own (``attn``), so a SimAM network's state
dict equals its baseline's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .simam import SimAMBatchNorm

__all__ = ["InvertedResidualBlock", "MobileNetV2", "mobilenetv2"]

LayerFactory = Callable[[], nn.Module]

# (expansion, out_channels, blocks, stride) of each stage: the official CIFAR configuration
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidualBlock(nn.Module):
    """1x1 expand -> bn1 -> relu -> 3x3 depthwise -> attention -> bn2 -> relu -> 1x1 project -> bn3
    (+ shortcut where the stride is 1: the identity, or a 1x1 conv + BN where the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int,
                 attn_layer: LayerFactory | None = None) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_channels
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.attn = attn_layer() if attn_layer is not None else nn.Identity()
        self.bn2 = SimAMBatchNorm(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out), self.attn))  # bn2(attn(.))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """Stride-1 stem, the inverted residual blocks of ``STAGES``, 1x1 conv to 1280, pool, linear."""

    # For load_official_checkpoint: our names are the official code's; with SimAM it wraps each block's (depthwise)
    # conv2 as Sequential(conv, SimAM) (blocks only: the network's own conv2, the 1x1 to 1280, never)
    OFFICIAL_RENAMES = ()
    OFFICIAL_SIMAM_CONV = "conv2"

    def __init__(self, num_classes: int, attn_layer: LayerFactory | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, channels = [], 32
        for expansion, width, count, stride in STAGES:
            for j in range(count):
                blocks.append(InvertedResidualBlock(channels, width, expansion, stride if j == 0 else 1, attn_layer))
                channels = width
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(channels, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# A two-line factory, registered in lambda_search.nn.registry
def mobilenetv2(num_classes: int, attn_layer: LayerFactory | None = None) -> MobileNetV2:
    return MobileNetV2(num_classes, attn_layer)
