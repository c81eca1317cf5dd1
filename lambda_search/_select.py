"""Choosing lambda, honestly: per-lambda statistics over all folds, the best mean, the
one-standard-error rule, and paired comparisons with the corrected resampled t-test of
Nadeau and Bengio (2003, "Inference for the generalization error").

Everything here is a pure function of a StudyStatus (which holds only validation
accuracies of the search's folds: nothing is selected on data that is reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats as _stats

from ._config import ConfigError
from ._objective import format_lambda, summarize
from ._status import StudyStatus

__all__ = ["LambdaStats", "lambda_stats", "corrected_t_test", "select", "format_selection", "nothing_selected",
           "test_train_ratio", "PREFER"]

PREFER = ("larger", "smaller")


@dataclass
class LambdaStats:
    """One lambda (or the baseline, ``e_lambda=None``) over every fold of every repeat.
    ``state``: "complete", "running" (some folds missing), "diverged" or "pending"."""

    e_lambda: float | None
    state: str
    folds: dict[str, float] = field(default_factory=dict)  # fold name (rRfF) -> accuracy
    n_folds: int = 0  # folds in the plan
    mean: float | None = None
    std: float | None = None  # ddof=1
    sem: float | None = None
    reason: str | None = None

    @property
    def baseline(self) -> bool:
        return self.e_lambda is None

    def to_dict(self) -> dict:
        return {"e_lambda": self.e_lambda, "state": self.state, "mean": self.mean, "std": self.std, "sem": self.sem,
                "folds_done": len(self.folds), "folds": self.n_folds}


def lambda_stats(status: StudyStatus) -> list[LambdaStats]:
    """Per lambda, in the config's order, then the baseline: the accuracies of all its
    finished folds (of every repeat), their mean, std (ddof=1) and standard error."""
    groups: dict[float | None, list] = {}
    for p in status.points:
        groups.setdefault(p.point.e_lambda, []).append(p)
    out = []
    for e_lambda, points in groups.items():
        folds = {name: r["val_accuracy"] for p in points for name, r in p.folds.items()
                 if r.get("status") == "completed" and r.get("val_accuracy") is not None}
        n_folds = sum(len(p.fold_names) for p in points)
        states = {p.state for p in points}
        if "diverged" in states:
            state = "diverged"
        elif states == {"complete"}:
            state = "complete"
        elif folds or states & {"running", "complete", "interrupted"}:
            state = "running"
        else:
            state = "pending"
        reason = next((p.reason for p in points if p.state == "diverged"), None)
        moments = summarize(list(folds.values())) if folds else dict(mean=None, std=None, sem=None)
        out.append(
            LambdaStats(e_lambda, state, folds, n_folds, moments["mean"], moments["std"], moments["sem"], reason)
        )
    return out


def test_train_ratio(config: dict) -> float:
    """n_test / n_train of one split, the correction of Nadeau and Bengio."""
    holdout = config["data"]["holdout"]
    if holdout is not None:
        return holdout / (1 - holdout)
    return 1 / (config["data"]["folds"] - 1)


def corrected_t_test(a: dict[str, float], b: dict[str, float], ratio: float) -> dict:
    """Paired, corrected resampled t-test of ``a`` against ``b`` over their shared folds:
    t = mean(d) / sqrt((1/J + n_test/n_train) * var(d)), with d = a - b per fold, var with
    ddof=1, J shared folds, J - 1 degrees of freedom; two-sided p."""
    shared = sorted(set(a) & set(b))
    d = [a[k] - b[k] for k in shared]
    J = len(d)
    out = {"folds": J, "diff": None, "t": None, "p": None}
    if J == 0:
        return out
    mean = math.fsum(d) / J
    out["diff"] = mean
    if J < 2:
        return out
    var = math.fsum((x - mean) ** 2 for x in d) / (J - 1)
    scale = math.sqrt((1 / J + ratio) * var)
    if scale == 0:
        out["t"], out["p"] = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
        return out
    t = mean / scale
    out["t"], out["p"] = t, float(2 * _stats.t.sf(abs(t), J - 1))
    return out


def select(status: StudyStatus, prefer: str = "larger", table: list[LambdaStats] | None = None) -> dict:
    """The lambda with the best mean; the one-standard-error choice (among the lambdas whose
    mean is at least best mean - best's standard error, the largest lambda when ``prefer`` is
    "larger": SimAM's energy closest to switched off, the conservative end; or the smallest);
    and each lambda compared with the best and with the baseline over shared folds.
    Only complete lambdas are candidates. ``table``: ``lambda_stats(status)``, when at hand."""
    if prefer not in PREFER:
        raise ConfigError(f"prefer must be 'larger' or 'smaller', got prefer={prefer!r}")
    table = lambda_stats(status) if table is None else table
    ratio = test_train_ratio(status.config)
    lambdas = [s for s in table if not s.baseline]
    baseline = next((s for s in table if s.baseline), None)
    complete = [s for s in lambdas if s.state == "complete"]
    result = {"study": status.name, "prefer": prefer, "test_train_ratio": ratio, "std_ddof": 1,
              "best": None, "one_se": None, "baseline": baseline.to_dict() if baseline else None,
              "complete": len(complete), "lambdas": len(lambdas),
              "diverged": sum(s.state == "diverged" for s in lambdas), "comparisons": [],
              "numerics": {"mixed": status.mixed_numerics, "mixed_folds": status.mixed_folds,
                           "distinct": status.numerics}}
    if not complete:
        return result
    best = max(complete, key=lambda s: (s.mean, -s.e_lambda))
    threshold = best.mean - (best.sem or 0.0)
    near = [s for s in complete if s.mean >= threshold]
    one_se = max(near, key=lambda s: s.e_lambda) if prefer == "larger" else min(near, key=lambda s: s.e_lambda)
    result["best"] = {"e_lambda": best.e_lambda, "mean": best.mean, "std": best.std, "sem": best.sem}
    result["one_se"] = {"e_lambda": one_se.e_lambda, "mean": one_se.mean, "std": one_se.std, "sem": one_se.sem,
                        "threshold": threshold, "candidates": sorted(s.e_lambda for s in near)}
    base_ok = baseline is not None and baseline.folds
    for s in lambdas:
        row = s.to_dict()
        if s.reason:
            row["reason"] = s.reason
        row["vs_best"] = corrected_t_test(s.folds, best.folds, ratio) if s.folds else None
        row["vs_baseline"] = corrected_t_test(s.folds, baseline.folds, ratio) if (base_ok and s.folds) else None
        result["comparisons"].append(row)
    return result


def _pct(v) -> str:
    return "  n/a" if v is None else f"{100 * v:.2f}"


def _p(test) -> str:
    if not test or test["p"] is None:
        return "n/a"
    return f"{100 * test['diff']:+.2f} (p={test['p']:.3f})"


def nothing_selected(sel: dict) -> str | None:
    """Why ``sel`` chose no lambda, in one line (None where it chose one)."""
    if sel["best"] is not None:
        return None
    n, diverged = sel["lambdas"], sel.get("diverged", 0)
    if diverged == n:
        return f"every lambda diverged ({n} of {n}): nothing to select; try a smaller train.lr"
    if diverged:
        return (f"no lambda is complete yet ({n - diverged} of {n} still to run, {diverged} diverged): "
                "nothing to select")
    return f"no lambda is complete yet (0 of {n}): nothing to select"


def format_selection(sel: dict) -> str:
    """The selection as text: the choice, why, and the comparison table."""
    if sel["best"] is None:
        return nothing_selected(sel)
    b, o = sel["best"], sel["one_se"]
    lines = [
        f"best mean:        lambda = {format_lambda(b['e_lambda'])}  {_pct(b['mean'])} % +- {_pct(b['std'])} "
        "(std over folds)",
        f"one-SE rule:      lambda = {format_lambda(o['e_lambda'])}  {_pct(o['mean'])} % "
        f"(the {sel['prefer'][:-2]}est lambda whose mean is >= {_pct(o['threshold'])} %, " + (
            "the best mean minus its standard error)" if b["sem"] is not None else
            "the best mean: one split per lambda has no standard error, so this is the best mean's lambda)"),
    ]
    if sel["baseline"] and sel["baseline"]["mean"] is not None:
        bl = sel["baseline"]
        lines.append(f"baseline:         no SimAM       {_pct(bl['mean'])} % +- {_pct(bl['std'])}")
    lines.append("")
    labels = [format_lambda(c["e_lambda"]) for c in sel["comparisons"]]
    width = max([len("lambda")] + [len(x) for x in labels])
    lines.append(f"{'lambda':<{width}}  state      mean %  std %   vs best: diff (p)     vs baseline: diff (p)")
    for label, c in zip(labels, sel["comparisons"]):
        lines.append(f"{label:<{width}}  {c['state']:<9} {_pct(c['mean']):>7} {_pct(c['std']):>6}   "
                     f"{_p(c['vs_best']):<20}  {_p(c['vs_baseline'])}")
    lines.append("p: two-sided corrected resampled t-test (Nadeau & Bengio 2003) over shared folds, "
                 f"n_test/n_train = {sel['test_train_ratio']:.3g}")
    if sel["complete"] < sel["lambdas"]:
        lines.append(f"only {sel['complete']} of {sel['lambdas']} lambdas are complete: the choice may change")
    if sel["numerics"]["mixed"]:
        mixed = sel["numerics"]["mixed_folds"]
        lines.append(f"WARNING: the points of {', '.join(mixed)} were trained under more than one numerics "
                     "(`lambda-search status` lists them): lambdas are not compared bit for bit there")
    return "\n".join(lines)
