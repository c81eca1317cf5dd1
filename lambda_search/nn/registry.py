"""The networks lambda_search trains, by name: one entry each (``NetworkSpec``), the family's
own file building it. No torch here: reading a study needs the labels, not the networks;
a network's file is imported when one is first built.

A user's own network is named by an import path, ``model.name = "mypkg.nets:build"`` (a
function, or a ``NetworkSpec``), stored with the study so that every worker and a resume
import the same. A builder is called as ``builder(num_classes, attn_layer, **options)``:
``attn_layer`` makes the attention layer (SimAM with the training's lambda) or is None for
the baseline network; where the network puts it is the network's affair (the paper's
ResNets: after each block's second convolution).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import numbers
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["NetworkSpec", "NETWORKS", "MODEL_NAMES", "MODEL_LABELS", "DEFAULT_NETWORK", "network_spec",
           "build_model", "ATTENTIONS"]

ATTENTIONS = ("simam", "none")


@dataclass(frozen=True)
class NetworkSpec:
    """All lambda_search needs to know of a network. ``builder``: ``"module:function"``
    (imported when first built) or the function; ``min_input``: the smallest image side it
    takes, in px; ``options``: each option of its family and the values allowed (the first the
    default), e.g. the ResNets' shortcut; ``packs``: whether ``train_pack`` may train several
    at once as one grouped network (its layers are ones ``lambda_search.train.packnet``
    converts); a network that does not pack trains one fold at a time; ``random``: it draws
    random numbers as it trains (dropout), which each step then draws from the training's seed
    and the step (``lambda_search.train.single.seeded_step``)."""

    name: str
    label: str
    builder: str | Callable
    min_input: int = 1
    options: dict = field(default_factory=dict)
    packs: bool = False
    random: bool = False  # draws random numbers as it trains (dropout): seeded per step from the training's seed

    def build(self, num_classes: int, attn_layer: Callable | None = None, **options):
        builder = self.builder if callable(self.builder) else _imported(self.builder, self.name)
        return builder(num_classes, attn_layer, **options)

    def checked_options(self, **given) -> dict:
        """``given`` options of this network, each checked against its allowed values; an
        option the network does not have is refused unless it is left at the ResNets' default."""
        out = {}
        for key, value in given.items():
            allowed = self.options.get(key)
            if allowed is None:
                if value not in (None, _DEFAULTS.get(key)):
                    raise ValueError(f"{key}={value!r} is not an option of {self.name}, which has "
                                     f"{', '.join(self.options) or 'none'}")
            elif value not in allowed:
                shown = " or ".join(repr(a) for a in allowed)
                raise ValueError(f"{key} must be {shown}, got {key}={value!r} ({self.name})")
            else:
                out[key] = value
        return out


_DEFAULTS = {"shortcut": "B"}  # (model.shortcut's default, which a network without shortcuts ignores)
_SHORTCUTS = {"shortcut": ("B", "A")}  # type B (1x1 conv + BN, the official SimAM code) or A (subsample, zero-pad)


def _resnet(depth: int) -> NetworkSpec:
    return NetworkSpec(f"resnet{depth}", f"ResNet-{depth}", f"lambda_search.nn.resnet:resnet{depth}",
                       min_input=5, options=_SHORTCUTS, packs=True)  # (min_input: as the PreResNets' below)


