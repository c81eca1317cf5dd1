"""``lambda-search submit`` without a cluster: the batch script, what tasks on many nodes can
share, a task's requeue on Slurm's warning (a stand-in scontrol), who holds a point, and a
fold resumed under other numerics. The real cluster: tests/test_slurm_cluster.py."""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.config import ConfigError
from lambda_search.points import mixed_folds, numerics_label
from lambda_search.report.tables import status_table
from lambda_search.search.slurm import (
    SlurmError,
    SlurmJob,
    check_shared,
    file_system,
    job_script,
    requeue_task,
    sbatch,
)
from lambda_search.search.submit import _left, _worker_overrides
from lambda_search.store.claims import holder
from lambda_search.train.plan import make_plan, run_point, trained_under

from conftest import SCRIPT, poll

MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
nfs1:/home /home nfs4 rw,vers=4.2 0 0
mds@tcp:/scratch /scratch lustre rw,flock 0 0
mds@tcp:/work /lus/local lustre rw,localflock 0 0
gpfs0 /gpfs gpfs rw 0 0
nfs1:/with\\040space /my\\040data nfs rw 0 0
systemd-1 /shared autofs rw 0 0
srv:/shared /shared nfs4 rw 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


def test_the_file_system_of_a_path_is_its_longest_mount(mounts):
    assert file_system("/home/u/study.ckpt", mounts)[1] == "nfs4"
    assert file_system("/my data/x", mounts)[:2] == ("/my data", "nfs")
    assert file_system("/homer", mounts)[1] == "ext4"
    assert file_system("/scratch/new/folder/not/made", mounts)[1] == "lustre"
    assert file_system("/shared/ckpt", mounts)[1] == "nfs4"  # (mounted over the automount point)


@pytest.mark.parametrize("url, folder, node, refused", [
    ("sqlite:////home/u/s.db", "/home/u/c", None, "SQLite is one machine's database"),
    ("journal:/home/u/s.log", "/home/u/c", None, "lies on nfs4 (/home), whose file locks"),
    ("journal:/lus/local/s.log", "/scratch/c", None, "lies on lustre (/lus/local), whose file locks"),
    ("journal:/scratch/s.log", "/scratch/c", None, None),
    ("journal:/gpfs/s.log", "/gpfs/c", None, None),
    ("postgresql://u:pw@db/x", "/home/u/c", None, None),
    ("postgresql://u:pw@db/x", "/tmp/c", None, "study.checkpoint_dir '/tmp/c' lies on tmpfs (/tmp), a node's own"),
    ("postgresql://u:pw@db/x", "/var/c", None, "lies on ext4 (/)"),
    ("sqlite:////tmp/s.db", "/tmp/c", "n1", None),
    ("journal:/tmp/s.log", "/var/c", "n1", None),
    ("postgresql://u:pw@localhost/x", "/home/u/c", None, "names this machine's own server (localhost)"),
    ("postgresql://u:pw@127.0.0.1:5432/x", "/home/u/c", None, "own server (127.0.0.1)"),
    ("postgresql:///x?host=/var/run/postgresql", "/home/u/c", None, "own server (/var/run/postgresql)"),
    ("postgresql://u:pw@localhost/x", "/tmp/c", "n1", None),
    ("postgresql://u:pw@LOCALHOST/x", "/home/u/c", None, "own server (localhost)"),
    ("postgresql://u:pw@%2Fvar%2Frun%2Fpostgresql/x", "/home/u/c", None, "own server (/var/run/postgresql)"),
])
def test_what_tasks_on_many_nodes_can_share(mounts, url, folder, node, refused):
    if refused is None:
        check_shared(url, {"study.checkpoint_dir": folder}, node, mounts)
    else:
        with pytest.raises(ConfigError) as exc:
            check_shared(url, {"study.checkpoint_dir": folder}, node, mounts)
        assert refused in str(exc.value)
        assert "--node NAME" in str(exc.value) and "pw" not in str(exc.value)


def test_a_server_named_by_pghost_is_the_tasks_too(mounts, monkeypatch):
    monkeypatch.setenv("PGHOST", "db.cluster")  # (sbatch hands it to the tasks)
    check_shared("postgresql://u@/x", {"study.checkpoint_dir": "/home/u/c"}, None, mounts)
    monkeypatch.setenv("PGHOST", "localhost")
    with pytest.raises(ConfigError, match="own server"):
        check_shared("postgresql://u@/x", {"study.checkpoint_dir": "/home/u/c"}, None, mounts)


