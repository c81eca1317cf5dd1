"""Faults: a full disk under a checkpoint or the database, a data folder that vanishes, and
checkpoints that could carry code. Each ends in a clear message, and a resume completes the
study with the uninterrupted run's numbers."""

import errno
import pickle
import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy
import torch

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.train import foldrun as _fold
from lambda_search.train import plan as _objective
from lambda_search.train import single as _train

from test_data import write_cifar10
from test_search import assert_exactly_once


def fold_accuracies(config):
    trials = assert_exactly_once(config.study.storage, config.study.name, config)
    return {k: t.user_attrs["fold_accuracies"] for k, t in trials.items()}


def expected_accuracies(config):
    plan = _objective.make_plan(config)
    return {p.key: [ls.train_fold(plan.data, f, p.e_lambda, plan.train, attention=p.attention,
                                  seed=plan.train_seed(f)).val_accuracy for f in plan.folds_of(p.repeat)]
            for p in plan.points}


@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_written(tiny_config, capsys, monkeypatch):
    path = tiny_config(lambdas="[1e-3, 1e-1]")
    config = ls.load_config(path)
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third checkpoint: half written, then the disk is full
            f.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(_train.torch, "save", save_until_the_disk_fills)
    assert main(["search", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no space left on the device writing" in err[0] and ".pt" in err[0], err
    folder = Path(config.study.checkpoint_dir)
    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert files and all(n.endswith((".pt", ".pt.prev")) or n == "RUN" for n in files), files  # no partial file left
    for p in [*folder.rglob("*.pt"), *folder.rglob("*.pt.prev")]:
        torch.load(p, weights_only=True)  # every checkpoint on disk is whole
    monkeypatch.setattr(_train.torch, "save", real_save)  # space freed
    capsys.readouterr()
    assert main(["search", str(path)]) == 0
    assert fold_accuracies(config) == expected_accuracies(config)


@pytest.mark.slow
def test_a_full_database(tiny_config, capsys):
    """SQLite refuses to grow past a page limit (SQLITE_FULL, as on a full disk)."""
    path = tiny_config(lambdas="[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0]", epochs=1)
    config = ls.load_config(path)
    ls.run_search(config, log=lambda s: None, should_stop=lambda: True)  # the study, created, nothing run

    def limit(dbapi_connection, record):  # no page beyond those the file has now
        dbapi_connection.execute("PRAGMA max_page_count = 1")

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", limit)
    try:
        code = main(["search", str(path)])
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "connect", limit)
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1 and "the study database is full" in err[0], err
    assert main(["search", str(path)]) == 0  # room again: the study completes
    assert fold_accuracies(config) == expected_accuracies(config)


@pytest.mark.slow
def test_the_data_folder_vanishing(tmp_path, capsys, monkeypatch):
    """The data set is read once, when a worker starts: a folder that vanishes between folds
    does not disturb it; a resume without the folder is refused and changes nothing."""
    root = tmp_path / "data"
    write_cifar10(root, per_batch=12)
    path = tmp_path / "cifar.toml"
    path.write_text(
        f'[search]\nlambdas = [1e-3, 1e-1]\nworkers = 1\n[data]\ndataset = "cifar10"\nroot = "{root}"\nfolds = 2\n'
        "[train]\nepochs = 1\nbatch_size = 8\n"
    )
    from lambda_search.train import groups as _runs

    real, folds = _runs.train_fold, []

    def train_fold(*args, **kwargs):
        folds.append(1)
        if len(folds) == 2:
            shutil.rmtree(root)  # gone between the first and the second fold
        return real(*args, **kwargs)

    monkeypatch.setattr(_runs, "train_fold", train_fold)
    assert main(["search", str(path)]) == 0
    assert not root.exists() and len(folds) == 4
    db = tmp_path / "cifar.db"
    before = db.read_bytes()
    capsys.readouterr()
    assert main(["search", str(path), "--set", "search.lambdas=[1e-3, 1e-1]"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"cannot read data set 'cifar10' from root='{root}'" in err[0], err
    assert db.read_bytes() == before


class _Payload:
    """A pickle that would run code when loaded."""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_carrying_code_is_never_run(tmp_path, recwarn):
    marker = tmp_path / "pwned"
    payload = _Payload()
    _Payload.marker = str(marker)
    bad = tmp_path / "fold.pt"
    with open(bad, "wb") as f:
        pickle.dump({"version": 1, "evil": payload}, f)
    assert _fold.load_checkpoint(bad, {}) is None  # refused (weights_only) and reported, never run
    assert not marker.exists()
    assert any("ignoring unreadable checkpoint" in str(w.message) for w in recwarn)
    # refused by torch's weights_only unpickler, which will not call Path.touch
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))} is not a readable PyTorch checkpoint "
                                         r"\(UnpicklingError\)$") as info:
        ls.load_official_checkpoint(ls.build_model("resnet20", 100), bad)
    assert type(info.value) is ValueError and info.value.__cause__ is None  # one clear line, no pickle trace
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    sources = Path(ls.__file__).parent.rglob("*.py")
    calls = [line for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for line in calls), calls


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["the search starting", "its workers importing", "its workers training"])
def test_ctrl_c_at_any_stage_of_start_up_is_one_line_and_resumable(tiny_config, cli_env, stage):
    """Ctrl-C reaches the whole process group (the search and its workers): at each stage of
    start-up it ends in one line, no traceback, and the same command finishes the study with
    every point exactly once and the accuracies of an uninterrupted run."""
    import os
    import signal
    import subprocess

    from conftest import SCRIPT

    path = tiny_config(lambdas="[1e-3, 1e-1]", baseline="true")
    command = [str(SCRIPT), "search", str(path), "--workers", "2"]
    proc = subprocess.Popen(command, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job
    wait_for = {"the search starting": "study 'tiny' created", "its workers importing": "started 2 worker processes",
                "its workers training": "] trial "}[stage]
    seen = ""
    while wait_for not in seen:
        line = proc.stdout.readline()
        assert line, (seen, proc.stderr.read())
        seen += line
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=240)
    assert "Traceback" not in err + out and "KeyboardInterrupt" not in err + out, err
    assert proc.returncode in (130, 0), (proc.returncode, err)  # 0: it had finished before the signal came
    if proc.returncode == 130:  # the last line says so (the lines before: what ran)
        assert "interrupted" in err.strip().splitlines()[-1], err
    config = ls.load_config(path)
    assert ls.run_search(config, workers=1, log=lambda s: None)[1].finished  # the resume (here: in this process)
    assert fold_accuracies(config) == expected_accuracies(config)