NETWORKS = {spec.name: spec for spec in (
    *(_resnet(depth) for depth in (20, 32, 44, 56, 110)),  # CIFAR: 32 px or smaller inputs
    # the official code's bottleneck CIFAR ResNet: type-B shortcuts only, not packed (the packed trainer knows
    # BasicBlocks), min_input as the PreResNets' below
    NetworkSpec("resnet164", "ResNet-164", "lambda_search.nn.resnet:resnet164", min_input=5,
                options={"shortcut": ("B",)}),
    # ImageNet: 224 px, or 112 px for the paper's half-resolution search; its last stage is 2x2 from 33 px
    # (33 -> 17 -> 9 -> 9 -> 5 -> 3 -> 2: stem, max pool, stages)
    NetworkSpec("resnet18", "ResNet-18", "lambda_search.nn.resnet:resnet18", min_input=33,
                options={"shortcut": ("B",)}, packs=True),
    # the other networks of the paper's Table 2 (CIFAR), as the official SimAM code builds them. min_input: the
    # smallest side at which every SimAM map keeps 2x2 px (a stride-2 3x3 conv maps s px to ceil(s / 2)): the
    # (Pre/Wide)ResNets' last stage is 2 px from 5 px (5 -> 3 -> 2); MobileNetV2's from 9 px (9 -> 5 -> 3 -> 2)
    *(NetworkSpec(f"preresnet{depth}", f"PreResNet-{depth}", f"lambda_search.nn.preresnet:preresnet{depth}",
                  min_input=5) for depth in (20, 56, 110, 164)),
    *(NetworkSpec(f"wideresnet{depth}x10", f"WideResNet-{depth}x10",
                  f"lambda_search.nn.wideresnet:wideresnet{depth}x10", min_input=5, random=True)  # dropout 0.3
      for depth in (28, 40)),
    NetworkSpec("mobilenetv2", "MobileNetV2", "lambda_search.nn.mobilenetv2:mobilenetv2", min_input=9),
)}
DEFAULT_NETWORK = "resnet20"  # the paper's search network
MODEL_NAMES = tuple(NETWORKS)
MODEL_LABELS = {name: spec.label for name, spec in NETWORKS.items()}  # as the paper writes them


def _imported(path: str, what: str):
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as exc:  # (a user's module: whatever it raises as it is imported)
        raise ValueError(f"model.name={what!r}: cannot import {attr!r} from module {module!r} "
                         f"({type(exc).__name__}: {exc})") from None


def network_spec(name: str) -> NetworkSpec:
    """The network called ``name``: a registered one, or a user's given as ``module:function``
    (a builder, or a NetworkSpec)."""
    if isinstance(name, str) and name in NETWORKS:
        return NETWORKS[name]
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise ValueError(f"unknown model name={name!r}; valid names: {', '.join(MODEL_NAMES)}, or a network of "
                         "your own as 'module:function'")
    return _users_network(name)


@functools.lru_cache(maxsize=None)
def _users_network(name: str) -> NetworkSpec:
    found = _imported(name, name)
    if isinstance(found, NetworkSpec):
        return dataclasses.replace(found, name=name)
    if callable(found):
        return NetworkSpec(name, name.split(":")[1], found)
    raise ValueError(f"model.name={name!r} is neither a network builder nor a NetworkSpec")


def build_model(name: str, num_classes: int, attention: str = "simam", e_lambda: float = 1e-4,
                shortcut: str | None = "B"):
    """Build a network by name, with SimAM (``attention="simam"``) or without (``"none"``).

    ``name``: resnet20, resnet32, resnet44, resnet56, resnet110 (CIFAR, 32 px or smaller
    inputs), resnet18 (ImageNet; 224 px, or 112 px for the paper's half-resolution search), the
    rest of the paper's Table 2 and the official code's bottleneck networks (preresnet20,
    preresnet56, preresnet110, preresnet164, wideresnet28x10, wideresnet40x10, mobilenetv2,
    resnet164; CIFAR), or ``module:function`` for a network of your own.
    ``shortcut``: the ResNets' "B" (1x1 conv + BN, the official SimAM code) or "A" (subsample
    and zero-pad, He et al.), CIFAR ResNets only.
    """
    spec = network_spec(name)
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got attention={attention!r}")
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got num_classes={num_classes!r}")
    options = spec.checked_options(shortcut=shortcut)
    attn_layer = None
    if attention == "simam":
        from .simam import SimAM, check_e_lambda  # (torch: only when a network is built)

        attn_layer = functools.partial(SimAM, check_e_lambda(e_lambda))
    return spec.build(int(num_classes), attn_layer, **options)
