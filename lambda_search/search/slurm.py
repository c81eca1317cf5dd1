"""Workers as a Slurm job array: the batch script ``lambda-search submit`` hands to sbatch, the
checks that its tasks can share the study, and what a task does on Slurm's warning.

Each array task is one ``lambda-search worker``, exec'd so that it *is* the batch script's
process and gets the signals Slurm sends it. Slurm warns it (SIGUSR1, ``--signal=B:USR1@N``)
N seconds before its time limit: the worker stops after its current step (the fold's
checkpoint saved, the trial marked interrupted, the lease given back), then requeues its own
task (``scontrol requeue``, as submitit does: no exit code requeues by default), which
starts again later and resumes the fold from the checkpoint, at most ``max_requeues`` times.
On SIGTERM (preemption, the time limit itself, ``scancel``) it stops the same way and leaves
the rest to Slurm (a preemption in requeue mode, or ``scontrol requeue``, starts it again).
Tasks only join a study ``submit`` made: none races to create it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..config import ConfigError
from ..store.failures import password_free, server_url
from ..store.storage import storage_file

__all__ = ["SlurmJob", "SlurmError", "job_script", "check_shared", "sbatch", "requeue_task"]

# file systems that every node of a cluster mounts (checkpoints, logs and a journal may lie there)
SHARED_FS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.ceph", "cifs", "smb3",
                       "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "fuse.weka", "orangefs", "pvfs2", "afs",
                       "fuse.juicefs", "vast", "fuse.sshfs"})
TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
MEM = re.compile(r"^\d+[KMGT]?$")
PLAIN = re.compile(r"^[^\s#%\"'\\]+$")  # a directive's value: sbatch splits at spaces, cuts at '#', reads '%'
LOCAL_HOSTS = ("", "localhost", "::1", "0.0.0.0")


class SlurmError(ValueError):
    """sbatch or scontrol missing, or refusing what was asked (its own words)."""


@dataclass(frozen=True)
class SlurmJob:
    """What ``submit`` asks Slurm for: ``tasks`` workers as one job array, each with these
    resources; ``warn_seconds`` before the time limit Slurm sends SIGUSR1 (0: no warning);
    ``node``: every task on this node (then a file storage and local folders are allowed)."""

    tasks: int
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    logs: str = "slurm-logs"
    max_requeues: int = 3
    warn_seconds: int = 120
    node: str | None = None
    python: str = sys.executable
    job_name: str | None = None

    def check(self) -> None:
        """Each value as Slurm takes it: a ConfigError naming the first that is not."""
        for flag, value in (("--tasks", self.tasks), ("--gpus-per-task", self.gpus_per_task),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and (not isinstance(value, int) or value < (1 if flag == "--tasks" else 0)):
                raise ConfigError(f"{flag} must be an integer >= {1 if flag == '--tasks' else 0}, got {value!r}")
        if self.time is not None and not TIME.match(self.time):
            raise ConfigError(f"--time must be one of Slurm's time formats (MINUTES, HH:MM:SS, D-HH:MM...), got "
                              f"{self.time!r}")
        if self.mem is not None and not MEM.match(self.mem):
            raise ConfigError(f"--mem must be a size as Slurm takes it (e.g. 16G, 4000M), got {self.mem!r}")
        if self.max_requeues < 0 or self.warn_seconds < 0:
            raise ConfigError(f"--max-requeues and --warn-seconds must be >= 0, got {self.max_requeues} and "
                              f"{self.warn_seconds}")
        limit = _seconds(self.time) if self.time else None
        if limit is not None and self.warn_seconds >= limit:
            raise ConfigError(f"--warn-seconds {self.warn_seconds} must be shorter than the time limit "
                              f"(--time {self.time}: {limit} s)")
        for line in (*self.sbatch, *self.setup, *(v for v in (self.partition, self.account, self.qos, self.node,
                                                              self.job_name) if v)):
            if "\n" in line or "\r" in line:
                raise ConfigError(f"one line each: {line!r} holds a line break")
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos),
                            ("--node", self.node), ("--job-name", self.job_name),
                            ("--logs", str(Path(self.logs).expanduser().resolve()))):
            if value is not None and not PLAIN.match(value):
                raise ConfigError(f"{flag} must hold no space, '#', '%', quote or backslash (sbatch would misread "
                                  f"the directive), got {value!r}")
        for line in self.sbatch:
            if not _directive(line).startswith("--"):
                raise ConfigError(f"--sbatch takes an sbatch option such as --constraint=a100, got {line!r}")


def _seconds(time: str) -> int:
    """A Slurm time limit in seconds (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _directive(line: str) -> str:
    return line.strip().removeprefix("#SBATCH").strip()


def job_script(job: SlurmJob, studies: list[str], url: str, what: str, overrides=()) -> str:
    """The batch script of ``job``: its ``tasks`` array tasks each run one worker on
    ``studies`` (in order) of the storage at ``url`` (named without its password).
    ``what``: a line saying what the workers run; ``overrides``: --set for each worker."""
    name = job.job_name or "ls-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", studies[0])[:40]
    logs = Path(job.logs).expanduser().resolve()
    lines = ["#!/bin/bash",
             f"# lambda-search submit: {job.tasks} worker{'s' if job.tasks > 1 else ''} of {what}, one per task "
             "of this job array.",
             "# On SIGTERM (preemption, scancel, the time limit) a worker stops after its current step, saving",
             "# its fold's checkpoint and giving its point back; on Slurm's warning (SIGUSR1) it then requeues",
             f"# its task (at most {job.max_requeues} times), which resumes the fold from the checkpoint.",
             f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{job.tasks - 1}", "#SBATCH --ntasks=1",
             f"#SBATCH --output={logs}/%x-%A_%a.out", "#SBATCH --open-mode=append", "#SBATCH --requeue"]
    if job.warn_seconds:
        lines.append(f"#SBATCH --signal=B:USR1@{job.warn_seconds}")
    for flag, value in (("partition", job.partition), ("gpus-per-task", job.gpus_per_task),
                        ("cpus-per-task", job.cpus_per_task), ("mem", job.mem), ("time", job.time),
                        ("account", job.account), ("qos", job.qos), ("nodelist", job.node)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {_directive(line)}" for line in job.sbatch]
    lines += ["", *job.setup] if job.setup else []
    shown = re.sub(r'(["$`\\])', r"\\\1", password_free(url))  # (inside double quotes)
    worker = [shlex.quote(job.python), "-m", "lambda_search", "worker",
              *(f"--study={shlex.quote(s)}" for s in studies), f"--max-requeues={job.max_requeues}",
              '--label="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
              *(f"--set={shlex.quote(o)}" for o in overrides)]
    lines += ["", f'export LAMBDA_SEARCH_STORAGE="${{LAMBDA_SEARCH_STORAGE:-{shown}}}"',
              "exec " + " ".join(worker), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- can every task share the study?


def _mounts(mounts_file: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, options) of each mount, longest mount point first."""
    out = []
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
            out.append((point, parts[2], set(parts[3].split(","))))
    # longest mount point first; of two on one point, the one listed last (mounted over the other: autofs)
    return [m for _, m in sorted(enumerate(out), key=lambda im: (len(im[1][0]), im[0]), reverse=True)]


def file_system(path, mounts_file: str = "/proc/self/mounts") -> tuple[str, str, set[str]]:
    """(mount point, type, options) of the file system ``path`` lies on (or would, once
    made: links above it followed); ("?", "unknown", set()) where it cannot be told."""
    text = str(Path(path).expanduser().resolve())
    for point, kind, options in _mounts(mounts_file):
        if text == point or text.startswith(point.rstrip("/") + "/"):
            return point, kind, options
    return "?", "unknown", set()


def _check_server(url: str) -> None:
    """Refuse a database server that only this machine reaches as named (localhost, a socket)."""
    parsed = server_url(url)
    if parsed is None:
        return  # (not PostgreSQL; or open_store says what is wrong with it)
    host = parsed.host or parsed.query.get("host") or os.environ.get("PGHOST") or ""  # (libpq's order; the tasks
    host = unquote(host if isinstance(host, str) else host[0]).lower()                # get PGHOST from sbatch)
    if host in LOCAL_HOSTS or host.startswith(("127.", "/")):
        where = host or "a local socket"
        raise ConfigError(f"storage {password_free(url)!r} names this machine's own server ({where}): "
                          "tasks on other nodes would each reach their own; name the server's host, or --node NAME to "
                          "run every task on one node")


def _locks_across_nodes(kind: str, options: set[str]) -> bool:
    """Whether file locks taken on one node are seen on the others (a file storage's leases):
    GPFS, or Lustre mounted with ``flock`` (not ``localflock``)."""
    return kind == "gpfs" or (kind == "lustre" and "flock" in options)


def check_shared(url: str, folders: dict[str, str | None], node: str | None,
                 mounts_file: str = "/proc/self/mounts") -> None:
    """Refuse, in one line, a storage or folder that tasks on other nodes cannot share: SQLite;
    a journal whose file locks (the workers' leases) do not hold across nodes; a folder
    (``folders``: what it is -> path: checkpoints, logs) on a node's own disk. With ``node``
    (every task on that one node) all of them are fine."""
    if node is not None:
        return
    many = "use postgresql://USER@HOST/DB for tasks on several nodes, or --node NAME to run every task on one node"
    _check_server(url)
    file = storage_file(url)
    if url.startswith("sqlite"):
        raise ConfigError(f"storage {url!r}: SQLite is one machine's database (its locks do not hold across nodes, "
                          f"and on a network file system it can be corrupted); {many}")
    if file is not None:
        point, kind, options = file_system(Path(file).expanduser().resolve().parent, mounts_file)  # (a link followed)
        if not _locks_across_nodes(kind, options):
            raise ConfigError(f"storage {url!r} lies on {kind} ({point}), whose file locks (the workers' leases) do "
                              f"not hold across nodes; {many}")
    for what, folder in folders.items():
        if folder is None:
            continue
        point, kind, _ = file_system(folder, mounts_file)
        if kind not in SHARED_FS:
            raise ConfigError(f"{what} {folder!r} lies on {kind} ({point}), a node's own disk: tasks on other nodes "
                              f"would not see it; put it on a shared file system, or --node NAME to run every task "
                              "on one node")


# ---------------------------------------------------------------- sbatch and scontrol


def _slurm(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} not found: submit needs Slurm's commands (sbatch, scontrol) on this machine's "
                         "PATH; `--print` shows the script to submit elsewhere")
    try:
        return subprocess.run(args, capture_output=True, text=True, **kwargs)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} gave no answer in {kwargs.get('timeout')} s (is slurmctld up?)") from None
    except OSError as exc:
        raise SlurmError(f"{args[0]} could not be run: {exc.strerror or exc}") from None


def sbatch(script: str, url: str, test_only: bool = False) -> str:
    """Submit ``script`` (its tasks get ``url``, password and all, in their environment, never
    in the script); returns the job id. ``test_only``: Slurm only checks it (sbatch
    --test-only), nothing is submitted. A refusal is a SlurmError in sbatch's own words."""
    env = {**os.environ, "LAMBDA_SEARCH_STORAGE": url}
    result = _slurm(["sbatch", "--test-only" if test_only else "--parsable"], input=script, env=env, timeout=120)
    said = (result.stderr or result.stdout).strip()
    if result.returncode != 0:
        raise SlurmError("sbatch refused the job: " + (said.splitlines()[-1] if said else f"exit {result.returncode}"))
    if test_only:
        return ""
    return result.stdout.strip().split(";")[0]


def requeue_task(max_requeues: int, environ=None) -> str:
    """In a Slurm job: requeue this task (``scontrol requeue``) unless it was requeued
    ``max_requeues`` times already. Returns what was done, one line."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "not in a Slurm job: nothing to requeue"
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    task = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID") else job
    if restarts >= max_requeues:
        return f"slurm job {task} not requeued: requeued {restarts} times already (--max-requeues {max_requeues})"
    try:
        result = _slurm(["scontrol", "requeue", task], timeout=60)  # (an array task's SLURM_JOB_ID may be the
        # array's own id, which names every task: requeue JOB_TASK)
    except SlurmError as exc:
        return f"slurm job {task} could not be requeued: {exc}"
    if result.returncode != 0:
        return f"slurm job {task} could not be requeued: {(result.stderr or result.stdout).strip()}"
    return f"slurm job {task} requeued ({restarts + 1} of at most {max_requeues}): it resumes from the checkpoint"

