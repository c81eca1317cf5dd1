"""_report on its own, on hand-made StudyStatus objects (no storage, no training): the status
table, the per-point and per-fold frames (columns, dtypes, NaN where nothing is known), their
CSV and JSON texts and files (round trips), and the list of a storage's studies."""

import io
import json
import math

import pandas as pd
import pytest

import lambda_search as ls
from lambda_search import ConfigError, StudyStatus
from lambda_search import configfile as _configfile
from lambda_search.points import Point
from lambda_search.report import tables as _report
from lambda_search.report.tables import numerics_lines
from lambda_search.store.status import PointStatus

NAMES = ["r0f0", "r0f1", "r0f2"]
CPU = {"device": "cpu", "processor": "Test CPU", "isa": "avx2", "dtype": "float32", "autocast": None, "threads": 1,
       "simam_kernel": "avx2", "kernel_build": None, "pack": 1, "compile": False, "channels_last": True,
       "torch": "2.0"}
CPU_LABEL = "cpu (Test CPU, avx2), float32, 1 thread, SimAM kernel avx2, pack 1, torch 2.0"


def rec(acc, seconds=1.0, status="completed", numerics=CPU):
    return {"status": status, "val_accuracy": acc, "val_loss": 0.5, "seconds": seconds, "iterations": 10, "seed": 3,
            "numerics": numerics}


def done(accs, secs, numerics=CPU):
    return {n: rec(a, s, numerics=numerics) for n, a, s in zip(NAMES, accs, secs)}


def make_status(repeats=1):
    """Five points of every state: two complete, one running, one diverged, the baseline pending."""
    config = _configfile.resolve_config(
        {
            "search": {"lambdas": [1e-3, 1e-2, 1e-1, 1.0], "baseline": True, "repeats": repeats},
            "data": {"dataset": "synthetic", "folds": 3},
            "train": {"iterations": 10},
        },
        name="rep",
    )
    points = [PointStatus(Point(1e-3), "complete", done([0.8, 0.9, 0.85], [1.0, 2.0, 3.0]), NAMES,
                          mean=0.85, std=0.05, sem=0.05 / math.sqrt(3)),
              PointStatus(Point(1e-2), "complete", done([0.9, 0.95, 0.85], [1.5, 1.5, 1.5]), NAMES,
                          mean=0.9, std=0.05, sem=0.05 / math.sqrt(3)),
              PointStatus(Point(1e-1), "running", {"r0f0": rec(0.7, 2.0)}, NAMES),
              PointStatus(Point(1.0), "diverged", {"r0f0": rec(0.3), "r0f1": rec(None, 0.5, "diverged")}, NAMES,
                          reason="diverged: at step 4 of fold r0f1"),
              PointStatus(Point(None), "pending", {}, NAMES)]
    return StudyStatus("rep", config, points, "sqlite:///rep.db")


# ---------------------------------------------------------------- the status table


def test_status_table():
    assert ls.status_table(make_status()) == "\n".join([
        "lambda    state     folds  val acc % (mean +- std)",
        "1e-03     complete  3/3    85.00 +- 5.00",
        "1e-02     complete  3/3    90.00 +- 5.00",
        "1e-01     running   1/3",
        "1e+00     diverged  1/3    diverged",
        "baseline  pending   0/3",
        "2 of 5 points complete (std over folds, ddof=1)",
        f"trained under one numerics: {CPU_LABEL}",
    ])


def test_status_table_shows_repeats_and_a_point_without_std():
    status = make_status(repeats=2)
    status.points[1] = PointStatus(Point(1e-2, 1), "complete", {"r1f0": rec(0.5)}, ["r1f0"], mean=0.5)
    lines = ls.status_table(status).splitlines()
    assert lines[0].split() == ["lambda", "repeat", "state", "folds", "val", "acc", "%", "(mean", "+-", "std)"]
    assert lines[1].split() == ["1e-03", "0", "complete", "3/3", "85.00", "+-", "5.00"]
    assert lines[2].split() == ["1e-02", "1", "complete", "1/1", "50.00"]  # one fold: no std
    assert {line.index("complete") for line in lines[1:3]} == {lines[0].index("state")}


