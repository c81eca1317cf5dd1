"""Grid points and what their folds recorded, read without training (no torch here).

A point is one lambda (or the baseline network) and a repeat; its folds are named ``r<repeat>f<i>``.
What a fold stores is a record (a dict: status, accuracy, seconds, seed, the numerics it was
trained under); this module summarises records (mean, sample std, SEM) and says which numerics
they were trained under.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .config import Config

__all__ = ["Point", "PointStatus", "format_lambda", "grid_points", "fold_names", "fold_accuracies", "summarize",
           "STD_DDOF", "numerics_label", "distinct_numerics", "mixed_folds"]

STD_DDOF = 1  # the standard deviation over folds is the sample one (n - 1)


def signed_pp(fraction: float) -> str:
    """A difference of accuracies (fractions) in percentage points, signed, to 2 decimals; one
    that rounds to zero is +0.00, never -0.00."""
    return f"{round(100 * fraction, 2) + 0.0:+.2f}"


def format_lambda(value: float) -> str:
    """A lambda as people read it: the shortest scientific form (Python's ``e`` style, a
    two-digit exponent at least) that reads back as exactly ``value``: 1e-3 -> "1e-03",
    1.2e-3 -> "1.2e-03", so that distinct lambdas never share a label."""
    for digits in range(18):
        text = f"{value:.{digits}e}"
        if float(text) == value:
            return text
    return repr(value)  # NaN: never equal to itself


@dataclass(frozen=True)
class Point:
    """A grid point: SimAM with ``e_lambda``, or the baseline network (``e_lambda=None``)."""

    e_lambda: float | None
    repeat: int = 0

    def __post_init__(self) -> None:
        # one form whatever it was made from (numpy floats, ints): its key and slug name it once
        if self.e_lambda is not None:
            object.__setattr__(self, "e_lambda", float(self.e_lambda))
        object.__setattr__(self, "repeat", int(self.repeat))

    @property
    def baseline(self) -> bool:
        return self.e_lambda is None

    @property
    def attention(self) -> str:
        return "none" if self.baseline else "simam"

    @property
    def key(self) -> str:
        what = "baseline" if self.baseline else f"e_lambda={self.e_lambda!r}"
        return f"{what}/repeat={self.repeat}"

    @property
    def slug(self) -> str:  # a folder name
        return ("baseline" if self.baseline else f"lambda-{self.e_lambda!r}") + f"-r{self.repeat}"

    def label(self, seeds: bool = False) -> str:
        """How logs name the point: by its repeat in a search, by its seed (``seeds``) in a final
        evaluation, where repeat N is seed N."""
        what = "baseline (no SimAM)" if self.baseline else f"lambda={format_lambda(self.e_lambda)}"
        if seeds:
            return f"{what} seed {self.repeat}"
        return what if self.repeat == 0 else f"{what} repeat {self.repeat}"


def grid_points(config: Config) -> list[Point]:
    """The grid of a resolved config: repeat by repeat, its lambdas in the config's order,
    then the baseline network when ``search.baseline`` is on."""
    points = []
    for r in range(config.search.repeats):
        points += [Point(v, r) for v in config.search.lambdas]
        if config.search.baseline:
            points.append(Point(None, r))
    return points


def fold_names(config: Config, repeat: int = 0) -> list[str]:
    """The names of one repeat's folds (as ``Fold.name``), from the config alone."""
    n = 1 if config.data.holdout is not None or config.data.test else config.data.folds
    return [f"r{repeat}f{i}" for i in range(n)]


