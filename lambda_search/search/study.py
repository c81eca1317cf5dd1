"""The lambda search as an Optuna study: create (or resume) it with its config and data
fingerprint, then run every grid point exactly once with one or more workers."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import uuid
from pathlib import Path
from typing import Callable

import optuna
import torch

from ..bench.measure import Engines, quick_projection
from ..bench.projection import format_seconds
from ..config import Config
from ..configfile import config_diff
from ..nn.kernels import use_kernels
from ..report.select import record_choice
from ..store.failures import StorageError, failures, redact
from ..store.status import (
    CONFIG_ATTR,
    FINGERPRINT_ATTR,
    RUN_ATTR,
    VERSIONS_ATTR,
    StudyError,
    StudyStatus,
    baseline_study_name,
    completed_config,
    study_pins,
    study_status,
)
from ..store.storage import Store, open_store
from ..train.numerics import device_kind, proposed_pin
from ..train.plan import Plan, make_plan
from .supervise import run_processes, worker_count
from .worker import describe_pin, pin_numerics, run_worker, worker_config

__all__ = ["create_or_resume", "check_resumable", "prepare_search", "run_search", "resume_config", "dry_run"]


def _versions() -> dict:
    return {
        "lambda_search": importlib.metadata.version("lambda-search"),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "python": sys.version.split()[0],
    }


# ---------------------------------------------------------------- creating and resuming


def _absolute(config: Config) -> Config:
    """The config as stored: paths absolute (``resume`` works from any folder), the storage
    URL without its password."""
    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    return (config.replace("study", storage=redact(config.study.storage),  # never store a password
                           checkpoint_dir=absolute(config.study.checkpoint_dir))
            .replace("data", root=absolute(config.data.root)))


def create_or_resume(store: Store, config: Config, plan: Plan, attrs: dict | None = None) -> str:
    """Create study ``config.study.name`` with its config, fingerprint, versions and ``attrs``
    (each kept as the first run set it), or check that the stored study has the same config
    and data. Returns "created" or "resumed"."""
    name = config.study.name
    stored_config = _absolute(config)
    with store.locks.exclusive():
        if store.study_id(name) is None:
            store.create_study(name)
            created = "created"
        else:
            created = "resumed"
        given, attrs = attrs or {}, store.study_attrs(name)
        if CONFIG_ATTR not in attrs:
            if store.trials(name):
                raise StudyError(
                    f"study {name!r} in {store.shown} was not made by lambda_search; choose another study.name"
                )
            _check_adoptable(store, name)
            _add_attrs(store, name, given)  # before the config: a study is complete with them
            store.set_study_attr(name, FINGERPRINT_ATTR, plan.fingerprint)
            store.set_study_attr(name, VERSIONS_ATTR, _versions())
            store.set_study_attr(name, RUN_ATTR, uuid.uuid4().hex)
            store.set_study_attr(name, CONFIG_ATTR, stored_config.to_dict())  # last: marks the study complete
            return "created"
        _check_same(name, attrs, stored_config, plan)
        _add_attrs(store, name, given)  # (a study made by an earlier version)
        if not store.metric_named(name):  # made by an earlier version
            store.name_metric(name)
        return created


def check_resumable(store: Store, config: Config, plan: Plan) -> None:
    """Refuse, before anything is stored, what :func:`create_or_resume` would refuse: a study
    of ``config``'s name made with another config or data."""
    attrs = store.study_attrs(config.study.name)
    if CONFIG_ATTR in attrs:
        _check_same(config.study.name, attrs, _absolute(config), plan)


def _add_attrs(store: Store, name: str, attrs: dict) -> None:
    """Store each of ``attrs`` that study ``name`` does not hold yet: the first run's stay."""
    held = store.study_attrs(name)
    for key, value in attrs.items():
        if key not in held:
            store.set_study_attr(name, key, value)


def _check_adoptable(store: Store, name: str) -> None:
    """An empty study lambda_search did not make (or its baseline companion) is adopted only
    where it maximizes one value, as lambda_search's accuracies need: else Optuna's
    best_params would name the worst lambda."""
    for study in (name, baseline_study_name(name)):
        if store.study_id(study) is None:
            continue
        if study != name and store.trials(study):
            raise StudyError(f"study {study!r} in {store.shown} was not made by lambda_search and has trials; "
                             "choose another study.name")
        if not store.maximizes(study):
            shown = ", ".join(store.directions(study))
            raise StudyError(f"study {study!r} in {store.shown} was not made by lambda_search and its direction is "
                             f"{shown}, not maximize (lambda_search maximizes accuracy); choose another study.name or "
                             f"delete it: optuna delete-study --study-name {study!r} --storage {store.shown}")


