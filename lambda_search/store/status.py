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

from optuna.trial import FrozenTrial, TrialState

from ..config import FINAL_SUFFIX, HELD_OUT_TEST, Config, ConfigError, final_parts
from ..configfile import resolve_config
from ..points import Point, PointStatus, distinct_numerics, fold_names, mixed_folds
from ..strategy import asked_points
from .failures import failures
from .storage import REASON_ATTR, Store

__all__ = ["StudyError", "PointStatus", "StudyStatus", "baseline_study_name", "final_study_name", "final_study_names",
           "check_search_name", "is_companion",
           "load_study_config",
           "study_status", "list_studies", "STORAGE_ENV"]

CONFIG_ATTR = "lambda_search:config"
FINGERPRINT_ATTR = "lambda_search:fingerprint"
VERSIONS_ATTR = "lambda_search:versions"
POINT_ATTR = "lambda_search:point"
WORKER_ATTR = "lambda_search:worker"  # on a trial: who runs it (claims.holder: host:pid, its Slurm job)
RUN_ATTR = "lambda_search:run"  # a study's own id: its checkpoint folders carry it (never another's adopted)
NUMERICS_ATTR = "lambda_search:numerics"  # device kind -> the pin its workers use (see _numerics)
EVALUATE_ATTR = "lambda_search:evaluate"  # on NAME:final: its lambda and how it was chosen
CHOSEN_ATTR = "lambda_search:chosen"  # a finished search's choice (one-SE rule, larger end) and its verdict
STORAGE_ENV = "LAMBDA_SEARCH_STORAGE"  # how a parent hands a storage URL to its workers (never argv)


class StudyError(ValueError):
    """A study that cannot be used as asked (unknown, conflicting, not lambda_search's)."""


def baseline_study_name(name: str) -> str:
    return f"{name}:baseline"


def final_study_name(name: str, column: str | None = None) -> str:
    """The companion study of ``name``'s final evaluation (``lambda-search evaluate``): of the
    searched network on the searched data (``NAME:final``), or of another network or data set
    (``NAME:final:COLUMN``)."""
    return name + FINAL_SUFFIX + (f":{column}" if column else "")


def final_study_names(store: Store, name: str) -> list[str]:
    """The final evaluations of study ``name`` made so far, in the order they were made (the
    searched network and data first); one killed as it was made (no config yet) is left out."""
    names = [n for n in store.study_names() if (final_parts(n) or (None,))[0] == name
             and not n.endswith(":baseline") and CONFIG_ATTR in store.study_attrs(n)]
    return sorted(names, key=lambda n: (n != final_study_name(name), store.study_id(n)))


def is_companion(name: str, of: str) -> bool:
    """Whether study ``name`` is a companion of study ``of``: its baseline's (``of:baseline``),
    a final evaluation of it (``of:final...``) or such a final evaluation's baseline."""
    base = name[: -len(":baseline")] if name.endswith(":baseline") else name
    parts = final_parts(base)
    return base == of and name != of or (parts is not None and parts[0] == of)


def check_search_name(name: str, command: str) -> None:
    """Refuse a final evaluation's study where ``command`` reads a search (its seeds are no
    folds), saying which command reads it."""
    parts = final_parts(name)
    if parts is not None:
        hint = (f"the same `lambda-search evaluate --study {parts[0]} ...` goes on with it" if command == "resume" else
                f"`lambda-search status --study {parts[0]}` shows its table")
        raise StudyError(f"study {name!r} is a final evaluation of study {parts[0]!r} (made by `lambda-search "
                         f"evaluate`), not a search that `{command}` reads: {hint}")


def load_study_config(store: Store, name: str) -> Config:
    """The resolved config stored in study ``name``."""
    if store.study_id(name) is None:
        names = [n for n in store.study_names() if ":" not in n]
        there = ", ".join(repr(n) for n in names) if names else "none"
        raise StudyError(f"no study named {name!r} in {store.shown}; studies there: {there}")
    attrs = store.study_attrs(name)
    if CONFIG_ATTR not in attrs:
        owner = name[: -len(":baseline")]
        if name.endswith(":baseline") and CONFIG_ATTR in store.study_attrs(owner):
            raise StudyError(f"study {name!r} holds the baseline network's trials (no SimAM) of study {owner!r}, a "
                             f"companion of it: read it with --study {owner}")
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


def all_trials(store: Store, name: str) -> list[tuple[str, FrozenTrial]]:
    return [(study, t) for study in (name, baseline_study_name(name)) for t in store.trials(study)]


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
    held = [t for t in running if alive(t._trial_id)]
    if held:
        status.state, status.trial_number = "running", held[-1].number
        status.worker = held[-1].system_attrs.get(WORKER_ATTR)
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


def point_statuses(store: Store, name: str, config: Config, trials=None, live=None,
                   strict: bool = False) -> list[PointStatus]:
    """Every point of study ``name``: those its strategy asks for (``search.strategy``), in its
    order, then any other point that has trials. The strategy is told what the study holds:
    the status of each point tried, in the order they were first tried. Where the strategy
    cannot be asked here (a user's module not importable on this machine), a reading shows the
    points that have trials, with a warning; ``strict`` (a worker about to claim) refuses."""
    if trials is None:
        trials, live = live_trials(store, name)
    by_key: dict[str, list[FrozenTrial]] = {}
    points: dict[str, Point] = {}
    for _, t in sorted(trials, key=lambda st: st[1]._trial_id):  # in the order they were made
        key = t.system_attrs.get(POINT_ATTR)
        if key is not None:
            by_key.setdefault(key, []).append(t)
            points.setdefault(key, Point(t.user_attrs.get("e_lambda"), t.user_attrs.get("repeat", 0)))

    def status(p: Point) -> PointStatus:
        return _point_status(p, fold_names(config, p.repeat), by_key.get(p.key, []), live.__contains__)

    tried = [status(p) for p in points.values()]
    try:
        asked = asked_points(config, tried)
    except ConfigError as exc:
        if strict:
            raise
        warnings.warn(f"{exc}: showing the points that have trials only", stacklevel=2)
        asked = []
    keys = {p.key for p in asked}
    return [status(p) for p in asked] + [s for s in tried if s.point.key not in keys]


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
        if any(is_companion(name, n) for n in names if n != name):
            continue  # a companion (NAME:baseline, NAME:final and its NAME:final:baseline), listed under its study
        entry = {"study": name, "lambda_search": False, "trials": None, "complete": None, "total": None,
                 "finished": None, "companions": [n for n in names if is_companion(n, name)]}
        if CONFIG_ATTR in store.study_attrs(name):
            status = study_status(store, name)
            entry.update(lambda_search=True, complete=status.complete, total=status.total, finished=status.finished)
        else:
            entry["trials"] = len(store.trials(name))
        out.append(entry)
    return out


def study_pins(store: Store, name: str) -> dict:
    return dict(store.study_attrs(name).get(NUMERICS_ATTR, {}))
