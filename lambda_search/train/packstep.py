"""A pack's step: SGD at one learning rate per network, and the step replayed as a CUDA graph.

:class:`PackedSGD` is torch.optim.SGD (momentum, weight decay, Nesterov) over a packed
network's parameters: SGD is elementwise, so with one learning rate and one set of momentum
buffers per slot each network takes its own step. :class:`GraphedStep` records a whole
training step once as a CUDA graph and replays it (no launch gaps between its kernels).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..config import TrainConfig
from .engine import make_optimizer
from .packnet import PackedNet

__all__ = ["GraphedStep", "PackedSGD"]


class PackedSGD:
    """SGD as torch.optim.SGD on ``net``'s parameters, at one learning rate per network: slot
    p's momentum buffers and rate are network p's own."""

    def __init__(self, net: PackedNet, device: torch.device) -> None:
        self.net, self.device = net, device
        self.momentum = [torch.zeros_like(p) for p in net.params]
        self._lrs: tuple | None = None
        # minus each network's learning rate, per parameter element: updated in place, so a
        # captured CUDA graph reads the current rates
        self._neg_lr = [torch.zeros_like(p) for p in net.params]

    def set_lrs(self, lrs: tuple[float, ...]) -> None:
        """The learning rate of each network's next steps."""
        if lrs == self._lrs:
            return
        self._lrs = lrs
        size = self.net.size
        neg = -torch.tensor(lrs, dtype=torch.float64).to(self.device, non_blocking=True)
        with torch.no_grad():
            for param, target in zip(self.net.params, self._neg_lr):
                per = neg.repeat_interleave(param.shape[0] // size) if param.shape[0] != size else neg
                target.copy_(per.view(-1, *[1] * (param.dim() - 1)).expand_as(param))

    def update(self, config: TrainConfig) -> None:
        """One SGD step of every network from the parameters' gradients (``config``'s
        momentum, weight decay and Nesterov; the rates of :meth:`set_lrs`)."""
        params = self.net.params
        with torch.no_grad():
            grads = [param.grad for param in params]
            d = torch._foreach_add(grads, params, alpha=config.weight_decay) if config.weight_decay else grads
            if config.momentum != 0:
                torch._foreach_mul_(self.momentum, config.momentum)
                torch._foreach_add_(self.momentum, d)
                d = torch._foreach_add(d, self.momentum, alpha=config.momentum) if config.nesterov else self.momentum
            torch._foreach_addcmul_(params, self._neg_lr, d)

    def load(self, p: int, momentum: list[Tensor] | None) -> None:
        """Slot ``p``'s momentum buffers (a train_fold optimiser's, in its parameters' order;
        None: zero)."""
        with torch.no_grad():
            for i, name in enumerate(self.net.param_names):
                target = self.net.split(name, self.momentum[i], p)
                target.copy_(momentum[i]) if momentum is not None else target.zero_()

    def state_dict(self, p: int, iteration: int, lr: float, config: TrainConfig, network: torch.nn.Module) -> dict:
        """Slot ``p``'s SGD state in torch.optim.SGD's format, as train_fold saves it
        (``network``: one unpacked network of the kind, whose weights it overwrites)."""
        network.load_state_dict(self.net.state(p, iteration))
        optimizer = make_optimizer(network, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if config.momentum != 0 and iteration > 0:
            for param, name, buf in zip(network.parameters(), self.net.param_names, self.momentum):
                optimizer.state[param]["momentum_buffer"] = self.net.split(name, buf, p).detach().clone()
        return optimizer.state_dict()


class GraphedStep:
    """A training step replayed as one CUDA graph: captured once per ``key`` (the input
    shapes and the optimiser setting the graph bakes in) and replayed for every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._graph = None  # (key, torch.cuda.CUDAGraph, static x, static y, static losses)

    def __call__(self, step: Callable[[Tensor, Tensor], Tensor], state: Callable[[], list[Tensor]], x: Tensor,
                 y: Tensor, key: tuple) -> Tensor:
        """``step(x, y)``'s losses (a copy), from the graph of ``key`` (captured first where
        it has none; ``state()``: the tensors a step changes)."""
        if self._graph is None or self._graph[0] != key:
            self._capture(step, state, x, y, key)
        _, graph, static_x, static_y, losses = self._graph
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return losses.clone()

    def _capture(self, step, state, x: Tensor, y: Tensor, key: tuple) -> None:
        """Record the step as a CUDA graph (after warm-up steps on a side stream, which also
        compile and let cuDNN pick its algorithms); ``state()`` is restored after."""
        self._graph = None
        saved = [t.detach().clone() for t in state()]
        static_x, static_y = x.clone(memory_format=torch.preserve_format), y.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step(static_x, static_y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = step(static_x, static_y)
        with torch.no_grad():
            for own, kept in zip(state(), saved):
                own.copy_(kept)
        self._graph = (key, graph, static_x, static_y, losses)
