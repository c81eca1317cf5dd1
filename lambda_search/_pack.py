"""Packed training: several (lambda, fold) trainings of one network at once, as one network.

P copies of a ResNet become one ResNet whose every layer is P times as wide and grouped:
convolutions with ``groups=P`` (model p owns channel block p), BatchNorm and SimAM per
channel (so per model, each with its own lambda), the classifier a batched matrix product.
Model p reads its own batch (its fold, its batch order, its augmentation) in channel block
p of the input; the loss is the sum of the P models' mean losses, so each model's gradient
is its own loss's; SGD is elementwise, with one learning rate per model. Nothing mixes
between models: each gets the weights and accuracy of its separate training, to float
rounding (tested on the CPU).

One small network on one batch leaves a GPU mostly idle; a pack fills it. Each member keeps
train_fold's checkpoint (a packed run resumes unpacked and the other way round), its own
curve and its own FoldResult.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._augment import eval_batch, train_batch
from ._data import ImageData, dataset_fingerprint
from ._folds import Fold, derive_seed
from ._models import BasicBlock, PadShortcut, ResNet
from ._simam import SimAM, set_e_lambda, simam
from ._train import (CHECKPOINT_VERSION, Engine, EpochMetrics, FoldResult, TrainConfig, _epoch_permutation,
                     _evaluate, checked_lambda, checkpoint_key, cpu_threads, engine_for, load_checkpoint,
                     make_optimizer, on_device, save_checkpoint)

__all__ = ["Pack", "pack_for", "train_pack"]


class _PackedLinear(nn.Module):
    """P linear layers: (B, P*C) -> (B, P, K)."""

    def __init__(self, size: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(size, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(size, out_features))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.size, -1)
        return torch.einsum("bpc,pkc->bpk", x, self.weight) + self.bias


class _PackedPadShortcut(nn.Module):
    """P type-A shortcuts: subsample, zero-pad each model's channel block."""

    def __init__(self, size: int, shortcut: PadShortcut) -> None:
        super().__init__()
        self.size, self.stride, self.pad = size, shortcut.stride, shortcut.pad

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        b, _, h, w = x.shape
        return F.pad(x.reshape(b, self.size, -1, h, w), self.pad).reshape(b, -1, h, w)


