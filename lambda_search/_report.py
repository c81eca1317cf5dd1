"""Reading a study: the status table, and the results as tables (scikit-learn's
``cv_results_`` shape per point, one row per fold) for pandas and CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ._numerics import numerics_label
from ._study import StudyStatus

__all__ = ["status_table", "numerics_lines", "results_frame", "folds_frame", "export_csv"]


def _lam(point) -> str:
    return "baseline" if point.baseline else f"{point.e_lambda:.0e}"


def status_table(status: StudyStatus) -> str:
    """A plain-text table of the points: lambda, repeat, state, folds done, mean +- std (%)."""
    repeats = status.config["search"]["repeats"] > 1
    head = ["lambda"] + (["repeat"] if repeats else []) + ["state", "folds", "val acc % (mean +- std)"]
    rows = []
    for p in status.points:
        acc = ""
        if p.mean is not None:
            acc = f"{100 * p.mean:.2f}" + (f" +- {100 * p.std:.2f}" if p.std is not None else "")
        elif p.state == "diverged":
            acc = "diverged"
        rows.append([_lam(p.point)] + ([str(p.point.repeat)] if repeats else [])
                    + [p.state, f"{p.folds_done}/{len(p.fold_names)}", acc])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    ddof = "std over folds, ddof=1"
    lines.append(f"{status.complete} of {status.total} points complete ({ddof})")
    return "\n".join(lines + numerics_lines(status))


def _folds(n: int) -> str:
    return f"{n} fold{'s' if n != 1 else ''}"


def numerics_lines(status: StudyStatus) -> list[str]:
    """What the finished folds were trained under (see lambda_search._numerics): one line,
    or a warning and one line per numerics when the points of a fold were trained under more
    than one."""
    kinds = status.numerics
    if not kinds:
        return []
    labels = [f"{numerics_label(k['numerics'])}" + (f" ({_folds(k['folds'])})" if len(kinds) > 1 else "")
              for k in kinds]
    if status.mixed_numerics:
        mixed = status.mixed_folds
        lines = [f"WARNING: on {_folds(len(mixed))} ({', '.join(mixed)}) the points were trained under more than one "
                 "numerics, so lambdas are not compared bit for bit there (differences within float noise may be "
                 "numerics, not lambda):"] + [f"  {label}" for label in labels]
    elif len(kinds) == 1:
        lines = [f"trained under one numerics: {labels[0]}"]
    else:  # e.g. the last, shorter pack of a point: each fold alike for every point
        lines = ["each fold trained under one numerics for every point: " + "; ".join(labels)]
    if any((k["numerics"] or {}).get("device") == "cuda" for k in kinds):
        lines.append("(on a GPU, one numerics gives the same numbers within float noise, not the same bits: cuDNN "
                     "picks its algorithms by timing them)")
    return lines


def results_frame(status: StudyStatus) -> pd.DataFrame:
    """One row per point, in scikit-learn's ``cv_results_`` shape: param_e_lambda (NaN for the
    baseline), param_repeat, baseline, state, split{i}_val_accuracy, mean_/std_/rank_val_accuracy
    (std with ddof=1; rank 1 is the best mean among complete points), mean_/std_fit_time (s)."""
    rows = []
    for p in status.points:
        d = p.to_dict()
        row = {"param_e_lambda": p.point.e_lambda, "param_repeat": p.point.repeat, "baseline": p.point.baseline,
               "state": p.state}
        for i, a in enumerate(d["fold_accuracies"]):
            row[f"split{i}_val_accuracy"] = a
        row["mean_val_accuracy"] = p.mean
        row["std_val_accuracy"] = p.std
        times = pd.Series([t for t in d["fold_seconds"] if t is not None], dtype="float64")
        row["mean_fit_time"] = times.mean() if len(times) else None
        row["std_fit_time"] = times.std(ddof=1) if len(times) > 1 else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    complete = frame["state"] == "complete"
    frame["rank_val_accuracy"] = frame["mean_val_accuracy"].where(complete).rank(ascending=False, method="min").astype("Int64")
    cols = [c for c in frame.columns if c not in ("mean_fit_time", "std_fit_time")] + ["mean_fit_time", "std_fit_time"]
    return frame[cols]


def folds_frame(status: StudyStatus) -> pd.DataFrame:
    """One row per finished fold: e_lambda, repeat, baseline, fold, status, val_accuracy,
    val_loss, seconds, iterations, seed, numerics (what it was trained under, in words)."""
    rows = []
    for p in status.points:
        for name in p.fold_names:
            r = p.folds.get(name)
            if r is not None:
                rows.append({"e_lambda": p.point.e_lambda, "repeat": p.point.repeat, "baseline": p.point.baseline,
                             "fold": name, "status": r.get("status"), "val_accuracy": r.get("val_accuracy"),
                             "val_loss": r.get("val_loss"), "seconds": r.get("seconds"),
                             "iterations": r.get("iterations"), "seed": r.get("seed"),
                             "numerics": numerics_label(r.get("numerics"))})
    columns = ["e_lambda", "repeat", "baseline", "fold", "status", "val_accuracy", "val_loss", "seconds",
               "iterations", "seed", "numerics"]
    return pd.DataFrame(rows, columns=columns)


def export_csv(status: StudyStatus, path) -> tuple[Path, Path]:
    """Write the per-point table to ``path`` and the per-fold table beside it
    (``NAME.folds.csv``). Returns both paths."""
    path = Path(path)
    folds_path = path.with_name(path.stem + ".folds" + (path.suffix or ".csv"))
    results_frame(status).to_csv(path, index=False)
    folds_frame(status).to_csv(folds_path, index=False)
    return path, folds_path
