"""One study on a real PostgreSQL server, shared by several worker processes.

The test starts a cluster of its own on 127.0.0.1 (with a password) and stops it. It is
skipped where PostgreSQL is not installed, except where LAMBDA_SEARCH_REQUIRE_POSTGRES is set
(.ci/run installs PostgreSQL and sets it).
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.train import plan as _objective

from conftest import SCRIPT
from test_search import assert_exactly_once, trials_of

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pw_42"


def _need(what):
    if os.environ.get("LAMBDA_SEARCH_REQUIRE_POSTGRES"):
        pytest.fail(f"{what} is missing; .ci/run installs it")
    pytest.skip(f"{what} is not installed")


class Server(str):
    """The server's URL, with stop() and start()."""

    def __new__(cls, url, stop, start):
        self = super().__new__(cls, url)
        self.stop, self.start = stop, start
        return self


@pytest.fixture(scope="module")
def postgres():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        _need("PostgreSQL (initdb)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _need("psycopg")
    bin_dir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="ls-pg-"))
    run_as = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    (base / "pw").write_text(PASSWORD)
    if run_as:
        shutil.chown(base / "pw", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "lsuser", "--auth=scram-sha-256",
                    f"--pwfile={base / 'pw'}", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    def pg_ctl(*args):
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), *args],
                       check=True, capture_output=True)

    try:
        yield Server(f"postgresql://lsuser:{PASSWORD}@127.0.0.1:{port}/postgres",
                     stop=lambda: pg_ctl("-m", "fast", "-w", "stop"),
                     start=lambda: pg_ctl("-w", "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"))
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_workers_on_postgresql_run_each_point_once(postgres, tiny_config, cli_env):
    path = tiny_config(name="pg", lambdas="[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3]", baseline="true")
    procs = [subprocess.Popen([str(SCRIPT), "search", str(path), "--storage", postgres, "--workers", "2"],
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    config = ls.load_config(path)
    sa_url = postgres.replace("postgresql://", "postgresql+psycopg://")
    assert_exactly_once(sa_url, "pg", config)
    assert sum(len(v) for v in trials_of(sa_url, "pg").values()) == 8
    # the password is in no output and no stored attribute
    result = subprocess.run([str(SCRIPT), "status", "--storage", postgres, "--study", "pg"], env=cli_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "8 of 8 points complete" in result.stdout
    study = optuna.load_study(study_name="pg", storage=sa_url)
    stored = repr(study.user_attrs) + repr([(t.user_attrs, t.system_attrs) for t in study.trials])
    for text in [*(o for pair in outs for o in pair), result.stdout, result.stderr, stored]:
        assert PASSWORD not in text
    assert "lsuser:***@127.0.0.1" in result.stdout


def test_a_wrong_password_is_one_line_without_the_password(postgres, capsys):
    wrong = postgres.replace(PASSWORD, "not-the-Pw")
    assert main(["status", "--storage", wrong, "--study", "pg"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not-the-Pw" not in err and "cannot open storage" in err


def test_the_server_stopping_mid_search_and_coming_back(postgres, tiny_config, capsys, monkeypatch):
    """The server stops as the first fold finishes: the search ends with one line (exit code
    1, no password); once the server is back, a resume completes the study with the
    uninterrupted numbers and the finished fold is not trained again."""

    path = tiny_config(name="pgstop", lambdas="[1e-3, 1e-1]")
    real, finished = _objective.fold_record, []

    def fold_record(result, *args):
        finished.append(result)
        if len(finished) == 1:
            postgres.stop()
        return real(result, *args)

    monkeypatch.setattr(_objective, "fold_record", fold_record)
    try:
        assert main(["search", str(path), "--storage", postgres]) == 1
    finally:
        postgres.start()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "lost the study database" in err[0] and PASSWORD not in err[0], err
    monkeypatch.setattr(_objective, "fold_record", real)
    assert main(["resume", "--storage", postgres, "--study", "pgstop"]) == 0
    config = ls.load_config(path)
    sa_url = postgres.replace("postgresql://", "postgresql+psycopg://")
    done = assert_exactly_once(sa_url, "pgstop", config)
    plan = _objective.make_plan(config)
    for point in plan.points:
        expected = [ls.train_fold(plan.data, f, point.e_lambda, plan.train, seed=plan.train_seed(f)).val_accuracy
                    for f in plan.folds]
        assert done[point.key].user_attrs["fold_accuracies"] == expected
    # the fold finished as the server stopped: taken up from its last checkpoint, at its end (2 epochs of 2 steps:
    # 19 training images a fold once 10 of 48 are held out for the test), not trained again
    assert done["e_lambda=0.001/repeat=0"].user_attrs["fold_results"]["r0f0"]["resumed_from_iteration"] == 4


def test_alive_reads_pg_locks_and_never_takes_a_lease(postgres, monkeypatch):
    """A lease held by one process is seen alive by another, and seeing it never takes the
    lock (which could make the holder's own lease() fail). Keys span the full 32-bit range."""
    from lambda_search.store.locks import PgLocks

    sa_url = postgres.replace("postgresql://", "postgresql+psycopg://")
    holder, reader = PgLocks(sa_url), PgLocks(sa_url)
    taken = []
    real_call = PgLocks._call

    def call(self, conn, fn, key):
        taken.append(fn)
        return real_call(self, conn, fn, key)

    monkeypatch.setattr(PgLocks, "_call", call)
    for trial_id in (5, 2**31 + 7, 2**32 - 2):
        assert reader.alive(trial_id) is False
        lease = holder.lease(trial_id)
        try:
            assert reader.alive(trial_id) is True and holder.alive(trial_id) is True
            assert reader.alive(trial_id + 1) is False
        finally:
            lease.release()
        assert reader.alive(trial_id) is False
        holder.lease(trial_id).release()  # free again
    assert taken == ["pg_try_advisory_lock"] * 6  # the holder's leases only: alive() took none
