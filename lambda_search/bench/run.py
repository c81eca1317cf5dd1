"""Speed, measured in one run on one device: the official code's way of training (per-sample
PIL transforms through a DataLoader, the eager float32 network, a ``loss.item()`` every
step) against the search's own step (``_measure``), with and without SimAM and packed; and
the projected wall time of a study from those figures. Only the CLI imports this module.

The three are timed in rounds, each round running a block of steps of each in turn, and
each figure is the median over rounds: a machine shared with other jobs slows all three
alike, and the ratios hold where the absolute figures drift.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import Config
from ..configfile import resolve_config
from ..data.datasets import ImageData
from ..nn.kernels import cpu_kernel
from ..nn.registry import DEFAULT_NETWORK, network_spec
from ..nn.simam import simam_reference
from ..train.engine import cpu_threads, make_optimizer, on_device
from ..train.plan import Plan, make_plan
from .measure import (
    Engines,
    eval_rates,
    lambda_of,
    least_share,
    medians,
    pack_setting,
    pick_rounds,
    search_step,
    time_rounds,
)
from .projection import Projection, evaluation_trainings, project_rounds

__all__ = ["Bench", "PAPER_FIGURE4", "paper_figure4_config", "run_bench", "format_bench"]


# The paper's Figure 4 search on CIFAR-100-shaped data: ResNet-20, 5 folds x 6 lambdas, 64k
# iterations at batch 128 (what `lambda-search bench` projects when given no config).
PAPER_FIGURE4 = {
    "study": {"name": "figure4-shape"},
    "search": {"lambdas": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "baseline": False},
    # CIFAR-100's 50,000 training and 10,000 test images: 60,000, of which 1/6 held out for the test
    "data": {"dataset": "synthetic", "folds": 5, "test_fraction": 1 / 6,
             "options": {"num_samples": 60000, "num_classes": 100, "image_size": 32}},
    "model": {"name": DEFAULT_NETWORK},  # ResNet-20, the paper's search network
    "train": {"iterations": 64000, "batch_size": 128, "lr": 0.1},
}


EVALUATION_SEEDS = 3  # `lambda-search evaluate`'s default


def paper_figure4_config(overrides=()) -> Config:
    """PAPER_FIGURE4, resolved, on the GPU where there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_config(PAPER_FIGURE4, [f"train.device={device!r}", *overrides], origin="bench")


@dataclass(frozen=True)
class Bench:
    device: str
    model: str
    image_size: int
    batch_size: int
    threads: int
    loader_workers: int  # the reference pipeline's DataLoader workers
    rounds: int
    steps_per_block: int
    reference_images_per_s: float
    engine_images_per_s: float
    baseline_images_per_s: float  # the engine, network without SimAM
    eval_images_per_s: float
    projection: Projection
    evaluation: Projection  # `lambda-search evaluate` after the search: 2 networks x EVALUATION_SEEDS
    pack_images_per_s: dict  # pack size -> training images/s of all its networks (engine, SimAM)
    pack: int  # the size a search picks here (train.pack = "auto")

    @property
    def speedup(self) -> float:
        return self.engine_images_per_s / self.reference_images_per_s

    @property
    def simam_overhead(self) -> float:
        """Engine step time with SimAM / without, minus 1."""
        return self.baseline_images_per_s / self.engine_images_per_s - 1

    @property
    def packed_speedup(self) -> float:
        """Training images/s of the pack a search picks here (all its networks) over the reference."""
        return self.pack_images_per_s[self.pack] / self.reference_images_per_s

    def to_json(self) -> dict:
        out = {"device": self.device, "reference_images_per_s": self.reference_images_per_s,
               "engine_images_per_s": self.engine_images_per_s, "speedup": self.speedup,
               "simam_overhead": self.simam_overhead, "projected_seconds": self.projection.seconds,
               "packed_speedup": self.packed_speedup}
        out.update({k: v for k, v in asdict(self).items() if k not in out and k != "projection"})
        out["projection"] = asdict(self.projection)
        out["evaluation"] = asdict(self.evaluation)
        return out


class _OfficialSimAM(torch.nn.Module):
    """SimAM as the official code runs it: the tensor formula in eager PyTorch operations."""

    def __init__(self, e_lambda: float) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x):
        return simam_reference(x, self.e_lambda)


class _PilImages(torch.utils.data.Dataset):
    """A uint8 (N, C, H, W) data set served one PIL image at a time, as torchvision's CIFAR."""

    def __init__(self, data: ImageData, index, transform) -> None:
        self.images = data.images[torch.as_tensor(index)].permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = data.labels[torch.as_tensor(index)].numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        image = self.images[i]
        image = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        return self.transform(image), int(self.labels[i])


def _reference_transform(data: ImageData):
    from torchvision import transforms as T

    aug = data.augmentation
    if aug.kind == "resized_crop":
        crop = [T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio)]
    else:
        crop = [T.RandomCrop(data.images.shape[-1], padding=aug.pad)]
    flip = [T.RandomHorizontalFlip()] if aug.flip else []
    return T.Compose(crop + flip + [T.ToTensor(), T.Normalize(data.mean, data.std)])


