"""The training protocol and the engine: one network on one device, its step, its validation.

What a training needs before any fold runs: the protocol (:class:`TrainConfig`), what a fold
reports (:class:`EpochMetrics`, :class:`FoldResult`), the network built once per device
(:class:`Engine`) and the validation pass of the final model.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..data.augment import eval_batch
from ..data.datasets import ImageData
from ..nn.resnet import build_model
from ..nn.simam import check_e_lambda, set_e_lambda

__all__ = ["TrainConfig", "EpochMetrics", "FoldResult", "Engine", "build_engine", "engine_for", "make_optimizer",
           "cpu_threads", "on_device", "checked_lambda"]

SCHEDULES = ("step", "cosine")


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
                f"give exactly one budget, iterations or epochs; got iterations={self.iterations!r}, "
                f"epochs={self.epochs!r}"
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
            raise ValueError(
                f"milestones must be increasing fractions of the budget in (0, 1), got milestones={self.milestones!r}"
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got device={self.device!r}"
            ) from None

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
    eval_seconds: float | None = None  # the validation pass's seconds (None where the epoch was not evaluated)


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
    score_seconds: float | None = None  # the final model's validation pass (scikit-learn's score time)

    def to_dict(self) -> dict:
        return asdict(self)


class Engine:
    """One network on one device, built (and compiled) once and reused for every lambda and
    fold: lambda is set in place in SimAM's buffers and fresh weights are copied into the
    same parameters, so a compiled graph stays valid.

    Its settings say how networks of its kind run on its device, its own and those built from
    it (packs, :mod:`lambda_search.train.pack`, read them; the engine knows nothing of packs):
    ``dtype``, ``amp``, ``channels_last``, ``compile``, and ``cuda_graphs``, whether a packed
    step is replayed as one CUDA graph (CUDA only). Packs alone read ``cuda_graphs`` (the
    engine's own step is never replayed); it is the engine's all the same, a setting of how this
    device runs, built from the same TrainConfig as the others (:func:`build_engine`).
    """

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
        # a step replayed as one CUDA graph: no launch gaps (packs do, lambda_search.train.pack)
        self.cuda_graphs = cuda and (cuda_graphs is None or bool(cuda_graphs))
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
        # channels last: faster convolutions on GPUs and with oneDNN on CPUs (measured by bench)
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.model = self.fresh(seed=0).to(self.device, dtype)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # compiled on GPUs by default (fused BatchNorm, SimAM and ReLU: about 1.8x the packed
        # images/s on an H200); compiling is lazy, at a network's first call
        self.compile = cuda if compile is None else bool(compile)
        self.forward = torch.compile(self.model) if self.compile else self.model

    def fresh(self, seed: int) -> torch.nn.Module:
        """A new network of the engine's kind with the initial weights of ``seed``, on the CPU in
        float32, lambda 1e-4 (the caller's RNG is left as it was): what every training starts from."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(self.spec["model_name"], self.spec["num_classes"], self.spec["attention"],
                               e_lambda=1e-4, shortcut=self.spec["shortcut"])

    def reset(self, seed: int, e_lambda: float | None) -> None:
        """Initial weights of ``seed`` (as a freshly built model on the CPU) and lambda."""
        with torch.no_grad():
            for own, new in zip(self.model.state_dict().values(), self.fresh(seed).state_dict().values()):
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


# ---------------------------------------------------------------- building and validating


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


def _evaluate(engine: Engine, data: ImageData, index: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Validation accuracy and mean loss of the engine's network on the images ``index``."""
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
