"""Timing the search's own steps: the pack size "auto" picks on a GPU, the engines a worker
reuses, and the projected wall time of a study (the line a search prints as it starts, and
``bench``'s projection).

Steps are timed in rounds, each round running a block of steps of each in turn after a
warm-up, and each figure is the median over rounds: a machine shared with other jobs slows
all alike, and the fastest and slowest rounds give the projection's range.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.augment import train_batch
from ..data.datasets import ImageData
from ..nn.kernels import cpu_kernel
from ..train.engine import Engine, _evaluate, build_engine, cpu_threads, make_optimizer, on_device
from ..train.groups import chunk_sizes, pack_size, trains_alone
from ..train.pack import Pack, Packs
from ..train.plan import Plan
from .projection import Projection, project_rounds

__all__ = ["Engines", "measure_steps", "measure_packs", "pick_pack", "pick_rounds", "quick_projection",
           "worker_pack", "time_rounds", "search_step", "medians", "eval_rates", "lambda_of", "pack_setting",
           "least_share"]


class Engines:
    """The engines of ``plan``'s networks, one per attention ("simam", "none"), built (and
    compiled) on first use and then reused: by the start-up projection, and by every point a
    worker in the same process trains, with the packs trained on them."""

    def __init__(self, plan: Plan):
        self.plan, self._built, self._packs = plan, {}, {}

    def __call__(self, attention: str) -> Engine:
        """The engine of the plan's network with ``attention`` ("simam" or "none"), as its
        [train] asks (built by :func:`~lambda_search.train.engine.build_engine`, the one way)."""
        if attention not in self._built:
            plan = self.plan
            model = plan.config.model
            self._built[attention] = build_engine(plan.train, model.name, plan.data.num_classes, attention,
                                                  model.shortcut)
        return self._built[attention]

    def packs(self, attention: str) -> Packs:
        """The packs trained on the engine of ``attention``, each size built once (on a GPU
        compiled and its step captured once) for every point the worker trains."""
        if attention not in self._packs:
            self._packs[attention] = Packs(self(attention))
        return self._packs[attention]

    def built(self) -> list[str]:
        return sorted(self._built)


def _engine_step(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None) -> Callable[[], None]:
    """lambda_search's training step on ``engine``: batches augmented on the device, no host sync."""
    engine.reset(0, e_lambda)
    optimizer = make_optimizer(engine.model, plan.train)
    device = engine.device
    index = torch.as_tensor(plan.folds[0].train, device=data.images.device)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = plan.train.batch_size

    def step() -> None:
        idx = index[torch.randint(len(index), (batch,), device=index.device)]
        x = engine.batch(train_batch(data, idx, generator, device))
        engine.step(optimizer, x, data.labels[idx].to(device, non_blocking=True))

    return step


def _pack_step(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None, size: int) -> Callable[[], None]:
    """A packed training step of ``size`` networks (train_pack's), on random batches of the first fold."""
    pack = Pack(engine, size)
    state = engine.fresh(0).state_dict()
    for p in range(size):
        pack.load(p, state, None, e_lambda)
    device = engine.device
    index = torch.as_tensor(plan.folds[0].train, device=data.images.device)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = plan.train.batch_size

    def step() -> None:
        xs, ys = [], []
        for _ in range(size):
            idx = index[torch.randint(len(index), (batch,), device=index.device)]
            xs.append(train_batch(data, idx, generator, device))
            ys.append(data.labels[idx].to(device, non_blocking=True))
        pack.step(engine.batch(torch.cat(xs, 1)), torch.stack(ys, 1), (plan.train.lr,) * size, plan.train)

    return step


def search_step(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None) -> Callable[[], None]:
    """One network's training step as the search runs it (``trains_alone``): the engine's
    step on the CPU, a pack of one (a CUDA graph where they are on) on GPUs."""
    if trains_alone(1, engine.device, engine.network.packs):
        return _engine_step(plan, engine, data, e_lambda)
    return _pack_step(plan, engine, data, e_lambda, 1)


def _pack_rounds(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None, sizes, *,
                 rounds: int = 1, block_seconds: float = 0.5) -> _Rounds:
    """The timed rounds of a pack of each size in ``sizes`` (size 1 on the CPU: the engine's
    own step; with CUDA graphs, a pack of one, as the search trains it there)."""
    steps = {size: (search_step(plan, engine, data, e_lambda) if size == 1
                    else _pack_step(plan, engine, data, e_lambda, size)) for size in sizes}
    return time_rounds(steps, engine.device, rounds, block_seconds, warmup=1)


