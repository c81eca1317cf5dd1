"""Unit tests of the study's state (_status) and of claiming points (_worker), without
training: hand-made trials, a real SQLite storage, leases taken and dropped by hand."""

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import lambda_search as ls
from lambda_search import points as _points
from lambda_search.search import study as _study
from lambda_search.store import status as _status
from lambda_search.store.claims import claim_next
from lambda_search.store.status import POINT_ATTR, REASON_ATTR, _point_status
from lambda_search.train import plan as _objective

NAMES = ["r0f0", "r0f1"]
POINT = _points.Point(1e-3)


def _record(acc, status="completed"):
    return {"status": status, "val_accuracy": acc, "val_loss": 1.0, "seconds": 1.0}


def _trial(state, number, folds=None, reason=None, value=None, attrs=None):
    t = create_trial(state=state, value=value, params={"e_lambda": 1e-3},
                     distributions={"e_lambda": FloatDistribution(1e-4, 1e-1, log=True)},
                     system_attrs={POINT_ATTR: POINT.key, **({REASON_ATTR: reason} if reason else {})},
                     user_attrs={"fold_results": folds or {}, **(attrs or {})})
    t.number, t._trial_id = number, 100 + number
    return t


def test_a_point_without_trials_is_pending():
    s = _point_status(POINT, NAMES, [], lambda tid: False)
    assert (s.state, s.folds, s.attempts, s.fold_accuracies) == ("pending", {}, 0, [None, None])


def test_a_complete_trial_wins_over_every_other():
    folds = {"r0f0": _record(0.5), "r0f1": _record(0.7)}
    done = _trial(TrialState.COMPLETE, 3, folds, value=0.6, attrs={"mean": 0.6, "std": 0.1414, "sem": 0.1})
    s = _point_status(POINT, NAMES, [_trial(TrialState.FAIL, 1, reason="interrupted"), done], lambda tid: True)
    assert (s.state, s.trial_number, s.mean, s.std, s.sem) == ("complete", 3, 0.6, 0.1414, 0.1)
    assert s.fold_accuracies == [0.5, 0.7] and s.folds_done == 2 and s.attempts == 2


def test_divergence_is_a_result_and_other_failures_keep_their_folds():
    diverged = _trial(TrialState.FAIL, 2, {"r0f0": _record(None, "diverged")}, reason="diverged: loss nan at step 3")
    s = _point_status(POINT, NAMES, [diverged], lambda tid: False)
    assert s.state == "diverged" and s.reason.startswith("diverged")
    older = _trial(TrialState.FAIL, 1, {"r0f0": _record(0.4)}, reason="interrupted")
    newer = _trial(TrialState.FAIL, 4, {"r0f0": _record(0.45), "r0f1": _record(0.2, "stopped")}, reason="interrupted")
    s = _point_status(POINT, NAMES, [newer, older], lambda tid: False)
    assert s.state == "interrupted" and s.reason == "interrupted" and s.trial_number == 4
    assert s.folds == {"r0f0": _record(0.45)}  # the newest finished record; a stopped fold is not kept


def test_a_running_trial_is_running_only_while_its_lease_lives():
    running = _trial(TrialState.RUNNING, 5, {"r0f0": _record(0.5)})
    assert _point_status(POINT, NAMES, [running], lambda tid: tid == 105).state == "running"
    s = _point_status(POINT, NAMES, [running], lambda tid: False)
    assert (s.state, s.reason, s.folds_done) == ("interrupted", "worker gone", 1)


def _store(tiny_config, tmp_path, **kw):
    config = ls.load_config(tiny_config(**kw))
    plan = _objective.make_plan(config)
    store = ls.open_store(config.study.storage, create=True)
    assert _study.create_or_resume(store, config, plan) == "created"
    return store, _status.load_study_config(store, "tiny")


