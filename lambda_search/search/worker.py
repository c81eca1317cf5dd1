"""A worker: claim a grid point, train its folds, store what it finished, until the study is done.

A worker claims a point under the storage's claim lock and holds a lease on its trial while
it runs (see ``_storage``): no two workers take the same point, and a dead worker's trial is
known dead at once and run again, keeping its finished folds and resuming the fold in
flight from its checkpoint. Every training runs under the numerics the study pins for the
worker's kind of device (see ``_numerics``).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from ..bench.measure import Engines, worker_pack
from ..config import Config, ConfigError
from ..configfile import IDENTITY_EXEMPT, resolve_config
from ..nn.kernels import cpu_kernel, use_kernels
from ..points import Point, fold_names
from ..report.select import record_choice
from ..store.failures import failures
from ..store.status import (
    FINGERPRINT_ATTR,
    NUMERICS_ATTR,
    POINT_ATTR,
    REASON_ATTR,
    RUN_ATTR,
    StudyError,
    all_trials,
    baseline_study_name,
    fold_accuracies,
    live_trials,
    load_study_config,
    name_metric,
    point_statuses,
    quiet_optuna,
    study_id,
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
    sid = study_id(store, name)
    run = store.storage.get_study_user_attrs(sid).get(RUN_ATTR)
    if run is None:
        with store.locks.exclusive():
            run = store.storage.get_study_user_attrs(sid).get(RUN_ATTR)
            if run is None:
                run = uuid.uuid4().hex
                store.storage.set_study_user_attr(sid, RUN_ATTR, run)
    return run


def pin_numerics(store: Store, name: str, kind: str, proposal: dict) -> dict:
    """The numerics study ``name`` pins for workers on ``kind`` devices: stored ones, else
    ``proposal``, stored now (under the claim lock: of two first workers, one pins)."""
    with store.locks.exclusive():
        pins = study_pins(store, name)
        if kind not in pins:
            pins[kind] = proposal
            store.storage.set_study_user_attr(study_id(store, name), NUMERICS_ATTR, pins)
        return pins[kind]


def describe_pin(kind: str, pin: dict, plan: Plan) -> str:
    packs = [(f"{n} folds at once" if n > 1 else "folds one at a time") + (" (baseline)" if a == "none" else "")
             for a, n in sorted(pin["packs"].items(), reverse=True)]
    if kind == "cpu":
        t = plan.train.threads
        packs[:0] = [f"{t} thread{'s' if t > 1 else ''} per training",
                     f"SimAM's CPU kernel {'on' if pin['simam_kernel'] else 'off'}"]
    return f"numerics pinned for {kind} workers: " + ", ".join(packs)


# ---------------------------------------------------------------- claiming a point


@dataclass
class Claim:
    trial_id: int
    number: int
    point: Point
    done: dict  # fold name -> record, finished by earlier attempts
    lease: object


def _fail(store: Store, trial_id: int, reason: str) -> None:
    storage = store.storage
    try:
        storage.set_trial_system_attr(trial_id, REASON_ATTR, reason[:500])
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        pass  # finished meanwhile


def _claim(store: Store, name: str, config: Config, label: str) -> Claim | str:
    """Under the claim lock: fail the trials of dead workers, then take the first point that
    is neither done nor running. Returns a Claim, "wait" (the rest is running elsewhere) or
    "done"."""
    storage = store.storage
    with store.locks.exclusive():  # no lease is taken while we hold it: leases only go away
        trials, live = live_trials(store, name)
        dead = [t._trial_id for _, t in trials if t.state == TrialState.RUNNING and t._trial_id not in live]
        for trial_id in dead:
            _fail(store, trial_id, "worker lost: its process ended before the trial finished")
        if dead:
            trials = all_trials(store, name)
        statuses = point_statuses(store, name, config, trials, live)
        free = [s for s in statuses if s.state in ("pending", "interrupted")]
        if not free:
            return "wait" if any(s.state == "running" for s in statuses) else "done"
        s = free[0]
        point = s.point
        study = baseline_study_name(name) if point.baseline else name
        sid = study_id(store, study)
        if sid is None:
            quiet_optuna()
            sid = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], study)
            storage.set_study_user_attr(sid, "lambda_search:baseline_of", name)
            name_metric(store, study)
        lambdas = config.search.lambdas
        params, dists = {}, {}
        if not point.baseline:
            params["e_lambda"] = point.e_lambda
            dists["e_lambda"] = FloatDistribution(min(lambdas), max(lambdas), log=True)
        if config.search.repeats > 1:
            params["repeat"] = point.repeat
            dists["repeat"] = IntDistribution(0, config.search.repeats - 1)
        template = create_trial(
            state=TrialState.RUNNING, params=params, distributions=dists,
            system_attrs={POINT_ATTR: point.key, "lambda_search:worker": f"{socket.gethostname()}:{os.getpid()}"},
            user_attrs={"e_lambda": point.e_lambda, "repeat": point.repeat, "attention": point.attention,
                        "fold_names": s.fold_names, "fold_results": s.folds,
                        "fold_accuracies": s.fold_accuracies})
        trial_id = storage.create_new_trial(sid, template)
        lease = store.locks.lease(trial_id)
        try:
            number = storage.get_trial(trial_id).number
        except BaseException:
            lease.release()  # never a lease left held by a trial nobody runs
            raise
        return Claim(trial_id, number, point, dict(s.folds), lease)


# ---------------------------------------------------------------- workers


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _record(store: Store, claim: Claim, outcome, names: list[str], checkpoint_dir, log) -> None:
    """Store a point's outcome on its trial: COMPLETE with its summary, FAILED as diverged (a
    result: never retried), or FAILED as interrupted (its finished folds kept for the re-run)."""
    tid, point = claim.trial_id, claim.point
    if outcome.status == "completed":
        summary = outcome.summary
        for key, value in (("mean", summary["mean"]), ("std", summary["std"]), ("std_ddof", summary["std_ddof"]),
                           ("sem", summary["sem"]),
                           ("fold_seconds", [outcome.folds[n]["seconds"] for n in names]),
                           ("seeds", [outcome.folds[n]["seed"] for n in names])):
            store.storage.set_trial_user_attr(tid, key, value)
        store.storage.set_trial_state_values(tid, TrialState.COMPLETE, [summary["mean"]])
        remove_checkpoints(checkpoint_dir, point)
        std = f" +- {summary['std']:.4f}" if summary["std"] is not None else ""
        log(f"trial {claim.number} complete: {point.label()} mean val acc {summary['mean']:.4f}{std}")
    elif outcome.status == "diverged":
        store.storage.set_trial_user_attr(tid, "failure", outcome.reason)
        _fail(store, tid, outcome.reason)
        remove_checkpoints(checkpoint_dir, point)
        log(f"trial {claim.number} FAILED: {point.label()} {outcome.reason}")
    else:
        _fail(store, tid, "interrupted")
        log(f"trial {claim.number} interrupted: {point.label()}; finished folds and checkpoint kept")


def _run_claim(store: Store, plan: Plan, claim: Claim, engines: Engines, *, checkpoint_dir, log, progress,
               should_stop, stats: dict, label: str, n_workers: int, pack: int = 1) -> str:
    storage, tid, point = store.storage, claim.trial_id, claim.point
    names = fold_names(plan.config, point.repeat)
    epochs = None

    def on_fold(fold, record, records):
        storage.set_trial_user_attr(tid, "fold_results", records)
        storage.set_trial_user_attr(tid, "fold_accuracies", fold_accuracies(records, names))
        stats["folds"] += 1
        stats["seconds"] += record["seconds"]
        total_folds = len(plan.points) * len(names)
        done_folds = sum(s.folds_done for s in point_statuses(store, plan.config.study.name, plan.config))
        eta = (total_folds - done_folds) * stats["seconds"] / stats["folds"] / max(1, n_workers)
        acc = record["val_accuracy"]
        shown = f"val acc {acc:.4f}" if acc is not None else record["status"]
        log(f"{label}{point.label()} fold {fold.name}: {shown} in {record['seconds']:.1f} s | "
            f"{done_folds}/{total_folds} folds done, ETA {_eta(eta)}")

    def on_epoch(fold, m):
        nonlocal epochs
        if progress is None:
            return
        if epochs is None:
            epochs = math.ceil(
                plan.train.total_iterations(len(fold.train)) / (len(fold.train) // plan.train.batch_size)
            )
        val = f" val {m.val_accuracy:.4f}" if m.val_accuracy is not None else ""
        progress(f"{label}{point.label()} fold {fold.name} epoch {m.epoch}/{epochs} loss {m.train_loss:.4f}{val}")

    reused = [n for n in names if n in claim.done]
    log(
        f"{label}{'baseline ' if point.baseline else ''}trial {claim.number}: {point.label()}"
        + (f" (keeps finished folds {', '.join(reused)})" if reused else "")
    )
    try:
        engine, pack_cache = engines(point.attention), engines.packs(point.attention)  # built once, may fail
        note = own_checkpoints(checkpoint_dir, point, _run_id(store, plan.config.study.name))
        if note:
            log(f"{label}warning: {note}")
        outcome = run_point(plan, point, claim.done, engine=engine, checkpoint_dir=checkpoint_dir,
                            on_fold=on_fold, on_epoch=on_epoch, should_stop=should_stop, pack=pack, packs=pack_cache)
        _record(store, claim, outcome, names, checkpoint_dir, lambda text: log(label + text))
        return outcome.status
    except optuna.exceptions.UpdateFinishedTrialError:
        log(f"{label}trial {claim.number} was declared lost by another worker; its folds are kept for the re-run")
        return "lost"
    except BaseException as exc:
        with contextlib.suppress(Exception):
            _fail(store, tid, f"error: {type(exc).__name__}: {exc}")
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
        stored = store.storage.get_study_user_attrs(store.storage.get_study_id_from_name(name))
        if stored.get(FINGERPRINT_ATTR) != plan.fingerprint:
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
        claim = _claim(store, name, config, label)
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
