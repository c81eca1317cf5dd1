"""A study's plan and one point's training: a grid point (a lambda, or the baseline network,
and a repeat) cross-validated over the folds of its repeat.

A plan turns a checked config into everything a worker needs (data, folds, the training
protocol, the grid of points), and fails with a ConfigError naming the key before anything
is stored. No Optuna here: the store and search layers keep what this layer computes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import TEST_SPLITS, Config, ConfigError, DataSection, ModelSection, TrainConfig
from ..data.datasets import CACHE_DIR, ImageData, dataset_fingerprint, join, load_dataset, subset
from ..data.folds import Fold, derive_seed, final_folds, folds_fingerprint, make_folds, test_split
from ..nn.registry import MODEL_NAMES, NetworkSpec, network_spec
from ..points import Point, summarize
from ..strategy import asked_points
from .engine import Engine, EpochMetrics, FoldResult, engine_for
from .foldrun import set_aside
from .groups import chunk_sizes, train_group
from .numerics import training_numerics
from .pack import Packs

__all__ = ["Plan", "PointOutcome", "make_plan", "run_point", "own_checkpoints", "check_device"]


@dataclass
class Plan:
    config: Config
    data: ImageData
    folds: list[Fold]
    train: TrainConfig
    fingerprint: str  # of the data set and the fold assignment
    points: list[Point]
    test_images: int | None = None  # of the test split, where known (held out, or the final evaluation's)

    def folds_of(self, repeat: int) -> list[Fold]:
        return [f for f in self.folds if f.repeat == repeat]

    def train_seed(self, fold: Fold) -> int:
        """The seed of the initial weights, batch order and augmentation of ``fold``: the
        same for every lambda (and the baseline), so points compare fold by fold."""
        return derive_seed(self.config.data.seed, 17, fold.repeat, fold.index)


def check_device(device: str) -> None:
    """Refuse a device lambda_search cannot train on here (before anything is stored): only
    the CPU and CUDA GPUs that exist."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda") or (kind == "cpu" and torch.device(device).index not in (None, 0)):
        raise ConfigError(f"train.device must be 'cpu', 'cuda' or 'cuda:N', got train.device={device!r}")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ConfigError(f"train.device={device!r} asks for a GPU, but none is available here; "
                              "use --set train.device=cpu (or --device cpu for a worker)")
        index = torch.device(device).index
        if index is not None and index >= count:
            raise ConfigError(f"train.device={device!r}: this machine has {count} GPU{'s' if count > 1 else ''}, "
                              f"cuda:0 to cuda:{count - 1}")


def _load(data_cfg: DataSection, split: str) -> ImageData:
    root = data_cfg.root
    try:
        return load_dataset(data_cfg.dataset, root=root, split=split, download=data_cfg.download,
                            **data_cfg.options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data: {exc}") from None
    except OSError as exc:
        what = "data set" if split == "train" else "the test split of"
        raise ConfigError(f"data: cannot read {what} {data_cfg.dataset!r} from root={root!r} ({exc})") from None


def _hold_out(data: ImageData, data_cfg: DataSection) -> tuple[ImageData, ImageData | None]:
    """(the images the folds are made from, the held-out test images or None): a data set
    without a test split of its own holds out data.test_fraction of it before any fold."""
    fraction = data_cfg.test_fraction
    if not fraction:
        return data, None
    try:
        keep, test = test_split(data.labels.numpy(), fraction, data_cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"data: {str(exc).replace('test_fraction', 'data.test_fraction')}") from None
    return subset(data, keep), subset(data, test)


def _folds(data: ImageData, test: ImageData | None, config: Config) -> tuple[ImageData, list[Fold]]:
    """The data a plan trains on and its folds: cross-validation folds, or with data.test
    (a final evaluation) every training image against the test split, once per seed."""
    data_cfg, repeats = config.data, config.search.repeats
    if data_cfg.test:
        if test is None and TEST_SPLITS.get(data_cfg.dataset) is None:
            raise ConfigError(f"data: {data_cfg.dataset!r} has no test split of its own and data.test_fraction is "
                              "0: the folds covered every image, none is left to test on")
        test = _load(data_cfg, "test") if test is None else test
        try:
            cache = Path(data_cfg.root).expanduser() / CACHE_DIR if data_cfg.dataset == "imagefolder" else None
            joined = join(data, test, cache)
        except ValueError as exc:
            raise ConfigError(f"data: the test split does not match the training set: {exc}") from None
        return joined, final_folds(len(data), len(test), data_cfg.seed, repeats)
    try:
        return data, make_folds(data.labels.numpy(), n_splits=data_cfg.folds, seed=data_cfg.seed,
                                repeats=repeats, holdout=data_cfg.holdout)
    except ValueError as exc:
        if data_cfg.holdout is None:
            raise ConfigError(f"data: {str(exc).replace('n_splits', 'data.folds')}") from None
        raise ConfigError(f"data: {exc} (data.holdout)") from None


def checked_network(model: ModelSection) -> NetworkSpec:
    """The network ``model`` names, its options checked (a ConfigError naming the key)."""
    if ":" not in model.name and model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name must be one of {', '.join(MODEL_NAMES)}, or a network of your own as "
                          f"'module:function', got model.name={model.name!r}")
    try:
        network = network_spec(model.name)
        network.checked_options(shortcut=model.shortcut)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    return network


