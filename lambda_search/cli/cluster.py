"""The commands that run workers elsewhere: ``worker`` (one process joining a study, alone or as
a Slurm task) and ``submit`` (a study's workers as a Slurm job array)."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ..store.status import study_status
from ..store.storage import open_store
from .common import interrupted, progress, say, stop_on_signals, url_of

__all__ = ["run_worker", "run_submit"]


def run_worker(args: argparse.Namespace) -> int:
    """Run each study named in turn until it is finished; in a Slurm task (--max-requeues),
    Slurm's warning (SIGUSR1) stops it as SIGTERM does, and the task is requeued."""
    from ..search.slurm import requeue_task
    from ..search.worker import run_worker as work

    store = open_store(url_of(args), write=True)
    label = f"[{args.label}] " if args.label else ""
    warned = (signal.SIGUSR1,) if args.max_requeues is not None else ()
    with stop_on_signals(also=warned) as stop:
        for name in args.study:
            counts = work(store, name, overrides=args.set, device=args.device, label=label, log=say,
                          progress=progress(), should_stop=stop, n_workers=args.workers_total or 1)
            status = study_status(store, name)
            if stop() and not status.finished:
                break
            ran = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no point"
            say(f"{label}worker done: ran {ran}; study {name!r}: {status.complete} of {status.total} points complete"
                + (", finished" if status.finished else ""))
        else:  # every study finished (a signal after the last point asks for nothing more)
            return 0
    if stop.signal in warned:  # Slurm's warning: requeue this task, which resumes from the checkpoint
        say(f"{label}{requeue_task(args.max_requeues)}")
    return interrupted(stop)


def _job(args: argparse.Namespace):
    from ..search.slurm import SlurmJob

    return SlurmJob(tasks=args.tasks, partition=args.partition, gpus_per_task=args.gpus_per_task,
                    cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, account=args.account,
                    qos=args.qos, sbatch=tuple(args.sbatch), setup=tuple(args.setup), logs=args.logs,
                    max_requeues=args.max_requeues, warn_seconds=args.warn_seconds, node=args.node,
                    python=args.python or sys.executable, job_name=args.job_name)


def run_submit(args: argparse.Namespace) -> int:
    """Check, make the study, submit; print the script (--print) or the job id and how to watch it."""
    from ..configfile import load_config
    from ..search.submit import submit_evaluate, submit_resume, submit_search

    job, log = _job(args), (lambda text: print(text, file=sys.stderr)) if args.print_only else say
    if args.submit == "search":
        overrides = list(args.set) + [f"study.{key}={json.dumps(value)}" for key, value in
                                      (("storage", args.storage), ("name", args.study)) if value is not None]
        done = submit_search(load_config(args.config, overrides), job, print_only=args.print_only, log=log)
    elif args.submit == "resume":
        done = submit_resume(url_of(args), args.study, job, args.set, print_only=args.print_only, log=log)
    else:
        done = submit_evaluate(url_of(args), args.study, job, seeds=args.seeds, e_lambda=args.e_lambda,
                               prefer=args.prefer, networks=args.networks, overrides=args.set,
                               print_only=args.print_only, log=log)
    if args.print_only:
        print(done.script, end="")
        return 0
    if done.job_id is None:  # (every study finished)
        return 0
    say("watch it:\n" + "\n".join(f"  {line}" for line in done.watch()))
    return 0