def test_numerics_lines():
    status = make_status()
    assert numerics_lines(status) == [f"trained under one numerics: {CPU_LABEL}"]
    assert numerics_lines(StudyStatus("e", status.config, [PointStatus(Point(1e-3), "pending", {}, NAMES)],
                                      "x")) == []  # nothing finished: nothing to say
    gpu = {**CPU, "device": "cuda", "processor": "Test GPU", "isa": None, "threads": None, "simam_kernel": None}
    status.points[1].folds["r0f0"]["numerics"] = gpu  # two numerics on fold r0f0
    lines = numerics_lines(status)
    assert lines[0].startswith("WARNING: on 1 fold (r0f0) the points were trained under more than one numerics")
    assert lines[1:3] == [f"  {CPU_LABEL} (7 folds)", "  cuda (Test GPU), float32, pack 1, torch 2.0 (1 fold)"]
    assert lines[3].startswith("(on a GPU, one numerics gives the same numbers within float noise")


# ---------------------------------------------------------------- the frames

RESULT_COLUMNS = ["mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time", "param_e_lambda", "params",
                  "split0_test_score", "split1_test_score", "split2_test_score", "mean_test_score", "std_test_score",
                  "rank_test_score"]
FOLD_COLUMNS = ["e_lambda", "repeat", "baseline", "fold", "status", "val_accuracy", "val_loss", "seconds",
                "iterations", "seed", "numerics"]


def _grid_search_cv_results(n_splits: int) -> dict:
    """A real scikit-learn GridSearchCV over one float parameter, ``n_splits`` splits."""
    import numpy as np
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import GridSearchCV, KFold

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), np.arange(60) % 2
    search = GridSearchCV(RidgeClassifier(), {"alpha": [1e-3, 1e-1, 1.0]}, cv=KFold(n_splits)).fit(X, y)
    return {k.replace("param_alpha", "param_e_lambda"): v for k, v in search.cv_results_.items()}


@pytest.mark.parametrize("repeats", [1, 2])
def test_cv_results_has_scikit_learns_keys_and_types(repeats):
    """Keys in scikit-learn's order, the same container and dtype for each, against a real
    GridSearchCV (the parameter renamed): a DataFrame of it reads as users expect."""
    import numpy as np

    status = make_status(repeats)
    if repeats == 2:  # a second repeat's folds are splits 3..5
        status.points.append(PointStatus(Point(1e-3, 1), "complete", {f"r1f{i}": rec(0.8) for i in range(3)},
                                         ["r1f0", "r1f1", "r1f2"]))
    ours, theirs = ls.cv_results(status), _grid_search_cv_results(3 * repeats)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        if isinstance(value, np.ndarray):
            assert ours[key].dtype == value.dtype and ours[key].shape == (4,), key
    assert type(ours["params"][0]) is dict and ours["params"][0] == {"e_lambda": 1e-3}
    assert not np.ma.getmaskarray(ours["param_e_lambda"]).any()


def test_cv_results_values():
    """ddof=0 as scikit-learn; a lambda not complete (or diverged) NaN and ranked last, ties
    "min"; the baseline not a candidate."""
    import numpy as np

    cv = ls.cv_results(make_status())
    assert cv["param_e_lambda"].tolist() == [1e-3, 1e-2, 1e-1, 1.0]
    assert cv["split0_test_score"].tolist() == [0.8, 0.9, 0.7, 0.3]
    assert np.isnan(cv["split1_test_score"][2:]).all()  # running; the diverged fold: NaN (error_score=nan)
    assert cv["mean_test_score"][:2].tolist() == pytest.approx([0.85, 0.9], rel=1e-15)
    assert np.isnan(cv["mean_test_score"][2:]).all()
    assert cv["std_test_score"][:2] == pytest.approx([math.sqrt(0.005 / 3), math.sqrt(0.005 / 3)], rel=1e-12)  # ddof=0
    assert cv["rank_test_score"].tolist() == [2, 1, 3, 3]
    assert cv["mean_fit_time"][:2].tolist() == [2.0, 1.5] and cv["std_fit_time"][:2] == pytest.approx([
        math.sqrt(2 / 3), 0.0])
    assert np.isnan(cv["mean_score_time"]).all()  # folds stored before score times were recorded
    status = make_status()
    for r in status.points[1].folds.values():
        r["score_seconds"] = 0.25
    cv = ls.cv_results(status)
    assert cv["mean_score_time"][1] == 0.25 and cv["std_score_time"][1] == 0.0
    tied = make_status()
    tied.points[1].folds = done([0.8, 0.9, 0.85], [1.0, 1.0, 1.0])  # the same folds as 1e-3: tied, "min"
    assert ls.cv_results(tied)["rank_test_score"].tolist() == [1, 1, 3, 3]


