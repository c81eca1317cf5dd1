"""A study's points, one trial each attempt: claim the next one (under the claim lock, with a
lease) and record how it ended. This is the storage side of the one loop every worker runs
(``lambda_search.search.worker``): ask (the study's strategy, through ``status``), claim, run,
record. It knows no strategy and no training; no torch here.

A worker claims a point under the storage's claim lock and holds a lease on its trial while
it runs (see ``locks``): no two workers take the same point, and a dead worker's trial is
known dead at once and run again, keeping its finished folds.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from ..config import Config
from ..points import Point
from .status import POINT_ATTR, WORKER_ATTR, all_trials, baseline_study_name, live_trials, point_statuses
from .storage import Store

__all__ = ["Claim", "claim_next", "record_outcome", "holder"]


@dataclass
class Claim:
    trial_id: int
    number: int
    point: Point
    done: dict  # fold name -> record, finished by earlier attempts
    lease: object
    folds_done: int = 0  # of the study's points, when it was claimed (for progress lines)
    folds_total: int = 0


def holder(environ=None) -> str:
    """Who runs a point: ``host:pid``, and the Slurm job (``JOB_TASK`` of a job array, and how
    often it was requeued) where the worker runs in one."""
    env = os.environ if environ is None else environ
    who = f"{socket.gethostname()}:{os.getpid()}"
    array, task, job = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_JOB_ID")
    if array and task:
        who += f", slurm job {array}_{task}"
    elif job:
        who += f", slurm job {job}"
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    if (array or job) and restarts not in ("", "0"):
        who += f" (requeued {restarts}x)"
    return who


def claim_next(store: Store, name: str, config: Config) -> Claim | str:
    """Under the claim lock: fail the trials of dead workers, then take the first point the
    study's strategy asks for that is neither done nor running. Returns a Claim, "wait" (the
    rest is running elsewhere) or "done"."""
    with store.locks.exclusive():  # no lease is taken while we hold it: leases only go away
        trials, live = live_trials(store, name)
        dead = [t._trial_id for _, t in trials if t.state == TrialState.RUNNING and t._trial_id not in live]
        for trial_id in dead:
            store.fail_trial(trial_id, "worker lost: its process ended before the trial finished")
        if dead:
            trials = all_trials(store, name)
        statuses = point_statuses(store, name, config, trials, live, strict=True)
        free = [s for s in statuses if s.state in ("pending", "interrupted")]
        if not free:
            return "wait" if any(s.state == "running" for s in statuses) else "done"
        claim = _open(store, name, config, free[0])
        claim.folds_done = sum(s.folds_done for s in statuses)
        claim.folds_total = sum(len(s.fold_names) for s in statuses)
        return claim


def _open(store: Store, name: str, config: Config, s) -> Claim:
    """A RUNNING trial for point status ``s``, its lease taken."""
    point = s.point
    study = baseline_study_name(name) if point.baseline else name
    if store.study_id(study) is None:
        store.create_study(study)
        store.set_study_attr(study, "lambda_search:baseline_of", name)
    params, dists = {}, {}
    if not point.baseline:
        lambdas = [*config.search.lambdas, point.e_lambda]  # (a strategy may ask for lambdas beyond the list)
        params["e_lambda"] = point.e_lambda
        dists["e_lambda"] = FloatDistribution(min(lambdas), max(lambdas), log=True)
    if config.search.repeats > 1:  # (a point's repeat is one of them: strategy.asked_points checks it)
        params["repeat"] = point.repeat
        dists["repeat"] = IntDistribution(0, config.search.repeats - 1)
    template = create_trial(
        state=TrialState.RUNNING, params=params, distributions=dists,
        system_attrs={POINT_ATTR: point.key, WORKER_ATTR: holder()},
        user_attrs={"e_lambda": point.e_lambda, "repeat": point.repeat, "attention": point.attention,
                    "fold_names": s.fold_names, "fold_results": s.folds, "fold_accuracies": s.fold_accuracies})
    trial_id = store.add_trial(study, template)
    lease = store.locks.lease(trial_id)
    try:
        number = store.trial(trial_id).number
    except BaseException:
        lease.release()  # never a lease left held by a trial nobody runs
        raise
    return Claim(trial_id, number, point, dict(s.folds), lease)


def record_outcome(store: Store, claim: Claim, outcome, names: list[str]) -> None:
    """Store how a point ended (``outcome``: a PointOutcome) on its trial: COMPLETE with its
    summary, FAILED as diverged (a result: never retried), or FAILED as interrupted (its
    finished folds kept for the re-run)."""
    tid = claim.trial_id
    if outcome.status == "completed":
        summary = outcome.summary
        for key, value in (("mean", summary["mean"]), ("std", summary["std"]), ("std_ddof", summary["std_ddof"]),
                           ("sem", summary["sem"]),
                           ("fold_seconds", [outcome.folds[n]["seconds"] for n in names]),
                           ("seeds", [outcome.folds[n]["seed"] for n in names])):
            store.set_trial_attr(tid, key, value)
        store.complete_trial(tid, summary["mean"])
    elif outcome.status == "diverged":
        store.set_trial_attr(tid, "failure", outcome.reason)
        store.fail_trial(tid, outcome.reason)
    else:
        store.fail_trial(tid, "interrupted")