def test_sbatch_that_hangs_is_one_line(monkeypatch, tmp_path):
    (tmp_path / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))

    def hang(args, **kwargs):
        raise subprocess.TimeoutExpired(args, kwargs.get("timeout"))

    monkeypatch.setattr(subprocess, "run", hang)
    with pytest.raises(SlurmError, match="sbatch gave no answer in 120 s"):
        sbatch("#!/bin/bash\n", "journal:/x", test_only=True)


def test_a_finished_study_is_not_submitted(tmp_path, tiny_config, capsys, monkeypatch):
    calls = tmp_path / "calls"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\necho 4242\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    path = tiny_config(tmp_path, lambdas="[1e-2]", samples=36, epochs=1)
    assert main(["search", str(path)]) == 0
    capsys.readouterr()
    url = f"sqlite:///{tmp_path}/tiny.db"
    args = ["submit", "resume", "--storage", url, "--study", "tiny", "--tasks", "2", "--node", "n1",
            "--logs", str(tmp_path / "logs"), "--set", "study.storage='postgresql://me:s3cret@db/ls'"]
    assert main([*args, "--print"]) == 0
    assert "s3cret" not in capsys.readouterr().out  # (the storage given to --set reaches no worker line)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing to submit: 'tiny' finished" in out and "submitted" not in out
    assert calls.read_text() == "--test-only\n"  # Slurm checked the job; nothing was submitted


def test_a_journal_is_judged_where_its_link_leads(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ngpfs0 {tmp_path}/g gpfs rw 0 0\n")
    (tmp_path / "g").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "g" / "s.log").symlink_to(tmp_path / "local" / "s.log")
    with pytest.raises(ConfigError, match="lies on ext4"):  # (its locks are taken where the link leads)
        check_shared(f"journal:{tmp_path}/g/s.log", {}, None, str(mounts))
    check_shared(f"journal:{tmp_path}/g/t.log", {}, None, str(mounts))


@pytest.mark.parametrize("url, shown", [
    ("postgresql://me:pa/ss@db/ls", "postgresql://me@db/ls"),
    ("postgresql://me@db/ls?password=s3cret", "postgresql://me@db/ls"),
    ("postgresql+psycopg://me:s%2F3cret@db:5433/ls", "postgresql+psycopg://me@db:5433/ls"),
])
def test_no_password_form_reaches_the_script(url, shown, tmp_path):
    script = job_script(SlurmJob(tasks=1, logs=str(tmp_path)), ["x"], url, "x")
    assert f"LAMBDA_SEARCH_STORAGE:-{shown}}}" in script
    assert "pa/ss" not in script and "s3cret" not in script and "s%2F3" not in script
    assert "pa/ss" not in ls.store.failures.redact(url) and "s3cret" not in ls.store.failures.redact(url)


def test_an_evaluations_workers_keep_each_final_studys_own_folders():
    given = ["study.checkpoint_dir=/x", "data.root=/c10", "data.dataset=cifar10", 'train.device="cuda"',
             "study.storage=/y"]
    assert _worker_overrides(given, stored=("study.checkpoint_dir", "data")) == ['train.device="cuda"']
    # (never the storage: the script names it, without its password)
    assert _worker_overrides(given) == ["study.checkpoint_dir=/x", "data.root=/c10", 'train.device="cuda"']