def test_claims_hand_out_each_point_once_and_take_back_a_dead_workers(tiny_config, tmp_path):
    store, config = _store(tiny_config, tmp_path, lambdas="[1e-4, 1e-1]", baseline="true")
    first, second, third = (claim_next(store, "tiny", config) for _ in range(3))
    assert [c.point for c in (first, second, third)] == [
        _points.Point(1e-4),
        _points.Point(1e-1),
        _points.Point(None),
    ]
    assert claim_next(store, "tiny", config) == "wait"  # all running, leases alive
    store.storage.set_trial_user_attr(second.trial_id, "fold_results", {"r0f0": _record(0.8)})
    second.lease.release()  # its worker dies
    again = claim_next(store, "tiny", config)
    assert again.point == _points.Point(1e-1) and again.done == {"r0f0": _record(0.8)}  # finished folds kept
    lost = store.storage.get_trial(second.trial_id)
    assert lost.state == TrialState.FAIL and lost.system_attrs[REASON_ATTR].startswith("worker lost")
    for claim in (first, again, third):
        store.storage.set_trial_state_values(claim.trial_id, TrialState.COMPLETE, [0.5])
        claim.lease.release()
    assert claim_next(store, "tiny", config) == "done"
    status = ls.study_status(store, "tiny")
    assert [p.state for p in status.points] == ["complete"] * 3 and status.finished


def test_a_diverged_point_is_not_claimed_again(tiny_config, tmp_path):
    store, config = _store(tiny_config, tmp_path, lambdas="[1e-4]")
    claim = claim_next(store, "tiny", config)
    store.fail_trial(claim.trial_id, "diverged: loss nan at step 1 of fold r0f0")
    claim.lease.release()
    assert claim_next(store, "tiny", config) == "done"
    assert ls.study_status(store, "tiny").points[0].state == "diverged"


def test_the_baseline_lives_in_its_companion_study(tiny_config, tmp_path):
    store, config = _store(tiny_config, tmp_path, lambdas="[1e-4]", baseline="true")
    claims = [claim_next(store, "tiny", config) for _ in range(2)]
    assert store.study_names() == ["tiny", "tiny:baseline"]
    baseline = store.storage.get_all_trials(store.storage.get_study_id_from_name("tiny:baseline"))
    assert [t.params for t in baseline] == [{}]  # no lambda: best_params of "tiny" is always a lambda
    for c in claims:
        c.lease.release()


def test_a_symlinked_database_shares_the_locks(tiny_config, tmp_path):
    """A worker that opens the study through a symlink in another folder sees the same claim
    lock and leases: it never claims a point another worker runs."""
    store, config = _store(tiny_config, tmp_path, lambdas="[1e-4, 1e-1]")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tiny.db").symlink_to(tmp_path / "tiny.db")
    other = ls.open_store(f"sqlite:///{elsewhere / 'tiny.db'}")
    first = claim_next(store, "tiny", config)
    second = claim_next(other, "tiny", config)
    assert first.point != second.point and other.locks.alive(first.trial_id)
    assert store.storage.get_trial(first.trial_id).state == TrialState.RUNNING
    for c in (first, second):
        c.lease.release()


def test_a_network_that_cannot_be_built_fails_its_trial_and_frees_its_lease(tiny_config, tmp_path, monkeypatch):
    from lambda_search.bench import measure as _measure

    store, config = _store(tiny_config, tmp_path, lambdas="[1e-4]")

    def broken(self, attention):
        raise MemoryError("no memory for the network")

    monkeypatch.setattr(_measure.Engines, "__call__", broken)
    with pytest.raises(MemoryError):
        ls.run_worker(store, "tiny", log=lambda s: None, pin={"simam_kernel": False, "packs": {"simam": 1}})
    trial = store.storage.get_all_trials(store.storage.get_study_id_from_name("tiny"))[0]
    assert trial.state == TrialState.FAIL and "MemoryError" in trial.system_attrs[REASON_ATTR]
    assert not store.locks.alive(trial._trial_id)