def make_plan(config: Config, device: str | None = None) -> Plan:
    """Load the data, hold out its test split where it has none of its own, make the folds
    (or with data.test the final evaluation's trainings) and check every value of a
    resolved config."""
    data_cfg, model_cfg = config.data, config.model
    network = checked_network(model_cfg)
    check_device(device or config.train.device)
    train = config.train if device is None else dataclasses.replace(config.train, device=device)
    if not network.packs:
        if train.pack not in ("auto", 1):
            raise ConfigError(f"model.name={network.name!r} does not pack (its NetworkSpec says so): train.pack must "
                              f"be 'auto' or 1, got train.pack={train.pack!r}")
        train = dataclasses.replace(train, pack=1)
    data, held_out = _hold_out(_load(data_cfg, "train"), data_cfg)
    data, folds = _folds(data, held_out, config)
    smallest = min(len(f.train) for f in folds)
    if train.batch_size > smallest:
        raise ConfigError(f"train.batch_size must be <= the smallest fold's {smallest} training images, "
                          f"got train.batch_size={train.batch_size}")
    if data.input_size < network.min_input:
        raise ConfigError(f"model.name={network.name!r} needs images of at least {network.min_input} px, the data "
                          f"set has {data.input_size} px")
    fingerprint = folds_fingerprint(folds, dataset_fingerprint(data))
    test_images = len(folds[0].val) if data_cfg.test else (None if held_out is None else len(held_out))
    points = asked_points(config, [])  # what the study trains first (a ConfigError where it cannot be asked)
    return Plan(config, data, folds, train, fingerprint, points, test_images)


def fold_record(result: FoldResult, numerics: dict | None = None, val_images: int | None = None) -> dict:
    """A fold's stored record; ``numerics``: what it was trained under (training_numerics);
    ``val_images``: the images its accuracy is over."""
    return dict(status=result.status, val_accuracy=result.val_accuracy, val_loss=result.val_loss, val_images=val_images,
                seconds=round(result.seconds, 3), iterations=result.iterations, seed=result.seed,
                diverged_at_step=result.diverged_at_step, resumed_from_iteration=result.resumed_from_iteration,
                score_seconds=None if result.score_seconds is None else round(result.score_seconds, 4),
                numerics=numerics)


@dataclass
class PointOutcome:
    """``status``: "completed" (``summary`` holds mean and std), "diverged" (``reason`` says
    where) or "stopped" (interrupted; finished folds and the checkpoint are kept)."""

    status: str
    folds: dict[str, dict] = field(default_factory=dict)  # fold name -> fold_record
    summary: dict | None = None
    reason: str | None = None


def checkpoint_folder(checkpoint_dir, point: Point) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / point.slug


OWNER_FILE = "RUN"  # in a point's checkpoint folder: the run (study) whose checkpoints it holds