def test_submit_says_sbatch_is_missing_in_one_line_and_stores_nothing(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    path = tiny_config(tmp_path)
    assert main(["submit", "search", str(path), "--tasks", "2", "--node", "n1", "--logs", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "sbatch not found" in err and "Traceback" not in err
    assert not (tmp_path / "tiny.db").exists() and not (tmp_path / "l").exists()


def test_the_batch_script(tmp_path):
    job = SlurmJob(tasks=3, partition="gpu", gpus_per_task=1, cpus_per_task=8, mem="32G", time="1-00:00:00",
                   account="lab", qos="normal", sbatch=("--constraint=a100", "#SBATCH --exclude=n9"),
                   setup=("module load cuda", "source ~/venv/bin/activate"), logs=str(tmp_path / "logs"),
                   max_requeues=5, warn_seconds=300, python="/opt/py/bin/python")
    job.check()
    url = "postgresql://me:s3cr$t@db.example.org:5432/ls"
    script = job_script(job, ["x", "x:final:resnet56"], url, "study 'x' (final evaluation)",
                        ['train.device="cuda"'])
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    for wanted in ("--array=0-2", "--requeue", "--signal=B:USR1@300", "--partition=gpu", "--gpus-per-task=1",
                   "--cpus-per-task=8", "--mem=32G", "--time=1-00:00:00", "--account=lab", "--qos=normal",
                   "--constraint=a100", "--exclude=n9", "--open-mode=append", f"--output={tmp_path}/logs/%x-%A_%a.out",
                   "--job-name=ls-x"):
        assert f"#SBATCH {wanted}" in directives, (wanted, directives)
    # every directive before the first command (sbatch reads no #SBATCH line after it)
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(lines.index(d) for d in directives) < first_command
    assert "s3cr" not in script  # the password reaches the tasks through sbatch's environment, never the script
    assert 'LAMBDA_SEARCH_STORAGE="${LAMBDA_SEARCH_STORAGE:-postgresql://me@db.example.org:5432/ls}"' in script
    assert lines[-1].startswith("exec /opt/py/bin/python -m lambda_search worker --study=x --study=x:final:resnet56 "
                                "--max-requeues=5 ")
    assert "--set='train.device=\"cuda\"'" in lines[-1]
    assert lines.index("module load cuda") < lines.index("source ~/venv/bin/activate") < len(lines) - 1
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # a script bash can read


def test_submit_print_shows_the_script_and_stores_nothing(tmp_path, tiny_config, capsys):
    path = tiny_config(tmp_path)
    code = main(["submit", "search", str(path), "--tasks", "2", "--node", "n1", "--print", "--time", "30",
                 "--logs", str(tmp_path / "logs")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodelist=n1" in out and "#SBATCH --array=0-1" in out
    assert f"sqlite:///{tmp_path}/tiny.db" in out and "--study=tiny" in out
    assert not (tmp_path / "tiny.db").exists() and not (tmp_path / "logs").exists()


def test_a_task_requeues_itself_until_its_limit(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_JOB_ID": "58", "SLURM_ARRAY_JOB_ID": "57", "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "1"}
    assert requeue_task(3, {}) == "not in a Slurm job: nothing to requeue"
    assert requeue_task(3, env) == "slurm job 57_1 requeued (2 of at most 3): it resumes from the checkpoint"
    assert calls.read_text() == "requeue 57_1\n"  # (not SLURM_JOB_ID: that of the last task is the whole array's)
    assert requeue_task(3, {"SLURM_JOB_ID": "9"}).startswith("slurm job 9 requeued (1 of at most 3)")
    assert "not requeued: requeued 3 times already (--max-requeues 3)" in requeue_task(3, {**env,
                                                                                          "SLURM_RESTART_COUNT": "3"})
    assert calls.read_text() == "requeue 57_1\nrequeue 9\n"


def test_who_holds_a_point():
    host_pid = holder({})
    assert host_pid.endswith(f":{os.getpid()}")
    assert holder({"SLURM_JOB_ID": "58", "SLURM_ARRAY_JOB_ID": "57", "SLURM_ARRAY_TASK_ID": "1"}) == \
        f"{host_pid}, slurm job 57_1"
    assert holder({"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "2"}) == f"{host_pid}, slurm job 9 (requeued 2x)"


def test_a_fold_resumed_under_other_numerics_says_so(tmp_path):
    """The numerics a fold trained under travel in its checkpoint: a fold resumed under others
    (a task requeued onto another kind of device) lists each, and the study reports it as
    mixed; one resumed under the same, or started afresh, lists one."""
    data = ls.load_dataset("synthetic", num_samples=48, num_classes=3, image_size=8)
    fold = ls.make_folds(data.labels, n_splits=2, seed=0)[0]
    cfg = ls.TrainConfig(epochs=3, batch_size=8, lr=0.05, checkpoint_every_seconds=None)
    gpu = {"device": "cuda", "processor": "H100", "isa": None, "dtype": "float32", "threads": None, "pack": 1,
           "torch": "2"}
    cpu = {"device": "cpu", "processor": "A", "isa": "avx2", "dtype": "float32", "threads": 1, "pack": 1, "torch": "2"}
    ckpt = tmp_path / "f0.pt"
    steps = iter(range(1000))
    stopped = ls.train_fold(data, fold, 1e-4, cfg, checkpoint=ckpt, numerics=gpu,
                            should_stop=lambda: next(steps) >= 4)
    assert stopped.status == "stopped" and stopped.trained_under == [gpu]
    done = ls.train_fold(data, fold, 1e-4, cfg, checkpoint=ckpt, numerics=cpu)  # requeued onto a CPU node
    assert done.status == "completed" and done.resumed_from_iteration == stopped.iterations > 0
    assert done.trained_under == [gpu, cpu]
    record = trained_under(done, cpu)
    assert record == {"resumed_under": [gpu, cpu]} and mixed_folds({"f0": [{"numerics": record}]}) == ["f0"]
    assert numerics_label(record).startswith("resumed under other numerics: cuda (H100), float32")
    assert ", then cpu (A, avx2)" in numerics_label(record)
    again = ls.train_fold(data, fold, 1e-4, cfg, checkpoint=ckpt, numerics=cpu)  # its finished checkpoint: resumed
    assert again.trained_under == [gpu, cpu]
    fresh = ls.train_fold(data, fold, 1e-4, cfg, numerics=cpu)
    assert trained_under(fresh, cpu) == cpu and fresh.val_accuracy == done.val_accuracy  # the same bits
    assert mixed_folds({"f0": [{"numerics": cpu}, {"numerics": cpu}]}) == []


@pytest.mark.slow
def test_a_worker_warned_by_slurm_checkpoints_and_requeues_its_task(tmp_path, tiny_config, cli_env):
    """SIGUSR1 to a worker started as a Slurm task starts it (a stand-in scontrol on PATH):
    it stops after its current step, its point interrupted with the checkpoint kept, then
    requeues its task; the task run again finishes with the accuracies of an uninterrupted run."""
    path = tiny_config(tmp_path, name="warned", lambdas="[1e-2]", samples=96, epochs=40, ckpt_seconds=0.0)
    config = ls.load_config(path)
    store_url = config.study.storage
    assert main(["submit", "search", str(path), "--tasks", "1", "--node", "n1", "--print"]) == 0
    from lambda_search.search.study import prepare_search

    prepare_search(config)
    assert _left(store_url, ["warned"]) == ("warned", 1)
    calls = tmp_path / "calls"
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {**cli_env, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LAMBDA_SEARCH_STORAGE": store_url,
           "SLURM_JOB_ID": "58", "SLURM_ARRAY_JOB_ID": "57", "SLURM_ARRAY_TASK_ID": "0", "SLURM_RESTART_COUNT": "0"}
    cmd = [str(SCRIPT), "worker", "--study", "warned", "--max-requeues", "2", "--label", "57_0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = Path(config.study.checkpoint_dir)
    assert poll(lambda: any(ckpt.glob("*/*.pt")), timeout=120)
    table = status_table(ls.study_status(ls.open_store(store_url), "warned"))
    assert "run by" in table.splitlines()[0] and ", slurm job 57_0" in table, table
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, out
    stopped = re.search(r"interrupted: lambda=1e-02, interrupted in fold (\S+) at step (\d+)", out)
    assert stopped, out
    assert "slurm job 57_0 requeued (1 of at most 2)" in out and calls.read_text() == "requeue 57_0\n"
    again = subprocess.run(cmd, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    status = ls.study_status(ls.open_store(store_url), "warned")
    point = status.points[0]
    assert status.finished and point.attempts == 2
    # no step lost: the fold resumed at the step it stopped at
    assert point.folds[stopped.group(1)]["resumed_from_iteration"] == int(stopped.group(2)) > 0
    direct = run_point(make_plan(config), point.point)
    assert point.fold_accuracies == [direct.folds[n]["val_accuracy"] for n in point.fold_names]
    assert not status.mixed_numerics and _left(store_url, ["warned"]) is None
