"""The lambda search as an Optuna study: every grid point exactly once.

A trial is one grid point (a lambda and a repeat) cross-validated over the folds of its
repeat: the Optuna parameter ``e_lambda``, the value the mean validation accuracy (a
fraction), user attributes with the per-fold results, written as each fold finishes. The
baseline network (no SimAM), when asked for, lives in a companion study
``<name>:baseline``, so that the main study holds only SimAM trials and
``study.best_params`` is always a lambda.

A worker claims a point under the storage's claim lock and holds a lease on its trial while
it runs (see ``_storage``). A point is done when it has a COMPLETE trial, or a FAILED one
whose reason is "diverged" (divergence is a result, not an accident: it is not retried). A
trial that FAILED for any other reason (interrupted, its worker died, an error) gives its
point back to the grid; the next attempt keeps the folds it had finished and resumes the
fold in flight from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from ._config import IDENTITY_EXEMPT, ConfigError, config_diff, resolve_config
from ._kernels import cpu_kernel, use_kernels
from ._numerics import device_kind, distinct_numerics, mixed_folds, proposed_pin
from ._objective import (Plan, Point, fold_names, grid_points, make_plan, own_checkpoints, remove_checkpoints,
                         run_point)
from ._bench import format_seconds, plan_engine, quick_projection, worker_pack
from ._storage import Store, open_store, redact
from ._train import Engine

__all__ = ["StudyError", "PointStatus", "StudyStatus", "baseline_study_name", "create_or_resume", "load_study_config",
           "study_status", "run_worker", "run_search", "resume_config", "stop_on_signals", "STORAGE_ENV",
           "list_studies"]

CONFIG_ATTR = "lambda_search:config"
FINGERPRINT_ATTR = "lambda_search:fingerprint"
VERSIONS_ATTR = "lambda_search:versions"
POINT_ATTR = "lambda_search:point"
REASON_ATTR = "lambda_search:fail_reason"
RUN_ATTR = "lambda_search:run"  # a study's own id: its checkpoint folders carry it (never another's adopted)
NUMERICS_ATTR = "lambda_search:numerics"  # device kind -> the pin its workers use (see _numerics)
STORAGE_ENV = "LAMBDA_SEARCH_STORAGE"  # how a parent hands a storage URL to its workers (never argv)


class StudyError(ValueError):
    """A study that cannot be used as asked (unknown, conflicting, not lambda_search's)."""


def baseline_study_name(name: str) -> str:
    return f"{name}:baseline"


def _versions() -> dict:
    from . import __version__

    return {"lambda_search": __version__, "torch": torch.__version__, "optuna": optuna.__version__,
            "python": sys.version.split()[0]}


def _study_id(store: Store, name: str) -> int | None:
    try:
        return store.storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------- creating and resuming


def _absolute(config: dict) -> dict:
    """The config as stored: paths absolute (``resume`` works from any folder), the storage
    URL without its password."""
    config = json.loads(json.dumps(config))
    config["study"]["storage"] = redact(config["study"]["storage"])  # never store a password
    for section, key in (("data", "root"), ("study", "checkpoint_dir")):
        if config[section][key] is not None:
            config[section][key] = str(Path(config[section][key]).expanduser().resolve())
    return config


def load_study_config(store: Store, name: str) -> dict:
    """The resolved config stored in study ``name``."""
    sid = _study_id(store, name)
    if sid is None:
        names = [n for n in store.study_names() if not n.endswith(":baseline")]
        there = ", ".join(repr(n) for n in names) if names else "none"
        raise StudyError(f"no study named {name!r} in {store.shown}; studies there: {there}")
    attrs = store.storage.get_study_user_attrs(sid)
    if CONFIG_ATTR not in attrs:
        raise StudyError(f"study {name!r} in {store.shown} was not made by lambda_search (it has no stored config)")
    return _completed(attrs[CONFIG_ATTR])


def _completed(stored: dict) -> dict:
    """A stored config with the defaults of keys added since it was stored (train.threads)."""
    return resolve_config(stored, origin="the stored config")


def create_or_resume(store: Store, config: dict, plan: Plan) -> str:
    """Create study ``config.study.name`` with its config, fingerprint and versions, or check
    that the stored study has the same config and data. Returns "created" or "resumed"."""
    name = config["study"]["name"]
    stored_config = _absolute(config)
    with store.locks.exclusive():
        sid = _study_id(store, name)
        if sid is None:
            _quiet_optuna()
            sid = store.storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
            created = "created"
        else:
            created = "resumed"
        attrs = store.storage.get_study_user_attrs(sid)
        if CONFIG_ATTR not in attrs:
            if store.storage.get_all_trials(sid, deepcopy=False):
                raise StudyError(f"study {name!r} in {store.shown} was not made by lambda_search; choose another study.name")
            _check_adoptable(store, name, sid)
            store.storage.set_study_user_attr(sid, FINGERPRINT_ATTR, plan.fingerprint)
            store.storage.set_study_user_attr(sid, VERSIONS_ATTR, _versions())
            store.storage.set_study_user_attr(sid, RUN_ATTR, uuid.uuid4().hex)
            store.storage.set_study_user_attr(sid, CONFIG_ATTR, stored_config)  # last: marks the study complete
            return "created"
        _check_same(name, attrs, stored_config, plan)
        return created


def _check_adoptable(store: Store, name: str, sid: int) -> None:
    """An empty study lambda_search did not make (or its baseline companion) is adopted only
    where it maximizes one value, as lambda_search's accuracies need: else Optuna's
    best_params would name the worst lambda."""
    maximize = [optuna.study.StudyDirection.MAXIMIZE]
    for study, study_id in ((name, sid), (baseline_study_name(name), _study_id(store, baseline_study_name(name)))):
        if study_id is None:
            continue
        directions = store.storage.get_study_directions(study_id)
        if study != name and store.storage.get_all_trials(study_id, deepcopy=False):
            raise StudyError(f"study {study!r} in {store.shown} was not made by lambda_search and has trials; "
                             "choose another study.name")
        if directions != maximize:
            shown = ", ".join(d.name.lower() for d in directions)
            raise StudyError(f"study {study!r} in {store.shown} was not made by lambda_search and its direction is "
                             f"{shown}, not maximize (lambda_search maximizes accuracy); choose another study.name or "
                             f"delete it: optuna delete-study --study-name {study!r} --storage URL")


def _check_same(name: str, attrs: dict, config: dict, plan: Plan) -> None:
    diff = config_diff(_completed(attrs[CONFIG_ATTR]), config)
    if diff:
        parts = [f"{k} (stored {_show(a)}, given {_show(b)})" for k, a, b in diff[:4]]
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise StudyError(f"config conflicts with study {name!r}: " + "; ".join(parts) + more
                         + "; use another study.name, or resume with the stored config (lambda-search resume)")
    if attrs.get(FINGERPRINT_ATTR) != plan.fingerprint:
        raise StudyError(f"the data set or its folds differ from those study {name!r} was made with "
                         f"(fingerprint {str(attrs.get(FINGERPRINT_ATTR))[:12]} stored, {plan.fingerprint[:12]} now)")


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


# ---------------------------------------------------------------- the state of every point


@dataclass
class PointStatus:
    """``state``: "complete", "running", "diverged", "interrupted" (tried, to be resumed:
    ``folds`` holds what it finished) or "pending" (never tried)."""

    point: Point
    state: str
    folds: dict = field(default_factory=dict)  # fold name -> fold record (finished folds)
    fold_names: list = field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    sem: float | None = None
    trial_number: int | None = None
    attempts: int = 0
    reason: str | None = None

    @property
    def fold_accuracies(self) -> list[float | None]:
        """Accuracy per fold of the plan, None where the fold is not finished."""
        return _fold_accuracies(self.folds, self.fold_names)

    @property
    def folds_done(self) -> int:
        return sum(1 for r in self.folds.values() if r.get("status") == "completed")

    def to_dict(self) -> dict:
        return {"e_lambda": self.point.e_lambda, "repeat": self.point.repeat, "baseline": self.point.baseline,
                "state": self.state, "folds_done": self.folds_done, "folds": len(self.fold_names),
                "mean": self.mean, "std": self.std, "sem": self.sem,
                "fold_accuracies": self.fold_accuracies,
                "fold_seconds": [self.folds.get(n, {}).get("seconds") for n in self.fold_names],
                "fold_numerics": [self.folds.get(n, {}).get("numerics") for n in self.fold_names],
                "trial": self.trial_number, "attempts": self.attempts, "reason": self.reason}


@dataclass
class StudyStatus:
    name: str
    config: dict
    points: list[PointStatus]
    storage: str  # redacted URL
    pinned: dict = field(default_factory=dict)  # device kind -> pinned numerics (SimAM kernel, packs)

    def _finished(self):
        return [(n, r) for p in self.points for n, r in p.folds.items() if r.get("status") == "completed"]

    @property
    def numerics(self) -> list[dict]:
        """The distinct numerics its finished folds were trained under, [{"numerics", "folds"}]."""
        return distinct_numerics(r for _, r in self._finished())

    @property
    def mixed_folds(self) -> list[str]:
        """The folds whose points were trained under more than one numerics: on those, lambdas
        (and the baseline) are not compared bit for bit."""
        by_fold: dict[str, list[dict]] = {}
        for name, record in self._finished():
            by_fold.setdefault(name, []).append(record)
        return mixed_folds(by_fold)

    @property
    def mixed_numerics(self) -> bool:
        return bool(self.mixed_folds)

    @property
    def total(self) -> int:
        return len(self.points)

    @property
    def complete(self) -> int:
        return sum(p.state == "complete" for p in self.points)

    @property
    def finished(self) -> bool:
        return all(p.state in ("complete", "diverged") for p in self.points)

    def to_dict(self) -> dict:
        return {"study": self.name, "storage": self.storage, "total": self.total, "complete": self.complete,
                "diverged": sum(p.state == "diverged" for p in self.points),
                "numerics": {"mixed": self.mixed_numerics, "mixed_folds": self.mixed_folds, "distinct": self.numerics,
                             "pinned": self.pinned},
                "points": [p.to_dict() for p in self.points]}


def _fold_accuracies(records: dict, names: list[str]) -> list[float | None]:
    return [records.get(n, {}).get("val_accuracy") for n in names]


def _all_trials(store: Store, name: str) -> list[tuple[str, FrozenTrial]]:
    out = []
    for study in (name, baseline_study_name(name)):
        sid = _study_id(store, study)
        if sid is not None:
            out += [(study, t) for t in store.storage.get_all_trials(sid, deepcopy=False)]
    return out


def _point_status(point: Point, names: list[str], trials: list[FrozenTrial], alive: Callable[[int], bool]) -> PointStatus:
    status = PointStatus(point, "pending", fold_names=names, attempts=len(trials))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        t = complete[0]
        a = t.user_attrs
        status.state, status.trial_number, status.folds = "complete", t.number, dict(a.get("fold_results", {}))
        status.mean, status.std, status.sem = a.get("mean", t.value), a.get("std"), a.get("sem")
        return status
    for t in trials:
        reason = t.system_attrs.get(REASON_ATTR, "")
        if t.state == TrialState.FAIL and reason.startswith("diverged"):
            status.state, status.trial_number, status.reason = "diverged", t.number, reason
            status.folds = dict(t.user_attrs.get("fold_results", {}))
            return status
    # finished folds of earlier attempts are kept (the newest record of a fold wins)
    for t in sorted(trials, key=lambda t: t.number):
        for fold, record in t.user_attrs.get("fold_results", {}).items():
            if record.get("status") in ("completed", "diverged"):
                status.folds[fold] = record
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if any(alive(t._trial_id) for t in running):
        status.state, status.trial_number = "running", running[-1].number
    elif trials:
        status.state = "interrupted"
        last = max(trials, key=lambda t: t.number)
        status.trial_number = last.number
        status.reason = last.system_attrs.get(REASON_ATTR) or ("worker gone" if last.state == TrialState.RUNNING else None)
    return status


def _live_trials(store: Store, name: str):
    """(trials, ids of live RUNNING trials), consistent: liveness is checked before the
    trials are read again. A worker writes COMPLETE before it drops its lease, so a trial
    still RUNNING in the second read whose lease was already gone is really dead; checking
    after the read could see a trial that finished in between as dead."""
    first = _all_trials(store, name)
    candidates = [t._trial_id for _, t in first if t.state == TrialState.RUNNING]
    live = {tid for tid in candidates if store.locks.alive(tid)}
    return (_all_trials(store, name) if candidates else first), live


def _statuses(store: Store, name: str, config: dict, trials=None, live=None) -> list[PointStatus]:
    if trials is None:
        trials, live = _live_trials(store, name)
    by_key: dict[str, list[FrozenTrial]] = {}
    for _, t in trials:
        key = t.system_attrs.get(POINT_ATTR)
        if key is not None:
            by_key.setdefault(key, []).append(t)
    return [_point_status(p, fold_names(config, p.repeat), by_key.get(p.key, []), live.__contains__)
            for p in grid_points(config)]


def study_status(store: Store, name: str) -> StudyStatus:
    """Every grid point of study ``name``: its state, finished folds, mean and std. Reads only."""
    config = load_study_config(store, name)
    return StudyStatus(name, config, _statuses(store, name, config), store.shown, _pins(store, name))


def list_studies(store: Store) -> list[dict]:
    """Every study in ``store``: for lambda_search's, its points complete and whether it is
    finished, with its companions (``<name>:baseline``...) under it; other Optuna studies
    are listed as such. Reads only."""
    names = store.study_names()
    out = []
    for name in names:
        base = name.rsplit(":", 1)[0]
        if ":" in name and base in names:
            continue  # a companion, listed under its study
        entry = {"study": name, "lambda_search": False, "trials": None, "complete": None, "total": None,
                 "finished": None, "companions": [n for n in names if n.rsplit(":", 1)[0] == name and n != name]}
        sid = store.storage.get_study_id_from_name(name)
        if CONFIG_ATTR in store.storage.get_study_user_attrs(sid):
            status = study_status(store, name)
            entry.update(lambda_search=True, complete=status.complete, total=status.total, finished=status.finished)
        else:
            entry["trials"] = len(store.storage.get_all_trials(sid, deepcopy=False))
        out.append(entry)
    return out


# ---------------------------------------------------------------- pinned numerics


def _pins(store: Store, name: str) -> dict:
    sid = _study_id(store, name)
    return dict(store.storage.get_study_user_attrs(sid).get(NUMERICS_ATTR, {})) if sid is not None else {}


def _run_id(store: Store, name: str) -> str:
    """Study ``name``'s run id (given to a study made before run ids were, on first use)."""
    sid = _study_id(store, name)
    run = store.storage.get_study_user_attrs(sid).get(RUN_ATTR)
    if run is None:
        with store.locks.exclusive():
            run = store.storage.get_study_user_attrs(sid).get(RUN_ATTR)
            if run is None:
                run = uuid.uuid4().hex
                store.storage.set_study_user_attr(sid, RUN_ATTR, run)
    return run


def _pin(store: Store, name: str, kind: str, proposal: dict) -> dict:
    """The numerics study ``name`` pins for workers on ``kind`` devices: stored ones, else
    ``proposal``, stored now (under the claim lock: of two first workers, one pins)."""
    with store.locks.exclusive():
        pins = _pins(store, name)
        if kind not in pins:
            pins[kind] = proposal
            store.storage.set_study_user_attr(_study_id(store, name), NUMERICS_ATTR, pins)
        return pins[kind]


def _describe_pin(kind: str, pin: dict, plan: Plan) -> str:
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


def _claim(store: Store, name: str, config: dict, label: str) -> Claim | str:
    """Under the claim lock: fail the trials of dead workers, then take the first point that
    is neither done nor running. Returns a Claim, "wait" (the rest is running elsewhere) or
    "done"."""
    storage = store.storage
    with store.locks.exclusive():  # no lease is taken while we hold it: leases only go away
        trials, live = _live_trials(store, name)
        dead = [t._trial_id for _, t in trials if t.state == TrialState.RUNNING and t._trial_id not in live]
        for trial_id in dead:
            _fail(store, trial_id, "worker lost: its process ended before the trial finished")
        if dead:
            trials = _all_trials(store, name)
        statuses = _statuses(store, name, config, trials, live)
        free = [s for s in statuses if s.state in ("pending", "interrupted")]
        if not free:
            return "wait" if any(s.state == "running" for s in statuses) else "done"
        s = free[0]
        point = s.point
        study = baseline_study_name(name) if point.baseline else name
        sid = _study_id(store, study)
        if sid is None:
            _quiet_optuna()
            sid = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], study)
            storage.set_study_user_attr(sid, "lambda_search:baseline_of", name)
        lambdas = config["search"]["lambdas"]
        params, dists = {}, {}
        if not point.baseline:
            params["e_lambda"] = point.e_lambda
            dists["e_lambda"] = FloatDistribution(min(lambdas), max(lambdas), log=True)
        if config["search"]["repeats"] > 1:
            params["repeat"] = point.repeat
            dists["repeat"] = IntDistribution(0, config["search"]["repeats"] - 1)
        template = create_trial(
            state=TrialState.RUNNING, params=params, distributions=dists,
            system_attrs={POINT_ATTR: point.key, "lambda_search:worker": f"{socket.gethostname()}:{os.getpid()}"},
            user_attrs={"e_lambda": point.e_lambda, "repeat": point.repeat, "attention": point.attention,
                        "fold_names": s.fold_names, "fold_results": s.folds,
                        "fold_accuracies": s.fold_accuracies})
        trial_id = storage.create_new_trial(sid, template)
        lease = store.locks.lease(trial_id)
        number = storage.get_trial(trial_id).number
        return Claim(trial_id, number, point, dict(s.folds), lease)


