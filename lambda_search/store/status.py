"""The state of a study, read only: every grid point's trials, finished folds, mean and std.

A trial is one grid point (a lambda and a repeat) cross-validated over the folds of its
repeat: the Optuna parameter ``e_lambda``, the value the mean validation accuracy (a
fraction), user attributes with the per-fold results, written as each fold finishes. The
baseline network (no SimAM), when asked for, lives in a companion study
``<name>:baseline``, so that the main study holds only SimAM trials and
``study.best_params`` is always a lambda. A point is done when it has a COMPLETE trial, or a
FAILED one whose reason is "diverged" (divergence is a result, not an accident: it is not
retried); a trial that FAILED for any other reason gives its point back to the grid, and
its finished folds are kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import FINAL_SUFFIX, HELD_OUT_TEST, Config
from ..configfile import resolve_config
from ..points import Point, distinct_numerics, fold_names, grid_points, mixed_folds
from .failures import failures
from .storage import Store

__all__ = ["StudyError", "PointStatus", "StudyStatus", "baseline_study_name", "final_study_name", "load_study_config",
           "study_status", "list_studies", "STORAGE_ENV"]

CONFIG_ATTR = "lambda_search:config"
FINGERPRINT_ATTR = "lambda_search:fingerprint"
VERSIONS_ATTR = "lambda_search:versions"
POINT_ATTR = "lambda_search:point"
REASON_ATTR = "lambda_search:fail_reason"
RUN_ATTR = "lambda_search:run"  # a study's own id: its checkpoint folders carry it (never another's adopted)
NUMERICS_ATTR = "lambda_search:numerics"  # device kind -> the pin its workers use (see _numerics)
EVALUATE_ATTR = "lambda_search:evaluate"  # on NAME:final: its lambda and how it was chosen
CHOSEN_ATTR = "lambda_search:chosen"  # a finished search's choice (one-SE rule, larger end) and its verdict
METRIC_NAME = "val_accuracy"  # what a trial's value is, named for Optuna's tools (the dashboard, trials_dataframe)
STORAGE_ENV = "LAMBDA_SEARCH_STORAGE"  # how a parent hands a storage URL to its workers (never argv)


class StudyError(ValueError):
    """A study that cannot be used as asked (unknown, conflicting, not lambda_search's)."""


def baseline_study_name(name: str) -> str:
    return f"{name}:baseline"


def final_study_name(name: str) -> str:
    """The companion study of ``name``'s final evaluation (``lambda-search evaluate``)."""
    return name + FINAL_SUFFIX


def study_id(store: Store, name: str) -> int | None:
    try:
        return store.storage.get_study_id_from_name(name)
    except KeyError:
        return None


def name_metric(store: Store, name: str) -> None:
    """Name study ``name``'s objective METRIC_NAME, as Optuna's ``set_metric_names`` does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.load_study(study_name=name, storage=store.storage).set_metric_names([METRIC_NAME])


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def load_study_config(store: Store, name: str) -> Config:
    """The resolved config stored in study ``name``."""
    sid = study_id(store, name)
    if sid is None:
        names = [n for n in store.study_names() if not n.endswith((":baseline", ":final"))]
        there = ", ".join(repr(n) for n in names) if names else "none"
        raise StudyError(f"no study named {name!r} in {store.shown}; studies there: {there}")
    attrs = store.storage.get_study_user_attrs(sid)
    if CONFIG_ATTR not in attrs:
        raise StudyError(f"study {name!r} in {store.shown} was not made by lambda_search (it has no stored config)")
    return completed_config(attrs[CONFIG_ATTR])


def completed_config(stored: dict) -> Config:
    """A stored config with the defaults of keys added since it was stored (train.threads);
    a study stored before data.test_fraction existed held nothing out (0): its folds stay."""
    data = stored.get("data", {})
    if "test_fraction" not in data and data.get("dataset") in HELD_OUT_TEST:
        stored = {**stored, "data": {**data, "test_fraction": 0.0}}
    return resolve_config(stored, origin="the stored config")


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
        return fold_accuracies(self.folds, self.fold_names)

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
    config: Config
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


def fold_accuracies(records: dict, names: list[str]) -> list[float | None]:
    return [records.get(n, {}).get("val_accuracy") for n in names]


def all_trials(store: Store, name: str) -> list[tuple[str, FrozenTrial]]:
    out = []
    for study in (name, baseline_study_name(name)):
        sid = study_id(store, study)
        if sid is not None:
            out += [(study, t) for t in store.storage.get_all_trials(sid, deepcopy=False)]
    return out


def _point_status(
    point: Point, names: list[str], trials: list[FrozenTrial], alive: Callable[[int], bool]
) -> PointStatus:
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
        status.reason = last.system_attrs.get(REASON_ATTR) or (
            "worker gone" if last.state == TrialState.RUNNING else None
        )
    return status


def live_trials(store: Store, name: str):
    """(trials, ids of live RUNNING trials), consistent: liveness is checked before the
    trials are read again. A worker writes COMPLETE before it drops its lease, so a trial
    still RUNNING in the second read whose lease was already gone is really dead; checking
    after the read could see a trial that finished in between as dead."""
    first = all_trials(store, name)
    candidates = [t._trial_id for _, t in first if t.state == TrialState.RUNNING]
    live = {tid for tid in candidates if store.locks.alive(tid)}
    return (all_trials(store, name) if candidates else first), live


def point_statuses(store: Store, name: str, config: Config, trials=None, live=None) -> list[PointStatus]:
    if trials is None:
        trials, live = live_trials(store, name)
    by_key: dict[str, list[FrozenTrial]] = {}
    for _, t in trials:
        key = t.system_attrs.get(POINT_ATTR)
        if key is not None:
            by_key.setdefault(key, []).append(t)
    return [_point_status(p, fold_names(config, p.repeat), by_key.get(p.key, []), live.__contains__)
            for p in grid_points(config)]


def study_status(store: Store, name: str) -> StudyStatus:
    """Every grid point of study ``name``: its state, finished folds, mean and std. Reads only."""
    with failures():
        return _study_status(store, name)


def _study_status(store: Store, name: str) -> StudyStatus:
    config = load_study_config(store, name)
    return StudyStatus(name, config, point_statuses(store, name, config), store.shown, study_pins(store, name))


def list_studies(store: Store) -> list[dict]:
    """Every study in ``store``: for lambda_search's, its points complete and whether it is
    finished, with its companions (``<name>:baseline``...) under it; other Optuna studies
    are listed as such. Reads only."""
    with failures():
        return _list_studies(store)


def _list_studies(store: Store) -> list[dict]:
    names = store.study_names()
    out = []
    for name in names:
        if ":" in name and name.split(":", 1)[0] in names:
            continue  # a companion (NAME:baseline, NAME:final and its NAME:final:baseline), listed under its study
        entry = {"study": name, "lambda_search": False, "trials": None, "complete": None, "total": None,
                 "finished": None, "companions": [n for n in names if n.startswith(name + ":")]}
        sid = store.storage.get_study_id_from_name(name)
        if CONFIG_ATTR in store.storage.get_study_user_attrs(sid):
            status = study_status(store, name)
            entry.update(lambda_search=True, complete=status.complete, total=status.total, finished=status.finished)
        else:
            entry["trials"] = len(store.storage.get_all_trials(sid, deepcopy=False))
        out.append(entry)
    return out


def study_pins(store: Store, name: str) -> dict:
    sid = study_id(store, name)
    return dict(store.storage.get_study_user_attrs(sid).get(NUMERICS_ATTR, {})) if sid is not None else {}
