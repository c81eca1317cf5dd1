"""Same numbers however the search runs: one study config run with --workers 1, with
--workers 2, and with one worker killed with SIGKILL mid-fold and resumed by two, gives
bit-identical folds (accuracy, loss, iterations), all trained under one numerics."""

import os
import signal
import subprocess

import pytest

import lambda_search as ls

from conftest import SCRIPT, poll, write_config

pytestmark = pytest.mark.slow


def _study(folder):
    folder.mkdir()
    # 3 points x 2 folds of 200 images, 100 steps each, a checkpoint after every step
    return write_config(folder, name="same", lambdas="[1e-3, 1e-1]", baseline="true", samples=400, epochs=4,
                        ckpt_seconds=0.0)


def _folds(folder) -> dict:
    status = ls.study_status(ls.open_store(f"sqlite:///{folder / 'same.db'}"), "same")
    assert status.finished and status.complete == 3
    assert not status.mixed_numerics, status.numerics
    return status, {(p.point.key, name): (r["val_accuracy"], r["val_loss"], r["iterations"])
                    for p in status.points for name, r in p.folds.items()}


def _search(path, env, *args):
    result = subprocess.run([str(SCRIPT), "search", str(path), *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two workers need two cores")
def test_workers_kills_and_resumes_give_the_same_bits(tmp_path, cli_env):
    env = {**cli_env}
    env.pop("OMP_NUM_THREADS")  # the machine's default: train.threads alone decides
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    out = _search(_study(one), env, "--workers", "1")
    assert "numerics pinned for cpu workers: 1 thread per training" in out
    assert "started 2 worker processes (1 thread each)" in _search(_study(two), env, "--workers", "2")

    # one worker (this process), killed mid-fold; resumed by two worker processes whose
    # environment says to switch SimAM's CPU kernel off: the study's pin decides
    path = _study(killed)
    proc = subprocess.Popen([str(SCRIPT), "search", str(path), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed / "same.ckpt"
    try:
        assert poll(lambda: any(ckpt.glob("*/*.pt")), timeout=300, every=0.02), "no checkpoint was written"
        # killed at once: inside the fold whose first checkpoint this is (a fold here takes well under a second, so a
        # wait could outlast its point, whose checkpoints go once it is complete)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert any(ckpt.glob("*/*.pt")) or any(ckpt.glob("*/*.pt.prev"))  # (killed between a save's two renames: .prev)
    result = subprocess.run([str(SCRIPT), "resume", "--storage", f"sqlite:///{killed / 'same.db'}", "--study", "same",
                             "--workers", "2"], env={**env, "LAMBDA_SEARCH_KERNELS": "0"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "started 2 worker processes" in result.stdout

    status, expected = _folds(one)
    assert len(expected) == 6
    [numerics] = status.numerics
    assert numerics["folds"] == 6 and numerics["numerics"]["threads"] == 1 and numerics["numerics"]["pack"] == 1
    assert _folds(two)[1] == expected
    resumed_status, resumed = _folds(killed)
    assert resumed == expected  # exact: the same bits
    assert resumed_status.numerics[0]["numerics"] == numerics["numerics"]
    assert any(r["resumed_from_iteration"] for p in resumed_status.points for r in p.folds.values()), \
        "the kill did not land mid-fold"
