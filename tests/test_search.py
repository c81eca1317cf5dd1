"""The lambda search: each grid point exactly once, resumable, with the right numbers."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess

import optuna
import pytest
import torch

import lambda_search as ls
from lambda_search import points as _points
from lambda_search.cli import main
from lambda_search.store import status as _status
from lambda_search.train import plan as _objective
from lambda_search.train.pack import train_pack

from conftest import SCRIPT, poll, write_config

pytestmark = pytest.mark.slow


def trials_of(url, name):
    """{point key: [FrozenTrial, ...]} over the study and its baseline companion."""
    if url.startswith("journal:"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url[len("journal:"):]))
    else:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    out = {}
    for study in (name, _status.baseline_study_name(name)):
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except KeyError:
            continue
        for t in trials:
            out.setdefault(t.system_attrs.get("lambda_search:point"), []).append(t)
    return out


def assert_exactly_once(url, name, config):
    by_point = trials_of(url, name)
    keys = [p.key for p in _points.grid_points(config)]
    assert sorted(k for k in by_point) == sorted(keys), by_point.keys()
    for key in keys:
        states = [t.state for t in by_point[key]]
        assert states.count(optuna.trial.TrialState.COMPLETE) == 1, (key, states)
        assert optuna.trial.TrialState.RUNNING not in states, (key, states)
    return {k: next(t for t in v if t.state == optuna.trial.TrialState.COMPLETE) for k, v in by_point.items()}


def test_search_stores_one_trial_per_point_with_the_fold_results(tiny_config):
    config = ls.load_config(tiny_config(baseline="true"))
    how, status = ls.run_search(config, log=lambda s: None)
    assert how == "created" and status.finished and status.complete == 3
    url, name = config.study.storage, config.study.name
    done = assert_exactly_once(url, name, config)

    study = optuna.load_study(study_name=name, storage=url)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert sorted(t.params["e_lambda"] for t in study.trials) == [1e-4, 1e-1]
    assert isinstance(study.trials[0].distributions["e_lambda"], optuna.distributions.FloatDistribution)
    assert study.best_params["e_lambda"] in (1e-4, 1e-1)  # the baseline lives in its own study
    assert study.user_attrs["lambda_search:config"]["search"]["lambdas"] == [1e-4, 1e-1]
    assert set(study.user_attrs["lambda_search:versions"]) >= {"lambda_search", "torch", "optuna"}

    seeds = set()
    for key, trial in done.items():
        a = trial.user_attrs
        accs = a["fold_accuracies"]
        assert len(accs) == 2 and all(0 <= x <= 1 for x in accs)
        assert trial.value == pytest.approx(sum(accs) / 2) == a["mean"]
        assert a["std_ddof"] == 1 and a["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
        assert a["sem"] == pytest.approx(a["std"] / math.sqrt(2))
        assert a["repeat"] == 0 and len(a["fold_seconds"]) == 2
        seeds.add(tuple(a["seeds"]))
    assert len(seeds) == 1  # every point trains from the same seeds: a paired comparison
    assert done["baseline/repeat=0"].user_attrs["attention"] == "none"


def test_a_trials_accuracies_are_train_folds_own(tiny_config):
    config = ls.load_config(tiny_config(lambdas="[1e-3]"))
    ls.run_search(config, log=lambda s: None)
    trial = assert_exactly_once(config.study.storage, "tiny", config)["e_lambda=0.001/repeat=0"]
    plan = _objective.make_plan(config)
    for fold, accuracy in zip(plan.folds, trial.user_attrs["fold_accuracies"]):
        result = ls.train_fold(plan.data, fold, 1e-3, plan.train, seed=plan.train_seed(fold))
        assert result.val_accuracy == accuracy  # the same numerics: the same bits
        assert result.val_loss == trial.user_attrs["fold_results"][fold.name]["val_loss"]


def test_a_packed_search_interrupted_and_resumed(tiny_config, capsys):
    """train.pack=2: both folds of a point train as one network; a stop mid-pack keeps each
    fold's checkpoint, and the resumed study equals an uninterrupted pack's results, bit for
    bit (a pack against one fold at a time sums in another order: test_pack.py)."""
    config = ls.load_config(tiny_config(lambdas="[1e-3, 1e-1]", baseline="true"), ["train.pack=2"])
    url, name = config.study.storage, config.study.name
    calls = []
    how, status = ls.run_search(config, log=print, should_stop=lambda: calls.append(1) or len(calls) > 14)
    assert status.complete < 3
    out = capsys.readouterr().out
    assert "numerics pinned for cpu workers: 1 thread per training" in out and "interrupted" in out
    assert ", 2 folds at once, 2 folds at once (baseline)\n" in out
    how, status = ls.run_search(config, log=lambda s: None)
    assert how == "resumed" and status.finished
    plan = _objective.make_plan(config)
    resumed = []
    for key, trial in assert_exactly_once(url, name, config).items():
        point = next(p for p in plan.points if p.key == key)
        records = trial.user_attrs["fold_results"]
        resumed += [r["resumed_from_iteration"] for r in records.values() if r["resumed_from_iteration"]]
        packed = train_pack(plan.data, plan.folds, [point.e_lambda] * 2, plan.train, attention=point.attention,
                               seeds=[plan.train_seed(f) for f in plan.folds])
        for fold, alone in zip(plan.folds, packed):
            assert (records[fold.name]["val_accuracy"], records[fold.name]["val_loss"]) == \
                   (alone.val_accuracy, alone.val_loss)
            assert records[fold.name]["numerics"]["pack"] == 2
    assert len(resumed) == 2  # both folds of the interrupted point went on from their checkpoints


def test_rerunning_a_finished_study_trains_nothing(tiny_config, capsys):
    path = tiny_config(lambdas="[1e-2]")
    assert main(["search", str(path)]) == 0
    # the search projects its wall time as it starts: 1 point x 2 folds (of 38 images: 10 held out for the
    # test) x 2 epochs of 2 steps, 19 validation images a fold and an epoch
    first = capsys.readouterr().out
    assert "projected on one cpu worker: 2 trainings, 8 iterations and 76 validation images:" in first
    db = path.with_suffix(".db")
    before = db.read_bytes()
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "projected" not in out  # nothing left to run
    assert first.count("trial 0 complete") == 1
    assert "1 of 1 points complete" in out and "trial 0 complete" not in out
    assert db.read_bytes() == before


def test_a_conflicting_resume_is_refused_and_changes_nothing(tiny_config, capsys):
    path = tiny_config(lambdas="[1e-2]")
    assert main(["search", str(path)]) == 0
    db = path.with_suffix(".db")
    before = db.read_bytes()
    capsys.readouterr()
    assert main(["search", str(path), "--set", "train.epochs=3", "--set", "train.lr=0.2"]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and out == ""
    assert "config conflicts with study 'tiny': train.epochs (stored 2, given 3); train.lr" in err
    assert db.read_bytes() == before
    # where and how fast may change
    assert main(["search", str(path), "--set", "train.checkpoint_every_seconds=5"]) == 0


def test_status_and_export(tiny_config, tmp_path, capsys):
    path = tiny_config(baseline="true")
    assert main(["search", str(path)]) == 0
    url = f"sqlite:///{path.with_suffix('.db')}"
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "tiny", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["total"], status["complete"]) == (3, 3)
    assert {k for k in status["points"][0]} >= {"e_lambda", "repeat", "state", "folds_done", "mean", "std"}
    assert [p["e_lambda"] for p in status["points"]] == [1e-4, 1e-1, None]
    assert main(["export", "--storage", url, "--study", "tiny", "-o", str(tmp_path / "out.csv")]) == 0
    import pandas as pd

    points = pd.read_csv(tmp_path / "out.csv")
    folds = pd.read_csv(tmp_path / "out.folds.csv")
    assert list(points.columns) == list(pd.DataFrame(ls.cv_results(ls.study_status(ls.open_store(url), "tiny"))))
    assert points["params"].tolist() == ["{'e_lambda': 0.0001}", "{'e_lambda': 0.1}", "baseline"]
    lambdas = points[points["params"] != "baseline"].sort_values("mean_test_score", ascending=False)
    assert lambdas["rank_test_score"].iloc[0] == 1 and lambdas["rank_test_score"].is_monotonic_increasing
    assert points["rank_test_score"].isna().tolist() == [False, False, True]  # the baseline is not ranked
    assert len(folds) == 6 and set(folds["status"]) == {"completed"}
    assert points["mean_test_score"].tolist() == pytest.approx(
        folds.groupby(["e_lambda", "baseline"], dropna=False, sort=False)["val_accuracy"].mean().tolist())
    assert (points["mean_score_time"] > 0).all()  # the final validation pass, timed


@pytest.mark.parametrize("args, message", [
    (["status", "--storage", "sqlite:///{tmp}/none.db", "--study", "x"], "no database file"),
    (["status", "--storage", "sqlite:///{tmp}/junk.db", "--study", "x"], "is not an SQLite database"),
    (["status", "--storage", "sqlite:///{tmp}/tiny.db", "--study", "nope"], "no study named 'nope'"),
    (["status", "--storage", "mysql://u:hunter2@h/db", "--study", "x"], "unsupported storage URL scheme 'mysql'"),
    (["resume", "--storage", "sqlite:///{tmp}/tiny.db", "--study", "tiny", "--set", "train.epochs=9"],
     "a stored study's config can only change where and how fast it runs"),
    (["search", "{tmp}/tiny.toml", "--set", "model.name=resnet21"], "model.name must be one of resnet20"),
    (["search", "{tmp}/tiny.toml", "--set", "data.dataset=mnist"], "unknown data set name='mnist'"),
    (["search", "{tmp}/tiny.toml", "--set", "data.folds=40"], "data.folds must be <= the smallest class count"),
    (["search", "{tmp}/tiny.toml", "--storage", "sqlite:///{tmp}/no/such/dir.db"], "does not exist"),
    pytest.param(["search", "{tmp}/tiny.toml", "--set", "train.device=cuda"], "asks for a GPU, but none is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available")),
])
def test_bad_storage_and_study_input(tiny_config, tmp_path, capsys, args, message):
    path = tiny_config(lambdas="[1e-2]", epochs=1)
    assert main(["search", str(path)]) == 0
    (tmp_path / "junk.db").write_text("not a database")
    db = path.with_suffix(".db").read_bytes()
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "hunter2" not in err
    assert path.with_suffix(".db").read_bytes() == db
    assert not (tmp_path / "none.db").exists()


# ---------------------------------------------------------------- processes that die


def _slow_config(folder, name="slow"):
    # 16 px, 96 training images per fold, 8 epochs: a few seconds per fold on one thread
    path = write_config(folder, name=name, samples=192, epochs=8)
    path.write_text(path.read_text().replace("image_size = 8", "image_size = 16").replace(
        "[train]\n", "[train]\ncheckpoint_every_epochs = 1\n"))
    return path


def _accuracies(url, name, config):
    return {k: t.user_attrs["fold_accuracies"] for k, t in assert_exactly_once(url, name, config).items()}


def _run(args, env, **kw):
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The slow config's accuracies from an uninterrupted run (a subprocess, one thread)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    path = _slow_config(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    result = _run(["search", str(path)], env)
    assert result.returncode == 0, result.stderr
    config = ls.load_config(path)
    return config, _accuracies(config.study.storage, "slow", config)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_search_killed_mid_fold_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, cli_env, how):
    config, expected = uninterrupted
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = _slow_config(run_dir)
    url = f"sqlite:///{run_dir / 'slow.db'}"
    proc = subprocess.Popen([str(SCRIPT), "search", str(path)], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "slow.ckpt" / "lambda-0.0001-r0" / "r0f1.pt"

    def one_fold_and_a_checkpoint():
        if not ckpt.exists():
            return False
        by_point = trials_of(url, "slow")
        return any(t.user_attrs.get("fold_results") for t in by_point.get("e_lambda=0.0001/repeat=0", []))

    assert poll(one_fold_and_a_checkpoint), proc.communicate()
    proc.send_signal(how)
    out, err = proc.communicate(timeout=120)
    if how == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "interrupted" in err and "Traceback" not in err
        (first,) = trials_of(url, "slow")["e_lambda=0.0001/repeat=0"]
        assert first.state == optuna.trial.TrialState.FAIL
        assert first.system_attrs["lambda_search:fail_reason"] == "interrupted"
    else:
        assert proc.returncode == -signal.SIGKILL
    killed = trials_of(url, "slow")["e_lambda=0.0001/repeat=0"][0]
    kept = killed.user_attrs["fold_results"]["r0f0"]

    result = _run(["resume", "--storage", url, "--study", "slow"], cli_env)
    assert result.returncode == 0, result.stderr
    assert "keeps finished folds r0f0" in result.stdout
    assert _accuracies(url, "slow", config) == expected
    final = assert_exactly_once(url, "slow", config)["e_lambda=0.0001/repeat=0"]
    assert final.user_attrs["fold_results"]["r0f0"] == kept  # not retrained
    assert final.user_attrs["fold_results"]["r0f1"]["resumed_from_iteration"] > 0
    assert not (run_dir / "slow.ckpt" / "lambda-0.0001-r0").exists()  # cleaned up once complete


def test_concurrent_searches_and_workers_run_each_point_once(tiny_config, tmp_path, cli_env):
    """Two `search --workers 2` at once on a new SQLite file: two creators, four workers."""
    path = tiny_config(lambdas="[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3]", baseline="true")
    procs = [subprocess.Popen([str(SCRIPT), "search", str(path), "--workers", "2"], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    config = ls.load_config(path)
    url = config.study.storage
    assert_exactly_once(url, "tiny", config)
    assert sum(len(v) for v in trials_of(url, "tiny").values()) == 8  # no failed attempts either
    workers = {t.system_attrs["lambda_search:worker"] for v in trials_of(url, "tiny").values() for t in v}
    assert len(workers) >= 2


def test_a_journal_file_storage(tiny_config, tmp_path, capsys):
    path = tiny_config(baseline="true")
    url = f"journal:{tmp_path / 'tiny.log'}"
    assert main(["search", str(path), "--storage", url]) == 0
    assert_exactly_once(url, "tiny", ls.load_config(path))
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "tiny"]) == 0
    assert "3 of 3 points complete" in capsys.readouterr().out


def test_a_search_whose_every_lambda_diverged_has_no_answer(tiny_config, capsys, monkeypatch):
    """One rule for exit codes: every lambda diverged, so the finished search has no answer:
    exit 1, as select and plot, saying why."""
    from lambda_search.train import groups as _runs

    real = _runs.train_fold

    def train_fold(data, fold, e_lambda, config, **kw):
        if e_lambda is not None:
            config = dataclasses.replace(config, lr=1e6)
        return real(data, fold, e_lambda, config, **kw)

    monkeypatch.setattr(_runs, "train_fold", train_fold)
    path = tiny_config(lambdas="[1e-3, 1e-1]", baseline="true")
    capsys.readouterr()
    assert main(["search", str(path)]) == 1
    err = capsys.readouterr().err
    assert "lambda-search: every lambda diverged (2 of 2): nothing to select" in err, err
    url = ls.load_config(path).study.storage
    for command in (["select"], ["plot", "-o", str(path.with_suffix(".png"))]):
        assert main([command[0], "--storage", url, "--study", "tiny", *command[1:]]) == 1


def test_a_diverging_point_fails_once_and_the_rest_completes(tiny_config, capsys, monkeypatch):
    """lambda=0.1 trains at a learning rate of 1e6 (as if that lambda made training blow up):
    its point ends FAILED "diverged" after its first fold, is never retried, and status,
    select and the plot show it as diverged while the other points complete."""
    from lambda_search.train import groups as _runs

    real = _runs.train_fold

    def train_fold(data, fold, e_lambda, config, **kw):
        if e_lambda == 0.1:
            config = dataclasses.replace(config, lr=1e6)
        return real(data, fold, e_lambda, config, **kw)

    monkeypatch.setattr(_runs, "train_fold", train_fold)
    path = tiny_config(lambdas="[1e-3, 1e-1]", baseline="true")
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trial 1 FAILED: lambda=1e-01 diverged: the training loss became NaN or infinite at step" in out
    assert main(["search", str(path)]) == 0  # finished: the diverged point is not run again
    out = capsys.readouterr().out
    assert "3 of 3 points complete" not in out and "trial" not in out.replace("trials", "")
    config = ls.load_config(path)
    url = config.study.storage
    by_point = trials_of(url, "tiny")
    (failed,) = by_point["e_lambda=0.1/repeat=0"]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.system_attrs["lambda_search:fail_reason"].startswith("diverged: ")
    assert list(failed.user_attrs["fold_results"]) == ["r0f0"]  # stopped at the first diverged fold
    assert [t.state for t in by_point["e_lambda=0.001/repeat=0"]] == [optuna.trial.TrialState.COMPLETE]
    status = ls.study_status(ls.open_store(url), "tiny")
    assert status.finished and {p.point.e_lambda: p.state for p in status.points} == \
        {1e-3: "complete", 0.1: "diverged", None: "complete"}
    assert main(["status", "--storage", url, "--study", "tiny"]) == 0
    assert re.search(r"1e-01\s+diverged", capsys.readouterr().out)
    sel = ls.select(status)
    assert sel["best"]["e_lambda"] == 1e-3 and sel["one_se"]["e_lambda"] == 1e-3
    assert "diverged" in {c["e_lambda"]: c for c in sel["comparisons"]}[0.1]["reason"]
    plot = {p["e_lambda"]: p for p in ls.figure4_data(status)["points"]}
    assert plot[0.1]["state"] == "diverged" and plot[0.1]["mean"] is None
