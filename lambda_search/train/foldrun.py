"""One fold's training as a state machine, shared by train_fold and every member of train_pack.

A :class:`FoldRun` owns what a (lambda, fold) training keeps between steps: its iteration,
curve, clock, partial epoch, generator and checkpoint, and its transitions: resume from a
checkpoint, the checkpoint's payload, the end of an epoch (metrics, evaluation, callback,
save, stop), a pause inside an epoch, and the final model's result. Who runs the steps (one
network, or a pack of them) gives it the model's state and the validation as callables.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..config import TrainConfig
from ..data.datasets import ImageData
from ..data.folds import Fold, derive_seed
from .engine import Engine, EpochMetrics, FoldResult

__all__ = ["CHECKPOINT_VERSION", "FoldRun", "checkpoint_key", "load_checkpoint", "save_checkpoint", "set_aside",
           "track", "trackers"]

CHECKPOINT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: BaseException | None) -> OSError | None:
    """``exc``, or the OSError it wraps (torch.save reports a failed write as a RuntimeError)."""
    for _ in range(10):
        if exc is None or isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (temporary file, fsync, rename); the previous file is kept as .prev."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, say: the previous checkpoint stays as it was
        tmp.unlink(missing_ok=True)
        failed = _os_error(exc)
        if failed is None:
            raise
        raise OSError(failed.errno, failed.strerror, str(path)) from exc  # the checkpoint named, not its tmp file
    _fsync_dir(path.parent)


def set_aside(path: Path) -> Path:
    """Rename ``path`` (a checkpoint file or folder that is not this run's) out of the way,
    to ``<name>.stale-N``: kept, never adopted. Returns the new path."""
    n = 1
    while path.with_name(f"{path.name}.stale-{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.stale-{n}")
    os.replace(path, target)
    return target


def load_checkpoint(path: Path, key: dict) -> dict | None:
    """The newest readable checkpoint of this run (``key`` must match), or None. A checkpoint
    of another run (another lambda, seed, fold, data set or protocol) is never adopted: it
    is set aside (renamed ``.stale-N``) with one warning, and the training starts afresh."""
    aside, differ, found = [], set(), None
    for candidate in (path, path.with_name(path.name + ".prev")):
        if not candidate.exists():
            continue
        try:
            payload = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or corrupt: fall back to the previous one
            warnings.warn(f"ignoring unreadable checkpoint {candidate} ({type(exc).__name__})", stacklevel=4)
            continue
        if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
            warnings.warn(f"ignoring checkpoint {candidate}: not a lambda_search fold checkpoint", stacklevel=4)
            continue
        if payload.get("key") != key:
            other = payload["key"] if isinstance(payload.get("key"), dict) else {}
            differ |= {k for k in set(key) | set(other) if key.get(k) != other.get(k)}
            aside.append(f"{candidate.name} as {set_aside(candidate).name}")
            continue
        found = payload
        break
    if aside:
        warnings.warn(f"set aside checkpoint {path.parent / aside[0]}{''.join(f', {a}' for a in aside[1:])}: "
                      f"another run's (it differs in {', '.join(sorted(differ))}), never adopted", stacklevel=4)
    return found


def checkpoint_key(data: ImageData, fold: Fold, e_lambda: float | None, seed: int, engine: Engine,
                   config: TrainConfig, data_key: str) -> dict:
    """What a fold checkpoint must match to be resumed: the run (``data_key``: the data set's
    fingerprint, its content), not where or how fast it runs, nor its numerics (a study fixes
    those; a fold resumed under others records them)."""
    key = dict(e_lambda=e_lambda, seed=seed, fold=fold.name, fold_seed=fold.seed, n_train=len(fold.train),
               n_val=len(fold.val), data=data.name, n_data=len(data), data_fingerprint=data_key, **engine.spec,
               config={k: v for k, v in asdict(config).items()
                       if k not in ("device", "compile", "cuda_graphs", "eval_batch_size", "checkpoint_every_epochs",
                                    "checkpoint_every_seconds", "max_device_bytes", "pack", "threads")})
    key["config"]["milestones"] = list(config.milestones)
    return key


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, 2, epoch))
    return torch.randperm(n, generator=g)



# ---------------------------------------------------------------- one fold's state


def trackers(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``size`` folds trained together track on the device, without a host sync per step:
    each one's partial epoch's loss sum (float64), its steps taken, its first non-finite step
    (-1: none). A :class:`FoldRun` reads its own slot."""
    return (torch.zeros(size, dtype=torch.float64, device=device), torch.zeros(size, dtype=torch.int64, device=device),
            torch.full((size,), -1, dtype=torch.int64, device=device))


def track(tracked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], losses: torch.Tensor,
          mask: torch.Tensor | None = None) -> None:
    """Add one step's losses (one per fold, or one for all) to ``tracked``; with ``mask``,
    only for the folds it marks (the others took no step)."""
    loss_sum, steps, first_bad = tracked
    if mask is None:
        steps += 1
        first_bad.copy_(torch.where((first_bad < 0) & ~torch.isfinite(losses), steps, first_bad))
        loss_sum += losses.double()
    else:
        steps += mask
        first_bad.copy_(torch.where(mask & (first_bad < 0) & ~torch.isfinite(losses), steps, first_bad))
        loss_sum += torch.where(mask, losses.double(), 0.0)


