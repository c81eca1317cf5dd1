"""The paper's networks: CIFAR ResNet-20/32/44/56/110, ResNet-164 and ImageNet ResNet-18.

SimAM sits where the official code puts it: in every residual block, right after the
(second) 3x3 convolution and before that convolution's BatchNorm:

    conv1 -> bn1 -> relu -> conv2 -> SimAM -> bn2 -> (+ shortcut) -> relu
    conv1 -> bn1 -> relu -> conv2 -> SimAM -> bn2 -> relu -> conv3 -> bn3 -> (+ shortcut) -> relu

(the second, a bottleneck block, ResNet-164's: 1x1, 3x3 with the stride, 1x1 to 4x the width).

Names follow torchvision (conv1, bn1, layer1..., downsample, fc), so an ImageNet
ResNet-18 state dict from torchvision loads as it is; official SimAM checkpoints load
through :func:`lambda_search.load_official_checkpoint`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .simam import SimAMBatchNorm

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "resnet164", "resnet18"]


LayerFactory = Callable[[], nn.Module]


class PadShortcut(nn.Module):
    """Type-A shortcut (He et al. 2016): subsample by the stride, zero-pad the channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Type-B shortcut: 1x1 convolution with stride, then BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> attention -> bn2 -> (+ shortcut) -> relu.

    ``bn2`` is a :class:`~lambda_search.nn.simam.SimAMBatchNorm`, the BatchNorm that takes the
    attention layer before it (``attn``: SimAM, or none): where they can, the two run as one
    kernel (CPU training); layer names and state dict keys are a plain block's.
    """

    expansion = 1  # output channels per width

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        attn_layer: LayerFactory | None = None,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.attn = attn_layer() if attn_layer is not None else nn.Identity()
        self.bn2 = SimAMBatchNorm(out_channels)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out), self.attn)  # bn2(attn(.))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """conv1 (1x1) -> bn1 -> relu -> conv2 (3x3, the stride) -> attention -> bn2 -> relu -> conv3 (1x1, 4x the
    width) -> bn3 -> (+ shortcut) -> relu: the official CIFAR bottleneck; ``bn2`` as BasicBlock's."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, attn_layer: LayerFactory | None = None,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.attn = attn_layer() if attn_layer is not None else nn.Identity()
        self.bn2 = SimAMBatchNorm(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out), self.attn))  # bn2(attn(.))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks (or ``block``) with a CIFAR stem (3x3 conv) or an ImageNet stem (7x7/2 + max pool)."""

    # For load_official_checkpoint: the official code's names where ours differ ((pattern, replacement), official ->
    # ours): its CIFAR shortcut is "shortcut" and its classifier "linear" (its ImageNet ResNets' are torchvision's,
    # ours); with SimAM it wraps each block's conv2 as Sequential(conv, SimAM), BasicBlock's and Bottleneck's alike
    OFFICIAL_RENAMES = ((r"\.shortcut\.", ".downsample."), (r"^linear\.", "fc."))
    OFFICIAL_SIMAM_CONV = "conv2"

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        imagenet_stem: bool,
        attn_layer: LayerFactory | None = None,
        shortcut: str = "B",
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
    ) -> None:
        super().__init__()
        channels = widths[0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, (count, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or channels != width * block.expansion:
                    make = PadShortcut if shortcut == "A" else _projection
                    downsample = make(channels, width * block.expansion, s)
                layers.append(block(channels, width, s, attn_layer, downsample))
                channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        # layer1, layer2, ... as torchvision names them
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(stages)))
        for name, stage in zip(self.stage_names, stages):
            self.add_module(name, stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        if imagenet_stem:
            # torchvision's (and the official ImageNet code's) initialisation; the
            # official CIFAR code keeps PyTorch's default initialisation.
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar(n: int, num_classes: int, attn_layer: LayerFactory | None, shortcut: str, block=BasicBlock) -> ResNet:
    return ResNet((n, n, n), (16, 32, 64), num_classes, False, attn_layer, shortcut, block)


# Each network: a two-line factory, registered in lambda_search.nn.registry
def resnet20(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return _cifar(3, num_classes, attn_layer, shortcut)


def resnet32(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return _cifar(5, num_classes, attn_layer, shortcut)


def resnet44(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return _cifar(7, num_classes, attn_layer, shortcut)


def resnet56(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return _cifar(9, num_classes, attn_layer, shortcut)


def resnet110(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return _cifar(18, num_classes, attn_layer, shortcut)


def resnet164(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return _cifar(18, num_classes, attn_layer, shortcut, Bottleneck)


def resnet18(num_classes: int, attn_layer: LayerFactory | None = None, shortcut: str = "B") -> ResNet:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, True, attn_layer, shortcut)
