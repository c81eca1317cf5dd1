"""Chaos: a search with 2 worker processes, killed with SIGKILL at random moments (the parent,
a worker, during start-up and study creation, mid-fold, mid-write), resumed again and again.

    python tests/chaos.py --kills 50 [--seed 0] [--folder DIR]

After every kill it checks, reading the study database: no point has two COMPLETE trials, and
no finished fold's record ever changes (a kept fold is never trained again). Whenever the
study finishes it checks every point complete exactly once, no trial RUNNING, and every
fold's accuracy equal to an uninterrupted run's (same processes, CPU, one thread each); then
it starts a fresh study and goes on killing. It prints its figures: kills survived, work lost
per kill, duplicates and skips. ``tests/test_chaos.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "lambda-search"

CONFIG = """
[study]
name = "chaos"

[search]
lambdas = [1e-4, 1e-2, 1.0]
baseline = true
workers = 2

[data]
dataset = "synthetic"
folds = 2
seed = 0

[data.options]
num_samples = 64
num_classes = 3
image_size = 8
noise = 60.0

[train]
epochs = {epochs}
batch_size = 8
lr = 0.05
checkpoint_every_seconds = 0.3
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _read(db: Path) -> dict:
    """Trials of the study, as {point key: [(state, fold_results)]}, read in a subprocess-free way."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out: dict = {}
    if not db.exists():
        return out
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_compatibility_check=True)
    for name in ("chaos", "chaos:baseline"):
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            continue
        for t in storage.get_all_trials(study_id, deepcopy=False):
            key = t.system_attrs.get("lambda_search:point")
            if key is None:
                continue
            out.setdefault(key, []).append((t.state.name, dict(t.user_attrs.get("fold_results") or {})))
    storage.remove_session()
    return out


def _children(pids: set[int]) -> set[int]:
    """Live processes descending from ``pids`` (from /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(entry.name)] = int(fields[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    return found | {p for p in pids if p in parent}


@dataclass
class Figures:
    kills: int = 0
    kills_of: dict = field(default_factory=lambda: {"parent": 0, "worker": 0, "start-up": 0})
    studies_finished: int = 0
    duplicates: int = 0  # a kept fold trained again, or two COMPLETE trials of one point
    skips: int = 0  # points or folds missing from a finished study
    wrong_accuracies: int = 0
    stuck_running: int = 0
    violations: list = field(default_factory=list)
    chaos_seconds: float = 0.0
    uninterrupted_seconds: float = 0.0
    resumed_folds: int = 0

    def lost_per_kill(self) -> float:
        """Wall seconds beyond the uninterrupted runs, per kill (process restarts included)."""
        extra = self.chaos_seconds - self.studies_finished * self.uninterrupted_seconds
        return extra / max(1, self.kills)

    def ok(self) -> bool:
        return not (self.duplicates or self.skips or self.wrong_accuracies or self.stuck_running)

    def report(self) -> str:
        return "\n".join(
            [
                f"kills survived: {self.kills} ({self.kills_of['parent']} parents, {self.kills_of['worker']} workers, "
                f"{self.kills_of['start-up']} during start-up or study creation)",
                f"studies run to the end through the kills: {self.studies_finished}, every fold's accuracy equal to "
                f"the uninterrupted run's: "
                f"{'yes' if not self.wrong_accuracies else f'NO ({self.wrong_accuracies} differ)'}",
                f"duplicates (a kept fold trained again, or a point completed twice): {self.duplicates}",
                f"skips (points or folds missing at the end): {self.skips}; trials left RUNNING: {self.stuck_running}",
                f"folds resumed from a mid-fold checkpoint: {self.resumed_folds}",
                f"work lost per kill: {self.lost_per_kill():.1f} s of wall time beyond the uninterrupted run "
                f"({self.uninterrupted_seconds:.1f} s), process restarts included",
            ]
            + [f"violation: {v}" for v in self.violations]
        )


class Chaos:
    def __init__(self, folder: Path, kills: int, seed: int, epochs: int = 8) -> None:
        self.folder, self.kills, self.rng = folder, kills, random.Random(seed)
        self.config = folder / "chaos.toml"
        self.db = folder / "chaos.db"
        folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG.format(epochs=epochs))
        self.figures = Figures()
        self.seen: dict = {}  # (point, fold) -> the first record seen of it
        self.groups: list[subprocess.Popen] = []

    def _reset(self) -> None:
        for path in (self.db, self.folder / "chaos.ckpt"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.seen.clear()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen([str(SCRIPT), "search", str(self.config)], env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.groups.append(proc)
        return proc

    def _live(self) -> set[int]:
        self.groups = [p for p in self.groups if p.poll() is None or _children({p.pid})]
        return _children({p.pid for p in self.groups})

    def _wait_all(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self._live() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self._live():
            os.kill(pid, signal.SIGKILL)
            self.figures.violations.append(f"process {pid} still running after {timeout:.0f} s")

    def reference(self) -> dict:
        """The uninterrupted run: {(point, fold): val_accuracy}."""
        self._reset()
        t = time.monotonic()
        proc = self._start()
        proc.wait()
        self._wait_all()
        self.figures.uninterrupted_seconds = time.monotonic() - t
        trials = _read(self.db)
        expected = {(k, f): r["val_accuracy"] for k, v in trials.items() for s, folds in v if s == "COMPLETE"
                    for f, r in folds.items()}
        self._reset()
        return expected

    def _check(self) -> bool:
        """The invariants that hold at any moment; True when the study is finished."""
        trials = _read(self.db)
        for key, versions in trials.items():
            if sum(s == "COMPLETE" for s, _ in versions) > 1:
                self.figures.duplicates += 1
                self.figures.violations.append(f"{key}: two COMPLETE trials")
            for _, folds in versions:
                for fold, record in folds.items():
                    first = self.seen.setdefault((key, fold), record)
                    if first != record:
                        self.figures.duplicates += 1
                        self.figures.violations.append(f"{key} {fold}: record changed {first} -> {record}")
                        self.seen[(key, fold)] = record
        return len(trials) == 4 and all(any(s == "COMPLETE" for s, _ in v) for v in trials.values())

    def _finish_study(self, expected: dict) -> None:
        self._wait_all()
        result = subprocess.run([str(SCRIPT), "search", str(self.config)], env=_env(), capture_output=True, text=True)
        if result.returncode != 0:
            self.figures.violations.append(f"final search exited {result.returncode}: {result.stderr[-300:]}")
        self._check()
        trials = _read(self.db)
        self.figures.stuck_running += sum(s == "RUNNING" for v in trials.values() for s, _ in v)
        complete = {k: folds for k, v in trials.items() for s, folds in v if s == "COMPLETE"}
        for key in {k for k, _ in expected}:
            if key not in complete:
                self.figures.skips += 1
                self.figures.violations.append(f"{key}: no COMPLETE trial")
        for (key, fold), accuracy in expected.items():
            record = complete.get(key, {}).get(fold)
            if record is None:
                self.figures.skips += 1
            elif record["val_accuracy"] != accuracy:
                self.figures.wrong_accuracies += 1
                self.figures.violations.append(f"{key} {fold}: {record['val_accuracy']} != {accuracy}")
            elif record.get("resumed_from_iteration"):
                self.figures.resumed_folds += 1
        self.figures.studies_finished += 1

    def run(self, log=print) -> Figures:
        expected = self.reference()
        log(f"uninterrupted run: {self.figures.uninterrupted_seconds:.1f} s, {len(expected)} folds")
        span = self.figures.uninterrupted_seconds
        t0 = time.monotonic()
        parent = None
        while self.figures.kills < self.kills:
            if parent is None or parent.poll() is not None:
                if parent is not None and parent.returncode == 0 and self._check():
                    self._finish_study(expected)
                    log(f"study finished after {self.figures.kills} kills; starting a fresh one")
                    self._reset()
                parent = self._start()
            if self.rng.random() < 0.2:  # while it imports, opens the database, creates the study
                time.sleep(self.rng.uniform(0.0, 2.5))
                if parent.poll() is not None:
                    continue
                victim, kind = parent.pid, "start-up"
            else:  # once its workers train: mid-fold, mid-checkpoint, mid-write, between points
                deadline = time.monotonic() + 60
                while parent.poll() is None and not (self._live() - {parent.pid}) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(self.rng.uniform(0.2, max(1.0, span / 3)))
                live = self._live()
                workers = sorted(live - {parent.pid})
                if not live or (parent.poll() is not None and not workers):
                    continue
                if parent.poll() is None and (not workers or self.rng.random() < 0.35):
                    victim, kind = parent.pid, "parent"
                else:
                    victim, kind = self.rng.choice(workers), "worker"
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.figures.kills += 1
            self.figures.kills_of[kind] += 1
            time.sleep(0.2)
            self._check()
            log(f"kill {self.figures.kills}: {kind} {victim}")
        self._finish_study(expected)
        self.figures.chaos_seconds = time.monotonic() - t0
        return self.figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=8, help="training epochs of each fold (longer: more mid-fold kills)"
    )
    parser.add_argument("--folder", type=Path, default=None, help="where the study lives (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import tempfile

    folder = args.folder or Path(tempfile.mkdtemp(prefix="lambda-search-chaos-"))
    figures = Chaos(folder, args.kills, args.seed, args.epochs).run(log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(figures.__dict__ | {"lost_per_kill": figures.lost_per_kill()}) if args.json else figures.report())
    return 0 if figures.ok() and not figures.violations else 1


if __name__ == "__main__":
    sys.exit(main())