def test_results_frame_is_the_cv_results_and_the_baseline_row():
    status = make_status()
    status.points[4] = PointStatus(Point(None), "complete", done([0.5, 0.6, 0.7], [1.0, 1.0, 1.0]), NAMES)
    frame = ls.results_frame(status)
    assert list(frame.columns) == RESULT_COLUMNS and len(frame) == 5
    expected = pd.DataFrame(ls.cv_results(status))
    _same(frame.iloc[:4], expected)
    assert frame["rank_test_score"].dtype == "Int32" and frame["rank_test_score"].tolist() == [2, 1, 3, 3, pd.NA]
    base = frame.iloc[4]
    assert base["params"] == "baseline" and math.isnan(base["param_e_lambda"])
    assert base["mean_test_score"] == pytest.approx(0.6)
    assert base["std_test_score"] == pytest.approx(math.sqrt(0.02 / 3))
    assert len(ls.results_frame(make_status())) == 5  # a pending baseline: its row, all NaN
    no_baseline = make_status()
    no_baseline.points = no_baseline.points[:4]
    assert len(ls.results_frame(no_baseline)) == 4


def test_folds_frame_has_one_row_per_finished_fold():
    frame = ls.folds_frame(make_status())
    assert list(frame.columns) == FOLD_COLUMNS
    assert list(zip(frame["e_lambda"], frame["fold"], frame["status"])) == [
        (1e-3, "r0f0", "completed"), (1e-3, "r0f1", "completed"), (1e-3, "r0f2", "completed"),
        (1e-2, "r0f0", "completed"), (1e-2, "r0f1", "completed"), (1e-2, "r0f2", "completed"),
        (1e-1, "r0f0", "completed"), (1.0, "r0f0", "completed"), (1.0, "r0f1", "diverged")]
    assert frame["val_accuracy"].tolist()[:8] == [0.8, 0.9, 0.85, 0.9, 0.95, 0.85, 0.7, 0.3]
    assert math.isnan(frame["val_accuracy"][8])
    assert (frame["numerics"] == CPU_LABEL).all() and not frame["baseline"].any()
    for column, dtype in [("e_lambda", "float64"), ("repeat", "int64"), ("val_accuracy", "float64"),
                          ("seconds", "float64"), ("iterations", "int64"), ("seed", "int64"), ("baseline", bool)]:
        assert frame[column].dtype == dtype, column


def test_folds_frame_of_a_study_with_nothing_finished_has_its_columns():
    status = make_status()
    status.points = [PointStatus(Point(1e-3), "pending", {}, NAMES)]
    frame = ls.folds_frame(status)
    assert list(frame.columns) == FOLD_COLUMNS and frame.empty


# ---------------------------------------------------------------- texts and files


def _same(read: pd.DataFrame, frame: pd.DataFrame, rel=1e-15):
    """Equal values, column by column (NaN, None and <NA> alike; numbers as floats to
    ``rel``)."""
    assert list(read.columns) == list(frame.columns)
    for c in frame.columns:
        a, b = read[c].tolist(), frame[c].tolist()
        assert len(a) == len(b)
        for x, y in zip(a, b):
            if pd.isna(y):
                assert pd.isna(x), (c, x, y)
            elif isinstance(y, (str, dict)):
                assert x == y or x == str(y), (c, x, y)  # a dict in CSV: its repr
            else:
                assert float(x) == pytest.approx(float(y), rel=rel, abs=0), (c, x, y)


@pytest.mark.parametrize("folds", [False, True])
def test_csv_text_round_trips(folds):
    status = make_status()
    frame = ls.folds_frame(status) if folds else ls.results_frame(status)
    text = _report.table_text(status, folds=folds, fmt="csv")
    assert text.splitlines()[0] == ",".join(frame.columns)
    _same(pd.read_csv(io.StringIO(text)), frame)  # exactly: CSV writes the shortest exact form


