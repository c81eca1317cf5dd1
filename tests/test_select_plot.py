"""The answer: statistics, the one-SE choice, the t-test and the plot data, against values
computed by hand; the drawing; the CLI; the notebook run top to bottom."""

import json
import math
import os
from pathlib import Path

import pytest

import lambda_search as ls
from lambda_search import _config, _objective, _select
from lambda_search._status import PointStatus
from lambda_search.cli import main

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "figure4.ipynb"


def _status(baseline=True):
    """A hand-made study: 3 folds; 1e-6 diverged, 1e-4 interrupted after one fold."""
    config = _config.resolve_config({"search": {"lambdas": [1e-6, 1e-4, 1e-3, 1e-2, 1e-1], "baseline": baseline},
                                "data": {"dataset": "cifar100", "folds": 3}, "train": {"iterations": 10}},
                               name="hand")
    names = ["r0f0", "r0f1", "r0f2"]

    def point(e_lambda, state, accs, reason=None):
        folds = {n: {"status": "completed", "val_accuracy": a, "seconds": 1.0} for n, a in zip(names, accs)}
        p = PointStatus(_objective.Point(e_lambda, 0), state, folds, names, reason=reason)
        if state == "complete":
            p.mean = sum(accs) / len(accs)
        return p

    points = [point(1e-6, "diverged", [], reason="diverged: at step 3 of fold r0f0"),
              point(1e-4, "interrupted", [0.95]),
              point(1e-3, "complete", [0.90, 0.92, 0.94]),
              point(1e-2, "complete", [0.91, 0.915, 0.93]),
              point(1e-1, "complete", [0.80, 0.85, 0.90])]
    if baseline:
        points.append(point(None, "complete", [0.89, 0.90, 0.88]))
    return ls.StudyStatus("hand", config, points, "sqlite:///hand.db")


def test_lambda_stats_by_hand():
    stats = {s.e_lambda: s for s in _select.lambda_stats(_status())}
    s = stats[1e-3]
    assert s.state == "complete" and s.mean == pytest.approx(0.92)
    assert s.std == pytest.approx(0.02) and s.sem == pytest.approx(0.02 / math.sqrt(3))
    assert stats[1e-4].state == "running" and stats[1e-4].mean == 0.95 and stats[1e-4].std is None
    assert stats[1e-6].state == "diverged" and stats[1e-6].mean is None
    assert stats[None].mean == pytest.approx(0.89) and stats[None].std == pytest.approx(0.01)


