"""Lambda labels: the shortest exact form, so that distinct lambdas never share a label
(``.0e`` showed 1e-3 and 1.2e-3 both as "1e-03"), in the tables, the logs and the plot."""

import numpy as np
import pytest

import lambda_search as ls
from lambda_search import configfile as _configfile
from lambda_search import points as _points
from lambda_search.store.status import PointStatus

CLOSE = [1e-3, 1.2e-3, 1.5e-3]


@pytest.mark.parametrize("value, text", [(1e-3, "1e-03"), (1.2e-3, "1.2e-03"), (1.5e-3, "1.5e-03"), (0.1, "1e-01"),
                                         (3e-05, "3e-05"), (1e-12, "1e-12"), (10.0, "1e+01"), (2.5, "2.5e+00"),
                                         (1.2345678901234567e-4, "1.2345678901234567e-04")])
def test_format_lambda_examples(value, text):
    assert ls.format_lambda(value) == text
    assert float(ls.format_lambda(value)) == value


def test_format_lambda_round_trips_and_is_shortest():
    rng = np.random.default_rng(14)
    for value in 10.0 ** rng.uniform(-12, 1, size=400):
        value = float(value)
        text = ls.format_lambda(value)
        assert float(text) == value, text
        digits = len(text.split("e")[0].replace(".", "")) - 1
        assert digits == 0 or float(f"{value:.{digits - 1}e}") != value, text  # one digit fewer is not exact
        exponent = text.split("e")[1]
        assert exponent[0] in "+-" and len(exponent) >= 3


def _status(lambdas):
    """A hand-made, finished study of ``lambdas``, 3 folds each, no training."""
    config = _configfile.resolve_config({"search": {"lambdas": lambdas, "baseline": False},
                                "data": {"dataset": "cifar100", "folds": 3}, "train": {"iterations": 10}},
                               name="close")
    names = ["r0f0", "r0f1", "r0f2"]
    points = []
    for i, e_lambda in enumerate(lambdas):
        accs = [0.90 + 0.01 * i, 0.91 + 0.01 * i, 0.92 + 0.01 * i]
        folds = {n: {"status": "completed", "val_accuracy": a, "seconds": 1.0} for n, a in zip(names, accs)}
        p = PointStatus(_points.Point(e_lambda, 0), "complete", folds, names)
        p.mean, p.std = sum(accs) / 3, 0.01
        points.append(p)
    return ls.StudyStatus("close", config, points, "sqlite:///close.db")


def test_point_labels_are_distinct():
    assert [_points.Point(v).label() for v in CLOSE] == ["lambda=1e-03", "lambda=1.2e-03", "lambda=1.5e-03"]
    assert _points.Point(1.2e-3, 2).label() == "lambda=1.2e-03 repeat 2"
    assert _points.Point(None).label() == "baseline (no SimAM)"


def test_status_table_shows_distinct_labels():
    lines = ls.status_table(_status(CLOSE)).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["1e-03", "1.2e-03", "1.5e-03"]
    starts = {line.index("complete") for line in lines[1:4]}
    assert starts == {lines[0].index("state")}  # the column stays aligned


def test_format_selection_shows_distinct_labels_aligned():
    text = ls.format_selection(ls.select(_status(CLOSE)))
    assert "best mean:        lambda = 1.5e-03  " in text  # the largest mean
    assert "one-SE rule:      lambda = 1.5e-03  " in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("lambda "))
    rows = lines[head + 1 : head + 4]
    assert [row.split()[0] for row in rows] == ["1e-03", "1.2e-03", "1.5e-03"]
    assert {row.index("complete") for row in rows} == {lines[head].index("state")}
    assert {row.index(row.split()[2]) + len(row.split()[2]) for row in rows} == {lines[head].index("mean %") + 6}


def test_figure4_tick_labels_exact_and_slanted_when_close():
    data = ls.figure4_data(_status(CLOSE))
    assert data["tick_labels"] == ["1e-03", "1.2e-03", "1.5e-03"]
    assert data["crowded_ticks"] is True
    spread = ls.figure4_data(_status([1e-6, 1e-4, 1e-3, 1e-2, 1e-1]))
    assert spread["tick_labels"] == ["1e-06", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert spread["crowded_ticks"] is False
    many = ls.figure4_data(_status([10.0 ** -k for k in range(12, 2, -1)]))  # 10 ticks, a decade apart
    assert many["crowded_ticks"] is True


def test_figure4_draws_close_lambdas(tmp_path):
    path = ls.plot_figure4(_status(CLOSE), tmp_path / "close.svg")
    svg = path.read_text()
    assert svg.startswith("<?xml")
