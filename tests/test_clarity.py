"""Issue 14, clarity: the storage from the environment for every command, export formats and
standard output, the studies of a storage, exit codes a script can use, a worker that says
what it did, a progress line that fits the terminal."""

import io
import json
import shutil
import subprocess

import optuna
import pandas as pd
import pytest

import lambda_search as ls
from lambda_search.cli import common, main
from lambda_search.report import select as _select
from lambda_search.store import status as _status

from conftest import SCRIPT, write_config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clarity")
    path = write_config(folder, lambdas="[1e-3, 1.2e-3]", baseline="true", samples=36, epochs=1)
    assert main(["search", str(path)]) == 0
    return folder


def _url(folder):
    return f"sqlite:///{folder / 'tiny.db'}"


@pytest.mark.parametrize("command", [["status"], ["select"], ["studies"], ["export", "-o", "-"],
                                     ["plot", "-o", "{tmp}/env.png"]])
def test_the_storage_may_come_from_the_environment(study, capsys, monkeypatch, command):
    monkeypatch.setenv(_status.STORAGE_ENV, _url(study))
    args = [a.format(tmp=study) for a in command] + ([] if command[0] == "studies" else ["--study", "tiny"])
    assert main(args) == 0
    assert capsys.readouterr().out


def test_without_a_storage_the_message_names_both_ways(capsys, monkeypatch):
    monkeypatch.delenv(_status.STORAGE_ENV, raising=False)
    assert main(["status", "--study", "tiny"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"lambda-search status: error: status needs --storage URL (or the {_status.STORAGE_ENV} environment "
                   "variable)"]


def test_resume_takes_the_storage_from_the_environment(study, capsys, monkeypatch):
    monkeypatch.setenv(_status.STORAGE_ENV, _url(study))
    assert main(["resume", "--study", "tiny"]) == 0
    assert "3 of 3 points complete" in capsys.readouterr().out


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_export_honours_the_extension(study, tmp_path, ext):
    out = tmp_path / f"res.{ext}"
    assert main(["export", "--storage", _url(study), "--study", "tiny", "-o", str(out)]) == 0
    read = pd.read_csv if ext == "csv" else (lambda p: pd.DataFrame(json.loads(p.read_text())))
    points, folds = read(out), read(tmp_path / f"res.folds.{ext}")
    assert len(points) == 3 and len(folds) == 6
    assert sorted(points["param_e_lambda"].dropna()) == [1e-3, 1.2e-3]  # exact
    if ext == "json":
        assert json.loads(out.read_text())[2]["param_e_lambda"] is None  # the baseline: null, not NaN


def test_export_to_standard_output_and_the_folds_alone(study, tmp_path, capsys):
    assert main(["export", "--storage", _url(study), "--study", "tiny", "-o", "-"]) == 0
    assert len(pd.read_csv(io.StringIO(capsys.readouterr().out))) == 3
    assert main(["export", "--storage", _url(study), "--study", "tiny", "-o", "-", "--folds", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 6
    assert not (tmp_path / "-").exists()
    assert main(["export", "--storage", _url(study), "--study", "tiny", "-o", str(tmp_path / "f.csv"), "--folds"]) == 0
    assert len(pd.read_csv(tmp_path / "f.csv")) == 6 and not (tmp_path / "f.folds.csv").exists()


@pytest.mark.parametrize("output, extra, message", [
    ("res.txt", [], "export writes .csv or .json files (or - for standard output), got -o '{tmp}/res.txt'"),
    ("res", [], "got -o '{tmp}/res'"),
    ("res.csv", ["--format", "json"], "export writes .json files"),
])
def test_export_refuses_what_it_cannot_honour(study, tmp_path, capsys, output, extra, message):
    assert main(["export", "--storage", _url(study), "--study", "tiny", "-o", str(tmp_path / output), *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert not list(tmp_path.iterdir())


def test_studies_lists_each_study_with_its_companions(study, capsys):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=_url(study), study_name="someone-elses")
    assert main(["studies", "--storage", _url(study)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"studies in {_url(study)}:"
    rows = [ln.split() for ln in lines[2:]]
    assert rows == [["someone-elses", "0", "trials", "not", "a", "lambda_search", "study"],
                    ["tiny", "3/3", "points", "complete", "finished"],
                    ["tiny:baseline", "its", "baseline", "(no", "SimAM)"]]
    assert main(["studies", "--storage", _url(study), "--json"]) == 0
    listed = {s["study"]: s for s in json.loads(capsys.readouterr().out)}
    assert listed["tiny"]["companions"] == ["tiny:baseline"] and listed["tiny"]["finished"] is True
    assert listed["someone-elses"]["lambda_search"] is False


def test_a_worker_on_a_finished_study_says_so(study, capsys):
    assert main(["worker", "--storage", _url(study), "--study", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "worker done: ran no point; study 'tiny': 3 of 3 points complete, finished"


def test_select_and_plot_exit_1_when_nothing_can_be_chosen(tiny_config, tmp_path, capsys):
    path = tiny_config(lambdas="[1e-3, 1e-1]", samples=36, epochs=1)
    config = ls.load_config(path)
    ls.run_search(config, log=lambda s: None, should_stop=lambda: True)  # stored, nothing trained
    url = config.study.storage
    capsys.readouterr()
    assert main(["select", "--storage", url, "--study", "tiny"]) == 1
    out, err = capsys.readouterr()
    assert "no lambda is complete yet (0 of 2)" in out
    assert err.splitlines() == ["lambda-search: no lambda is complete yet (0 of 2): nothing to select"]
    assert main(["plot", "--storage", url, "--study", "tiny", "-o", str(tmp_path / "p.png")]) == 1
    assert (tmp_path / "p.png").exists()


def test_every_lambda_diverged_is_said_as_such():
    sel = {"best": None, "lambdas": 2, "diverged": 2, "complete": 0}
    assert _select.nothing_selected(sel) == "every lambda diverged (2 of 2): nothing to select; try a smaller train.lr"
    sel["diverged"] = 1
    assert (
        _select.nothing_selected(sel)
        == "no lambda is complete yet (1 of 2 still to run, 1 diverged): nothing to select"
    )


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_the_progress_line_fits_the_terminal(monkeypatch, columns):
    written = []

    class Tty(io.StringIO):
        def isatty(self):
            return True

        def write(self, text):
            written.append(text)

    monkeypatch.setattr(common.sys, "stderr", Tty())
    monkeypatch.setattr(common.shutil, "get_terminal_size",
                        lambda fallback: __import__("os").terminal_size((columns, 24)))
    show = common.progress()
    show("x" * 300)
    line = written[0].strip("\r")
    assert len(line) == columns - 1


@pytest.mark.slow
def test_a_closed_pipe_stops_a_command_quietly(tmp_path, cli_env):
    """``lambda-search status ... | head -1``: the reader goes away; the command stops without a
    traceback and exits 141 (128 + SIGPIPE), as a Unix tool a closed pipe stopped."""
    config = ls.load_config(write_config(tmp_path, baseline="true"))
    ls.run_search(config, log=lambda s: None)
    url = config.study.storage
    for args in (["status", "--study", "tiny"], ["studies"], ["select", "--study", "tiny", "--json"],
                 ["export", "--study", "tiny", "--output", "-"]):
        proc = subprocess.Popen([str(SCRIPT), *args, "--storage", url], env=cli_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # before the command writes a byte: it meets a closed pipe, every time
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141 and err == "", (args, err)


@pytest.mark.slow
def test_delete_removes_a_study_with_its_companions_checkpoints_and_plots(tmp_path, capsys, monkeypatch):
    """`delete` lists what it removes (the study, its companions, its checkpoint folders with
    what was set aside in them, its plots), asks first (--yes for scripts, refused where no one
    can answer), and leaves what is not the study's: another study, another run's checkpoints."""
    path = write_config(tmp_path, name="d", lambdas="[1e-1]", baseline="true")
    assert main(["search", str(path)]) == 0
    url = f"sqlite:///{tmp_path / 'd.db'}"
    assert main(["evaluate", "--storage", url, "--study", "d", "--seeds", "1",
                 "--networks", "resnet20,preresnet20"]) == 0
    other = write_config(tmp_path, name="o", lambdas="[1e-1]")
    assert main(["search", str(other), "--storage", url]) == 0
    ckpt = tmp_path / "d.ckpt"
    (ckpt / "lambda-0.1-r0.stale-1").mkdir(parents=True)  # set aside in it: the study's to remove
    (ckpt / "foreign-r0").mkdir()
    (ckpt / "foreign-r0" / "RUN").write_text("another-run\n")  # another run's (a folder shared): kept
    (ckpt / "photos" / "2023").mkdir(parents=True)  # a user's: kept, as a file, and a link's target
    (ckpt / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere" / "lambda-0.1-r0").mkdir(parents=True)
    (ckpt / "photos" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "d.db", tmp_path / "copy" / "d.db")  # a copy: its checkpoint folder is the original's
    capsys.readouterr()
    assert main(["delete", "--storage", f"sqlite:///{tmp_path / 'copy' / 'd.db'}", "--study", "d", "--yes"]) == 0
    assert f"kept: {ckpt}: not beside this database" in capsys.readouterr().out
    assert (ckpt / "lambda-0.1-r0.stale-1").is_dir() and (tmp_path / "d.png").exists()
    db = (tmp_path / "d.db").read_bytes()
    capsys.readouterr()
    assert main(["delete", "--storage", url, "--study", "d", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    for shown in ("study 'd'", "study 'd:baseline'", "study 'd:final'", "study 'd:final:preresnet20:baseline'",
                  f"folder {ckpt / 'lambda-0.1-r0.stale-1'}", f"file {tmp_path / 'd.png'}",
                  f"file {tmp_path / 'd+evaluation.png'}"):
        assert shown in listed, (shown, listed)
    assert "study 'o'" not in listed and "foreign" not in listed and (tmp_path / "d.db").read_bytes() == db
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no one to answer
    assert main(["delete", "--storage", url, "--study", "d"]) == 2
    assert "give --yes to delete without asking" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["delete", "--storage", url, "--study", "d"]) == 1 and (tmp_path / "d.db").read_bytes() == db
    assert main(["delete", "--storage", url, "--study", "d:final"]) == 2
    assert "is a companion of study 'd': delete it with --study d" in capsys.readouterr().err
    assert main(["delete", "--storage", url, "--study", "d", "--yes"]) == 0
    assert ls.open_store(url).study_names() == ["o"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["foreign-r0", "notes.txt", "photos"]  # not the study's: kept
    assert not (tmp_path / "d.png").exists() and not (tmp_path / "d+evaluation.png").exists()
    assert ls.study_status(ls.open_store(url), "o").finished and (tmp_path / "elsewhere" / "lambda-0.1-r0").is_dir()
    import optuna

    optuna.create_study(study_name="o:tuning", storage=url)  # not a companion of o's, though named so
    assert main(["delete", "--storage", url, "--study", "o", "--yes"]) == 0
    assert ls.open_store(url).study_names() == ["o:tuning"]


@pytest.mark.slow
def test_dry_run_says_what_would_be_trained_and_stores_nothing(tmp_path, capsys):
    path = write_config(tmp_path, name="dr", lambdas="[1e-3, 1e-1]", baseline="true")
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study 'dr' in sqlite:///" in out and "not made yet" in out
    assert "would train 3 points of 3: lambda=1e-03, lambda=1e-01, baseline (no SimAM)" in out
    assert "projected for the whole study on one cpu worker: 6 trainings" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dr.toml"]  # nothing stored, nothing written
    assert main(["search", str(path)]) == 0
    url = f"sqlite:///{tmp_path / 'dr.db'}"
    db = (tmp_path / "dr.db").read_bytes()
    capsys.readouterr()
    assert main(["search", str(path), "--dry-run", "--set", "train.lr=0.5"]) == 2  # what search refuses, refused
    assert "config conflicts with study 'dr'" in capsys.readouterr().err
    assert main(["evaluate", "--storage", url, "--study", "dr", "--seeds", "2", "--networks", "resnet20,preresnet20",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study 'dr:final:preresnet20' in " in out and "not made yet" in out
    assert "would train 4 points of 4: lambda=1e-01 seed 0, baseline (no SimAM) seed 0, lambda=1e-01 seed 1" in out
    assert (tmp_path / "dr.db").read_bytes() == db and ls.open_store(url).study_names() == ["dr", "dr:baseline"]