def measure_packs(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None, sizes, *,
                  rounds: int = 1, block_seconds: float = 0.5) -> dict[int, float]:
    """Seconds per step of a pack of each size in ``sizes`` (the median over ``rounds``)."""
    return medians(_pack_rounds(plan, engine, data, e_lambda, sizes, rounds=rounds,
                                 block_seconds=block_seconds).seconds)


def _training_rounds(plan: Plan, timed: _Rounds, size: int) -> list[float]:
    """Seconds per iteration of one training in each round of ``timed`` when a point's folds
    train in packs of ``size`` (as run_point cuts them)."""
    folds = len(plan.folds_of(0))
    chunks = chunk_sizes(folds, size)
    return [sum(timed.seconds[c][r] for c in chunks) / folds for r in range(timed.rounds)]


def pick_rounds(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None, size: int | None, *,
                 rounds: int = 1, block_seconds: float = 0.5) -> tuple[int, list[float], _Rounds]:
    """Time a point's folds in packs of ``size`` (None: "auto", the faster of one fold at a
    time and all folds at once, as :func:`~lambda_search.train.groups.pack_size` picks). Returns (size, seconds per
    iteration of one training in each round, the rounds of every pack size timed)."""
    folds = len(plan.folds_of(0))
    sizes = [1, folds] if size is None else sorted({size, *chunk_sizes(folds, size)})
    timed = _pack_rounds(plan, engine, data, e_lambda, sizes, rounds=rounds, block_seconds=block_seconds)
    if size is None:
        size = pack_size(plan.train, folds, engine.device, medians(timed.seconds))
    return size, _training_rounds(plan, timed, size), timed


