"""Train one (lambda, fold) with the paper's protocol; fast on a GPU, exact on a CPU, resumable.

The result is the final model's validation accuracy, never the best epoch's. Training
never imports Optuna: progress goes to a callback, which may ask to stop.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ._augment import eval_batch, train_batch
from ._data import ImageData, dataset_fingerprint
from ._folds import Fold, derive_seed
from ._models import build_model
from ._simam import check_e_lambda, set_e_lambda

__all__ = ["TrainConfig", "EpochMetrics", "FoldResult", "Engine", "build_engine", "make_optimizer", "train_fold",
           "cpu_threads"]

SCHEDULES = ("step", "cosine")
CHECKPOINT_VERSION = 1


def _positive(name, value, kind=numbers.Real, allow_zero=False):
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        what = "an integer" if kind is numbers.Integral else "a finite number"
        raise ValueError(f"{name} must be {what} {rule}, got {name}={value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation protocol. Defaults are the paper's CIFAR protocol: SGD, momentum
    0.9, weight decay 5e-4, lr 0.1, batch 128, lr divided by 10 at 50 % and 75 % of the
    budget (32k and 48k of 64k iterations). Give the budget as ``iterations`` or ``epochs``."""

    iterations: int | None = None
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the budget (step schedule)
    gamma: float = 0.1
    device: str = "cpu"
    amp: bool | None = None  # bfloat16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on
    compile: bool | None = None  # torch.compile; None: on for CUDA
    cuda_graphs: bool | None = None  # a packed step replayed as one CUDA graph; None: on for CUDA
    eval_every: int = 1  # epochs between validation passes; the final model is always evaluated
    eval_batch_size: int = 1024
    checkpoint_every_epochs: int = 1
    checkpoint_every_seconds: float | None = 600.0
    max_device_bytes: int = 8 << 30  # larger data sets stay on the host, batches are copied
    pack: int | str = "auto"  # folds of a point trained at once (lambda_search.train_pack); "auto": measured
    threads: int = 1  # CPU threads of a training on the CPU: PyTorch's kernels round differently with each count

    def __post_init__(self) -> None:
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError(
                f"give exactly one budget, iterations or epochs; got iterations={self.iterations!r}, epochs={self.epochs!r}"
            )
        if self.iterations is not None:
            _positive("iterations", self.iterations, numbers.Integral)
        if self.epochs is not None:
            _positive("epochs", self.epochs, numbers.Integral)
        for name in ("batch_size", "eval_every", "eval_batch_size", "checkpoint_every_epochs", "max_device_bytes",
                     "threads"):
            _positive(name, getattr(self, name), numbers.Integral)
        _positive("lr", self.lr)
        _positive("momentum", self.momentum, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("gamma", self.gamma)
        if self.checkpoint_every_seconds is not None:
            _positive("checkpoint_every_seconds", self.checkpoint_every_seconds, allow_zero=True)
        if self.pack != "auto":
            _positive("pack", self.pack, numbers.Integral)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got schedule={self.schedule!r}")
        m = tuple(self.milestones)
        if any(not isinstance(x, numbers.Real) or not 0 < x < 1 for x in m) or list(m) != sorted(set(m)):
            raise ValueError(f"milestones must be increasing fractions of the budget in (0, 1), got milestones={self.milestones!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got device={self.device!r}") from None

    def total_iterations(self, n_train: int) -> int:
        return self.iterations if self.iterations is not None else self.epochs * (n_train // self.batch_size)

    def lr_at(self, iteration: int, total: int) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * iteration / total))
        drops = sum(iteration >= round(m * total) for m in self.milestones)
        return self.lr * self.gamma**drops


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based; the last one may be partial when the budget is in iterations
    iteration: int  # iterations done at its end
    lr: float
    train_loss: float  # mean over the epoch's iterations
    val_accuracy: float | None  # None where the epoch was not evaluated
    val_loss: float | None
    seconds: float  # training time since the fold started, resumes included


