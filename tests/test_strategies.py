"""A search strategy is asked what to train; the one loop (claim, lease, run, record) runs
whatever it asks for exactly once, through kills and resumes. A strategy of the tests' own
is found by its import path, as a user's is, and stored with the study."""

import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest

import lambda_search as ls
from lambda_search.strategy import Grid, strategy_for
from lambda_search.train import plan as _plan

from conftest import SCRIPT, poll, write_config

TESTS = str(Path(__file__).resolve().parent)
LAMBDAS = "[1e-4, 1e-2, 1e-1]"


def test_a_strategy_is_found_by_name_or_import_path(tiny_config):
    assert isinstance(strategy_for("grid"), Grid)
    assert type(strategy_for("toy_strategies:Refine")).__name__ == "Refine"
    config = ls.load_config(tiny_config(lambdas=LAMBDAS), ["search.strategy='toy_strategies:Refine'"])
    assert [p.e_lambda for p in _plan.make_plan(config).points] == [1e-4, 1e-2, 1e-1]  # its first ask
    for name, message in (("toy_strategies:NoAsk", "has no ask"), ("toy_strategies:Nope", "cannot import 'Nope'"),
                          ("grid2", r"search.strategy must be 'grid' or a strategy of your own as 'module:attribute'")):
        with pytest.raises(ls.ConfigError, match=message):
            _plan.make_plan(ls.load_config(tiny_config(), [f"search.strategy={name!r}"]))


def _trials(url, name):
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    out = {}
    for study in (name, f"{name}:baseline"):
        try:
            trials = storage.get_all_trials(storage.get_study_id_from_name(study))
        except KeyError:  # not made yet
            continue
        for t in trials:
            out.setdefault(t.system_attrs["lambda_search:point"], []).append(t)
    return out


def _once(url, name):
    """{point: its fold accuracies}, checking that each point has exactly one COMPLETE trial."""
    out = {}
    for key, trials in _trials(url, name).items():
        states = [t.state.name for t in trials]
        assert states.count("COMPLETE") == 1 and "RUNNING" not in states, (key, states)
        out[key] = next(t for t in trials if t.state.name == "COMPLETE").user_attrs["fold_accuracies"]
    return out


@pytest.mark.slow
def test_a_strategy_of_ones_own_runs_exactly_once_through_a_kill_and_a_resume(tmp_path, cli_env):
    env = {**cli_env, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
    runs = {}
    for run in ("whole", "killed"):
        folder = tmp_path / run
        folder.mkdir()
        path = write_config(folder, lambdas=LAMBDAS, baseline="true", epochs=3)
        path.write_text(path.read_text().replace("workers = 1", 'workers = 1\nstrategy = "toy_strategies:Refine"'))
        url = f"sqlite:///{folder / 'tiny.db'}"
        if run == "killed":  # SIGKILL once the grid's second point has trained a fold
            proc = subprocess.Popen([str(SCRIPT), "search", str(path)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            assert poll(lambda: folder.joinpath("tiny.db").exists() and any(
                t.user_attrs.get("fold_results") for t in _trials(url, "tiny").get("e_lambda=0.01/repeat=0", []))
                if folder.joinpath("tiny.db").exists() else False), proc.communicate()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        done = subprocess.run([str(SCRIPT), "search", str(path)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        runs[run] = _once(url, "tiny")
    whole, killed = runs["whole"], runs["killed"]
    assert len(whole) in (5, 6) and whole == killed  # the grid (3 + baseline), then 1 or 2 midpoints: same bits
    status = ls.study_status(ls.open_store(f"sqlite:///{tmp_path / 'killed' / 'tiny.db'}"), "tiny")
    assert status.finished and status.config.search.strategy == "toy_strategies:Refine"
    assert status.complete == status.total == len(whole)
