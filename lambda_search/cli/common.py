"""What every command shares: SIGINT and SIGTERM (and a Slurm task's warning) as a clean stop,
its output lines, the storage it names."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys

from ..store.failures import StorageError
from ..store.status import STORAGE_ENV

__all__ = ["stop_on_signals", "say", "note", "progress", "interrupted", "url_of"]


class _Stop:
    """A flag set by SIGINT or SIGTERM; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals(also=()):
    """Within the block, SIGINT and SIGTERM (and the signals ``also`` names) ask for a clean
    stop: the fold in flight saves its checkpoint, the trial is marked interrupted and the
    process can exit; ``stop.signal`` says which came."""
    stop = _Stop()
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM, *also)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def say(text: str) -> None:
    print(text, flush=True)


def progress():
    """Per-epoch progress, on a terminal only: one line, rewritten."""
    if not sys.stderr.isatty():
        return None

    def show(text: str) -> None:
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)  # never wraps, however narrow
        sys.stderr.write("\r" + text[:width].ljust(width) + "\r")
        sys.stderr.flush()
    return show


def interrupted(stop) -> int:
    print("interrupted: finished folds and checkpoints are kept; run the same command again to resume",
          file=sys.stderr)
    return 128 + int(stop.signal)


def url_of(args: argparse.Namespace) -> str:
    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise StorageError(f"{args.command} needs --storage URL (or the {STORAGE_ENV} environment variable)")
    return url


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