# ---------------------------------------------------------------- workers


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _run_claim(store: Store, plan: Plan, claim: Claim, engine: Engine, *, checkpoint_dir, log, progress,
               should_stop, stats: dict, label: str, n_workers: int, pack: int = 1) -> str:
    storage, tid, point = store.storage, claim.trial_id, claim.point
    names = fold_names(plan.config, point.repeat)
    epochs = None

    def on_fold(fold, record, records):
        storage.set_trial_user_attr(tid, "fold_results", records)
        storage.set_trial_user_attr(tid, "fold_accuracies", _fold_accuracies(records, names))
        stats["folds"] += 1
        stats["seconds"] += record["seconds"]
        total_folds = len(plan.points) * len(names)
        done_folds = sum(s.folds_done for s in _statuses(store, plan.config["study"]["name"], plan.config))
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
            epochs = math.ceil(plan.train.total_iterations(len(fold.train)) / (len(fold.train) // plan.train.batch_size))
        val = f" val {m.val_accuracy:.4f}" if m.val_accuracy is not None else ""
        progress(f"{label}{point.label()} fold {fold.name} epoch {m.epoch}/{epochs} loss {m.train_loss:.4f}{val}")

    reused = [n for n in names if n in claim.done]
    log(f"{label}{'baseline ' if point.baseline else ''}trial {claim.number}: {point.label()}" + (f" (keeps finished folds {', '.join(reused)})" if reused else ""))
    try:
        note = own_checkpoints(checkpoint_dir, point, _run_id(store, plan.config["study"]["name"]))
        if note:
            log(f"{label}warning: {note}")
        outcome = run_point(plan, point, claim.done, engine=engine, checkpoint_dir=checkpoint_dir,
                            on_fold=on_fold, on_epoch=on_epoch, should_stop=should_stop, pack=pack)
        if outcome.status == "completed":
            summary = outcome.summary
            for key, value in (("mean", summary["mean"]), ("std", summary["std"]), ("std_ddof", summary["std_ddof"]),
                               ("sem", summary["sem"]),
                               ("fold_seconds", [outcome.folds[n]["seconds"] for n in names]),
                               ("seeds", [outcome.folds[n]["seed"] for n in names])):
                storage.set_trial_user_attr(tid, key, value)
            storage.set_trial_state_values(tid, TrialState.COMPLETE, [summary["mean"]])
            remove_checkpoints(checkpoint_dir, point)
            std = f" +- {summary['std']:.4f}" if summary["std"] is not None else ""
            log(f"{label}trial {claim.number} complete: {point.label()} mean val acc {summary['mean']:.4f}{std}")
        elif outcome.status == "diverged":
            storage.set_trial_user_attr(tid, "failure", outcome.reason)
            _fail(store, tid, outcome.reason)
            remove_checkpoints(checkpoint_dir, point)
            log(f"{label}trial {claim.number} FAILED: {point.label()} {outcome.reason}")
        else:
            _fail(store, tid, "interrupted")
            log(f"{label}trial {claim.number} interrupted: {point.label()}; finished folds and checkpoint kept")
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


def _worker_config(store: Store, name: str, overrides=()) -> dict:
    config = load_study_config(store, name)
    if overrides:
        keys = [o.split("=", 1)[0].strip() for o in overrides]
        bad = [k for k in keys if k not in IDENTITY_EXEMPT]
        if bad:
            raise ConfigError(f"--set {bad[0]}: a stored study's config can only change where and how fast it runs: "
                              + ", ".join(sorted(IDENTITY_EXEMPT)))
        config = resolve_config(config, overrides, origin=f"study {name!r}")
    return config


def _measured_pin(plan: Plan, engines: dict[str, Engine], log, label: str) -> dict:
    """The pin a first worker of its device kind proposes: pack sizes measured (on a GPU) or
    set by train.pack, engines built for each network of the grid."""
    packs = {}
    for attention in sorted({p.attention for p in plan.points}):
        engine = engines[attention] = engines.get(attention) or plan_engine(plan, attention)
        size, seconds = worker_pack(plan, engine)
        if size > 1 and seconds:
            log(f"{label}packing {size} folds at once ({attention}): {size * seconds[1] / seconds[size]:.2f}x the "
                f"training images/s of one at a time")
        packs[attention] = size
    return proposed_pin(plan.train.device, packs)


def run_worker(store: Store, name: str, *, overrides=(), device: str | None = None, label: str = "",
               log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None, poll_seconds: float = 2.0, n_workers: int = 1,
               plan: Plan | None = None, pin: dict | None = None, engines: dict[str, Engine] | None = None) -> dict:
    """Claim and run points of study ``name`` until every point is complete (or diverged),
    waiting while the last ones run elsewhere (to take them over if their workers die).
    Every training runs under the numerics the study pins for this worker's kind of device
    (``pin``, read from the study where not given; the first worker of a kind pins it: pack
    sizes measured on a GPU where train.pack is "auto", SimAM's CPU kernel on where it can be
    built). ``engines`` (attention -> Engine) are reused where given (built and compiled once).
    Returns counts: {"completed", "diverged", "interrupted", "lost"}."""
    should_stop = should_stop or (lambda: False)
    if plan is None:
        config = _worker_config(store, name, overrides)
        plan = make_plan(config, device)
        stored = store.storage.get_study_user_attrs(store.storage.get_study_id_from_name(name))
        if stored.get(FINGERPRINT_ATTR) != plan.fingerprint:
            raise StudyError(f"the data set or its folds differ from those study {name!r} was made with; "
                             "check data.root (--set data.root=...)")
    engines = dict(engines or {})
    kind = device_kind(plan.train.device)
    if pin is None:
        pin = _pins(store, name).get(kind) or _pin(store, name, kind, _measured_pin(plan, engines, log, label))
    with use_kernels(pin["simam_kernel"]):
        if pin["simam_kernel"] and cpu_kernel() is None:
            log(f"{label}warning: the study pins SimAM's CPU kernel on, but it cannot be built here: this worker's "
                "folds run the PyTorch formula, and status will report them as trained under other numerics")
        return _work(store, name, plan, pin["packs"], engines, label=label, log=log, progress=progress,
                     should_stop=should_stop, poll_seconds=poll_seconds, n_workers=n_workers)


def _work(store: Store, name: str, plan: Plan, packs: dict[str, int], engines: dict[str, Engine], *, label, log,
          progress, should_stop, poll_seconds, n_workers) -> dict:
    config = plan.config
    checkpoint_dir = config["study"]["checkpoint_dir"]
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
        attention = claim.point.attention
        if attention not in engines:
            engines[attention] = plan_engine(plan, attention)
        status = _run_claim(store, plan, claim, engines[attention], checkpoint_dir=checkpoint_dir, log=log,
                            progress=progress, should_stop=should_stop, stats=stats, label=label, n_workers=n_workers,
                            pack=packs.get(attention, 1))
        counts["interrupted" if status == "stopped" else status] += 1
        if status == "stopped":
            break
    return counts


class _Stop:
    """A flag set by SIGINT or SIGTERM; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM ask for a clean stop: the fold in flight saves
    its checkpoint, the trial is marked interrupted and the process can exit."""
    stop = _Stop()
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the search


def _devices(device: str, workers: int) -> list[str]:
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


def _spawn(name: str, url: str, label: str, device: str, workers: int, overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lambda_search", "worker", "--study", name, "--label", label,
           "--device", device, "--workers-total", str(workers)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, STORAGE_ENV: url}
    return subprocess.Popen(cmd, env=env)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(config: dict, requested: int | str | None, pending: int) -> tuple[int, str | None]:
    """How many worker processes a search starts, and a note where that is not what was
    asked. ``requested``: a number, "auto" or None (search.workers). On the CPU every
    training uses train.threads threads, whatever the worker count, so workers are capped at
    cores // threads (more would only share the cores; fewer leave cores idle, and the note
    says so); "auto" is that many, on GPUs one per GPU; never more than the ``pending`` points."""
    requested = config["search"]["workers"] if requested is None else requested
    train = config["train"]
    if device_kind(train["device"]) == "cpu":
        cap = max(1, _cores() // train["threads"])
        if requested == "auto":
            return max(1, min(cap, pending)), None
        if requested > cap:
            return cap, (f"{requested} workers asked for, {cap} started: each training uses train.threads = "
                         f"{train['threads']} (the study's), and this machine has {_cores()} cores")
        if requested < min(cap, pending):
            return requested, (f"{requested} worker{'s' if requested > 1 else ''} of {train['threads']} thread"
                               f"{'s' if train['threads'] > 1 else ''} on {_cores()} cores: --workers auto would "
                               f"use {min(cap, pending)}")
        return requested, None
    if requested == "auto":
        gpus = torch.cuda.device_count() if train["device"] == "cuda" else 1
        return max(1, min(gpus, pending)), None
    return requested, None


def resume_config(url: str, name: str, overrides=()) -> dict:
    """The config stored in study ``name`` at ``url``, with execution ``overrides``."""
    store = open_store(url)
    config = _worker_config(store, name, overrides)
    config["study"]["storage"] = url
    return config


def run_search(config: dict, *, workers: int | str | None = None, log: Callable[[str], None] = print,
               progress: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
               resume_only: bool = False) -> tuple[str, StudyStatus]:
    """Create (or resume) the study of ``config`` and run it to the end with ``workers``
    processes (a number or "auto"; default ``search.workers``; see :func:`worker_count`).
    Everything is checked before anything is stored. Returns ("created"|"resumed", final
    status); a finished study trains nothing."""
    should_stop = should_stop or (lambda: False)
    plan = make_plan(config)  # data, folds and every value checked first
    name = config["study"]["name"]
    store = open_store(config["study"]["storage"], create=not resume_only, write=True)
    how = create_or_resume(store, config, plan)
    plan.config = _absolute(config)
    status = _effective(study_status(store, name), plan.config)
    log(f"study {name!r} {how} in {store.shown}: {status.complete} of {status.total} points complete")
    if status.finished:
        return how, status
    kind = device_kind(plan.train.device)
    pin = _pins(store, name).get(kind)
    engines: dict[str, Engine] = {}
    with use_kernels(pin["simam_kernel"] if pin else None):  # where none is pinned yet: as this machine has it
        projection = quick_projection(plan, engines=engines, packs=pin["packs"] if pin else None)
        pin = pin or _pin(store, name, kind, proposed_pin(plan.train.device, projection.packs))
    log(_describe_pin(kind, pin, plan))
    pending = sum(p.state not in ("complete", "diverged") for p in status.points)
    workers, note = worker_count(plan.config, workers, pending)
    if note:
        log(note)
    parallel = f"; about {format_seconds(projection.seconds / workers)} on {workers} workers" if workers > 1 else ""
    log(f"projected on one {plan.train.device} worker: {projection.describe()}{parallel} (a quick measurement; "
        "`lambda-search bench CONFIG` measures in full)")
    if workers == 1:
        run_worker(store, name, plan=plan, log=log, progress=progress, should_stop=should_stop, pin=pin,
                   engines=engines)
    else:
        _run_processes(store, name, plan.config, workers, log, should_stop)
    return how, _effective(study_status(store, name), plan.config)


def _effective(status: StudyStatus, config: dict) -> StudyStatus:
    """``status`` with the config this search runs under: the stored one with the changes a
    resume may make (where it runs: checkpoint_dir, data.root...), so outputs such as the
    plot beside the checkpoints follow them."""
    status.config = config
    return status


def _run_processes(store: Store, name: str, config: dict, workers: int, log, should_stop) -> None:
    overrides = [f"{k}={json.dumps(config[k.split('.')[0]][k.split('.')[1]])}"
                 for k in ("data.root", "study.checkpoint_dir") if config[k.split('.')[0]][k.split('.')[1]] is not None]
    devices = _devices(config["train"]["device"], workers)
    procs = {i: _spawn(name, store.url, f"w{i}", devices[i], workers, overrides) for i in range(workers)}
    respawns = 3 * workers
    threads = config["train"]["threads"]
    each = f" ({threads} thread{'s' if threads > 1 else ''} each)" if device_kind(devices[0]) == "cpu" else ""
    log(f"started {workers} worker processes{each}")
    stopping = False
    try:
        while procs:
            time.sleep(0.2)
            if should_stop() and not stopping:
                stopping = True
                for p in procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGTERM)
            for i, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[i]
                if rc > 0 and not stopping:
                    log(f"worker w{i} exited with code {rc}")
                if rc < 0 and not stopping and respawns > 0 and not study_status(store, name).finished:
                    respawns -= 1
                    log(f"worker w{i} died ({signal.Signals(-rc).name}); starting a new one")
                    procs[i] = _spawn(name, store.url, f"w{i}", devices[i], workers, overrides)
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            with contextlib.suppress(Exception):
                p.wait(timeout=60)