class FoldRun:
    """One (lambda, fold) training between its steps, as train_fold runs it: the batches it
    reads, its learning rate, what it saves and when it ends. ``weights(run)`` gives the
    model's and the optimiser's state dicts in train_fold's format (for a checkpoint),
    ``evaluate(run)`` the current model's validation accuracy and mean loss.
    ``result`` is None until the run ends."""

    def __init__(self, fold: Fold, e_lambda: float | None, seed: int, config: TrainConfig, *,
                 path: Path | None, key: dict | None, device: torch.device, index_device: torch.device,
                 tracked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], slot: int,
                 weights: Callable[[FoldRun], tuple[dict, dict]], evaluate: Callable[[FoldRun], tuple[float, float]],
                 callback: Callable[[EpochMetrics], bool | None] | None = None,
                 should_stop: Callable[[], bool] | None = None, numerics: dict | None = None) -> None:
        self.fold, self.e_lambda, self.seed, self.config = fold, e_lambda, seed, config
        self.path, self.key = path, key
        self.weights, self.evaluate, self.callback, self.should_stop = weights, evaluate, callback, should_stop
        self.train_index = torch.as_tensor(fold.train, device=index_device)
        self.val_index = torch.as_tensor(fold.val, device=index_device)
        self.steps_per_epoch = len(fold.train) // config.batch_size
        self.total = config.total_iterations(len(fold.train))
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 1))
        self.tracked = tracked
        self.loss_sum, self.steps, self.first_bad = (t[slot] for t in tracked)  # views of this fold's slot
        self.iteration, self.curve, self.seconds_before, self.resumed_from = 0, [], 0.0, None
        self.epoch_steps = 0  # steps of the partial epoch (zero at an epoch's end)
        self.started = self.last_save = time.monotonic()
        self.result: FoldResult | None = None
        # the numerics it trains under, oldest first: its checkpoint's, then this run's where they differ
        self.trained_under = None if numerics is None else [numerics]
        self._perm, self._perm_epoch = None, -1

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> dict | None:
        """The run's checkpoint, if it has one: its state taken over (the caller loads the
        payload's "model" and "optimizer"), the payload returned."""
        payload = load_checkpoint(self.path, self.key) if self.path is not None else None
        if payload is not None:
            self.generator.set_state(payload["generator"])
            self.iteration, self.seconds_before = payload["iteration"], payload["seconds"]
            self.curve = [EpochMetrics(**m) for m in payload["curve"]]
            self.resumed_from = self.iteration
            before = json.loads(payload.get("trained_under") or "null")  # (none in one made before they were kept)
            if before and self.trained_under:
                self.trained_under = before + ([] if before[-1] == self.trained_under[0] else self.trained_under)
            self.loss_sum.fill_(payload["epoch_loss"])
            self.epoch_steps = payload["epoch_steps"]
            self.steps.fill_(self.iteration)
        return payload

    def begin(self, now: float) -> None:
        """Start the clock (the fold's seconds go on from its checkpoint's)."""
        self.started = self.last_save = now

    def elapsed(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def payload(self) -> dict:
        """The checkpoint: this run's key, model, optimiser, generator, clock, curve and partial epoch."""
        model, optimizer = self.weights(self)
        return dict(version=CHECKPOINT_VERSION, key=self.key, model=model, optimizer=optimizer,
                    generator=self.generator.get_state(), iteration=self.iteration, seconds=self.elapsed(),
                    curve=[asdict(m) for m in self.curve], epoch_loss=self.loss_sum.item(),
                    epoch_steps=self.epoch_steps, trained_under=json.dumps(self.trained_under))  # (as stored: JSON)

    def save(self) -> None:
        save_checkpoint(self.path, self.payload())
        self.last_save = time.monotonic()

    # ------------------------------------------------------------ steps

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.config.lr_at(self.iteration, self.total)

    @property
    def last_lr(self) -> float:
        """The learning rate of the step just taken."""
        return self.config.lr_at(max(self.iteration - 1, 0), self.total)

    def batch_index(self) -> torch.Tensor:
        """The images of the next step: its epoch's permutation of the fold, batch by batch."""
        epoch, b = divmod(self.iteration, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = _epoch_permutation(len(self.fold.train), self.seed, epoch).to(self.train_index.device)
            self._perm_epoch = epoch
        size = self.config.batch_size
        return self.train_index[self._perm[b * size : (b + 1) * size]]

    def advance(self) -> bool:
        """Count a step taken (its loss tracked on the device); whether it ended an epoch (or the budget)."""
        self.iteration += 1
        self.epoch_steps += 1
        return self.iteration % self.steps_per_epoch == 0 or self.iteration >= self.total

    def due(self) -> bool:
        """Whether the epoch that just ended is evaluated (the last one always is)."""
        epoch_number = math.ceil(self.iteration / self.steps_per_epoch)
        return epoch_number % self.config.eval_every == 0 or self.iteration >= self.total

    # ------------------------------------------------------------ transitions

    def finish(self, status: str, accuracy=None, loss=None, diverged_at=None, score_seconds=None) -> FoldResult:
        self.result = FoldResult(status, accuracy, loss, self.elapsed(), self.iteration, list(self.curve),
                                 diverged_at, self.e_lambda, self.seed, self.fold.name, self.resumed_from,
                                 score_seconds, self.trained_under)
        return self.result

    def _timed_evaluate(self) -> tuple[float, float, float]:
        """(accuracy, loss, seconds) of one validation pass of the model as it is."""
        started = time.monotonic()
        accuracy, loss = self.evaluate(self)
        return accuracy, loss, time.monotonic() - started

    def end_epoch(self, evaluated: tuple[float, float] | None = None,
                  eval_seconds: float | None = None) -> FoldResult | None:
        """The end of an epoch, or of the budget: "diverged" where a loss was not finite; else
        its metrics (validated where due: ``evaluated``, or ``evaluate``) go to the curve and
        the callback, the checkpoint is saved where due, and the run ends "stopped" (the
        callback or should_stop asked), "completed" or "diverged" (the budget spent), or goes
        on (None)."""
        bad = self.first_bad.item()
        if bad >= 0:
            return self.finish("diverged", diverged_at=bad)
        config = self.config
        epoch_number = math.ceil(self.iteration / self.steps_per_epoch)
        accuracy = val_loss = None
        if self.due():
            if evaluated is None:
                accuracy, val_loss, eval_seconds = self._timed_evaluate()
            else:
                accuracy, val_loss = evaluated
        else:
            eval_seconds = None
        metrics = EpochMetrics(epoch_number, self.iteration, self.last_lr,
                               self.loss_sum.item() / max(self.epoch_steps, 1), accuracy, val_loss, self.elapsed(),
                               eval_seconds)
        self.curve.append(metrics)
        self.loss_sum.zero_()
        self.epoch_steps = 0
        going = self.iteration < self.total
        stop = bool(self.callback(metrics)) if self.callback is not None else False
        stop = stop or (self.should_stop is not None and going and bool(self.should_stop()))
        if self.path is not None and (stop or not going or epoch_number % config.checkpoint_every_epochs == 0):
            self.save()
        if stop and going:
            return self.finish("stopped", accuracy, val_loss)
        return None if going else self.final()

    def pause(self, interrupted: bool, end_diverged: bool) -> FoldResult | None:
        """A checkpoint inside an epoch (the clock's, or should_stop's: ``interrupted``). A run
        whose loss was not finite is not saved: it ends "diverged" when interrupted or
        ``end_diverged``, else it trains on to its epoch's end. Any other is saved (where it
        has a checkpoint) and ends "stopped" when interrupted."""
        bad = self.first_bad.item()
        if bad >= 0:
            return self.finish("diverged", diverged_at=bad) if interrupted or end_diverged else None
        if self.path is not None:
            self.save()
        return self.finish("stopped") if interrupted else None

    def final(self) -> FoldResult:
        """The end of the budget (also a run resumed from a finished checkpoint): the final
        model's accuracy and loss, evaluated unless the curve's last epoch has them."""
        last = self.curve[-1] if self.curve else None
        if last is None or last.iteration != self.iteration or last.val_accuracy is None:
            accuracy, val_loss, seconds = self._timed_evaluate()
        else:
            accuracy, val_loss, seconds = last.val_accuracy, last.val_loss, last.eval_seconds
        if not math.isfinite(val_loss):
            return self.finish("diverged", diverged_at=self.iteration)
        return self.finish("completed", accuracy, val_loss, score_seconds=seconds)
