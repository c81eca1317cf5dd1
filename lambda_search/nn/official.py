"""Load checkpoints saved by the official SimAM code (github ZjjConan/SimAM)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from .resnet import ResNet
from .simam import SimAM

__all__ = ["load_official_checkpoint", "map_official_state_dict", "official_simam"]

# Counters that the FLOP counter (thop) left in the official checkpoints; no layer owns them.
_COUNTERS = ("total_ops", "total_params")
# Saved from a DataParallel network: every key prefixed "module.".
_PREFIX = re.compile(r"^module\.")


def _names(model: nn.Module | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Which convolution of its blocks the official code wraps as Sequential(conv, SimAM), and
    the official names the network's family differs by ((pattern, replacement): official ->
    ours), as the family declares them (``OFFICIAL_SIMAM_CONV``, ``OFFICIAL_RENAMES``). Without
    a model: the CIFAR ResNets', the official code's default network; a network that declares
    nothing: conv2, the official code's in every network, and no renames."""
    source = ResNet if model is None else model
    return getattr(source, "OFFICIAL_SIMAM_CONV", "conv2"), tuple(getattr(source, "OFFICIAL_RENAMES", ()))


def map_official_state_dict(state_dict: Mapping[str, torch.Tensor],
                            model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Drop the FLOP counter's entries and rename official keys to lambda_search's names: the
    "module." prefix dropped, the SimAM-wrapped convolution unwrapped (``convN.0.`` ->
    ``convN.``), then the renames of ``model``'s family (without a model: the CIFAR ResNets')."""
    conv, renames = _names(model)
    rules = [(_PREFIX, ""), (re.compile(rf"\.{conv}\.0\."), f".{conv}.")]
    rules += [(re.compile(pattern), replacement) for pattern, replacement in renames]
    mapped = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in _COUNTERS:
            continue
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        mapped[key] = value
    return mapped


def official_simam(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> bool:
    """Whether an official state dict was trained with SimAM: the official code marks it by
    wrapping a block's convolution (``model``'s family's, conv2 in every official network) as
    Sequential(conv, SimAM), whose weight is then ``...convN.0.weight``."""
    conv, _ = _names(model)
    wrapped = re.compile(rf"\.{conv}\.0\.weight$")
    return any(wrapped.search(key) for key in state_dict)


def _short(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike, map_location="cpu") -> dict:
    """Load an official SimAM checkpoint into ``model``, strictly.

    Accepts the official training checkpoint (a dict with ``state_dict``) or a bare state
    dict. Every weight and buffer of ``model`` must be filled and every checkpoint entry
    used, with equal shapes; otherwise ValueError lists what differs and ``model`` is left
    unchanged. The checkpoint must also agree with the model on SimAM: the official code
    marks it by wrapping a block's convolution (conv2) as (conv, SimAM); the official names
    are mapped to ours as ``model``'s family declares (:func:`map_official_state_dict`).
    Lambda is not stored in official checkpoints: the model keeps its own. Returns the
    checkpoint's metadata (epoch, arch, best_acc, where present) and ``simam`` (whether it
    was trained with SimAM).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt file fails in many ways (IndexError, EOFError, ...)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors or a 'state_dict' entry)")

    has_simam = official_simam(state, model)
    model_simam = any(isinstance(m, SimAM) for m in model.modules())
    if has_simam != model_simam:
        trained = "with SimAM" if has_simam else "without SimAM"
        built = "attention='simam'" if model_simam else "attention='none'"
        raise ValueError(f"{path} was trained {trained}, but the model was built with {built}")

    mapped = map_official_state_dict(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong_shape:
        detail = [f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape]
        problems.append(f"shape mismatches (checkpoint vs model): {_short(detail)}")
    if problems:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)

    meta = {k: checkpoint[k] for k in ("epoch", "arch", "best_acc") if k in checkpoint}
    meta["simam"] = has_simam
    return meta
