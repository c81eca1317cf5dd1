"""``lambda-search submit`` on a real single-node Slurm cluster of the test's own (see
slurm_cluster.py): a study's workers as a job array of 2 tasks; one task preempted mid-fold
(``scontrol requeue``), the other warned as before a time limit (SIGUSR1 to its batch
script: it checkpoints and requeues itself); every point complete exactly once with the
accuracies of a single-process run, no step lost; then the final evaluation submitted.

Skipped where Slurm is not installed or not root, except where LAMBDA_SEARCH_REQUIRE_SLURM
is set (.ci/run installs it and sets it)."""

import contextlib
import re
import subprocess
from pathlib import Path

import pytest
import torch
from slurm_cluster import slurm_cluster

import lambda_search as ls
from lambda_search.train.plan import make_plan, run_point

from conftest import SCRIPT, poll
from test_search import assert_exactly_once

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


def _steps(folder) -> int:
    """The most steps a checkpoint in ``folder`` holds (0: none yet)."""
    steps = [0]
    for path in folder.glob("*.pt"):
        with contextlib.suppress(Exception):  # (one being replaced)
            steps.append(torch.load(path, weights_only=False)["iteration"])
    return max(steps)


def _running(store, name, ckpt, exclude=()):
    """The first running point whose holder is a Slurm task not in ``exclude`` and whose fold
    has trained 40 steps (a fifth of it): (point status, 'JOB_TASK')."""
    for p in ls.study_status(store, name).points:
        task = re.search(r"slurm job (\d+_\d+)", p.worker or "")
        if p.state == "running" and task and task.group(1) not in exclude and _steps(ckpt / p.point.slug) >= 40:
            return p, task.group(1)
    return None


def _wait_gone(cluster, job, timeout):
    def gone():
        return cluster.run("squeue", "-h", "-j", job, "-o", "%i %T", check=False) == ""
    assert poll(gone, timeout=timeout, every=0.5), cluster.run("squeue", "-j", job, check=False) + cluster.logs()


def test_a_job_array_survives_preemption_and_a_time_limit_warning(cluster, tmp_path, tiny_config, cli_env):
    path = tiny_config(tmp_path, name="sl", lambdas="[1e-4, 1e-1]", baseline="true", samples=96, epochs=40,
                       ckpt_seconds=0.0)
    url = f"journal:{tmp_path}/sl.log"
    env = {**cli_env, "SLURM_CONF": str(cluster.conf)}
    submit = [str(SCRIPT), "submit", "search", str(path), "--storage", url, "--tasks", "2", "--cpus-per-task", "1",
              "--node", cluster.host, "--logs", str(tmp_path / "logs"), "--time", "30"]
    printed = subprocess.run([*submit, "--print"], env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and "#SBATCH --array=0-1" in printed.stdout, printed.stderr
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)
    assert f"squeue -j {job}" in done.stdout
    store = ls.open_store(url)
    config = ls.load_config(path, [f"study.storage={url!r}".replace("'", '"')])
    ckpt = Path(config.study.checkpoint_dir)

    # preempted: Slurm stops the task (SIGTERM) and queues it again
    found = []
    assert poll(lambda: found.append(_running(store, "sl", ckpt)) or found[-1] is not None, timeout=180), cluster.logs()
    first = found[-1]
    shown = subprocess.run([str(SCRIPT), "status", "--storage", url, "--study", "sl"], env=env, capture_output=True,
                           text=True, timeout=120).stdout
    print(printed.stdout, shown, sep="\n")  # (shown where the test fails, and with -s)
    assert "run by" in shown and f"slurm job {first[1]}" in shown, shown
    cluster.run("scontrol", "requeue", first[1])

    # warned, as N seconds before a time limit: it checkpoints, then requeues itself
    assert poll(lambda: found.append(_running(store, "sl", ckpt, exclude=(first[1],))) or found[-1] is not None,
                timeout=180)
    second = found[-1]
    cluster.run("scancel", "--batch", "--signal=USR1", second[1])

    _wait_gone(cluster, job, timeout=420)
    status = ls.study_status(store, "sl")
    assert status.finished, (shown, cluster.logs())
    assert_exactly_once(url, "sl", config)
    plan = make_plan(config)
    for p in status.points:  # the accuracies of one uninterrupted process
        direct = run_point(plan, p.point)
        assert p.fold_accuracies == [direct.folds[n]["val_accuracy"] for n in p.fold_names], p.point
    assert not status.mixed_numerics

    logs = {f.name: f.read_text() for f in (tmp_path / "logs").iterdir()}
    print(*(f"--- {name}\n{text}" for name, text in sorted(logs.items())), sep="\n")
    warned = logs[f"ls-sl-{second[1]}.out"]
    assert f"slurm job {second[1]} requeued (1 of at most 3)" in warned, warned
    stops = [m for text in logs.values()
             for m in re.finditer(r"interrupted: (.+?), interrupted in fold (\S+) at step (\d+)", text)]
    assert len(stops) >= 2, logs
    by_label = {p.point.label(): p for p in status.points}
    for m in stops:  # no step lost: each fold resumed at the step it stopped at
        assert by_label[m.group(1)].folds[m.group(2)]["resumed_from_iteration"] == int(m.group(3))
    requeued = [p for p in status.points if p.attempts > 1]
    assert len(requeued) >= 2

    # the final evaluation on two networks: each task works through both final studies in turn
    evaluate = [str(SCRIPT), "submit", "evaluate", "--storage", url, "--study", "sl", "--seeds", "1", "--networks",
                "resnet20,preresnet20", "--tasks", "2", "--node", cluster.host, "--logs", str(tmp_path / "logs")]
    done = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)
    _wait_gone(cluster, job, timeout=300)
    table = ls.read_evaluations(store, "sl")
    assert table["finished"] and [c["final_study"] for c in table["columns"]] == ["sl:final", "sl:final:preresnet20"]
    for column in table["columns"]:
        assert [n["network"] for n in column["networks"]] == ["simam", "none"], column
        assert all(len(n["seeds"]) == 1 and n["seeds"][0] is not None for n in column["networks"]), column
    for final in ("sl:final", "sl:final:preresnet20"):
        assert_exactly_once(url, final, ls.study_status(store, final).config)
