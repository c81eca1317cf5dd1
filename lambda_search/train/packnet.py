"""The packed network: P networks of one kind as one network, P times as wide and grouped.

P copies of a ResNet become one ResNet whose every layer is P times as wide and grouped:
convolutions with ``groups=P`` (model p owns channel block p), BatchNorm and SimAM per
channel (so per model, each with its own lambda), the classifier a batched matrix product.
Model p reads its own batch in channel block p of the input. :class:`PackedNet` puts one
network's state into slot p and takes it out again; :func:`packed_evaluate` validates the
networks in one pass.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import eval_batch
from ..data.datasets import ImageData
from ..nn.resnet import BasicBlock, PadShortcut, ResNet
from ..nn.simam import SimAM
from .engine import Engine

__all__ = ["PackedNet", "packed_evaluate"]


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


class _ChannelSimAM(SimAM):
    """SimAM with one lambda per channel: model p's lambda on its channel block. A SimAM, so that
    the block's SimAMBatchNorm fuses the two on the CPU as it does for one network."""

    def __init__(self, size: int, channels: int) -> None:
        super().__init__()
        self.size = size
        # replaces SimAM's one lambda
        self.register_buffer("e_lambda", torch.full((size * channels,), 1e-4), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.e_lambda.numel()} channels, a lambda each"


def _packed(module: nn.Module, size: int) -> nn.Module:
    """The P-wide, grouped equivalent of one layer of a network (its children converted too)."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(size * module.in_channels, size * module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, size * module.groups, module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):  # a block's bn2 stays a SimAMBatchNorm
        return type(module)(size * module.num_features, module.eps, module.momentum, module.affine,
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


class PackedNet:
    """P networks of ``engine``'s kind as one on its device (compiled where the engine is):
    slot p holds network p's weights, BatchNorm statistics and lambda."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.size = size
        template = engine.fresh(seed=0)
        self.names = list(template.state_dict())
        with torch.random.fork_rng(devices=[]):  # the new layers' initial weights, overwritten by load
            self.model = _packed(copy.deepcopy(template), size).to(engine.device, engine.dtype)
        if engine.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if engine.compile else self.model
        self.params = list(self.model.parameters())
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self._simam = [m for m in self.model.modules() if isinstance(m, _ChannelSimAM)]

    def split(self, name: str, value: Tensor, p: int) -> Tensor:
        """Slot ``p``'s part (a view) of the packed tensor ``value`` of parameter or buffer ``name``."""
        if value.dim() == 0:
            return value
        if isinstance(self.model.get_submodule(name.rsplit(".", 1)[0]), _PackedLinear):
            return value[p]
        return value.chunk(self.size, dim=0)[p]

    def load(self, p: int, state: dict, e_lambda: float | None) -> None:
        """Put one network (a train_fold state dict) and its lambda in slot ``p``."""
        own = self.model.state_dict()
        with torch.no_grad():
            for name in self.names:
                if own[name].dim() > 0:
                    self.split(name, own[name], p).copy_(state[name])
        if e_lambda is not None:
            for layer in self._simam:
                layer.e_lambda.view(self.size, -1)[p].fill_(e_lambda)

    def state(self, p: int, iteration: int) -> dict:
        """Slot ``p`` as a train_fold state dict (BatchNorm's batch counters at ``iteration``)."""
        out = {}
        for name, value in self.model.state_dict().items():
            out[name] = (torch.tensor(iteration, dtype=value.dtype) if value.dim() == 0
                         else self.split(name, value, p).detach().clone())
        return out


def packed_evaluate(net: PackedNet, engine: Engine, data: ImageData, indices: list[Tensor | None],
                    batch_size: int) -> list[tuple[float, float] | None]:
    """Validation accuracy and mean loss of the networks given an index (None: skipped),
    as train_fold computes them, in one pass of the packed network in eval mode; each
    network reads its own images (a shorter validation set is padded and masked)."""
    device, size = engine.device, net.size
    todo = [i for i, idx in enumerate(indices) if idx is not None]
    correct = torch.zeros(size, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(size, dtype=torch.float64, device=device)
    longest = max(len(indices[i]) for i in todo)
    net.model.eval()
    with torch.no_grad(), engine.autocast():
        for start in range(0, longest, batch_size):
            # compiled: the last batch padded too (one shape, one graph)
            rows = batch_size if engine.compile else min(batch_size, longest - start)
            xs, ys = [None] * size, {}
            for i in todo:
                idx = indices[i][start:start + rows]
                if len(idx):
                    x = eval_batch(data, idx, device)
                    xs[i] = torch.cat([x, x.new_zeros(rows - len(idx), *x.shape[1:])]) if len(idx) < rows else x
                    ys[i] = data.labels[idx.to(data.labels.device)].to(device, non_blocking=True)
            filler = next(x for x in xs if x is not None)
            x = torch.cat([x if x is not None else torch.zeros_like(filler) for x in xs], 1)
            out = net.forward(engine.batch(x)).float()  # (rows, P, K)
            for i, y in ys.items():
                mine = out[: len(y), i]
                loss_sum[i] += F.cross_entropy(mine, y, reduction="sum").double()
                correct[i] += (mine.argmax(1) == y).sum()
    net.model.train()
    correct, loss_sum = correct.tolist(), loss_sum.tolist()
    return [(correct[i] / len(indices[i]), loss_sum[i] / len(indices[i])) if i in todo else None
            for i in range(size)]
