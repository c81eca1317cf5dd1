"""Issue 14, faults 4 to 8: a database that can only be read, a device that cannot train,
outputs that follow a resume's config, and leases no clean-up can break."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.store import status as _status
from lambda_search.store.claims import claim_next

from conftest import SCRIPT, poll, write_config

NOBODY = 65534


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny study in a folder every user can read (the read-only cases run as an
    unprivileged user where the tests run as root, for whom nothing is read-only)."""
    folder = Path(tempfile.mkdtemp(prefix="ls-access-", dir=tmp_path_factory.getbasetemp()))
    for p in [folder, *folder.parents]:
        if p == Path(p.anchor):
            break
        if p.stat().st_mode & 0o005 != 0o005:
            os.chmod(p, p.stat().st_mode | 0o005)
    path = write_config(folder, lambdas="[1e-2]", samples=36, epochs=1)
    assert main(["search", str(path)]) == 0
    os.chmod(path, 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


READER = """
import contextlib, io, json, sys, traceback
from lambda_search.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as std:
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code, _ = "traceback", traceback.print_exc(file=err)
    out.append([args, code, err.getvalue(), std.getvalue()])
print(json.dumps(out))
"""


def _as_reader(commands, home: Path, env) -> list:
    """Run CLI commands, in one process, as a user who may not write what root wrote (root may
    write anything). Returns [args, exit code, stderr, stdout] for each."""
    cmd = [sys.executable, "-c", READER, json.dumps(commands)]
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    env = {**env, "HOME": str(home), "MPLCONFIGDIR": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=home)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def _read_only(folder: Path, what: str):
    """Make the database file (``what`` = "file") or its folder ("folder") read-only for the
    reader, the other writable; returns a folder the reader may write outputs to."""
    db = folder / "tiny.db"
    out = Path(tempfile.mkdtemp(dir=folder.parent))
    if os.geteuid() == 0:
        os.chown(out, NOBODY, NOBODY)
        os.chown(folder, *((0, 0) if what == "folder" else (NOBODY, NOBODY)))
        os.chown(db, *((NOBODY, NOBODY) if what == "folder" else (0, 0)))
        os.chmod(db, 0o644)
    else:
        os.chmod(folder, 0o555 if what == "folder" else 0o755)
        os.chmod(db, 0o644 if what == "folder" else 0o444)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_read_only_database_is_read_and_never_searched(finished, cli_env, what):
    db = finished / "tiny.db"
    out = _read_only(finished, what)
    before = db.read_bytes()
    url = f"sqlite:///{db}"
    try:
        reads = [["status"], ["select"], ["plot", "-o", str(out / "fig.png")], ["export", "-o", "-"], ["studies"]]
        reads = [[a[0], "--storage", url, *([] if a[0] == "studies" else ["--study", "tiny"]), *a[1:]] for a in reads]
        writes = [["search", str(finished / "tiny.toml")], ["resume", "--storage", url, "--study", "tiny"],
                  ["worker", "--storage", url, "--study", "tiny"]]
        results = _as_reader(reads + writes, out, cli_env)
        for args, code, err, std in results[: len(reads)]:
            assert code == 0 and "Traceback" not in err, (args, err)
        assert (out / "fig.png").exists()
        for args, code, err, std in results[len(reads):]:
            lines = err.splitlines()
            assert code == 2 and len(lines) == 1, (args, err)
            assert "is read-only here" in lines[0] and f"its {what}" in lines[0], lines
            assert "projected" not in std  # refused before any training or timing
    finally:
        os.chmod(finished, 0o755)
        os.chmod(db, 0o644)
        if os.geteuid() == 0:
            os.chown(finished, 0, 0)
            os.chown(db, 0, 0)
    assert db.read_bytes() == before
    assert not list(finished.glob("*.locks")) and not list(finished.glob("*-journal"))


@pytest.mark.parametrize("device, message", [
    ("mps", "train.device must be 'cpu', 'cuda' or 'cuda:N', got train.device='mps'"),
    ("meta", "got train.device='meta'"),
    ("cuda:7", "train.device='cuda:7'"),
    ("gpu", "train.device"),
])
def test_every_device_is_checked_before_anything_is_stored(tiny_config, tmp_path, capsys, device, message):
    path = tiny_config()
    assert main(["search", str(path), "--set", f"train.device={device}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "tiny.db").exists()


def test_a_workers_device_is_checked_before_it_claims(finished, capsys):
    db = finished / "tiny.db"
    before = db.read_bytes()
    assert main(["worker", "--storage", f"sqlite:///{db}", "--study", "tiny", "--device", "mps"]) == 2
    assert "got train.device='mps'" in capsys.readouterr().err
    assert db.read_bytes() == before


def test_a_resumes_outputs_follow_its_config(tiny_config, tmp_path, capsys):
    path = tiny_config(lambdas="[1e-2]", samples=36, epochs=1)
    assert main(["search", str(path)]) == 0
    shutil.rmtree(tmp_path / "tiny.ckpt", ignore_errors=True)
    (tmp_path / "tiny.png").unlink()
    moved = tmp_path / "elsewhere" / "deeper" / "ck"
    assert main(["resume", "--storage", f"sqlite:///{tmp_path / 'tiny.db'}", "--study", "tiny",
                 "--set", f"study.checkpoint_dir={moved}"]) == 0
    out = capsys.readouterr().out  # the plot beside the database, named after it, wherever the checkpoints go
    assert f"Figure 4: {tmp_path / 'tiny.png'}" in out, out
    assert (tmp_path / "tiny.png").exists() and not moved.with_suffix(".png").exists()


@pytest.mark.slow
def test_a_lease_needs_no_lock_file_and_survives_a_clean_up(tiny_config, tmp_path, cli_env):
    """Nothing beside the database holds a lease: deleting every other file while a search
    runs leaves its trial alive for other workers; killing its process frees it at once."""
    path = tiny_config(lambdas="[1e-3]", samples=96, epochs=200)
    proc = subprocess.Popen([str(SCRIPT), "search", str(path)], env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    db = tmp_path / "tiny.db"
    try:
        def running():
            if not db.exists():
                return False
            try:
                return any(
                    p.state == "running" for p in ls.study_status(ls.open_store(f"sqlite:///{db}"), "tiny").points
                )
            except Exception:  # the study is being created
                return False
        assert poll(running, timeout=180)
        beside = [p for p in tmp_path.iterdir() if p.name not in ("tiny.db", "tiny.toml", "tiny.ckpt")]
        assert not beside, beside  # no lock files or folders a user could clean up
        store = ls.open_store(f"sqlite:///{db}")
        trial = next(t for t in store.storage.get_all_trials(store.storage.get_study_id_from_name("tiny"))
                     if t.state.name == "RUNNING")
        assert store.locks.alive(trial._trial_id)
        # another worker looking for work waits for the live trial: never declared lost while its worker lives
        assert claim_next(store, "tiny", _status.load_study_config(store, "tiny")) == "wait"
        assert store.storage.get_trial(trial._trial_id).state.name == "RUNNING"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert poll(lambda: not store.locks.alive(trial._trial_id), timeout=10)
    points = ls.study_status(store, "tiny").points
    assert points[0].state == "interrupted" and points[0].reason == "worker gone"