@dataclass
class PointStatus:
    """``state``: "complete", "running", "diverged", "interrupted" (tried, to be resumed:
    ``folds`` holds what it finished) or "pending" (never tried)."""

    point: Point
    state: str
    folds: dict = field(default_factory=dict)  # fold name -> fold record (finished folds)
    fold_names: list = field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    sem: float | None = None
    trial_number: int | None = None
    attempts: int = 0
    reason: str | None = None
    worker: str | None = None  # a running point's: who runs it (host:pid, its Slurm job)

    @property
    def fold_accuracies(self) -> list[float | None]:
        """Accuracy per fold of the plan, None where the fold is not finished."""
        return fold_accuracies(self.folds, self.fold_names)

    @property
    def folds_done(self) -> int:
        return sum(1 for r in self.folds.values() if r.get("status") == "completed")

    def to_dict(self) -> dict:
        return {"e_lambda": self.point.e_lambda, "repeat": self.point.repeat, "baseline": self.point.baseline,
                "state": self.state, "folds_done": self.folds_done, "folds": len(self.fold_names),
                "mean": self.mean, "std": self.std, "sem": self.sem,
                "fold_accuracies": self.fold_accuracies,
                "fold_seconds": [self.folds.get(n, {}).get("seconds") for n in self.fold_names],
                "fold_numerics": [self.folds.get(n, {}).get("numerics") for n in self.fold_names],
                "trial": self.trial_number, "attempts": self.attempts, "reason": self.reason,
                "worker": self.worker}


def fold_accuracies(records: dict, names: list[str]) -> list[float | None]:
    return [records.get(n, {}).get("val_accuracy") for n in names]


def summarize(accuracies: list[float]) -> dict:
    """Mean, sample standard deviation (ddof=1), and standard error of the mean."""
    n = len(accuracies)
    mean = math.fsum(accuracies) / n
    if n > STD_DDOF:
        std = math.sqrt(math.fsum((a - mean) ** 2 for a in accuracies) / (n - STD_DDOF))
        sem = std / math.sqrt(n)
    else:
        std = sem = None
    return dict(mean=mean, std=std, std_ddof=STD_DDOF, sem=sem, n=n)


def numerics_label(numerics: dict | None) -> str:
    """One line: where and how a fold was trained."""
    if not numerics:
        return "not recorded (trained before lambda_search recorded numerics)"
    if "resumed_under" in numerics:  # a fold resumed from a checkpoint made under other numerics
        return "resumed under other numerics: " + ", then ".join(numerics_label(n) for n in numerics["resumed_under"])
    n = numerics
    parts = [f"{n['device']} ({n['processor']}" + (f", {n['isa']})" if n.get("isa") else ")"), n["dtype"]]
    if n.get("autocast"):
        parts.append(f"{n['autocast']} autocast")
    if n.get("threads") is not None:
        parts.append(f"{n['threads']} thread{'s' if n['threads'] != 1 else ''}")
    if n.get("simam_kernel") is not None:
        parts.append(f"SimAM kernel {n['simam_kernel']}")
    parts += [f"pack {n['pack']}"] + (["compiled"] if n.get("compile") else []) + [f"torch {n['torch']}"]
    return ", ".join(parts)


def _key(numerics: dict | None) -> str:
    return json.dumps(numerics, sort_keys=True)


def distinct_numerics(records) -> list[dict]:
    """The distinct numerics of fold ``records`` (dicts with a "numerics" entry; a record
    without one counts as None), in order of first appearance: [{"numerics", "folds"}]."""
    seen: dict[str, dict] = {}
    for record in records:
        n = record.get("numerics")
        seen.setdefault(_key(n), {"numerics": n, "folds": 0})["folds"] += 1
    return list(seen.values())


def mixed_folds(records: dict[str, list[dict]]) -> list[str]:
    """The folds (fold name -> the records of every point on that fold) that were trained
    under more than one numerics: there the points are not compared bit for bit. Folds may
    differ from each other (the last, shorter pack of a point, say): they are never compared. A
    fold resumed from a checkpoint made under other numerics is one such, whatever the others."""
    return [name for name, rs in records.items() if len({_key(r.get("numerics")) for r in rs}) > 1
            or any("resumed_under" in (r.get("numerics") or {}) for r in rs)]
