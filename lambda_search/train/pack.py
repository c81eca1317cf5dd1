"""Packed training: several (lambda, fold) trainings of one network at once, as one network.

P copies of a ResNet become one packed network (:mod:`lambda_search.train.packnet`): every
layer P times as wide and grouped, model p in channel block p. Model p reads its own batch
(its fold, its batch order, its augmentation); the loss is the sum of the P models' mean
losses, so each model's gradient is its own loss's; SGD is elementwise, with one learning
rate per model (:mod:`lambda_search.train.packstep`). Nothing mixes between models: each gets
the weights and accuracy of its separate training, to float rounding (tested on the CPU).

One small network on one batch leaves a GPU mostly idle; a pack fills it. Each member is a
:class:`~lambda_search.train.foldrun.FoldRun`, as train_fold's fold is: the same checkpoint (a
packed run resumes unpacked and the other way round), its own curve and its own FoldResult.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import TrainConfig
from ..data.augment import train_batch
from ..data.datasets import ImageData, dataset_fingerprint
from ..data.folds import Fold
from ..nn.registry import DEFAULT_NETWORK
from ..nn.simam import set_e_lambda
from .engine import Engine, EpochMetrics, FoldResult, _evaluate, checked_lambda, cpu_threads, engine_for, on_device
from .foldrun import FoldRun, checkpoint_key, track, trackers
from .packnet import PackedNet, packed_evaluate
from .packstep import GraphedStep, PackedSGD

__all__ = ["Pack", "Packs", "train_pack"]


class Pack:
    """P networks of ``engine``'s kind as one, on its device (``net``), with SGD (momentum,
    weight decay, Nesterov as torch.optim.SGD) at one learning rate per network (``sgd``),
    its step replayed as a CUDA graph where the engine asks for one (``graph``)."""

    def __init__(self, engine: Engine, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"pack size must be an integer >= 1, got size={size!r}")
        self.engine, self.size = engine, size
        self.net = PackedNet(engine, size)
        self.model = self.net.model
        self.sgd = PackedSGD(self.net, engine.device)
        self.graph = GraphedStep(engine.device)

    def load(self, p: int, state: dict, momentum: list[Tensor] | None, e_lambda: float | None) -> None:
        """Put one network (a train_fold state dict, its SGD momentum buffers) in slot ``p``."""
        self.net.load(p, state, e_lambda)
        self.sgd.load(p, momentum)

    def state(self, p: int, iteration: int) -> dict:
        """Slot ``p`` as a train_fold state dict (BatchNorm's batch counters at ``iteration``)."""
        return self.net.state(p, iteration)

    def optimizer_state(self, p: int, iteration: int, lr: float, config: TrainConfig) -> dict:
        """Slot ``p``'s SGD state in torch.optim.SGD's format, as train_fold saves it."""
        return self.sgd.state_dict(p, iteration, lr, config, self.engine.model)

    def _step(self, x: Tensor, y: Tensor, config: TrainConfig) -> Tensor:
        """Forward, backward and SGD at the rates set; the P losses."""
        with self.engine.autocast():
            out = self.net.forward(x)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        losses = F.cross_entropy(out.permute(0, 2, 1), y, reduction="none").mean(0)
        for param in self.net.params:
            param.grad = None
        losses.sum().backward()
        self.sgd.update(config)
        return losses.detach()

    def step(self, x: Tensor, y: Tensor, lrs: tuple[float, ...], config: TrainConfig) -> Tensor:
        """One SGD step of every network: ``x`` (B, P*C, H, W), ``y`` (B, P). Returns the P
        losses, detached (no host sync). On CUDA (``engine.cuda_graphs``) the step is captured
        once per input shape and optimiser setting and replayed."""
        self.sgd.set_lrs(lrs)
        if not self.engine.cuda_graphs:
            return self._step(x, y, config)
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), config.weight_decay, config.momentum,
               config.nesterov)
        return self.graph(partial(self._step, config=config), self._state, x, y, key)

    def _state(self) -> list[Tensor]:
        """What a step changes: the networks' parameters and buffers, the momentum buffers."""
        return [*self.model.state_dict().values(), *self.sgd.momentum]

    def evaluate(
        self, data: ImageData, indices: list[Tensor | None], batch_size: int
    ) -> list[tuple[float, float] | None]:
        """Validation accuracy and mean loss of the networks given an index (None: skipped),
        in one packed pass (:func:`~lambda_search.train.packnet.packed_evaluate`)."""
        return packed_evaluate(self.net, self.engine, data, indices, batch_size)