def test_corrected_t_test_by_hand():
    a = {"f0": 0.91, "f1": 0.915, "f2": 0.93, "only_a": 0.5}
    b = {"f0": 0.90, "f1": 0.92, "f2": 0.94}
    test = ls.corrected_t_test(a, b, ratio=0.5)
    # d = (+0.01, -0.005, -0.01): mean -1/600, var (ddof=1) = 1.0833e-4, t = mean / sqrt((1/3 + 1/2) var)
    t = (-1 / 600) / math.sqrt((1 / 3 + 1 / 2) * 1.0833333333e-4)
    assert test["folds"] == 3 and test["diff"] == pytest.approx(-1 / 600)
    assert test["t"] == pytest.approx(t, rel=1e-6) and test["t"] == pytest.approx(-0.175412, rel=1e-5)
    assert test["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # df = 2, in closed form
    same = ls.corrected_t_test(b, b, ratio=0.5)
    assert (same["diff"], same["t"], same["p"]) == (0.0, 0.0, 1.0)
    assert ls.corrected_t_test({"f0": 1.0}, {"f0": 0.5}, 0.5)["p"] is None  # one fold: no test


def test_select_best_and_one_standard_error_rule():
    sel = ls.select(_status())
    assert sel["best"]["e_lambda"] == 1e-3 and sel["best"]["mean"] == pytest.approx(0.92)
    # threshold = 0.92 - 0.02/sqrt(3) = 0.90845: 1e-3 and 1e-2 (0.91833) qualify, 1e-1 (0.85) does not
    assert sel["one_se"]["threshold"] == pytest.approx(0.92 - 0.02 / math.sqrt(3))
    assert sel["one_se"]["candidates"] == [1e-3, 1e-2]
    assert sel["one_se"]["e_lambda"] == 1e-2
    assert ls.select(_status(), prefer="smaller")["one_se"]["e_lambda"] == 1e-3
    assert sel["test_train_ratio"] == 0.5 and sel["complete"] == 3 and sel["lambdas"] == 5
    rows = {c["e_lambda"]: c for c in sel["comparisons"]}
    assert rows[1e-2]["vs_best"]["t"] == pytest.approx(-0.175412, rel=1e-5)
    assert rows[1e-3]["vs_best"]["p"] == 1.0
    assert rows[1e-1]["vs_baseline"]["diff"] == pytest.approx(0.85 - 0.89)
    assert rows[1e-4]["vs_best"]["folds"] == 1 and rows[1e-6]["vs_best"] is None
    assert "diverged" in rows[1e-6]["reason"]
    text = ls.format_selection(sel)
    assert "one-SE rule:      lambda = 1e-02" in text and "largest lambda" in text
    assert "only 3 of 5 lambdas are complete" in text
    with pytest.raises(ls.ConfigError, match="prefer must be 'larger' or 'smaller', got prefer='simpler'"):
        ls.select(_status(), prefer="simpler")


def test_figure4_data_by_hand():
    data = ls.figure4_data(_status())
    assert data["title"] == "Cross-validation accuracy on CIFAR-100, ResNet-20"
    assert [p["e_lambda"] for p in data["points"]] == [1e-6, 1e-4, 1e-3, 1e-2, 1e-1]
    p = {p["e_lambda"]: p for p in data["points"]}
    assert p[1e-3]["mean"] == pytest.approx(92.0) and p[1e-3]["std"] == pytest.approx(2.0)
    assert p[1e-3]["folds"] == pytest.approx([90.0, 92.0, 94.0]) and p[1e-3]["state"] == "complete"
    assert (p[1e-4]["state"], p[1e-4]["folds_done"], p[1e-4]["n_folds"]) == ("running", 1, 3)
    assert p[1e-6]["state"] == "diverged" and p[1e-6]["mean"] is None
    assert data["baseline"]["mean"] == pytest.approx(89.0) and data["baseline"]["std"] == pytest.approx(1.0)
    assert (data["chosen"], data["best"], data["finished"]) == (1e-2, 1e-3, False)
    assert data["bar_label"] == "mean +- std over 3 folds (ddof=1)"
    assert ls.figure4_data(_status(baseline=False))["baseline"] is None


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_drawing_by_extension(tmp_path, suffix, magic):
    path = ls.plot_figure4(_status(), tmp_path / f"fig{suffix}")
    assert path.read_bytes().startswith(magic)


def test_drawing_refuses_other_formats(tmp_path):
    with pytest.raises(ls.ConfigError, match=r"must end in .png, .svg or .pdf, got '.*fig.jpg'"):
        ls.plot_figure4(_status(), tmp_path / "fig.jpg")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from conftest import write_config

    folder = tmp_path_factory.mktemp("study")
    path = write_config(folder, name="tiny", lambdas="[1e-4, 1e-2, 1e-1]", baseline="true")
    assert main(["search", str(path)]) == 0
    return f"sqlite:///{folder / 'tiny.db'}", folder


def test_search_ends_with_the_plot_and_the_selection(tiny_study, capsys):
    url, folder = tiny_study
    assert (folder / "tiny.png").read_bytes().startswith(b"\x89PNG")
    assert main(["search", str(folder / "tiny.toml")]) == 0
    out = capsys.readouterr().out
    assert "one-SE rule:" in out and f"Figure 4: {folder / 'tiny.png'}" in out


def test_select_and_plot_commands(tiny_study, tmp_path, capsys):
    url, _ = tiny_study
    assert main(["select", "--storage", url, "--study", "tiny", "--json"]) == 0
    sel = json.loads(capsys.readouterr().out)
    assert set(sel["best"]) >= {"e_lambda", "mean", "std"} and set(sel["one_se"]) >= {"e_lambda", "mean", "std"}
    assert [c["e_lambda"] for c in sel["comparisons"]] == [1e-4, 1e-2, 1e-1]
    assert all(c["vs_baseline"]["folds"] == 2 for c in sel["comparisons"])
    assert main(["plot", "--storage", url, "--study", "tiny", "-o", str(tmp_path / "f.svg")]) == 0
    assert (tmp_path / "f.svg").exists()
    capsys.readouterr()
    assert main(["plot", "--storage", url, "--study", "tiny", "-o", str(tmp_path / "f.gif")]) == 2
    assert main(["plot", "--storage", url, "--study", "tiny", "-o", str(tmp_path / "no" / "f.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "got" in err[0] and "cannot write the plot" in err[1]


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tiny_study):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    url, folder = tiny_study
    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["LAMBDA_SEARCH_STORAGE"], os.environ["LAMBDA_SEARCH_STUDY"] = url, "tiny"
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}}).execute()
    finally:
        del os.environ["LAMBDA_SEARCH_STORAGE"], os.environ["LAMBDA_SEARCH_STUDY"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 of 4 points complete" in text  # 3 lambdas and the baseline
    assert "one-SE rule:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("param_e_lambda" in o.get("data", {}).get("text/plain", "") for o in outputs)