class _ChannelSimAM(nn.Module):
    """SimAM with one lambda per channel: model p's lambda on its channel block."""

    fuses_with_batch_norm = True

    def __init__(self, size: int, channels: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("e_lambda", torch.full((size * channels,), 1e-4), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return simam(x, self.e_lambda)


def _packed(module: nn.Module, size: int) -> nn.Module:
    """The P-wide, grouped equivalent of one layer of a network (its children converted too)."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(size * module.in_channels, size * module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, size * module.groups, module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(size * module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
    if isinstance(module, nn.Linear):
        return _PackedLinear(size, module.in_features, module.out_features)
    if isinstance(module, PadShortcut):
        return _PackedPadShortcut(size, module)
    if isinstance(module, SimAM):
        raise TypeError("a SimAM layer is packed with its block (it needs the channel count)")
    if not isinstance(module, (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Sequential,
                               BasicBlock, ResNet)):
        raise TypeError(f"cannot pack a {type(module).__name__} layer")
    width = module.conv2.out_channels if isinstance(module, BasicBlock) else None  # before conv2 is packed
    for name, child in list(module.named_children()):
        if isinstance(module, BasicBlock) and name == "attn" and isinstance(child, SimAM):
            setattr(module, name, _ChannelSimAM(size, width))
        else:
            setattr(module, name, _packed(child, size))
    return module


class Pack:
    """P networks of ``engine``'s kind as one, on its device, with SGD (momentum, weight
    decay, Nesterov as torch.optim.SGD) at one learning rate per network."""

    def __init__(self, engine: Engine, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"pack size must be an integer >= 1, got size={size!r}")
        self.engine, self.size = engine, size
        template = engine._fresh(seed=0)
        self.names = list(template.state_dict())
        self.model = _packed(copy.deepcopy(template), size).to(engine.device, engine.dtype)
        if engine.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if engine.compile else self.model
        self.params = list(self.model.parameters())
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self._lrs: tuple | None = None
        # minus each network's learning rate, per parameter element: updated in place, so a
        # captured CUDA graph reads the current rates
        self._neg_lr = [torch.zeros_like(p) for p in self.params]
        self._simam = [m for m in self.model.modules() if isinstance(m, _ChannelSimAM)]
        self._graph = None  # (key, torch.cuda.CUDAGraph, static x, static y, static losses)

    # ------------------------------------------------------------ members' state

    def _split(self, name: str, value: Tensor, p: int) -> Tensor:
        if value.dim() == 0:
            return value
        if isinstance(self.model.get_submodule(name.rsplit(".", 1)[0]), _PackedLinear):
            return value[p]
        return value.chunk(self.size, dim=0)[p]

    def load(self, p: int, state: dict, momentum: list[Tensor] | None, e_lambda: float | None) -> None:
        """Put one network (a train_fold state dict, its SGD momentum buffers) in slot ``p``."""
        own = self.model.state_dict()
        with torch.no_grad():
            for name in self.names:
                if own[name].dim() > 0:
                    self._split(name, own[name], p).copy_(state[name])
            for i, name in enumerate(self.param_names):
                target = self._split(name, self.momentum[i], p)
                target.copy_(momentum[i]) if momentum is not None else target.zero_()
        if e_lambda is not None:
            for layer in self._simam:
                layer.e_lambda.view(self.size, -1)[p].fill_(e_lambda)

    def state(self, p: int, iteration: int) -> dict:
        """Slot ``p`` as a train_fold state dict (BatchNorm's batch counters at ``iteration``)."""
        out = {}
        for name, value in self.model.state_dict().items():
            out[name] = (torch.tensor(iteration, dtype=value.dtype) if value.dim() == 0
                         else self._split(name, value, p).detach().clone())
        return out

    def optimizer_state(self, p: int, iteration: int, lr: float, config: TrainConfig) -> dict:
        """Slot ``p``'s SGD state in torch.optim.SGD's format, as train_fold saves it."""
        net = self.engine.model
        net.load_state_dict(self.state(p, iteration))
        optimizer = make_optimizer(net, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if config.momentum != 0 and iteration > 0:
            for param, name, buf in zip(net.parameters(), self.param_names, self.momentum):
                optimizer.state[param]["momentum_buffer"] = self._split(name, buf, p).detach().clone()
        return optimizer.state_dict()

    # ------------------------------------------------------------ training

    def _set_lrs(self, lrs: tuple[float, ...]) -> None:
        if lrs == self._lrs:
            return
        self._lrs = lrs
        neg = -torch.tensor(lrs, dtype=torch.float64).to(self.engine.device, non_blocking=True)
        with torch.no_grad():
            for param, target in zip(self.params, self._neg_lr):
                per = neg.repeat_interleave(param.shape[0] // self.size) if param.shape[0] != self.size else neg
                target.copy_(per.view(-1, *[1] * (param.dim() - 1)).expand_as(param))

    def _step(self, x: Tensor, y: Tensor, config: TrainConfig) -> Tensor:
        """Forward, backward and SGD at the rates in ``self._neg_lr``; the P losses."""
        with self.engine.autocast():
            out = self.forward(x)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        losses = F.cross_entropy(out.permute(0, 2, 1), y, reduction="none").mean(0)
        for param in self.params:
            param.grad = None
        losses.sum().backward()
        with torch.no_grad():
            grads = [param.grad for param in self.params]
            d = torch._foreach_add(grads, self.params, alpha=config.weight_decay) if config.weight_decay else grads
            if config.momentum != 0:
                torch._foreach_mul_(self.momentum, config.momentum)
                torch._foreach_add_(self.momentum, d)
                d = torch._foreach_add(d, self.momentum, alpha=config.momentum) if config.nesterov else self.momentum
            torch._foreach_addcmul_(self.params, self._neg_lr, d)
        return losses.detach()

    def _capture(self, x: Tensor, y: Tensor, config: TrainConfig, key: tuple) -> None:
        """Record the step as a CUDA graph (after warm-up steps on a side stream, which also
        compile and let cuDNN pick its algorithms); the networks' state is restored after."""
        self._graph = None
        state = [t.detach().clone() for t in [*self.model.state_dict().values(), *self.momentum]]
        static_x, static_y = x.clone(memory_format=torch.preserve_format), y.clone()
        side = torch.cuda.Stream(self.engine.device)
        side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(static_x, static_y, config)
        torch.cuda.current_stream(self.engine.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self._step(static_x, static_y, config)
        with torch.no_grad():
            for own, saved in zip([*self.model.state_dict().values(), *self.momentum], state):
                own.copy_(saved)
        self._graph = (key, graph, static_x, static_y, losses)

    def step(self, x: Tensor, y: Tensor, lrs: tuple[float, ...], config: TrainConfig) -> Tensor:
        """One SGD step of every network: ``x`` (B, P*C, H, W), ``y`` (B, P). Returns the P
        losses, detached (no host sync). On CUDA (``engine.cuda_graphs``) the step is captured
        once per input shape and optimiser setting and replayed."""
        self._set_lrs(lrs)
        if not self.engine.cuda_graphs:
            return self._step(x, y, config)
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), config.weight_decay, config.momentum,
               config.nesterov)
        if self._graph is None or self._graph[0] != key:
            self._capture(x, y, config, key)
        _, graph, static_x, static_y, losses = self._graph
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return losses.clone()

    def evaluate(self, data: ImageData, indices: list[Tensor | None], batch_size: int) -> list[tuple[float, float] | None]:
        """Validation accuracy and mean loss of the networks given an index (None: skipped),
        as train_fold computes them, in one pass of the packed network in eval mode; each
        network reads its own images (a shorter validation set is padded and masked)."""
        device = self.engine.device
        todo = [i for i, idx in enumerate(indices) if idx is not None]
        correct = torch.zeros(self.size, dtype=torch.int64, device=device)
        loss_sum = torch.zeros(self.size, dtype=torch.float64, device=device)
        longest = max(len(indices[i]) for i in todo)
        self.model.eval()
        with torch.no_grad(), self.engine.autocast():
            for start in range(0, longest, batch_size):
                # compiled: the last batch padded too (one shape, one graph)
                rows = batch_size if self.engine.compile else min(batch_size, longest - start)
                xs, ys = [None] * self.size, {}
                for i in todo:
                    idx = indices[i][start:start + rows]
                    if len(idx):
                        x = eval_batch(data, idx, device)
                        xs[i] = torch.cat([x, x.new_zeros(rows - len(idx), *x.shape[1:])]) if len(idx) < rows else x
                        ys[i] = data.labels[idx.to(data.labels.device)].to(device, non_blocking=True)
                filler = next(x for x in xs if x is not None)
                x = torch.cat([x if x is not None else torch.zeros_like(filler) for x in xs], 1)
                out = self.forward(self.engine.batch(x)).float()  # (rows, P, K)
                for i, y in ys.items():
                    mine = out[: len(y), i]
                    loss_sum[i] += F.cross_entropy(mine, y, reduction="sum").double()
                    correct[i] += (mine.argmax(1) == y).sum()
        self.model.train()
        correct, loss_sum = correct.tolist(), loss_sum.tolist()
        return [(correct[i] / len(indices[i]), loss_sum[i] / len(indices[i])) if i in todo else None
                for i in range(self.size)]


def pack_for(engine: Engine, size: int) -> Pack:
    """The engine's pack of ``size`` networks, built once (and compiled once) per engine."""
    if size not in engine.packs:
        engine.packs[size] = Pack(engine, size)
    return engine.packs[size]


@dataclass
class _Member:
    """One (lambda, fold) training inside a pack: what train_fold keeps in local variables."""

    fold: Fold
    e_lambda: float | None
    seed: int
    key: dict
    path: Path | None
    train_index: Tensor
    val_index: Tensor
    steps_per_epoch: int
    total: int
    generator: torch.Generator
    iteration: int = 0
    seconds_before: float = 0.0
    resumed_from: int | None = None
    epoch_steps: int = 0
    curve: list = field(default_factory=list)
    perm: Tensor | None = None
    perm_epoch: int = -1
    epoch_loss: float = 0.0  # a partial epoch's loss sum, from the checkpoint
    result: FoldResult | None = None


def train_pack(
    data: ImageData,
    folds: list[Fold],
    e_lambdas: list[float | None],
    config: TrainConfig,
    *,
    seeds: list[int],
    model: str = "resnet20",
    attention: str = "simam",
    shortcut: str = "B",
    engine: Engine | None = None,
    callback: Callable[[int, EpochMetrics], bool | None] | None = None,
    checkpoints: list[str | os.PathLike | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[FoldResult]:
    """Train ``len(folds)`` (lambda, fold) pairs at once as one packed network; what
    :func:`train_fold` does for each, with the same results to float rounding.

    Member i trains on ``folds[i]`` with ``e_lambdas[i]`` and ``seeds[i]``, and has its own
    checkpoint ``checkpoints[i]`` in train_fold's format (either resumes from the other's).
    ``callback(i, metrics)`` runs after each of member i's epochs; True stops member i. When
    ``should_stop()`` answers True, every unfinished member saves its checkpoint and stops.
    A member that diverges ends "diverged" and the others go on. Returns the members'
    FoldResults in order; ``seconds`` of each is the pack's wall time.
    """
    with cpu_threads(config):
        return _train_pack(data, folds, e_lambdas, config, seeds, model, attention, shortcut, engine, callback,
                           checkpoints, should_stop)


def _train_pack(data, folds, e_lambdas, config, seeds, model, attention, shortcut, engine, callback, checkpoints,
                should_stop) -> list[FoldResult]:
    n = len(folds)
    if n < 1 or len(e_lambdas) != n or len(seeds) != n or (checkpoints is not None and len(checkpoints) != n):
        raise ValueError(f"train_pack needs one lambda, seed (and checkpoint) per fold; got {n} folds, "
                         f"{len(e_lambdas)} lambdas, {len(seeds)} seeds")
    e_lambdas = [checked_lambda(v, attention) for v in e_lambdas]
    engine = engine_for(engine, data, config, model, attention, shortcut)
    device = engine.device
    for fold in folds:
        if config.batch_size > len(fold.train):
            raise ValueError(f"batch_size={config.batch_size} exceeds fold {fold.name}'s {len(fold.train)} training images")
    checkpointed = checkpoints is not None and any(c is not None for c in checkpoints)
    data_key = dataset_fingerprint(data) if checkpointed else None
    data = on_device(data, config, device)
    index_device = data.images.device
    pack = pack_for(engine, n)

    members = []
    for i, (fold, lam, seed) in enumerate(zip(folds, e_lambdas, seeds)):
        path = Path(checkpoints[i]) if checkpoints is not None and checkpoints[i] is not None else None
        spe = len(fold.train) // config.batch_size
        m = _Member(fold, lam, seed, checkpoint_key(data, fold, lam, seed, engine, config, data_key), path,
                    torch.as_tensor(fold.train, device=index_device), torch.as_tensor(fold.val, device=index_device),
                    spe, config.total_iterations(len(fold.train)),
                    torch.Generator(device=device).manual_seed(derive_seed(seed, 1)))
        payload = load_checkpoint(path, m.key) if path is not None else None
        if payload is None:
            pack.load(i, engine._fresh(seed).state_dict(), None, lam)
        else:
            momentum = [payload["optimizer"]["state"].get(j, {}).get("momentum_buffer") for j in
                        range(len(pack.params))]
            pack.load(i, payload["model"], None if any(b is None for b in momentum) else momentum, lam)
            m.generator.set_state(payload["generator"])
            m.iteration, m.seconds_before = payload["iteration"], payload["seconds"]
            m.curve = [EpochMetrics(**c) for c in payload["curve"]]
            m.resumed_from, m.epoch_steps, m.epoch_loss = m.iteration, payload["epoch_steps"], payload["epoch_loss"]
        members.append(m)

    epoch_loss = torch.tensor([m.epoch_loss for m in members], dtype=torch.float64, device=device)
    step_count = torch.tensor([m.iteration for m in members], dtype=torch.int64, device=device)
    first_bad = torch.full((n,), -1, dtype=torch.int64, device=device)
    labels = data.labels
    start = time.monotonic()
    last_save = start

    def elapsed(m: _Member) -> float:
        return m.seconds_before + time.monotonic() - start

    def lr_of(m: _Member) -> float:  # of the next step
        return config.lr_at(m.iteration, m.total)

    def last_lr(m: _Member) -> float:  # of the step just taken (train_fold's ``lr``)
        return config.lr_at(max(m.iteration - 1, 0), m.total)

    def save(i: int) -> None:
        m = members[i]
        save_checkpoint(m.path, dict(
            version=CHECKPOINT_VERSION, key=m.key, model=pack.state(i, m.iteration),
            optimizer=pack.optimizer_state(i, m.iteration, last_lr(m), config),
            generator=m.generator.get_state(), iteration=m.iteration, seconds=elapsed(m),
            curve=[asdict(c) for c in m.curve], epoch_loss=epoch_loss[i].item(), epoch_steps=m.epoch_steps))

    def finish(i: int, status: str, accuracy=None, loss=None, diverged_at=None) -> None:
        m = members[i]
        m.result = FoldResult(status, accuracy, loss, elapsed(m), m.iteration, list(m.curve), diverged_at,
                              m.e_lambda, m.seed, m.fold.name, m.resumed_from)

    def evaluate(i: int) -> tuple[float, float]:
        m = members[i]
        engine.model.load_state_dict(pack.state(i, m.iteration))
        if m.e_lambda is not None:
            set_e_lambda(engine.model, m.e_lambda)
        return _evaluate(engine, data, m.val_index, config.eval_batch_size)

    def due(i: int) -> bool:
        """Whether member i's epoch that just ended is evaluated."""
        m = members[i]
        return math.ceil(m.iteration / m.steps_per_epoch) % config.eval_every == 0 or m.iteration >= m.total

    def end_epoch(i: int, evaluated: tuple[float, float] | None) -> None:
        """train_fold's end of an epoch (or of the budget) for member i (``evaluated``: its
        validation accuracy and loss where due, from a packed pass)."""
        m = members[i]
        bad = first_bad[i].item()
        if bad >= 0:
            return finish(i, "diverged", diverged_at=bad)
        epoch_number = math.ceil(m.iteration / m.steps_per_epoch)
        accuracy = val_loss = None
        if due(i):
            accuracy, val_loss = evaluated if evaluated is not None else evaluate(i)
        metrics = EpochMetrics(epoch_number, m.iteration, last_lr(m), epoch_loss[i].item() / max(m.epoch_steps, 1),
                               accuracy, val_loss, elapsed(m))
        m.curve.append(metrics)
        epoch_loss[i] = 0.0
        m.epoch_steps = 0
        stop = bool(callback(i, metrics)) if callback is not None else False
        stop = stop or (should_stop is not None and m.iteration < m.total and bool(should_stop()))
        if m.path is not None and (stop or m.iteration >= m.total or epoch_number % config.checkpoint_every_epochs == 0):
            save(i)
        if stop and m.iteration < m.total:
            return finish(i, "stopped", accuracy, val_loss)
        if m.iteration >= m.total:
            if not math.isfinite(val_loss):
                return finish(i, "diverged", diverged_at=m.iteration)
            finish(i, "completed", accuracy, val_loss)

    # members resumed from a finished checkpoint, or at an epoch's end without its evaluation
    for i, m in enumerate(members):
        if m.iteration >= m.total:
            c = m.curve[-1] if m.curve else None
            if c is None or c.iteration != m.iteration or c.val_accuracy is None:
                accuracy, val_loss = evaluate(i)
            else:
                accuracy, val_loss = c.val_accuracy, c.val_loss
            if math.isfinite(val_loss):
                finish(i, "completed", accuracy, val_loss)
            else:
                finish(i, "diverged", diverged_at=m.iteration)

    pack.model.train()
    masks: dict[tuple, Tensor] = {}
    while any(m.result is None for m in members):
        active = [m.result is None for m in members]
        xs, ys = [None] * n, [None] * n
        for i, m in enumerate(members):
            if active[i]:
                epoch, b = divmod(m.iteration, m.steps_per_epoch)
                if m.perm_epoch != epoch:
                    m.perm, m.perm_epoch = _epoch_permutation(len(m.fold.train), m.seed, epoch).to(index_device), epoch
                idx = m.train_index[m.perm[b * config.batch_size: (b + 1) * config.batch_size]]
                xs[i] = train_batch(data, idx, m.generator, device)
                ys[i] = labels[idx].to(device, non_blocking=True)
        live = active.index(True)
        for i in range(n):  # a finished member computes on zeros at learning rate 0 until the pack ends
            if not active[i]:
                xs[i], ys[i] = torch.zeros_like(xs[live]), torch.zeros_like(ys[live])
        lrs = tuple(lr_of(m) if active[i] else 0.0 for i, m in enumerate(members))
        losses = pack.step(engine.batch(torch.cat(xs, 1)), torch.stack(ys, 1), lrs, config)
        if masks.get(tuple(active)) is None:  # built once per set of active members: no copy per step
            masks[tuple(active)] = torch.tensor(active).to(device, non_blocking=True)
        mask = masks[tuple(active)]
        step_count += mask
        first_bad = torch.where(mask & (first_bad < 0) & ~torch.isfinite(losses), step_count, first_bad)
        epoch_loss += torch.where(mask, losses.double(), 0.0)
        ended = []
        for i, m in enumerate(members):
            if active[i]:
                m.iteration += 1
                m.epoch_steps += 1
                if m.iteration % m.steps_per_epoch == 0 or m.iteration >= m.total:
                    ended.append(i)
        # members whose epochs end together (equal folds) are evaluated in one packed pass (a
        # diverged member's slot computes NaN for itself alone; end_epoch ignores it)
        evaluated = [None] * n
        validate = [i for i in ended if due(i)]
        if len(validate) > 1 or (validate and n == 1):
            evaluated = pack.evaluate(data, [m.val_index if i in validate else None for i, m in enumerate(members)],
                                      config.eval_batch_size)
        for i in ended:
            end_epoch(i, evaluated[i])
        unfinished = [i for i, m in enumerate(members) if m.result is None]
        if not unfinished:
            break
        seconds_due = (config.checkpoint_every_seconds is not None
                       and time.monotonic() - last_save >= config.checkpoint_every_seconds)
        interrupted = should_stop is not None and bool(should_stop())
        if seconds_due or interrupted:
            bad = first_bad.tolist()
            for i in unfinished:
                m = members[i]
                if bad[i] >= 0:
                    if interrupted:
                        finish(i, "diverged", diverged_at=bad[i])
                    continue
                if m.path is not None:
                    save(i)
                if interrupted:
                    finish(i, "stopped")
            last_save = time.monotonic()
    return [m.result for m in members]