class Packs:
    """The packs of one engine by size, each built (on GPUs compiled, its step captured) once
    and then reused: kept by whoever owns the engine and trains packs on it, and given to
    :func:`train_pack`. The engine knows nothing of them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._built: dict[int, Pack] = {}

    def __call__(self, size: int) -> Pack:
        """The pack of ``size`` networks, built on first use."""
        if size not in self._built:
            self._built[size] = Pack(self.engine, size)
        return self._built[size]

    def clear(self) -> None:
        """Drop every pack built (and the device memory it holds)."""
        self._built.clear()


def train_pack(
    data: ImageData,
    folds: list[Fold],
    e_lambdas: list[float | None],
    config: TrainConfig,
    *,
    seeds: list[int],
    model: str = DEFAULT_NETWORK,
    attention: str = "simam",
    shortcut: str = "B",
    engine: Engine | None = None,
    callback: Callable[[int, EpochMetrics], bool | None] | None = None,
    checkpoints: list[str | os.PathLike | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    packs: Packs | None = None,
    numerics: dict | None = None,
) -> list[FoldResult]:
    """Train ``len(folds)`` (lambda, fold) pairs at once as one packed network; what
    :func:`train_fold` does for each, with the same results to float rounding.

    Member i trains on ``folds[i]`` with ``e_lambdas[i]`` and ``seeds[i]``, and has its own
    checkpoint ``checkpoints[i]`` in train_fold's format (either resumes from the other's).
    ``callback(i, metrics)`` runs after each of member i's epochs; True stops member i. When
    ``should_stop()`` answers True, every unfinished member saves its checkpoint and stops.
    A member that diverges ends "diverged" and the others go on. Returns the members'
    FoldResults in order; ``seconds`` of each is the pack's wall time.

    ``packs``: the :class:`Packs` of ``engine`` (its engine where ``engine`` is not given), to
    take the pack from and leave it in for the next call: built (on GPUs compiled, its step
    captured) once per size. Without it the call builds a pack of its own.
    """
    if packs is not None:
        if engine is not None and engine is not packs.engine:
            raise ValueError("train_pack was given packs of another engine than engine=")
        engine = packs.engine
    with cpu_threads(config):
        return _train_pack(data, folds, e_lambdas, config, seeds, model, attention, shortcut, engine, callback,
                           checkpoints, should_stop, packs, numerics)


def _train_pack(data, folds, e_lambdas, config, seeds, model, attention, shortcut, engine, callback, checkpoints,
                should_stop, packs, numerics=None) -> list[FoldResult]:
    n = len(folds)
    if n < 1 or len(e_lambdas) != n or len(seeds) != n or (checkpoints is not None and len(checkpoints) != n):
        raise ValueError(f"train_pack needs one lambda, seed (and checkpoint) per fold; got {n} folds, "
                         f"{len(e_lambdas)} lambdas, {len(seeds)} seeds")
    e_lambdas = [checked_lambda(v, attention) for v in e_lambdas]
    engine = engine_for(engine, data, config, model, attention, shortcut)
    device = engine.device
    for fold in folds:
        if config.batch_size > len(fold.train):
            raise ValueError(
                f"batch_size={config.batch_size} exceeds fold {fold.name}'s {len(fold.train)} training images"
            )
    paths = [Path(c) if c is not None else None for c in (checkpoints if checkpoints is not None else [None] * n)]
    data_key = dataset_fingerprint(data) if any(p is not None for p in paths) else None
    data = on_device(data, config, device)
    pack = packs(n) if packs is not None else Pack(engine, n)

    tracked, runs = trackers(n, device), []
    for i, (fold, lam, seed, path) in enumerate(zip(folds, e_lambdas, seeds, paths)):
        key = checkpoint_key(data, fold, lam, seed, engine, config, data_key) if path is not None else None
        run = FoldRun(fold, lam, seed, config, path=path, key=key, device=device, index_device=data.images.device,
                      tracked=tracked, slot=i, weights=partial(_slot_weights, pack, i),
                      evaluate=partial(_slot_evaluate, pack, i, data),
                      callback=partial(callback, i) if callback is not None else None, should_stop=should_stop,
                      numerics=numerics)
        payload = run.resume()
        if payload is None:
            pack.load(i, engine.fresh(seed).state_dict(), None, lam)
        else:
            momentum = [payload["optimizer"]["state"].get(j, {}).get("momentum_buffer")
                        for j in range(len(pack.net.params))]
            pack.load(i, payload["model"], None if any(b is None for b in momentum) else momentum, lam)
        runs.append(run)
    start = time.monotonic()
    for run in runs:
        run.begin(start)
        if run.iteration >= run.total:  # resumed from a finished checkpoint
            run.final()
    _packed_steps(pack, runs, data, config, should_stop)
    return [run.result for run in runs]


def _slot_weights(pack: Pack, p: int, run: FoldRun) -> tuple[dict, dict]:
    """Member ``p``'s model and optimiser state, as train_fold checkpoints them."""
    return pack.state(p, run.iteration), pack.optimizer_state(p, run.iteration, run.last_lr, run.config)