@dataclass(frozen=True)
class FoldResult:
    """``status``: "completed", "diverged" (a non-finite loss; ``diverged_at_step`` says
    where, and accuracy and loss are None), or "stopped" (the callback asked)."""

    status: str
    val_accuracy: float | None  # fraction in [0, 1] of the final model
    val_loss: float | None
    seconds: float
    iterations: int
    curve: list[EpochMetrics] = field(default_factory=list)
    diverged_at_step: int | None = None
    e_lambda: float | None = None
    seed: int = 0
    fold: str = ""
    resumed_from_iteration: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Engine:
    """One network on one device, built (and compiled) once and reused for every lambda and
    fold: lambda is set in place in SimAM's buffers and fresh weights are copied into the
    same parameters, so a compiled graph stays valid."""

    def __init__(self, model_name: str, num_classes: int, attention: str = "simam", shortcut: str = "B",
                 device: str = "cpu", compile: bool | None = None, amp: bool | None = None,
                 channels_last: bool | None = None, dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool | None = None) -> None:
        self.device = torch.device(device)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got dtype={dtype!r}")
        self.dtype = dtype  # float64: a check of the arithmetic (the CPU kernel is float32 only)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for, but no CUDA device is available")
        self.spec = dict(model_name=model_name, num_classes=num_classes, attention=attention, shortcut=shortcut)
        cuda = self.device.type == "cuda"
        self.amp = cuda if amp is None else bool(amp)
        # packs (lambda_search._pack) replay their whole step as one CUDA graph: no launch gaps
        self.cuda_graphs = cuda and (cuda_graphs is None or bool(cuda_graphs))
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
        # channels last: faster convolutions on GPUs and with oneDNN on CPUs (measured by bench)
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.model = self._fresh(seed=0).to(self.device, dtype)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # compiled on GPUs by default (fused BatchNorm, SimAM and ReLU: about 1.8x the packed
        # images/s on an H200); compiling is lazy, at a network's first call
        self.compile = cuda if compile is None else bool(compile)
        self.forward = torch.compile(self.model) if self.compile else self.model
        self.packs: dict = {}  # pack size -> Pack (lambda_search._pack), built once like the engine

    def _fresh(self, seed: int, e_lambda: float = 1e-4):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(self.spec["model_name"], self.spec["num_classes"], self.spec["attention"],
                               e_lambda=e_lambda, shortcut=self.spec["shortcut"])

    def reset(self, seed: int, e_lambda: float | None) -> None:
        """Initial weights of ``seed`` (as a freshly built model on the CPU) and lambda."""
        with torch.no_grad():
            for own, new in zip(self.model.state_dict().values(), self._fresh(seed).state_dict().values()):
                own.copy_(new)
        if self.spec["attention"] == "simam":
            set_e_lambda(self.model, e_lambda)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        # no cast cache: each weight is used once per step, and a CUDA graph capture needs it off
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False)

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step on the batch (x, y); returns the loss, detached (no host sync)."""
        with self.autocast():
            loss = F.cross_entropy(self.forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()


@contextlib.contextmanager
def cpu_threads(config: TrainConfig):
    """Within the block PyTorch uses ``config.threads`` threads when ``config`` trains on the
    CPU (its reductions, BatchNorm among them, split their sums by thread: each count rounds
    differently, and a training amplifies that), as every training and every timing of a
    study does; elsewhere the block changes nothing."""
    if torch.device(config.device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_optimizer(net: torch.nn.Module, config: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


# ---------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    except OSError as exc:  # a full disk, say: the previous checkpoint stays as it was
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
            warnings.warn(f"ignoring unreadable checkpoint {candidate} ({type(exc).__name__})", stacklevel=3)
            continue
        if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
            warnings.warn(f"ignoring checkpoint {candidate}: not a lambda_search fold checkpoint", stacklevel=3)
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
                      f"another run's (it differs in {', '.join(sorted(differ))}), never adopted", stacklevel=3)
    return found


# ---------------------------------------------------------------- training


def checked_lambda(e_lambda, attention: str) -> float | None:
    if attention == "simam":
        return check_e_lambda(e_lambda)
    if e_lambda is not None:
        raise ValueError(f"e_lambda must be None without attention, got e_lambda={e_lambda!r}")
    return None


def build_engine(config: TrainConfig, model: str, num_classes: int, attention: str, shortcut: str) -> Engine:
    """The engine ``config`` asks for (device, compile, amp, channels last, CUDA graphs)."""
    return Engine(model, num_classes, attention, shortcut, config.device, config.compile, config.amp,
                  config.channels_last, cuda_graphs=config.cuda_graphs)


def engine_for(engine: Engine | None, data: ImageData, config: TrainConfig, model: str, attention: str,
               shortcut: str) -> Engine:
    """``engine`` after checking that it is built for this network, or a new one."""
    if engine is None:
        return build_engine(config, model, data.num_classes, attention, shortcut)
    if engine.spec != dict(model_name=model, num_classes=data.num_classes, attention=attention, shortcut=shortcut):
        raise ValueError(f"the engine was built for {engine.spec}, not for model={model!r}, attention={attention!r}, "
                         f"shortcut={shortcut!r} with {data.num_classes} classes")
    return engine


def on_device(data: ImageData, config: TrainConfig, device: torch.device) -> ImageData:
    """The data set on the training device, unless it is larger than ``config.max_device_bytes``."""
    if data.images.device != device and data.images.numel() <= config.max_device_bytes:
        return data.to(device)
    return data


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


def _evaluate(engine: Engine, data: ImageData, index: torch.Tensor, batch_size: int) -> tuple[float, float]:
    model = engine.forward
    engine.model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=engine.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    labels = data.labels
    with torch.no_grad(), engine.autocast():
        for start in range(0, len(index), batch_size):
            idx = index[start : start + batch_size]
            out = model(engine.batch(eval_batch(data, idx, engine.device))).float()
            y = labels[idx.to(labels.device)].to(engine.device, non_blocking=True)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    engine.model.train()
    return correct.item() / len(index), loss_sum.item() / len(index)


def train_fold(
    data: ImageData,
    fold: Fold,
    e_lambda: float | None,
    config: TrainConfig,
    *,
    model: str = "resnet20",
    attention: str = "simam",
    shortcut: str = "B",
    seed: int = 0,
    engine: Engine | None = None,
    callback: Callable[[EpochMetrics], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    should_stop: Callable[[], bool] | None = None,
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
    step and returns "stopped".

    Example, one fold of the bundled digits (about 10 s on 2 CPU cores)::

        import lambda_search as ls
        data = ls.load_dataset("digits")
        fold = ls.make_folds(data.labels, n_splits=3, seed=0)[0]
        cfg = ls.TrainConfig(epochs=15, batch_size=64, lr=0.05)
        print(ls.train_fold(data, fold, 1e-4, cfg, model="resnet20").val_accuracy)  # about 0.97
    """
    with cpu_threads(config):
        return _train_fold(data, fold, e_lambda, config, model, attention, shortcut, seed, engine, callback,
                           checkpoint, should_stop)


