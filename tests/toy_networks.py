"""A network of a user's own, as a user would write it in their package: one builder (and a
NetworkSpec for the rules of its own), named in a config as ``toy_networks:build``."""

from torch import nn

from lambda_search.nn.registry import NetworkSpec


def build(num_classes, attn_layer=None):
    """conv -> BN -> ReLU -> attention (SimAM or none) -> pool -> linear."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         attn_layer() if attn_layer is not None else nn.Identity(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


# the same network with rules of its own: it needs 16 px or more
BIG_ONLY = NetworkSpec("big-only", "Toy (16 px and up)", build, min_input=16)


def tiny_wide(num_classes, attn_layer=None):
    """A WideResNet-10x1 (the paper's WideResNet family at toy size), with its dropout 0.3."""
    from lambda_search.nn.wideresnet import WideResNet

    return WideResNet(10, 1, num_classes, attn_layer)


TINY_WIDE = NetworkSpec("tiny-wide", "WideResNet-10x1", tiny_wide, min_input=5, random=True)
