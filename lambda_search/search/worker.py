"""A worker: the one loop every search runs, whatever its strategy: ask (the study's
strategy, through the points' status), claim a point (``store.claims``: under the claim lock,
with a lease), run its folds, tell (record the outcome), until the study is done.

A dead worker's trial is known dead at once and its point run again, keeping its finished
folds and resuming the fold in flight from its checkpoint. Every training runs under the
numerics the study pins for the worker's kind of device (see ``train.numerics``).
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from typing import Callable

import optuna

from ..bench.measure import Engines, worker_pack
from ..config import Config, ConfigError
from ..configfile import IDENTITY_EXEMPT, resolve_config
from ..nn.kernels import cpu_kernel, use_kernels
from ..points import fold_accuracies, fold_names
from ..report.select import record_choice
from ..store.claims import Claim, claim_next, record_outcome
from ..store.failures import failures
from ..store.status import (
    FINGERPRINT_ATTR,
    NUMERICS_ATTR,
    RUN_ATTR,
    StudyError,
    load_study_config,
    study_pins,
    study_status,
)
from ..store.storage import Store
from ..train.numerics import device_kind, proposed_pin
from ..train.plan import Plan, make_plan, own_checkpoints, remove_checkpoints, run_point

__all__ = ["run_worker"]


# ---------------------------------------------------------------- pinned numerics and run ids


def _run_id(store: Store, name: str) -> str:
    """Study ``name``'s run id (given to a study made before run ids were, on first use)."""
    run = store.study_attrs(name).get(RUN_ATTR)
    if run is None:
        with store.locks.exclusive():
            run = store.study_attrs(name).get(RUN_ATTR)
            if run is None:
                run = uuid.uuid4().hex
                store.set_study_attr(name, RUN_ATTR, run)
    return run


def pin_numerics(store: Store, name: str, kind: str, proposal: dict) -> dict:
    """The numerics study ``name`` pins for workers on ``kind`` devices: stored ones, else
    ``proposal``, stored now (under the claim lock: of two first workers, one pins)."""
    with store.locks.exclusive():
        pins = study_pins(store, name)
        if kind not in pins:
            pins[kind] = proposal
            store.set_study_attr(name, NUMERICS_ATTR, pins)
        return pins[kind]


def describe_pin(kind: str, pin: dict, plan: Plan) -> str:
    packs = [(f"{n} folds at once" if n > 1 else "folds one at a time") + (" (baseline)" if a == "none" else "")
             for a, n in sorted(pin["packs"].items(), reverse=True)]
    if kind == "cpu":
        t = plan.train.threads
        packs[:0] = [f"{t} thread{'s' if t > 1 else ''} per training",
                     f"SimAM's CPU kernel {'on' if pin['simam_kernel'] else 'off'}"]
    return f"numerics pinned for {kind} workers: " + ", ".join(packs)


# ---------------------------------------------------------------- workers


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# what the logs call things: in a search (validation folds), in a final evaluation (a test per seed)
WORDS = {False: {"acc": "val acc", "mean": "mean val acc", "done": "folds done",
                 "kept": "finished folds and checkpoint"},
         True: {"acc": "test acc", "mean": "test acc", "done": "trainings done", "kept": "checkpoint"}}


def _tell(store: Store, claim: Claim, outcome, names: list[str], checkpoint_dir, log, test: bool) -> None:
    """Record how the point ended, then drop its checkpoints where it is done (complete, or
    diverged: a result, never retried)."""
    record_outcome(store, claim, outcome, names)
    point, number, words = claim.point, claim.number, WORDS[test]
    if outcome.status == "completed":
        remove_checkpoints(checkpoint_dir, point)
        summary = outcome.summary
        std = f" +- {summary['std']:.4f}" if summary["std"] is not None else ""
        log(f"trial {number} complete: {point.label(test)} {words['mean']} {summary['mean']:.4f}{std}")
    elif outcome.status == "diverged":
        remove_checkpoints(checkpoint_dir, point)
        log(f"trial {number} FAILED: {point.label(test)} {outcome.reason}")
    else:
        log(f"trial {number} interrupted: {point.label(test)}, {outcome.reason}; {words['kept']} kept")