def _train_fold(data, fold, e_lambda, config, model, attention, shortcut, seed, engine, callback, checkpoint,
                should_stop) -> FoldResult:
    e_lambda = checked_lambda(e_lambda, attention)
    engine = engine_for(engine, data, config, model, attention, shortcut)
    device = engine.device
    n_train = len(fold.train)
    if config.batch_size > n_train:
        raise ValueError(f"batch_size={config.batch_size} exceeds the fold's {n_train} training images")
    path = Path(checkpoint) if checkpoint is not None else None
    key = checkpoint_key(data, fold, e_lambda, seed, engine, config, dataset_fingerprint(data)) if path else None
    data = on_device(data, config, device)
    index_device = data.images.device
    train_index = torch.as_tensor(fold.train, device=index_device)
    val_index = torch.as_tensor(fold.val, device=index_device)
    steps_per_epoch = n_train // config.batch_size
    total = config.total_iterations(n_train)

    engine.reset(seed, e_lambda)
    net = engine.model
    optimizer = make_optimizer(net, config)
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 1))

    iteration, curve, seconds_before, resumed_from, payload = 0, [], 0.0, None, None
    if path is not None:
        payload = load_checkpoint(path, key)
        if payload is not None:
            net.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            generator.set_state(payload["generator"])
            iteration, seconds_before = payload["iteration"], payload["seconds"]
            curve = [EpochMetrics(**m) for m in payload["curve"]]
            resumed_from = iteration
    # the running sums of a partial epoch (zero at an epoch's end)
    epoch_loss = torch.full((), payload["epoch_loss"] if resumed_from is not None else 0.0,
                            dtype=torch.float64, device=device)
    epoch_steps = payload["epoch_steps"] if resumed_from is not None else 0

    start = time.monotonic()
    last_save = start

    def elapsed() -> float:
        return seconds_before + time.monotonic() - start

    def save() -> None:
        nonlocal last_save
        save_checkpoint(path, dict(
            version=CHECKPOINT_VERSION, key=key, model=net.state_dict(), optimizer=optimizer.state_dict(),
            generator=generator.get_state(), iteration=iteration, seconds=elapsed(),
            curve=[asdict(m) for m in curve], epoch_loss=epoch_loss.item(), epoch_steps=epoch_steps,
        ))
        last_save = time.monotonic()

    def result(status, accuracy=None, loss=None, diverged_at=None) -> FoldResult:
        return FoldResult(status, accuracy, loss, elapsed(), iteration, list(curve), diverged_at,
                          e_lambda, seed, fold.name, resumed_from)

    # the first non-finite loss, tracked on the device: no host sync inside the step
    step_count = torch.full((), iteration, dtype=torch.int64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    labels = data.labels
    net.train()
    lr = None
    while iteration < total:
        epoch = iteration // steps_per_epoch
        perm = _epoch_permutation(n_train, seed, epoch).to(index_device)
        for b in range(iteration % steps_per_epoch, steps_per_epoch):
            if iteration >= total:
                break
            new_lr = config.lr_at(iteration, total)
            if new_lr != lr:
                lr = new_lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
            idx = train_index[perm[b * config.batch_size : (b + 1) * config.batch_size]]
            x = engine.batch(train_batch(data, idx, generator, device))
            loss = engine.step(optimizer, x, labels[idx].to(device, non_blocking=True))
            step_count += 1
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step_count, first_bad)
            epoch_loss += loss.double()
            epoch_steps += 1
            iteration += 1
            seconds_due = (path is not None and config.checkpoint_every_seconds is not None
                           and time.monotonic() - last_save >= config.checkpoint_every_seconds)
            interrupted = should_stop is not None and iteration < total and should_stop()
            if (seconds_due or interrupted) and iteration % steps_per_epoch:
                if first_bad.item() >= 0:
                    break
                if path is not None:
                    save()
                if interrupted:
                    return result("stopped")
        # end of an epoch, or of the budget
        bad = first_bad.item()
        if bad >= 0:
            return result("diverged", diverged_at=bad)
        epoch_number = math.ceil(iteration / steps_per_epoch)
        evaluate = epoch_number % config.eval_every == 0 or iteration >= total
        accuracy = val_loss = None
        if evaluate:
            accuracy, val_loss = _evaluate(engine, data, val_index, config.eval_batch_size)
        metrics = EpochMetrics(epoch_number, iteration, lr, epoch_loss.item() / max(epoch_steps, 1),
                               accuracy, val_loss, elapsed())
        curve.append(metrics)
        epoch_loss.zero_()
        epoch_steps = 0
        stop = bool(callback(metrics)) if callback is not None else False
        stop = stop or (should_stop is not None and iteration < total and bool(should_stop()))
        if path is not None and (stop or iteration >= total or epoch_number % config.checkpoint_every_epochs == 0):
            save()
        if stop and iteration < total:
            return result("stopped", accuracy, val_loss)

    # the final model (also when resumed from a finished checkpoint)
    if not curve or curve[-1].iteration != iteration or curve[-1].val_accuracy is None:
        accuracy, val_loss = _evaluate(engine, data, val_index, config.eval_batch_size)
    else:
        accuracy, val_loss = curve[-1].val_accuracy, curve[-1].val_loss
    if not math.isfinite(val_loss):
        return result("diverged", diverged_at=iteration)
    return result("completed", accuracy, val_loss)
