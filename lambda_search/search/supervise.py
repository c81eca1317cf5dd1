"""Worker processes on this machine: how many, on which devices, started, watched and
replaced when they die, stopped together."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import torch

from ..config import Config
from ..store.status import STORAGE_ENV, study_status
from ..store.storage import Store
from ..train.numerics import device_kind

__all__ = ["worker_count", "run_processes"]


def _devices(device: str, workers: int) -> list[str]:
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


def _spawn(name: str, url: str, label: str, device: str, workers: int, overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lambda_search", "worker", "--study", name, "--label", label,
           "--device", device, "--workers-total", str(workers)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, STORAGE_ENV: url}
    # born ignoring SIGINT (kept across exec; Python leaves it so): a Ctrl-C in the terminal, which reaches the
    # whole process group, must not kill a worker still starting Python; its search stops it (SIGTERM), and once
    # the worker runs, its own handlers take SIGINT as a clean stop
    return subprocess.Popen(cmd, env=env, preexec_fn=_ignore_sigint)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(config: Config, requested: int | str | None, pending: int) -> tuple[int, str | None]:
    """How many worker processes a search starts, and a note where that is not what was
    asked. ``requested``: a number, "auto" or None (search.workers). On the CPU every
    training uses train.threads threads, whatever the worker count, so workers are capped at
    cores // threads (more would only share the cores; fewer leave cores idle, and the note
    says so); "auto" is that many, on GPUs one per GPU; never more than the ``pending`` points."""
    requested = config.search.workers if requested is None else requested
    train = config.train
    if device_kind(train.device) == "cpu":
        cap = max(1, _cores() // train.threads)
        if requested == "auto":
            return max(1, min(cap, pending)), None
        if requested > cap:
            return cap, (f"{requested} workers asked for, {cap} started: each training uses train.threads = "
                         f"{train.threads} (the study's), and this machine has {_cores()} cores")
        if requested < min(cap, pending):
            return requested, (f"{requested} worker{'s' if requested > 1 else ''} of {train.threads} thread"
                               f"{'s' if train.threads > 1 else ''} on {_cores()} cores: --workers auto would "
                               f"use {min(cap, pending)}")
        return requested, None
    if requested == "auto":
        gpus = torch.cuda.device_count() if train.device == "cuda" else 1
        return max(1, min(gpus, pending)), None
    return requested, None


def run_processes(store: Store, name: str, config: Config, workers: int, log, should_stop) -> None:
    overrides = [f"{k}={json.dumps(v)}" for k, v in (("data.root", config.data.root),
                                                      ("study.checkpoint_dir", config.study.checkpoint_dir))
                 if v is not None]
    devices = _devices(config.train.device, workers)
    procs = {i: _spawn(name, store.url, f"w{i}", devices[i], workers, overrides) for i in range(workers)}
    respawns = 3 * workers
    threads = config.train.threads
    each = f" ({threads} thread{'s' if threads > 1 else ''} each)" if device_kind(devices[0]) == "cpu" else ""
    log(f"started {workers} worker processes{each}")
    stopping = False
    try:
        while procs:
            time.sleep(0.2)
            if should_stop() and not stopping:
                stopping = True
                for p in procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGTERM)
            for i, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[i]
                if rc > 0 and not stopping:
                    log(f"worker w{i} exited with code {rc}")
                if rc < 0 and not stopping and respawns > 0 and not study_status(store, name).finished:
                    respawns -= 1
                    log(f"worker w{i} died ({signal.Signals(-rc).name}); starting a new one")
                    procs[i] = _spawn(name, store.url, f"w{i}", devices[i], workers, overrides)
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            with contextlib.suppress(Exception):
                p.wait(timeout=60)