def _slot_evaluate(pack: Pack, p: int, data: ImageData, run: FoldRun) -> tuple[float, float]:
    """Member ``p`` validated alone, in the engine's network."""
    engine = pack.engine
    engine.model.load_state_dict(pack.state(p, run.iteration))
    if run.e_lambda is not None:
        set_e_lambda(engine.model, run.e_lambda)
    return _evaluate(engine, data, run.val_index, run.config.eval_batch_size)


def _packed_steps(pack: Pack, runs: list[FoldRun], data: ImageData, config: TrainConfig,
                  should_stop: Callable[[], bool] | None) -> None:
    """Step every unfinished member at once until all have ended. A finished member computes
    on zeros at learning rate 0 until the pack ends; members whose epochs end together are
    validated in one packed pass; every member pauses (checkpoints, stops) together."""
    engine, n = pack.engine, len(runs)
    device, labels = engine.device, data.labels
    last_save = runs[0].started
    pack.model.train()
    masks: dict[tuple, Tensor] = {}
    while any(run.result is None for run in runs):
        active = tuple(run.result is None for run in runs)
        xs, ys = [None] * n, [None] * n
        for i, run in enumerate(runs):
            if active[i]:
                idx = run.batch_index()
                xs[i] = train_batch(data, idx, run.generator, device)
                ys[i] = labels[idx].to(device, non_blocking=True)
        live = active.index(True)
        for i in range(n):
            if not active[i]:
                xs[i], ys[i] = torch.zeros_like(xs[live]), torch.zeros_like(ys[live])
        lrs = tuple(run.lr if active[i] else 0.0 for i, run in enumerate(runs))
        losses = pack.step(engine.batch(torch.cat(xs, 1)), torch.stack(ys, 1), lrs, config)
        if masks.get(active) is None:  # built once per set of active members: no copy per step
            masks[active] = torch.tensor(active).to(device, non_blocking=True)
        track(runs[0].tracked, losses, masks[active])  # the pack's trackers: every member's slot
        ended = [i for i, run in enumerate(runs) if active[i] and run.advance()]
        # (a diverged member's slot computes NaN for itself alone; its end_epoch ignores it)
        evaluated, eval_seconds = [None] * n, None
        validate = [i for i in ended if runs[i].due()]
        if len(validate) > 1 or (validate and n == 1):
            started = time.monotonic()
            evaluated = pack.evaluate(data, [run.val_index if i in validate else None for i, run in enumerate(runs)],
                                      config.eval_batch_size)
            eval_seconds = (time.monotonic() - started) / len(validate)  # one packed pass, shared
        for i in ended:
            runs[i].end_epoch(evaluated[i], eval_seconds if evaluated[i] is not None else None)
        unfinished = [run for run in runs if run.result is None]
        if not unfinished:
            break
        seconds_due = (config.checkpoint_every_seconds is not None
                       and time.monotonic() - last_save >= config.checkpoint_every_seconds)
        interrupted = should_stop is not None and bool(should_stop())
        if seconds_due or interrupted:
            for run in unfinished:
                run.pause(interrupted, end_diverged=False)
            last_save = time.monotonic()
