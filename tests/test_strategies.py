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
from lambda_search.strategy import STRATEGIES, Grid, strategy_for
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


def _trained_a_fold(url, key):
    """Whether point ``key`` of study tiny has a finished fold (False while the database is being made)."""
    try:
        return any(t.user_attrs.get("fold_results") for t in _trials(url, "tiny").get(key, []))
    except Exception:  # no file, or its tables not made yet
        return False


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
            assert poll(lambda: _trained_a_fold(url, "e_lambda=0.01/repeat=0")), proc.communicate()
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


def test_what_a_strategy_asks_for_is_checked_in_one_place(tiny_config):
    import numpy as np

    from lambda_search.points import Point
    from lambda_search.search.columns import final_config
    from lambda_search.strategy import asked_points

    config = ls.load_config(tiny_config(lambdas=LAMBDAS), ["search.strategy='toy_strategies:Refine'"])
    assert Point(np.float64(0.01)).key == Point(0.01).key == "e_lambda=0.01/repeat=0"  # one form, one key
    assert Point(1).key == Point(1.0).key and Point(0.1, np.int64(0)) == Point(0.1)
    for asked, message in (([Point(0.1), Point(np.float64(0.1))], "asked for lambda=1e-01 twice"),
                           ([Point(0.1, 1)], "asked for repeat 1: the study has search.repeats = 1"),
                           ([Point(0.0)], "a lambda it asks for must be a finite number > 0"),
                           ([0.1], "asked for 0.1, not a Point")):
        class Fixed:
            def ask(self, config, tried, asked=asked):
                return asked

        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(STRATEGIES, "toy_strategies:Refine", Fixed())
            with pytest.raises(ls.ConfigError, match=message):
                asked_points(config, [])
    assert final_config(config, 1e-2, 2).search.strategy == "grid"  # the final evaluation trains its lambda only


def test_a_strategy_that_cannot_be_imported_here_is_read_from_its_trials(tiny_config):
    from lambda_search.store.status import point_statuses

    config = ls.load_config(tiny_config(), ["search.strategy='not_a_module_here:Strategy'"])
    with pytest.warns(UserWarning, match="cannot import 'Strategy' from module 'not_a_module_here'"):
        assert point_statuses(None, "tiny", config, trials=[], live=set()) == []  # a reading: the points tried
    with pytest.raises(ls.ConfigError, match="cannot import 'Strategy'"):  # a worker about to claim: refused
        point_statuses(None, "tiny", config, trials=[], live=set(), strict=True)
