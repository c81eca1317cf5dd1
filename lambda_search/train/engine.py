"""The training protocol and the engine: one network on one device, its step, its validation.

What a training needs before any fold runs: the protocol (:class:`TrainConfig`), what a fold
reports (:class:`EpochMetrics`, :class:`FoldResult`), the network built once per device
(:class:`Engine`) and the validation pass of the final model.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.augment import eval_batch
from ..data.datasets import ImageData
from ..nn.registry import build_model, network_spec
from ..nn.simam import check_e_lambda, set_e_lambda

__all__ = ["EpochMetrics", "FoldResult", "Engine", "build_engine", "engine_for", "make_optimizer",
           "cpu_threads", "on_device", "checked_lambda"]

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
    trained_under: list | None = None  # the numerics it trained under, oldest first (more than one: resumed so)

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
        self.network = network_spec(model_name)  # what it is: its label, whether it packs...
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
    """The engine ``config`` asks for (device, compile, amp, channels last, CUDA graphs): the one way
    an engine is built (``engine_for`` builds through it where none is given, ``Engines`` keeps a
    worker's)."""
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