def test_csv_text_keeps_close_lambdas_apart():
    status = make_status()
    status.points[1].point = Point(1.0000000000000002e-3)
    read = pd.read_csv(io.StringIO(_report.table_text(status)))
    assert read["param_e_lambda"].tolist()[:2] == [1e-3, 1.0000000000000002e-3]


@pytest.mark.parametrize("folds", [False, True])
def test_json_text_round_trips(folds):
    status = make_status()
    frame = ls.folds_frame(status) if folds else ls.results_frame(status)
    text = _report.table_text(status, folds=folds, fmt="json")
    records = json.loads(text)
    assert isinstance(records, list) and len(records) == len(frame)
    assert all(list(r) == list(frame.columns) for r in records)
    if not folds:  # missing values are null, never NaN (which JSON has not)
        assert records[4]["param_e_lambda"] is None and records[4]["rank_test_score"] is None
        assert records[0]["rank_test_score"] == 2 and records[4]["params"] == "baseline"
        assert records[1]["params"] == {"e_lambda": 0.01}
    _same(pd.DataFrame.from_records(records, columns=list(frame.columns)), frame, rel=1e-9)


def test_json_text_keeps_every_float_exactly():
    status = make_status()
    status.points[1].point = Point(1.0000000000000002e-3)  # one float step above the first point's lambda
    records = json.loads(_report.table_text(status, fmt="json"))
    assert [r["param_e_lambda"] for r in records[:2]] == [1e-3, 1.0000000000000002e-3]
    assert records[1]["std_fit_time"] == ls.results_frame(status)["std_fit_time"][1] == 0.0
    assert records[0]["std_test_score"] == ls.cv_results(status)["std_test_score"][0]


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_export_tables_writes_both_tables(tmp_path, ext):
    status = make_status()
    paths = ls.export_tables(status, tmp_path / f"out.{ext}")
    assert paths == [tmp_path / f"out.{ext}", tmp_path / f"out.folds.{ext}"]
    assert paths[0].read_text() == _report.table_text(status, False, ext)
    assert paths[1].read_text() == _report.table_text(status, True, ext)
    only = ls.export_tables(status, tmp_path / f"only.{ext}", folds_only=True, fmt=ext)
    assert only == [tmp_path / f"only.{ext}"] and only[0].read_text() == _report.table_text(status, True, ext)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"out.{ext}", f"out.folds.{ext}", f"only.{ext}"])


def test_export_tables_reads_the_format_from_the_extension(tmp_path):
    status = make_status()
    ls.export_tables(status, tmp_path / "UPPER.CSV")
    _same(pd.read_csv(tmp_path / "UPPER.CSV"), ls.results_frame(status))
    _same(pd.read_csv(tmp_path / "UPPER.folds.CSV"), ls.folds_frame(status))


@pytest.mark.parametrize("name, fmt, want", [("out.txt", None, ".csv or .json"), ("out", None, ".csv or .json"),
                                             ("out.csv", "json", ".json"), ("out.json", "csv", ".csv"),
                                             ("out.xlsx", "csv", ".csv")])
def test_export_tables_refuses_another_extension(tmp_path, name, fmt, want):
    path = tmp_path / name
    with pytest.raises(ConfigError) as info:
        ls.export_tables(make_status(), path, fmt=fmt)
    assert str(info.value) == f"export writes {want} files (or - for standard output), got -o {str(path)!r}"
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------- the studies of a storage


def test_format_studies():
    assert _report.format_studies([], "sqlite:///x.db") == "no studies in sqlite:///x.db"
    studies = [{"study": "a", "lambda_search": True, "finished": True, "complete": 5, "total": 5,
                "companions": ["a-baseline"]},
               {"study": "other", "lambda_search": False, "trials": 12, "companions": []},
               {"study": "b", "lambda_search": True, "finished": False, "complete": 1, "total": 10, "companions": []}]
    assert _report.format_studies(studies, "postgresql://u:***@h/db") == "\n".join([
        "studies in postgresql://u:***@h/db:",
        "study         points                state",
        "a             5/5 points complete   finished",
        "  a-baseline  companion",
        "other         12 trials             not a lambda_search study",
        "b             1/10 points complete  not finished",
    ])