def own_checkpoints(checkpoint_dir, point: Point, run: str) -> str | None:
    """Make ``point``'s checkpoint folder the one of ``run`` (a study's run id) before it
    trains: a folder another run left there (another study of this name, in another storage
    or before its database was deleted) is set aside, never adopted. Returns the warning to
    show, or None."""
    folder = checkpoint_folder(checkpoint_dir, point)
    if folder is None:
        return None
    marker = folder / OWNER_FILE
    note = None
    if folder.exists():
        try:
            owner = marker.read_text().strip()
        except OSError:
            owner = None
        if owner != run:
            note = (f"set aside checkpoint folder {folder} as {set_aside(folder).name}: another run's (not written "
                    "by this study), never adopted")
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        tmp = folder / f".{OWNER_FILE}.{os.getpid()}"
        tmp.write_text(run + "\n")
        os.replace(tmp, marker)
    return note


def remove_checkpoints(checkpoint_dir, point: Point) -> None:
    folder = checkpoint_folder(checkpoint_dir, point)
    if folder is not None and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)


def run_point(plan: Plan, point: Point, done: dict[str, dict] | None = None, *,
              engine: Engine | None = None, checkpoint_dir: str | os.PathLike | None = None,
              on_fold: Callable[[Fold, dict, dict], None] | None = None,
              on_epoch: Callable[[Fold, EpochMetrics], None] | None = None,
              should_stop: Callable[[], bool] | None = None, pack: int = 1, packs: Packs | None = None) -> PointOutcome:
    """Train ``point`` on every fold of its repeat that ``done`` (fold name -> record) does
    not hold yet, in fold order, and summarise. A fold with a checkpoint resumes from it.
    ``pack`` > 1 trains that many folds at once as one packed network (same results to float
    rounding; the packs are the repeat's folds cut in runs of ``pack``, whichever are done,
    so that a resumed point packs its folds as an uninterrupted one; ``packs``: the engine's packs,
    reused from point to point). Each record says what
    its fold was trained under (``numerics``). ``on_fold(fold, record, all_records)`` runs as
    each fold finishes."""
    records = dict(done or {})
    for name, record in records.items():
        if record["status"] == "diverged":
            return PointOutcome("diverged", records, reason=_diverged(name, record))
    model = plan.config.model
    engine = engine_for(engine, plan.data, plan.train, model.name, point.attention, model.shortcut)
    folder = checkpoint_folder(checkpoint_dir, point)
    folds, start = plan.folds_of(point.repeat), 0
    for size in chunk_sizes(len(folds), max(1, pack)):
        group = [f for f in folds[start : start + size] if f.name not in records]
        start += size
        if not group:
            continue
        paths = [folder / f"{f.name}.pt" if folder is not None else None for f in group]
        numerics = training_numerics(engine, plan.train, len(group))
        results = train_group(plan.data, group, point.e_lambda, plan.train, seeds=[plan.train_seed(f) for f in group],
                              model=model.name, attention=point.attention, shortcut=model.shortcut,
                              engine=engine, checkpoints=paths, on_epoch=on_epoch, should_stop=should_stop,
                              packs=packs, numerics=numerics)
        for fold, result in zip(group, results):  # finished folds are kept, also when others stopped
            if result.status != "stopped":
                records[fold.name] = fold_record(result, trained_under(result, numerics), len(fold.val))
                if on_fold is not None:
                    on_fold(fold, records[fold.name], records)
        for fold, result in zip(group, results):
            if result.status == "diverged":
                return PointOutcome("diverged", records, reason=_diverged(fold.name, records[fold.name]))
        stopped = [f"{f.name} at step {r.iterations}" for f, r in zip(group, results) if r.status == "stopped"]
        if stopped:  # (each at the step it stopped at: its checkpoint's, where it has one)
            return PointOutcome("stopped", records, reason=f"interrupted in fold {', '.join(stopped)}")
    accuracies = [records[f.name]["val_accuracy"] for f in plan.folds_of(point.repeat)]
    return PointOutcome("completed", records, summary=summarize(accuracies))


def trained_under(result: FoldResult, numerics: dict) -> dict:
    """A fold record's numerics: ``numerics``, or ``{"resumed_under": [...]}`` where the fold
    resumed from a checkpoint made under other numerics (a task requeued onto another kind of
    device, say: the study then reports mixed numerics)."""
    under = result.trained_under or [numerics]
    return under[0] if len(under) == 1 else {"resumed_under": under}


def _diverged(fold: str, record: dict) -> str:
    return f"diverged: the training loss became NaN or infinite at step {record['diverged_at_step']} of fold {fold}"