def _check_same(name: str, attrs: dict, config: Config, plan: Plan) -> None:
    diff = config_diff(completed_config(attrs[CONFIG_ATTR]), config)
    if diff:
        parts = [f"{k} (stored {_show(a)}, given {_show(b)})" for k, a, b in diff[:4]]
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        hint = ""
        if any(k == "data.test_fraction" for k, _, _ in diff):  # a study made before the key held nothing out
            hint = " (a study made before data.test_fraction existed held no test images out)"
        raise StudyError(f"config conflicts with study {name!r}: " + "; ".join(parts) + more
                         + "; use another study.name, or resume with the stored config (lambda-search resume)" + hint)
    if attrs.get(FINGERPRINT_ATTR) != plan.fingerprint:
        raise StudyError(f"the data set or its folds differ from those study {name!r} was made with "
                         f"(fingerprint {str(attrs.get(FINGERPRINT_ATTR))[:12]} stored, {plan.fingerprint[:12]} now)")


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)

def resume_config(url: str, name: str, overrides=()) -> Config:
    """The config stored in study ``name`` at ``url``, with execution ``overrides``."""
    store = open_store(url)
    return worker_config(store, name, overrides).replace("study", storage=url)


def prepare_search(config: Config, *, resume_only: bool = False, attrs: dict | None = None,
                   device: str | None = None) -> tuple[Store, Plan, str]:
    """What every run of ``config``'s study does first: check everything (the data, folds and
    every value), then create the study or check the stored one against ``config``, training
    nothing. ``device``: where to check the plan instead of train.device (``submit`` on a
    login node without the study's GPU). Returns (the store, the plan, "created"|"resumed")."""
    plan = make_plan(config, device)  # data, folds and every value checked first
    store = open_store(config.study.storage, create=not resume_only, write=True)
    how = create_or_resume(store, config, plan, attrs)
    plan.config = _absolute(config)
    return store, plan, how


def run_search(config: Config, *, workers: int | str | None = None, log: Callable[[str], None] = print,
               progress: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
               resume_only: bool = False, attrs: dict | None = None) -> tuple[str, StudyStatus]:
    """Create (or resume) the study of ``config`` and run it to the end with ``workers``
    processes (a number or "auto"; default ``search.workers``; see :func:`worker_count`).
    Everything is checked before anything is stored; ``attrs`` are stored with a new study
    (see :func:`create_or_resume`). Returns ("created"|"resumed", final status); a finished
    study trains nothing."""
    with failures():
        return _run_search(config, workers=workers, log=log, progress=progress, should_stop=should_stop,
                           resume_only=resume_only, attrs=attrs)


def _run_search(config: Config, *, workers: int | str | None = None, log: Callable[[str], None] = print,
                progress: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
                resume_only: bool = False, attrs: dict | None = None) -> tuple[str, StudyStatus]:
    should_stop = should_stop or (lambda: False)
    store, plan, how = prepare_search(config, resume_only=resume_only, attrs=attrs)
    name = config.study.name
    status = _effective(study_status(store, name), plan.config)
    log(f"study {name!r} {how} in {store.shown}: {status.complete} of {status.total} points complete")
    if status.finished:
        record_choice(store, status)  # (a study finished by an earlier version)
        return how, status
    kind = device_kind(plan.train.device)
    pin = study_pins(store, name).get(kind)
    engines = Engines(plan)
    with use_kernels(pin["simam_kernel"] if pin else None):  # where none is pinned yet: as this machine has it
        projection = quick_projection(plan, engines=engines, packs=pin["packs"] if pin else None)
        pin = pin or pin_numerics(store, name, kind, proposed_pin(plan.train.device, projection.packs))
    log(describe_pin(kind, pin, plan))
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
        run_processes(store, name, plan.config, workers, log, should_stop)
    return how, _effective(study_status(store, name), plan.config)


def dry_run(config: Config) -> list[str]:
    """What running the study of ``config`` would train, and how long the whole study is
    projected to take on one worker here (a quick measurement: a few untimed steps trained and
    thrown away): every value checked, nothing stored or written."""
    plan = make_plan(config)
    name = config.study.name
    try:
        store = open_store(config.study.storage)
        made = store.study_id(name) is not None and CONFIG_ATTR in store.study_attrs(name)
        if made:
            check_resumable(store, config, plan)  # what search would refuse, refused here too
        elif store.study_id(name) is not None:
            _check_adoptable(store, name)
        status = study_status(store, name) if made else None
    except StorageError as exc:  # (no database file yet, or none to reach from here)
        status, made = None, f"not made yet ({exc})"
    done = {p.point for p in status.points if p.state in ("complete", "diverged")} if status else set()
    todo = [p for p in plan.points if p not in done]
    said = (f"{status.complete} of {status.total} points complete" if status else
            made if isinstance(made, str) else "not made yet")
    projection = quick_projection(plan)
    return [f"study {name!r} in {redact(config.study.storage)}: {said}",
            f"would train {len(todo)} point{'s' if len(todo) != 1 else ''} of {len(plan.points)}"
            + (": " + ", ".join(p.label(config.data.test) for p in todo[:12]) + (", ..." if len(todo) > 12 else "")
               if todo else ""),
            f"projected for the whole study on one {plan.train.device} worker: {projection.describe()}"]


def _effective(status: StudyStatus, config: Config) -> StudyStatus:
    """``status`` with the config this search runs under: the stored one with the changes a
    resume may make (where it runs: checkpoint_dir, data.root...), so outputs such as the
    plot beside the checkpoints follow them."""
    status.config = config
    return status