def pick_pack(plan: Plan, engine: Engine, data: ImageData, e_lambda: float | None, *, rounds: int = 1,
              block_seconds: float = 0.5) -> tuple[int, float, dict[int, float]]:
    """The pack size for one point's folds on ``engine``: ``train.pack`` when it is a number;
    "auto": on a GPU the faster of one fold at a time and all folds at once (a pack must beat
    one at a time by 5 %), on the CPU 1 (measured all the same). Returns (size, seconds per iteration of one
    training, {size: seconds per pack step}), medians over ``rounds``."""
    size = pack_setting(plan, engine.device)
    size, per_training, timed = pick_rounds(plan, engine, data, e_lambda, size, rounds=rounds,
                                             block_seconds=block_seconds)
    return size, statistics.median(per_training), medians(timed.seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class _Rounds:
    seconds: dict  # name -> seconds per step in each round
    steps: int  # steps a block timed
    cpu_share: dict  # name -> process CPU time / (wall time x threads) over its blocks (CPU only)

    @property
    def rounds(self) -> int:
        return min(len(v) for v in self.seconds.values())


def medians(seconds: dict) -> dict:
    return {name: statistics.median(v) for name, v in seconds.items()}


def time_rounds(steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, block_seconds: float,
                 warmup: int = 2) -> _Rounds:
    """``warmup`` untimed steps of each of ``steps`` (the first calls: kernels, compilation,
    allocations), one timed step that sizes the blocks, then ``rounds`` rounds of one block of
    k steps each (k sized so that a block of the fastest takes about ``block_seconds``), the
    order rotating from round to round."""
    first = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        first[name] = time.perf_counter() - t
    k = max(2, math.ceil(block_seconds / max(min(first.values()), 1e-6)))
    names = list(steps)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    wall, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            _sync(device)
            c, t = time.process_time(), time.perf_counter()
            for _ in range(k):
                steps[name]()
            _sync(device)
            elapsed = time.perf_counter() - t
            cpu[name] += time.process_time() - c
            wall[name] += elapsed
            per_round[name].append(elapsed / k)
    threads = torch.get_num_threads()
    share = {name: min(1.0, cpu[name] / max(wall[name] * threads, 1e-9)) for name in names} \
        if device.type == "cpu" else {}
    return _Rounds(per_round, k, share)


def measure_steps(steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, block_seconds: float,
                  warmup: int = 2) -> tuple[dict[str, float], int]:
    """Seconds per step of each of ``steps``, timed as :func:`time_rounds` does. Returns the
    median over rounds of each block's seconds per step, and k (the steps of a block)."""
    timed = time_rounds(steps, device, rounds, block_seconds, warmup)
    return medians(timed.seconds), timed.steps


def eval_rates(engine: Engine, data: ImageData, plan: Plan, size: int = 1, passes: int = 1) -> list[float]:
    """Validation images/s of each of ``passes`` timed passes (after one untimed): of the
    engine, or of a pack of ``size`` (members whose epochs end together are evaluated in
    one packed pass)."""
    val = torch.as_tensor(plan.folds[0].val, device=data.images.device)
    val = val[: max(1, min(len(val), 2 * plan.train.eval_batch_size))]
    batch = plan.train.eval_batch_size
    if size == 1 and not engine.cuda_graphs:  # on GPUs the search evaluates through a pack of one
        def run(index):
            _evaluate(engine, data, index, batch)
    else:
        pack = Pack(engine, size)

        def run(index):
            pack.evaluate(data, [index] * size, batch)
    run(val[:batch])  # warm up
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        run(val)
        rates.append(size * len(val) / (time.perf_counter() - t))
    return rates


def _eval_images_per_s(engine: Engine, data: ImageData, plan: Plan, size: int = 1, passes: int = 1) -> float:
    """Validation images/s (the median of ``passes`` timed passes), as :func:`eval_rates`."""
    return statistics.median(eval_rates(engine, data, plan, size, passes))


def lambda_of(plan: Plan) -> float:
    lambdas = plan.config.search.lambdas
    return 1e-4 if 1e-4 in lambdas else lambdas[len(lambdas) // 2]


def pack_setting(plan: Plan, device: torch.device) -> int | None:
    """What to time: the pack size train.pack sets, None for "auto" (timed, on the CPU too,
    where :func:`~lambda_search.train.groups.pack_size` then says 1)."""
    return None if plan.train.pack == "auto" else pack_size(plan.train, len(plan.folds_of(0)), device)


def least_share(shares) -> float | None:
    """The lowest CPU share of those measured (None where none was: on a GPU)."""
    return min((s for s in shares if s is not None), default=None)


def quick_projection(plan: Plan, block_seconds: float = 0.15, engines: Engines | None = None,
                     packs: dict[str, int] | None = None, rounds: int = 5) -> Projection:
    """The projection a search prints as it starts, from ``rounds`` short rounds (blocks of
    about ``block_seconds``, after a warm-up step) of the engine at the pack size of each
    network, and 3 timed validation passes: ``packs`` (attention -> size, a study's pinned
    sizes) where given, else as :func:`worker_pack` decides; the projection's ``packs`` says
    the sizes, its ``low``..``high`` the fastest and slowest rounds. The engines are taken from
    ``engines`` (built there where missing), for the worker that goes on in this process."""
    with cpu_threads(plan.train):
        device = torch.device(plan.train.device)
        if device.type == "cpu":
            cpu_kernel()  # build SimAM's CPU kernel before anything is timed
        data = on_device(plan.data, plan.train, device)
        attentions = sorted({p.attention for p in plan.points})
        step, chosen, ks, shares = {}, {}, [], []
        engines = Engines(plan) if engines is None else engines
        for a in attentions:
            engine = engines(a)
            lam = lambda_of(plan) if a == "simam" else None
            size = (packs or {}).get(a) or pack_size(plan.train, len(plan.folds_of(0)), device)
            chosen[a], step[a], timed = pick_rounds(plan, engine, data, lam, size, rounds=rounds,
                                                     block_seconds=block_seconds)
            ks.append(timed.steps)
            shares += timed.cpu_share.values()
        rates = eval_rates(engine, data, plan, chosen[attentions[-1]], passes=3)
        return project_rounds(plan, step, rates, chosen, min(ks), least_share(shares))


def worker_pack(plan: Plan, engine: Engine) -> tuple[int, dict[int, float]]:
    """The pack size of a worker's ``engine`` (train.pack as a number, or "auto": measured on
    a GPU, 1 on the CPU) and the pack steps measured to pick it ({} where none was)."""
    size = pack_size(plan.train, len(plan.folds_of(0)), engine.device)
    if size is not None:
        return size, {}
    lam = lambda_of(plan) if engine.spec["attention"] == "simam" else None
    with cpu_threads(plan.train):
        size, _, seconds = pick_pack(plan, engine, on_device(plan.data, plan.train, engine.device), lam)
    return size, seconds
