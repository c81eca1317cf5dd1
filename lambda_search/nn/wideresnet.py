"""The paper's wide ResNets (Table 2): CIFAR WideResNet-28x10 and WideResNet-40x10.

As the official SimAM code builds them (``networks/cifar/wideresnet.py``, Zagoruyko and
Komodakis' network): a 3x3 stem convolution with 16 channels, three stages of (depth - 4) / 6
wide basic blocks with 16k, 32k, 64k channels (k = 10; stride 2 at the start of stages 2 and
3), then BatchNorm, ReLU, global average pool (the official 8x8 average pool at 32 px) and
the classifier. Dropout 0.3 between a block's convolutions (training mode only), the official
default; its masks come from torch's global random generator, which a training seeds at each
step from its own seed (the registry marks the network ``random``), so the same numbers however
it runs. SimAM sits right after each block's second convolution, before
the residual sum:

    bn1 -> relu -> conv1 -> bn2 -> relu -> dropout -> conv2 -> SimAM -> (+ shortcut)

Where a block changes the width, its shortcut is a strided 1x1 convolution of the activated
input (``relu(bn1(x))``, as the official code); elsewhere the identity of ``x``. The official
initialisation: convolutions He-normal (fan out), BatchNorm 1 and 0, the classifier's bias 0.
Layer names are the official code's (``block1.layer.0.convShortcut``, ``bn1``, ``fc``), the
attention a child of its own (``attn``), so a SimAM network's state dict equals its baseline's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WideBasicBlock", "WideResNet", "wideresnet28x10", "wideresnet40x10"]

LayerFactory = Callable[[], nn.Module]
DROPOUT = 0.3  # the official code's for both depths


class WideBasicBlock(nn.Module):
    """bn1 -> relu -> conv1 -> bn2 -> relu -> dropout -> conv2 -> attention -> (+ shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, droprate: float,
                 attn_layer: LayerFactory | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.attn = attn_layer() if attn_layer is not None else nn.Identity()
        self.droprate = droprate
        self.convShortcut = None  # (the official code's name, kept for its state dicts)
        if in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        out = self.relu(self.bn2(self.conv1(pre)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.attn(self.conv2(out))


class _Stage(nn.Module):
    """One stage's blocks, as ``layer`` (the official code's NetworkBlock, for its names)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """3x3 stem, three stages of WideBasicBlocks, bn1 -> relu -> pool -> fc."""

    # For load_official_checkpoint: our names are the official code's; with SimAM it wraps each block's conv2 as
    # Sequential(conv, SimAM)
    OFFICIAL_RENAMES = ()
    OFFICIAL_SIMAM_CONV = "conv2"

    def __init__(self, depth: int, widen: int, num_classes: int, attn_layer: LayerFactory | None = None,
                 droprate: float = DROPOUT) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WideResNet's depth is 6n + 4, got depth={depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        channels = 16
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = [WideBasicBlock(channels if j == 0 else width, width, 2 if i > 0 and j == 0 else 1, droprate,
                                     attn_layer) for j in range(n)]
            self.add_module(f"block{i + 1}", _Stage(blocks))
            channels = width
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _official_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn1(out)))
        return self.fc(torch.flatten(out, 1))


@torch.no_grad()
def _official_init(model: WideResNet) -> None:
    """The official code's: the classifier's bias 0, every convolution N(0, 2 / (k * k * out)),
    every BatchNorm weight 1 and bias 0 (the classifier's weight PyTorch's default)."""
    model.fc.bias.zero_()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1)
            m.bias.zero_()


# Each network: a two-line factory, registered in lambda_search.nn.registry
def wideresnet28x10(num_classes: int, attn_layer: LayerFactory | None = None) -> WideResNet:
    return WideResNet(28, 10, num_classes, attn_layer)


def wideresnet40x10(num_classes: int, attn_layer: LayerFactory | None = None) -> WideResNet:
    return WideResNet(40, 10, num_classes, attn_layer)
