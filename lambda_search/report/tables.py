"""Reading a study: the status table, and the results as tables (scikit-learn's
``cv_results_`` shape per point, one row per fold) for pandas and CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from ..config import ConfigError, final_parts
from ..points import format_lambda, numerics_label
from ..store.status import StudyStatus

__all__ = ["status_table", "numerics_lines", "cv_results", "results_frame", "folds_frame", "export_tables",
           "table_text", "format_studies", "EXPORT_FORMATS"]


def _lam(point) -> str:
    return "baseline" if point.baseline else format_lambda(point.e_lambda)


def status_table(status: StudyStatus) -> str:
    """A plain-text table of the points: lambda, repeat, state, folds done, mean +- std (%)."""
    repeats = status.config.search.repeats > 1
    held = any(p.worker for p in status.points)
    head = (["lambda"] + (["repeat"] if repeats else []) + ["state", "folds", "val acc % (mean +- std)"]
            + (["run by"] if held else []))
    rows = []
    for p in status.points:
        acc = ""
        if p.mean is not None:
            acc = f"{100 * p.mean:.2f}" + (f" +- {100 * p.std:.2f}" if p.std is not None else "")
        elif p.state == "diverged":
            acc = "diverged"
        rows.append([_lam(p.point)] + ([str(p.point.repeat)] if repeats else [])
                    + [p.state, f"{p.folds_done}/{len(p.fold_names)}", acc] + ([p.worker or ""] if held else []))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    ddof = "std over folds, ddof=1"
    lines.append(f"{status.complete} of {status.total} points complete ({ddof})")
    return "\n".join(lines + numerics_lines(status))


def _folds(n: int) -> str:
    return f"{n} fold{'s' if n != 1 else ''}"


def numerics_lines(status: StudyStatus) -> list[str]:
    """What the finished folds were trained under (see lambda_search.train.numerics): one line,
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


def _splits(status: StudyStatus) -> list[str]:
    """The study's splits in scikit-learn's order: every fold of repeat 0, then of repeat 1..."""
    first = next((p.point.e_lambda for p in status.points if not p.point.baseline), None)
    points = sorted((p for p in status.points if p.point.e_lambda == first and not p.point.baseline),
                    key=lambda p: p.point.repeat)
    return [name for p in points for name in p.fold_names]


def _split_values(status: StudyStatus, e_lambda, splits: list[str], key: str) -> np.ndarray:
    """``key`` of each finished fold of ``e_lambda`` (all its repeats), NaN where not finished."""
    records = {n: r for p in status.points if p.point.e_lambda == e_lambda and p.point.baseline == (e_lambda is None)
               for n, r in p.folds.items() if r.get("status") == "completed"}
    return np.array([np.nan if records.get(n, {}).get(key) is None else records[n][key] for n in splits],
                    dtype=np.float64)


def _rank_min(means: np.ndarray) -> np.ndarray:
    """scikit-learn's rank_test_score: 1 the best, ties "min"; a NaN mean (a lambda not
    complete, or diverged) tied with the worst."""
    if np.isnan(means).all():
        return np.ones_like(means, dtype=np.int32)
    filled = np.nan_to_num(means, nan=np.nanmin(means) - 1)
    return rankdata(-filled, method="min").astype(np.int32, copy=False)


def _moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: mean and std (ddof=0) as scikit-learn's ``np.average``; NaN where a value is."""
    if values.shape[1] == 0:
        nan = np.full(values.shape[0], np.nan)
        return nan, nan.copy()
    mean = np.average(values, axis=1)
    return mean, np.sqrt(np.average((values - mean[:, np.newaxis]) ** 2, axis=1))


def _rows(status: StudyStatus, keys: list, splits: list[str], key: str) -> np.ndarray:
    return np.array([_split_values(status, k, splits, key) for k in keys], dtype=np.float64).reshape(-1, len(splits))


def _scores_and_times(status: StudyStatus, keys: list, splits: list[str]) -> dict:
    """The keys of cv_results but the params and rank, for ``keys`` (lambdas, or [None])."""
    out = {}
    for name, key in (("fit_time", "seconds"), ("score_time", "score_seconds")):
        out[f"mean_{name}"], out[f"std_{name}"] = _moments(_rows(status, keys, splits, key))
    scores = _rows(status, keys, splits, "val_accuracy")
    out.update({f"split{i}_test_score": scores[:, i] for i in range(len(splits))})
    out["mean_test_score"], out["std_test_score"] = _moments(scores)
    return out


def cv_results(status: StudyStatus) -> dict:
    """The lambdas of ``status`` as scikit-learn's ``GridSearchCV.cv_results_`` (single metric,
    no train scores): the same keys in the same order and types: mean_/std_fit_time and
    mean_/std_score_time (seconds: a fold's whole training; its final validation pass),
    ``param_e_lambda`` (a masked float array), ``params`` (a list of dicts),
    ``split{i}_test_score`` (validation accuracy of split i: every fold of repeat 0, then
    repeat 1...), mean_/std_test_score (std with ddof=0, as scikit-learn; the tool's own
    tables use ddof=1) and ``rank_test_score`` (int32, ties "min"). A lambda with a fold not
    finished (or diverged) has NaN there (its score, and its times), and ranks last as
    scikit-learn ranks an ``error_score=nan`` fit.
    The baseline is not a candidate: it is not here (``results_frame`` adds it as a row)."""
    lambdas = list(dict.fromkeys(p.point.e_lambda for p in status.points if not p.point.baseline))
    splits = _splits(status)
    computed = _scores_and_times(status, lambdas, splits)
    param = np.ma.MaskedArray(np.empty(len(lambdas), dtype=np.float64), mask=True)
    for i, lam in enumerate(lambdas):
        param[i] = lam
    out = {k: computed[k] for k in ("mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time")}
    out["param_e_lambda"], out["params"] = param, [{"e_lambda": lam} for lam in lambdas]
    out.update({k: v for k, v in computed.items() if k.startswith(("split", "mean_test", "std_test"))})
    out["rank_test_score"] = _rank_min(computed["mean_test_score"])
    return out


def results_frame(status: StudyStatus) -> pd.DataFrame:
    """``pd.DataFrame(cv_results(status))``, one row per lambda, and where the study has a
    baseline, a last row for it: ``params`` "baseline", ``param_e_lambda`` and
    ``rank_test_score`` empty (it is not a candidate), its scores and times as a lambda's."""
    frame = pd.DataFrame(cv_results(status))
    frame["rank_test_score"] = frame["rank_test_score"].astype("Int32")
    if not any(p.point.baseline for p in status.points):
        return frame
    row = {k: v[0] for k, v in _scores_and_times(status, [None], _splits(status)).items()}
    row.update(params="baseline", param_e_lambda=np.nan, rank_test_score=pd.NA)
    baseline = pd.DataFrame([row], columns=frame.columns).astype(frame.dtypes.to_dict())
    return pd.concat([frame, baseline], ignore_index=True)


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
        return json.dumps(records, indent=1, default=lambda v: v.item(), allow_nan=False) + "\n"
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


def _companion(name: str) -> str:
    """What a companion study holds, from its reserved name."""
    if name.endswith(":baseline"):
        return "its baseline (no SimAM)"
    parts = final_parts(name)
    if parts is None:
        return "companion"
    return "final evaluation" + (f": {parts[1]}" if parts[1] else ": the searched network and data")


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
        rows += [[f"  {c}", _companion(c), ""] for c in s["companions"]]
    head = ["study", "points", "state"]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return f"studies in {storage}:\n" + "\n".join(lines)
