"""Train one (lambda, fold) with the paper's protocol; fast on a GPU, exact on a CPU, resumable.

The result is the final model's validation accuracy, never the best epoch's. Training
never imports Optuna: progress goes to a callback, which may ask to stop. The protocol and
the engine are in :mod:`lambda_search.train.engine`, the fold's state (checkpoints, epochs, the
result) in :mod:`lambda_search.train.foldrun`; this module runs the steps.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable

import torch  # noqa: F401  (the checkpoints' torch.save, as tests reach it: _train.torch.save)

# the engine's and the fold's names are imported from here too (train_fold's module, as before)
from ..config import TrainConfig
from ..data.augment import train_batch
from ..data.datasets import ImageData, dataset_fingerprint
from ..data.folds import Fold, derive_seed
from ..nn.registry import DEFAULT_NETWORK
from .engine import (
    Engine,
    EpochMetrics,
    FoldResult,
    _evaluate,
    build_engine,
    checked_lambda,
    cpu_threads,
    engine_for,
    make_optimizer,
    on_device,
)
from .foldrun import (
    FoldRun,
    checkpoint_key,
    track,
    trackers,
)

__all__ = ["TrainConfig", "EpochMetrics", "FoldResult", "Engine", "build_engine", "make_optimizer", "train_fold",
           "cpu_threads"]


def train_fold(
    data: ImageData,
    fold: Fold,
    e_lambda: float | None,
    config: TrainConfig,
    *,
    model: str = DEFAULT_NETWORK,
    attention: str = "simam",
    shortcut: str = "B",
    seed: int = 0,
    engine: Engine | None = None,
    callback: Callable[[EpochMetrics], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    should_stop: Callable[[], bool] | None = None,
    numerics: dict | None = None,
) -> FoldResult:
    """Train ``model`` with SimAM(``e_lambda``) (or without, ``attention="none"``) on
    ``fold.train`` and evaluate the final model on ``fold.val``.

    ``seed`` fixes the initial weights, the batch order and the augmentation: the same seed
    gives the same accuracy bit for bit on the CPU, and every lambda of a study sees the
    same initial weights and batches (paired comparisons). Pass one ``engine`` to reuse a
    built, compiled network across calls. ``callback(metrics)`` runs after each epoch;
    returning True stops the fold (status "stopped", checkpoint written). With
    ``checkpoint``, state is saved every ``config.checkpoint_every_epochs`` epochs and
    ``config.checkpoint_every_seconds`` seconds, and a call finds it and resumes: the result
    equals an uninterrupted run's on the CPU. ``should_stop()`` is asked after every step
    (a signal handler's flag, say): when it answers True the fold saves its checkpoint at that
    step and returns "stopped". ``numerics``: what it trains under (kept in its checkpoint;
    the result's ``trained_under`` lists each, where a resumed run trained under others).

    Example, one fold of the bundled digits (about 10 s on 2 CPU cores)::

        import lambda_search as ls
        data = ls.load_dataset("digits")
        fold = ls.make_folds(data.labels, n_splits=3, seed=0)[0]
        cfg = ls.TrainConfig(epochs=15, batch_size=64, lr=0.05)
        print(ls.train_fold(data, fold, 1e-4, cfg).val_accuracy)  # ResNet-20: about 0.97
    """
    with cpu_threads(config):
        return _train_fold(data, fold, e_lambda, config, model, attention, shortcut, seed, engine, callback,
                           checkpoint, should_stop, numerics)


@contextlib.contextmanager
def seeded_step(engine, seed: int, iteration: int):
    """Within the block, a network that draws random numbers as it trains (dropout: its
    NetworkSpec says ``random``) draws them from torch's generator seeded by the training's
    seed and the step, and the caller's generator is left as it was: the same numbers however
    the training runs (resumed from a checkpoint, in any process). Other networks: nothing."""
    if not engine.network.random:
        yield
        return
    devices = [engine.device] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, 3, iteration))
        yield


def _train_fold(data, fold, e_lambda, config, model, attention, shortcut, seed, engine, callback, checkpoint,
                should_stop, numerics=None) -> FoldResult:
    e_lambda = checked_lambda(e_lambda, attention)
    engine = engine_for(engine, data, config, model, attention, shortcut)
    device = engine.device
    n_train = len(fold.train)
    if config.batch_size > n_train:
        raise ValueError(f"batch_size={config.batch_size} exceeds the fold's {n_train} training images")
    path = Path(checkpoint) if checkpoint is not None else None
    key = checkpoint_key(data, fold, e_lambda, seed, engine, config, dataset_fingerprint(data)) if path else None
    data = on_device(data, config, device)

    engine.reset(seed, e_lambda)
    net = engine.model
    optimizer = make_optimizer(net, config)
    run = FoldRun(fold, e_lambda, seed, config, path=path, key=key, device=device, index_device=data.images.device,
                  tracked=trackers(1, device), slot=0, weights=lambda run: (net.state_dict(), optimizer.state_dict()),
                  evaluate=lambda run: _evaluate(engine, data, run.val_index, config.eval_batch_size),
                  callback=callback, should_stop=should_stop, numerics=numerics)
    payload = run.resume()
    if payload is not None:
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    run.begin(time.monotonic())

    labels = data.labels
    net.train()
    lr = None
    while run.iteration < run.total:
        if run.lr != lr:
            lr = run.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
        idx = run.batch_index()
        x = engine.batch(train_batch(data, idx, run.generator, device))
        with seeded_step(engine, seed, run.iteration):
            track(run.tracked, engine.step(optimizer, x, labels[idx].to(device, non_blocking=True)))
        ended = run.advance()
        seconds_due = (path is not None and config.checkpoint_every_seconds is not None
                       and time.monotonic() - run.last_save >= config.checkpoint_every_seconds)
        interrupted = should_stop is not None and run.iteration < run.total and should_stop()
        if ((seconds_due or interrupted) and run.iteration % run.steps_per_epoch
                and run.pause(bool(interrupted), end_diverged=True) is not None):
            return run.result
        if ended and run.end_epoch() is not None:  # the end of an epoch, or of the budget
            return run.result
    return run.final()  # the final model (also when resumed from a finished checkpoint)
