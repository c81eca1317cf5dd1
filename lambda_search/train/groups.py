"""How a point's folds run: which of them train together, and how.

A point's folds are cut, in fold order, into groups of the pack size; each group trains
alone (``train_fold``: a group of one on the CPU) or as one packed network (``train_pack``:
a larger group, or a group of one on a GPU, whose step is replayed there as one CUDA graph).
The pack size is ``train.pack`` as a number, or for "auto" one fold at a time on the CPU and
a measured choice on a GPU (``_measure``). The search (``run_point``), the start-up
projection and ``bench`` all take these rules from here: what is timed is what is trained.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..config import TrainConfig
from ..data.datasets import ImageData
from ..data.folds import Fold
from .engine import Engine, EpochMetrics, FoldResult
from .pack import Packs, train_pack
from .single import train_fold

__all__ = ["auto_packs", "chunk_sizes", "pack_size", "trains_alone", "train_group"]

PACK_GAIN = 0.95  # "auto" packs only where a point's folds packed take at most this share of one at a time


def auto_packs(device) -> bool:
    """Whether train.pack = "auto" may pack on ``device``: on GPUs only. On the CPU a search
    stays bit-for-bit reproducible (a grouped convolution rounds differently from a plain one,
    and the pick would depend on a timing); packing there is asked for with a number."""
    return torch.device(device).type != "cpu"


def chunk_sizes(folds: int, size: int) -> list[int]:
    """The sizes of the groups ``folds`` folds are cut into at pack size ``size``."""
    return [size] * (folds // size) + ([folds % size] if folds % size else [])


def pack_size(train: TrainConfig, folds: int, device, seconds: dict[int, float] | None = None) -> int | None:
    """The pack size a point's ``folds`` folds train at: the one place it is decided, for the
    search, its start-up projection and ``bench``. ``train.pack`` as a number (at most the
    folds); for "auto", 1 on the CPU or with one fold, and on a GPU the size of the fastest
    point of those ``seconds`` (size -> seconds per pack step, measured) covers, where it beats
    one fold at a time by 5 %; None where "auto" needs that measurement and has none. (A
    network that does not pack has train.pack = 1: its plan says so.)"""
    if train.pack != "auto":
        return min(train.pack, folds)
    if folds == 1 or not auto_packs(device):
        return 1
    if seconds is None:
        return None
    per_point = {s: sum(seconds[c] for c in chunk_sizes(folds, s)) for s in seconds
                 if all(c in seconds for c in chunk_sizes(folds, s))}
    best = min(per_point, key=per_point.get)
    return best if per_point[best] <= PACK_GAIN * per_point[1] else 1


def trains_alone(size: int, device, packs: bool = True) -> bool:
    """Whether a group of ``size`` folds trains as plain networks (``train_fold``) rather than
    packed: a group of one on the CPU; on a GPU a group of one is a pack of one, its whole step
    one CUDA graph; always for a network that does not pack (``packs``, its NetworkSpec's)."""
    return not packs or (size == 1 and torch.device(device).type == "cpu")


def train_group(data: ImageData, group: list[Fold], e_lambda: float | None, config: TrainConfig, *,
                seeds: list[int], model: str, attention: str, shortcut: str, engine: Engine,
                checkpoints: list[str | os.PathLike | None],
                on_epoch: Callable[[Fold, EpochMetrics], None] | None = None,
                should_stop: Callable[[], bool] | None = None, packs: Packs | None = None,
                numerics: dict | None = None) -> list[FoldResult]:
    """Train the folds of ``group`` (one group of a point, as :func:`chunk_sizes` cuts them)
    alone or packed, as :func:`trains_alone` says; one result per fold. ``packs``: the
    engine's packs, reused from point to point (built for this call where not given)."""
    common = dict(model=model, attention=attention, shortcut=shortcut, engine=engine, should_stop=should_stop,
                  numerics=numerics)
    if trains_alone(len(group), engine.device, engine.network.packs):
        fold = group[0]
        callback = (lambda m: on_epoch(fold, m)) if on_epoch is not None else None
        return [train_fold(data, fold, e_lambda, config, seed=seeds[0], callback=callback, checkpoint=checkpoints[0],
                           **common)]
    callback = (lambda i, m: on_epoch(group[i], m)) if on_epoch is not None else None
    return train_pack(data, group, [e_lambda] * len(group), config, seeds=seeds, callback=callback,
                      checkpoints=checkpoints, packs=packs, **common)