def _reference_step(plan: Plan, e_lambda: float, device: torch.device, workers: int) -> Callable[[], None]:
    """The official code's training step: DataLoader of PIL transforms, eager float32 network
    with the tensor-formula SimAM, a loss.item() every step."""
    cfg, train = plan.config.model, plan.train
    spec = network_spec(cfg.name)  # SimAM as the official code computes it, where the network puts SimAM
    model = spec.build(plan.data.num_classes, lambda: _OfficialSimAM(e_lambda), **spec.checked_options(
        shortcut=cfg.shortcut))
    model = model.to(device).train()
    optimizer = make_optimizer(model, train)
    dataset = _PilImages(plan.data, plan.folds[0].train, _reference_transform(plan.data))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=1 << 30)
    loader = torch.utils.data.DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    batches = iter(loader)

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()

    step.close = lambda: getattr(batches, "_shutdown_workers", lambda: None)()
    return step


def run_bench(config: Config | None = None, *, rounds: int = 7, block_seconds: float = 1.0,
              workers: int | None = None, log: Callable[[str], None] | None = None) -> Bench:
    """Measure the three pipelines on ``config``'s data, network, batch size and device (the
    paper's Figure 4 search on CIFAR-100-shaped synthetic data when None), and project the
    config's study."""
    if config is None:
        config = paper_figure4_config()
    plan = make_plan(config)
    with cpu_threads(plan.train):  # as every training of the study runs
        return _run_bench(plan, rounds, block_seconds, workers, log or (lambda text: None))


def _run_bench(plan: Plan, rounds: int, block_seconds: float, workers: int | None, say) -> Bench:
    config = plan.config
    device = torch.device(plan.train.device)
    if device.type == "cpu":
        cpu_kernel()  # build SimAM's CPU kernel before anything is timed
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    data = on_device(plan.data, plan.train, device)
    e_lambda = lambda_of(plan)
    say(f"bench: {config.model.name} at {data.input_size} px, batch {plan.train.batch_size}, on {device} "
        f"({torch.get_num_threads()} threads); {rounds} rounds")
    engines = Engines(plan)
    simam_engine, baseline_engine = engines("simam"), engines("none")
    reference = _reference_step(plan, e_lambda, device, workers)
    try:
        timed = time_rounds({"reference": reference,
                              "engine": search_step(plan, simam_engine, data, e_lambda),
                              "baseline": search_step(plan, baseline_engine, data, None)},
                             device, rounds, block_seconds)
    finally:
        reference.close()
    seconds, k = medians(timed.seconds), timed.steps
    batch = plan.train.batch_size
    say("bench: packed training")
    size, per_training, packed = pick_rounds(plan, simam_engine, data, e_lambda, pack_setting(plan, device),
                                              rounds=max(1, rounds // 2), block_seconds=block_seconds)
    rates = eval_rates(simam_engine, data, plan, size, passes=3)
    size_none = 1
    step = {"simam": timed.seconds["engine"], "none": timed.seconds["baseline"]}
    shares = [timed.cpu_share.get("engine"), timed.cpu_share.get("baseline")]
    if size > 1:
        step["simam"] = per_training
        size_none, step["none"], _ = pick_rounds(plan, baseline_engine, data, None, pack_setting(plan, device),
                                                  rounds=max(1, rounds // 2), block_seconds=block_seconds)
    projection = project_rounds(plan, step, rates, {"simam": size, "none": size_none}, k, least_share(shares))
    alone = {"simam": timed.seconds["engine"], "none": timed.seconds["baseline"]}  # one training per point: no pack
    evaluation = project_rounds(plan, alone, rates, {"simam": 1, "none": 1}, k, least_share(shares),
                                evaluation_trainings(plan, EVALUATION_SEEDS))
    return Bench(str(device), config.model.name, data.input_size, batch, torch.get_num_threads(), workers,
                 rounds, k, batch / seconds["reference"], batch / seconds["engine"], batch / seconds["baseline"],
                 statistics.median(rates), projection, evaluation,
                 {s: s * batch / t for s, t in sorted(medians(packed.seconds).items())}, size)


def format_bench(bench: Bench) -> str:
    rows = [("reference: PIL transforms, DataLoader, eager, loss.item()", bench.reference_images_per_s),
            ("lambda_search engine, SimAM", bench.engine_images_per_s),
            ("lambda_search engine, no SimAM", bench.baseline_images_per_s)]
    lines = [f"{'training images/s':<60} {'':>10}"]
    lines += [f"  {name:<58} {value:>10,.1f}" for name, value in rows]
    lines += [f"  {'evaluation (engine, SimAM)':<58} {bench.eval_images_per_s:>10,.1f}",
              f"speedup over the reference: {bench.speedup:.2f}x"
              + (f" (packs of {bench.pack}: {bench.packed_speedup:.2f}x)" if bench.pack > 1 else ""),
              f"SimAM overhead in the engine: {bench.simam_overhead:+.1%} (step time with SimAM / without - 1)",
              f"projected on one {bench.device} worker: {bench.projection.describe()}",
              f"then `evaluate` (2 networks x {EVALUATION_SEEDS} seeds on the whole training set, tested once): "
              f"{bench.evaluation.describe()}"]
    if len(bench.pack_images_per_s) > 1:
        one = bench.pack_images_per_s[1]
        lines.insert(4, "  packed training (train.pack), all networks together:")
        for i, (size, rate) in enumerate(bench.pack_images_per_s.items()):
            lines.insert(5 + i, f"    {size} network{'s' if size > 1 else ' '} at once{'':<37} {rate:>10,.1f}"
                                f"  ({rate / one:.2f}x){'  <- picked' if size == bench.pack else ''}")
    return "\n".join(lines)
