"""Reading a study: the status table, and the results as tables (scikit-learn's
``cv_results_`` shape per point, one row per fold) for pandas and CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ._config import ConfigError
from ._numerics import numerics_label
from ._objective import format_lambda
from ._status import StudyStatus

__all__ = ["status_table", "numerics_lines", "results_frame", "folds_frame", "export_csv", "export_tables",
           "table_text", "format_studies", "EXPORT_FORMATS"]


def _lam(point) -> str:
    return "baseline" if point.baseline else format_lambda(point.e_lambda)


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
    frame["rank_val_accuracy"] = (
        frame["mean_val_accuracy"].where(complete).rank(ascending=False, method="min").astype("Int64")
    )
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


EXPORT_FORMATS = ("csv", "json")


def _text(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "json":  # records, every float exact (pandas' to_json keeps 15 digits); NaN and missing as null
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        return json.dumps(records, indent=1, default=lambda v: v.item()) + "\n"
    return frame.to_csv(index=False)


def table_text(status: StudyStatus, folds: bool = False, fmt: str = "csv") -> str:
    """The per-point table (or with ``folds`` the per-fold one) as CSV or JSON text."""
    return _text(folds_frame(status) if folds else results_frame(status), fmt)


def export_tables(status: StudyStatus, path, folds_only: bool = False, fmt: str | None = None) -> list[Path]:
    """Write the per-point table to ``path`` and the per-fold table beside it
    (``NAME.folds.csv`` or ``.json``), or with ``folds_only`` the per-fold table alone to
    ``path``. The format is ``fmt`` or the extension of ``path`` (.csv or .json); any other
    extension, or one that contradicts ``fmt``, is refused. Returns the paths written."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in EXPORT_FORMATS or (fmt is not None and fmt != ext):
        want = f".{fmt}" if fmt else ".csv or .json"
        raise ConfigError(f"export writes {want} files (or - for standard output), got -o {str(path)!r}")
    if folds_only:
        path.write_text(table_text(status, True, ext))
        return [path]
    folds_path = path.with_name(path.stem + ".folds" + path.suffix)
    path.write_text(table_text(status, False, ext))
    folds_path.write_text(table_text(status, True, ext))
    return [path, folds_path]


def export_csv(status: StudyStatus, path) -> tuple[Path, Path]:
    """Write the per-point table to ``path`` and the per-fold table beside it
    (``NAME.folds.csv``), as CSV whatever the extension. Returns both paths."""
    path = Path(path)
    folds_path = path.with_name(path.stem + ".folds" + (path.suffix or ".csv"))
    results_frame(status).to_csv(path, index=False)
    folds_frame(status).to_csv(folds_path, index=False)
    return path, folds_path


def format_studies(studies: list[dict], storage: str) -> str:
    """The studies of a storage (``list_studies``) as a table, companions under their study."""
    if not studies:
        return f"no studies in {storage}"
    rows = []
    for s in studies:
        if s["lambda_search"]:
            state = "finished" if s["finished"] else "not finished"
            rows.append([s["study"], f"{s['complete']}/{s['total']} points complete", state])
        else:
            rows.append([s["study"], f"{s['trials']} trials", "not a lambda_search study"])
        rows += [[f"  {c}", "companion", ""] for c in s["companions"]]
    head = ["study", "points", "state"]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return f"studies in {storage}:\n" + "\n".join(lines)