def _run_claim(store: Store, plan: Plan, claim: Claim, engines: Engines, *, checkpoint_dir, log, progress,
               should_stop, stats: dict, label: str, n_workers: int, pack: int = 1) -> str:
    tid, point, test = claim.trial_id, claim.point, plan.config.data.test  # test: a final evaluation's seed
    names = fold_names(plan.config, point.repeat)
    epochs = None
    claim_done = sum(r.get("status") == "completed" for r in claim.done.values())

    def on_fold(fold, record, records):
        store.set_trial_attr(tid, "fold_results", records)
        store.set_trial_attr(tid, "fold_accuracies", fold_accuracies(records, names))
        stats["folds"] += 1
        stats["seconds"] += record["seconds"]
        total_folds = claim.folds_total  # as the study stood when the point was claimed, and this point since
        done_folds = claim.folds_done + sum(r["status"] == "completed" for r in records.values()) - claim_done
        eta = (total_folds - done_folds) * stats["seconds"] / stats["folds"] / max(1, n_workers)
        acc, words = record["val_accuracy"], WORDS[test]
        shown = f"{words['acc']} {acc:.4f}" if acc is not None else record["status"]
        log(f"{label}{point.label(test)}{'' if test else f' fold {fold.name}'}: {shown} in {record['seconds']:.1f} s | "
            f"{done_folds}/{total_folds} {words['done']}, ETA {_eta(eta)}")

    def on_epoch(fold, m):
        nonlocal epochs
        if progress is None:
            return
        if epochs is None:
            epochs = math.ceil(
                plan.train.total_iterations(len(fold.train)) / (len(fold.train) // plan.train.batch_size)
            )
        val = f" val {m.val_accuracy:.4f}" if m.val_accuracy is not None else ""
        progress(f"{label}{point.label(test)}{'' if test else f' fold {fold.name}'} epoch {m.epoch}/{epochs} "
                 f"loss {m.train_loss:.4f}{val}")

    reused = [n for n in names if n in claim.done]
    log(
        f"{label}{'baseline ' if point.baseline else ''}trial {claim.number}: {point.label(test)}"
        + (f" (keeps finished folds {', '.join(reused)})" if reused else "")
    )
    try:
        engine, pack_cache = engines(point.attention), engines.packs(point.attention)  # built once, may fail
        note = own_checkpoints(checkpoint_dir, point, _run_id(store, plan.config.study.name))
        if note:
            log(f"{label}warning: {note}")
        outcome = run_point(plan, point, claim.done, engine=engine, checkpoint_dir=checkpoint_dir,
                            on_fold=on_fold, on_epoch=on_epoch, should_stop=should_stop, pack=pack, packs=pack_cache)
        _tell(store, claim, outcome, names, checkpoint_dir, lambda text: log(label + text), test)
        return outcome.status
    except optuna.exceptions.UpdateFinishedTrialError:
        log(f"{label}trial {claim.number} was declared lost by another worker; its folds are kept for the re-run")
        return "lost"
    except BaseException as exc:
        with contextlib.suppress(Exception):
            store.fail_trial(tid, f"error: {type(exc).__name__}: {exc}")
        raise
    finally:
        claim.lease.release()


def worker_config(store: Store, name: str, overrides=()) -> Config:
    config = load_study_config(store, name)
    if overrides:
        keys = [o.split("=", 1)[0].strip() for o in overrides]
        bad = [k for k in keys if k not in IDENTITY_EXEMPT]
        if bad:
            raise ConfigError(f"--set {bad[0]}: a stored study's config can only change where and how fast it runs: "
                              + ", ".join(sorted(IDENTITY_EXEMPT)))
        config = resolve_config(config, overrides, origin=f"study {name!r}")
    return config


def _measured_pin(plan: Plan, engines: Engines, log, label: str) -> dict:
    """The pin a first worker of its device kind proposes: pack sizes measured (on a GPU) or
    set by train.pack, engines built for each network of the grid."""
    packs = {}
    for attention in sorted({p.attention for p in plan.points}):
        size, seconds = worker_pack(plan, engines(attention))
        if size > 1 and seconds:
            log(f"{label}packing {size} folds at once ({attention}): {size * seconds[1] / seconds[size]:.2f}x the "
                f"training images/s of one at a time")
        packs[attention] = size
    return proposed_pin(plan.train.device, packs)


def run_worker(store: Store, name: str, *, overrides=(), device: str | None = None, label: str = "",
               log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None, poll_seconds: float = 2.0, n_workers: int = 1,
               plan: Plan | None = None, pin: dict | None = None, engines: Engines | None = None) -> dict:
    """Claim and run points of study ``name`` until every point is complete (or diverged),
    waiting while the last ones run elsewhere (to take them over if their workers die).
    Every training runs under the numerics the study pins for this worker's kind of device
    (``pin``, read from the study where not given; the first worker of a kind pins it: pack
    sizes measured on a GPU where train.pack is "auto", SimAM's CPU kernel on where it can be
    built). ``engines``: the networks' engines, reused where given (built and compiled once).
    Returns counts: {"completed", "diverged", "interrupted", "lost"}."""
    with failures():
        counts = _run_worker(store, name, overrides=overrides, device=device, label=label, log=log,
                             progress=progress, should_stop=should_stop, poll_seconds=poll_seconds,
                             n_workers=n_workers, plan=plan, pin=pin, engines=engines)
        if not (should_stop and should_stop()):
            record_choice(store, study_status(store, name))
        return counts


def _run_worker(store: Store, name: str, *, overrides=(), device: str | None = None, label: str = "",
                log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None,
                should_stop: Callable[[], bool] | None = None, poll_seconds: float = 2.0, n_workers: int = 1,
                plan: Plan | None = None, pin: dict | None = None, engines: Engines | None = None) -> dict:
    should_stop = should_stop or (lambda: False)
    if plan is None:
        config = worker_config(store, name, overrides)
        plan = make_plan(config, device)
        if store.study_attrs(name).get(FINGERPRINT_ATTR) != plan.fingerprint:
            raise StudyError(f"the data set or its folds differ from those study {name!r} was made with; "
                             "check data.root (--set data.root=...)")
    engines = Engines(plan) if engines is None else engines
    kind = device_kind(plan.train.device)
    if pin is None:
        pin = study_pins(store, name).get(kind)
        pin = pin or pin_numerics(store, name, kind, _measured_pin(plan, engines, log, label))
    with use_kernels(pin["simam_kernel"]):
        if pin["simam_kernel"] and cpu_kernel() is None:
            log(f"{label}warning: the study pins SimAM's CPU kernel on, but it cannot be built here: this worker's "
                "folds run the PyTorch formula, and status will report them as trained under other numerics")
        return _work(store, name, plan, pin["packs"], engines, label=label, log=log, progress=progress,
                     should_stop=should_stop, poll_seconds=poll_seconds, n_workers=n_workers)


def _work(store: Store, name: str, plan: Plan, packs: dict[str, int], engines: Engines, *, label, log,
          progress, should_stop, poll_seconds, n_workers) -> dict:
    config = plan.config
    checkpoint_dir = config.study.checkpoint_dir
    counts = {"completed": 0, "diverged": 0, "interrupted": 0, "lost": 0}
    stats = {"folds": 0, "seconds": 0.0}
    while not should_stop():
        claim = claim_next(store, name, config)
        if claim == "done":
            break
        if claim == "wait":
            deadline = time.monotonic() + poll_seconds
            while time.monotonic() < deadline and not should_stop():
                time.sleep(0.1)
            continue
        status = _run_claim(store, plan, claim, engines, checkpoint_dir=checkpoint_dir, log=log,
                            progress=progress, should_stop=should_stop, stats=stats, label=label, n_workers=n_workers,
                            pack=packs.get(claim.point.attention, 1))
        counts["interrupted" if status == "stopped" else status] += 1
        if status == "stopped":
            break
    return counts
