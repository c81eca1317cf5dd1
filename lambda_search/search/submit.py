"""``lambda-search submit``: a study's workers as one Slurm job array (see ``slurm``).

Everything is checked before anything is stored or submitted: the job's options, the config
or study (its data and values, on the CPU where this machine lacks the study's GPU: a login
node), that every task can share the storage and the checkpoint folder, and the job itself
(``sbatch --test-only``). Then the study is made (for an evaluation, each final study with the
chosen lambda), so that the tasks only join it, and the job is submitted.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, ConfigError
from ..configfile import IDENTITY_EXEMPT, parse_override
from ..store.failures import failures, password_free
from ..store.status import check_search_name, study_status
from ..store.storage import open_store
from ..train.numerics import device_kind
from .evaluate import plan_evaluation
from .slurm import SlurmError, SlurmJob, check_shared, job_script, sbatch
from .study import prepare_search, resume_config

__all__ = ["Submission", "submit_search", "submit_resume", "submit_evaluate"]


@dataclass
class Submission:
    """What ``submit`` made: the script, the studies its workers run, the job id (None where
    only printed) and the commands to watch it."""

    script: str
    studies: list[str]
    url: str
    name: str  # the study status reads (the search, for its final evaluations)
    job_id: str | None = None
    logs: str = ""

    def watch(self) -> list[str]:
        url = shlex.quote(password_free(self.url))
        return [f"squeue -j {self.job_id}          # its tasks: pending, running, requeued",
                f"lambda-search status --storage {url} --study {self.name}   # its points, who runs each",
                f"scancel {self.job_id}            # stop every task (each saves its checkpoint first)",
                f"logs: {self.logs}/<job name>-{self.job_id}_<task>.out"]


def _check_device(config: Config) -> str | None:
    """Where to check the study's plans here: its own device, or the CPU where it asks for a
    GPU this machine lacks (a login node: the tasks' GPUs are checked by the workers)."""
    if device_kind(config.train.device) == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return None


def _worker_overrides(overrides, stored=()) -> list[str]:
    """The --set each worker takes: those that change where and how fast it runs, but for the
    storage (the script names it, without its password) and the keys in ``stored`` (each study
    made by submit holds its own)."""
    kept = IDENTITY_EXEMPT - {"study.storage", *stored}
    return [o for o in overrides if ".".join(parse_override(o)[:2]) in kept and parse_override(o)[0] not in stored]


def _submit(job: SlurmJob, url: str, studies: list[str], what: str, config: Config, overrides,
            make: Callable[[], None], print_only: bool, log, folders=()) -> Submission:
    """The steps every submission takes, in order: check that the tasks can share the study
    (and ``folders``: more checkpoint folders), write the script, have Slurm check it, make
    the logs folder and the study, submit (where anything is left to run)."""
    shared = {"study.checkpoint_dir": config.study.checkpoint_dir, "--logs": job.logs}
    shared.update({f"{name}'s checkpoint_dir": folder for name, folder in folders})
    check_shared(url, shared, job.node)
    script = job_script(job, studies, url, what, overrides)
    done = Submission(script, studies, url, config.study.name, logs=str(Path(job.logs).expanduser().resolve()))
    if print_only:
        return done
    sbatch(script, url, test_only=True)  # Slurm's own checks (partition, account, limits) before anything is stored
    try:
        Path(done.logs).mkdir(parents=True, exist_ok=True)  # (Slurm does not make it: a task would fail unseen)
    except OSError as exc:
        raise ConfigError(f"--logs {done.logs!r}: cannot make the folder ({exc.strerror or exc})") from None
    with failures():
        make()
        left = _left(url, studies)
    if not left:
        log(f"nothing to submit: {', '.join(repr(s) for s in studies)} finished")
        return done
    if job.tasks > left[1]:
        log(f"note: {job.tasks} tasks for {left[1]} unfinished point{'s' if left[1] != 1 else ''} of study "
            f"{left[0]!r}: {job.tasks - left[1]} will wait for the others (to take over a point should its task die)")
    try:
        done.job_id = sbatch(script, url)
    except SlurmError as exc:
        raise SlurmError(f"{exc} (the study is made: submit again once that is mended)") from None
    log(f"submitted job {done.job_id}: {job.tasks} worker{'s' if job.tasks > 1 else ''} of {what}")
    return done


def _left(url: str, studies: list[str]) -> tuple[str, int] | None:
    """The first of ``studies`` not finished and its unfinished points (the tasks work through
    them in turn; one with nothing to claim waits for the study's last points, to take one
    over should its task die), or None where every one is finished."""
    store = open_store(url)
    for name in studies:
        pending = sum(p.state not in ("complete", "diverged") for p in study_status(store, name).points)
        if pending:
            return name, pending
    return None


def submit_search(config: Config, job: SlurmJob, *, print_only: bool = False, log=print) -> Submission:
    """Submit ``job.tasks`` workers of the search of ``config`` (made here, or resumed as
    ``search`` would: the same config and data)."""
    job.check()
    device = _check_device(config)
    url, name = config.study.storage, config.study.name

    def make():
        store, _, how = prepare_search(config, device=device)
        log(f"study {name!r} {how} in {store.shown}")

    return _submit(job, url, [name], f"study {name!r} (search)", config, [], make, print_only, log)


def submit_resume(url: str, name: str, job: SlurmJob, overrides=(), *, print_only: bool = False,
                  log=print) -> Submission:
    """Submit ``job.tasks`` workers of stored study ``name`` (``resume``'s, on a cluster)."""
    job.check()
    check_search_name(name, "submit resume")
    config = resume_config(url, name, overrides)

    def make():  # the data and folds checked against the stored ones (a wrong data.root, say), as resume does
        prepare_search(config, resume_only=True, device=_check_device(config))

    return _submit(job, url, [name], f"study {name!r} (resumed)", config, _worker_overrides(overrides), make,
                   print_only, log)


def submit_evaluate(url: str, name: str, job: SlurmJob, *, seeds: int = 3, e_lambda: float | None = None,
                    prefer: str = "larger", networks=None, overrides=(), print_only: bool = False,
                    log=print) -> Submission:
    """Submit ``job.tasks`` workers of study ``name``'s final evaluation (``evaluate``'s, on a
    cluster): every final study asked for is made here with the chosen lambda, and each task
    works through them in order."""
    job.check()
    config = resume_config(url, name, [o for o in overrides if parse_override(o)[0] != "data"])
    ev = plan_evaluation(url, name, seeds=seeds, e_lambda=e_lambda, prefer=prefer, networks=networks,
                         overrides=overrides, write=not print_only, device=_check_device(config))
    log(ev.said)

    def make():
        for final in ev.finals:
            prepare_search(final, attrs=ev.chosen, device=_check_device(final))

    workers = _worker_overrides(overrides, stored=("study.checkpoint_dir", "data"))  # (each final study holds its own)
    return _submit(job, url, ev.studies, f"study {name!r} (final evaluation)", config, workers, make, print_only, log,
                   folders=[(f.study.name, f.study.checkpoint_dir) for f in ev.finals])
