"""The answer: statistics, the one-SE choice, the t-test and the plot data, against values
computed by hand; the drawing; the CLI; the notebook run top to bottom."""

import json
import math
import os
import statistics
from pathlib import Path

import pytest

import lambda_search as ls
from lambda_search import configfile as _configfile
from lambda_search import points as _points
from lambda_search.cli import main
from lambda_search.report import select as _select
from lambda_search.store.status import PointStatus

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "figure4.ipynb"


def _status(baseline=True):
    """A hand-made study: 3 folds; 1e-6 diverged, 1e-4 interrupted after one fold."""
    config = _configfile.resolve_config({"search": {"lambdas": [1e-6, 1e-4, 1e-3, 1e-2, 1e-1], "baseline": baseline},
                                "data": {"dataset": "cifar100", "folds": 3}, "train": {"iterations": 10}},
                               name="hand")
    names = ["r0f0", "r0f1", "r0f2"]

    def point(e_lambda, state, accs, reason=None):
        folds = {n: {"status": "completed", "val_accuracy": a, "seconds": 1.0} for n, a in zip(names, accs)}
        p = PointStatus(_points.Point(e_lambda, 0), state, folds, names, reason=reason)
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
    assert stats[1e-4].state == "interrupted" and stats[1e-4].mean == 0.95 and stats[1e-4].std is None
    assert stats[1e-6].state == "diverged" and stats[1e-6].mean is None
    assert stats[None].mean == pytest.approx(0.89) and stats[None].std == pytest.approx(0.01)


def test_corrected_t_test_by_hand():
    a = {"f0": 0.91, "f1": 0.915, "f2": 0.93, "only_a": 0.5}
    b = {"f0": 0.90, "f1": 0.92, "f2": 0.94}
    test = _select.corrected_t_test(a, b, ratio=0.5)
    # d = (+0.01, -0.005, -0.01): mean -1/600, var (ddof=1) = 1.0833e-4, t = mean / sqrt((1/3 + 1/2) var)
    t = (-1 / 600) / math.sqrt((1 / 3 + 1 / 2) * 1.0833333333e-4)
    assert test["folds"] == 3 and test["diff"] == pytest.approx(-1 / 600)
    assert test["t"] == pytest.approx(t, rel=1e-6) and test["t"] == pytest.approx(-0.175412, rel=1e-5)
    assert test["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # df = 2, in closed form
    same = _select.corrected_t_test(b, b, ratio=0.5)
    assert (same["diff"], same["t"], same["p"]) == (0.0, None, None)  # no p of 1 made up
    assert same["reason"] == "same accuracy on every fold (3 folds): the corrected test is undefined"
    one = _select.corrected_t_test({"f0": 1.0}, {"f0": 0.5}, 0.5)
    assert one["p"] is None and one["reason"] == "one shared fold: no test"


def test_a_difference_with_zero_variance_has_no_p():
    """One image better on every fold (var(d) = 0) is not certainty (p = 0): the test is
    undefined, said so, while 2, 1, 1 images better gives an ordinary p."""
    n = 599  # validation images per fold
    base = {f"r0f{i}": (500 + i) / n for i in range(3)}
    one_image = {k: v + 1 / n for k, v in base.items()}
    test = _select.corrected_t_test(one_image, base, ratio=0.5)
    assert test["diff"] == pytest.approx(1 / n) and (test["t"], test["p"]) == (None, None)
    assert test["reason"] == "same difference on every fold (3 folds): the corrected test is undefined"
    more = {k: v + d / n for (k, v), d in zip(base.items(), (2, 1, 1))}
    d = [2 / n, 1 / n, 1 / n]
    mean = sum(d) / 3
    t = mean / math.sqrt((1 / 3 + 0.5) * sum((x - mean) ** 2 for x in d) / 2)
    assert _select.corrected_t_test(more, base, 0.5)["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)


def test_the_same_difference_through_float_rounding_is_still_undefined():
    """Accuracies are counts / images: +17 images of 10,000 on every fold subtracts, in floats,
    to differences that differ in the last bits; still the same difference, no p of ~0."""
    base = {f"r0f{i}": c / 10000 for i, c in enumerate((9571, 9632, 9583, 9710, 9655))}
    better = {k: (round(v * 10000) + 17) / 10000 for k, v in base.items()}
    assert len({better[k] - base[k] for k in base}) > 1  # the rounding noise is there
    test = _select.corrected_t_test(better, base, 0.25)
    assert (test["t"], test["p"]) == (None, None) and test["diff"] == pytest.approx(0.0017)
    assert test["reason"] == "same difference on every fold (5 folds): the corrected test is undefined"
    same = _select.corrected_t_test({k: v + 0.0 for k, v in base.items()}, base, 0.25)
    assert same["reason"].startswith("same accuracy on every fold")


def test_no_verdict_against_a_baseline_that_is_not_complete():
    status = _status()
    names = ["r0f0", "r0f1", "r0f2"]
    status.points[-1] = PointStatus(_points.Point(None, 0), "interrupted",
                                    {"r0f0": {"status": "completed", "val_accuracy": 0.5}}, names)
    v = ls.select(status)["verdict"]
    assert v["verdict"] is None and v["baseline_within_one_se"] is None
    assert v["reason"] == "the baseline is interrupted (1 of 3 folds): no verdict until it is complete"
    assert "verdict: none (the baseline is interrupted (1 of 3 folds)" in ls.format_selection(ls.select(status))
    assert ls.figure4_data(status)["verdict"] is None


def _tied_status(prefer_sems=(0.004, 0.002)):
    """1e-5 and 1e-3 tie at the best mean, with different spreads; 1e-1 a little below."""
    config = _configfile.resolve_config({"search": {"lambdas": [1e-5, 1e-3, 1e-1], "baseline": True},
                                     "data": {"dataset": "digits", "folds": 3}, "train": {"iterations": 10}},
                                    name="tied")
    names = ["r0f0", "r0f1", "r0f2"]

    def point(e_lambda, accs):
        folds = {n: {"status": "completed", "val_accuracy": a, "seconds": 1.0} for n, a in zip(names, accs)}
        return PointStatus(_points.Point(e_lambda, 0), "complete", folds, names)

    points = [point(1e-5, [0.97, 0.98, 0.99]), point(1e-3, [0.975, 0.98, 0.985]), point(1e-1, [0.974, 0.975, 0.976]),
              point(None, [0.965, 0.969, 0.973])]
    return ls.StudyStatus("tied", config, points, "sqlite:///tied.db")


def test_ties_at_the_best_mean_are_taken_at_the_preferred_end():
    """glmnet's getOptcv.glmnet: of the lambdas tied at the best mean, the one at the
    preferred end is the best, and its own standard error sets the threshold."""
    status = _tied_status()
    large = ls.select(status, prefer="larger")
    sem_3 = 0.005 / math.sqrt(3)  # std of (0.975, 0.98, 0.985) is 0.005
    assert large["best"]["e_lambda"] == 1e-3 and large["best"]["tied"] == [1e-5, 1e-3]
    assert large["one_se"]["threshold"] == pytest.approx(0.98 - sem_3)  # 0.97711: 1e-1 (0.975) is out
    assert large["one_se"]["e_lambda"] == 1e-3 and large["one_se"]["candidates"] == [1e-5, 1e-3]
    small = ls.select(status, prefer="smaller")
    sem_5 = 0.01 / math.sqrt(3)  # std of (0.97, 0.98, 0.99) is 0.01
    assert small["best"]["e_lambda"] == 1e-5 and small["best"]["tied"] == [1e-5, 1e-3]
    assert small["one_se"]["threshold"] == pytest.approx(0.98 - sem_5)  # 0.97423: 1e-1 (0.975) is in
    assert small["one_se"]["candidates"] == [1e-5, 1e-3, 1e-1] and small["one_se"]["e_lambda"] == 1e-5
    text = ls.format_selection(large)
    assert "best mean:        lambda = 1e-03" in text and "(tied with 1e-05: the largest of them, as glmnet)" in text
    assert "tied with 1e-03: the smallest of them" in ls.format_selection(small)


def test_the_verdict_against_the_baseline():
    # chosen 1e-2 (0.91, 0.915, 0.93) vs baseline (0.89, 0.90, 0.88): d = (0.02, 0.015, 0.05)
    sel = ls.select(_status())
    d = [0.02, 0.015, 0.05]
    mean = sum(d) / 3
    t = mean / math.sqrt((1 / 3 + 0.5) * sum((x - mean) ** 2 for x in d) / 2)
    p = 1 - abs(t) / math.sqrt(2 + t * t)
    v = sel["verdict"]
    assert v["e_lambda"] == 1e-2 and v["diff"] == pytest.approx(mean) and v["p"] == pytest.approx(p, rel=1e-9)
    assert v["verdict"] == ("helps" if p < 0.05 else "no difference") and v["folds"] == 3 and v["alpha"] == 0.05
    assert v["baseline_within_one_se"] is False  # 0.89 < 0.90845
    line = next(x for x in ls.format_selection(sel).splitlines() if x.startswith("verdict:"))
    assert line == (f"verdict: no difference shown at these folds: lambda = 1e-02 vs the baseline +{100 * mean:.2f} pp "
                    f"(p = {p:.3f}, 3 folds, alpha 0.05); the baseline is not within one SE of the best mean")
    # the tied study: 1e-3 (0.975, 0.98, 0.985) vs baseline (0.965, 0.969, 0.973): d = (0.010, 0.011, 0.012)
    v = ls.select(_tied_status())["verdict"]
    d = [0.010, 0.011, 0.012]
    t = 0.011 / math.sqrt((1 / 3 + 0.5) * sum((x - 0.011) ** 2 for x in d) / 2)
    assert v["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9) and v["p"] < 0.05
    assert v["verdict"] == "helps" and v["baseline_within_one_se"] is False
    hurt = _tied_status()
    hurt.points[-1] = PointStatus(_points.Point(None, 0), "complete",
                                  {n: {"status": "completed", "val_accuracy": a} for n, a in
                                   zip(["r0f0", "r0f1", "r0f2"], [0.986, 0.992, 0.998])}, ["r0f0", "r0f1", "r0f2"])
    v = ls.select(hurt)["verdict"]
    assert v["verdict"] == "hurts" and v["baseline_within_one_se"] is True
    text = ls.format_selection(ls.select(hurt))
    assert text.count("verdict: SimAM hurts: lambda = 1e-03 trails the baseline by -1.20 pp (p = ") == 1
    assert ls.select(_status(baseline=False))["verdict"]["verdict"] is None


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
    assert rows[1e-3]["vs_best"]["p"] is None and "same accuracy on every fold" in rows[1e-3]["vs_best"]["reason"]
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
    assert (p[1e-4]["state"], p[1e-4]["folds_done"], p[1e-4]["n_folds"]) == ("interrupted", 1, 3)
    assert p[1e-6]["state"] == "diverged" and p[1e-6]["mean"] is None
    assert data["baseline"]["mean"] == pytest.approx(89.0) and data["baseline"]["std"] == pytest.approx(1.0)
    assert (data["chosen"], data["best"], data["finished"]) == (1e-2, 1e-3, False)
    assert data["bar_label"] == "mean +- std over 3 folds (ddof=1)"
    assert ls.figure4_data(_status(baseline=False))["baseline"] is None
    assert data["verdict"].startswith("no difference shown: +2.83 pp vs no SimAM (p = 0.")
    assert data["verdict"].endswith(", 3 folds)")
    assert ls.figure4_data(_tied_status())["verdict"].startswith("SimAM helps: +1.10 pp vs no SimAM (p = 0.0")
    assert ls.figure4_data(_status(baseline=False))["verdict"] is None


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


def test_optuna_sees_the_metric_and_the_choice(tiny_study, capsys):
    """Optuna's own tools name the value val_accuracy (the dashboard, trials_dataframe), and a
    finished search leaves its choice and verdict in the study's user attributes."""
    import optuna

    url, _ = tiny_study
    study = optuna.load_study(study_name="tiny", storage=url)
    assert study.metric_names == ["val_accuracy"]
    assert optuna.load_study(study_name="tiny:baseline", storage=url).metric_names == ["val_accuracy"]
    assert "value_val_accuracy" in study.trials_dataframe(multi_index=False).columns
    assert main(["select", "--storage", url, "--study", "tiny", "--json"]) == 0
    sel = json.loads(capsys.readouterr().out)
    chosen = study.user_attrs["lambda_search:chosen"]
    assert chosen["e_lambda"] == sel["one_se"]["e_lambda"] and chosen["best_e_lambda"] == sel["best"]["e_lambda"]
    assert (chosen["rule"], chosen["prefer"]) == ("one-SE", "larger")
    assert chosen["verdict"] == sel["verdict"]["verdict"] and chosen["p_vs_baseline"] == sel["verdict"]["p"]
    assert main(["select", "--storage", url, "--study", "tiny"]) == 0
    verdicts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict: ")]
    assert len(verdicts) == 1 and "the baseline is" in verdicts[0] and "one SE of the best mean" in verdicts[0]


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


def _hand(lambdas_folds: dict, repeats: int = 1, folds: int = 3, holdout=None):
    """A hand-made study of complete points: {lambda (None: the baseline): accuracies}."""
    data = {"dataset": "digits", **({"holdout": holdout} if holdout else {"folds": folds})}
    config = _configfile.resolve_config({"search": {"lambdas": [x for x in lambdas_folds if x is not None],
                                                    "baseline": None in lambdas_folds, "repeats": repeats},
                                         "data": data, "train": {"iterations": 10}}, name="hand")
    points = []
    per = 1 if holdout else folds
    for e_lambda, accs in lambdas_folds.items():
        for r in range(repeats):
            names = [f"r{r}f{f}" for f in range(per)]
            own = accs[r * per:(r + 1) * per]
            recs = {n: {"status": "completed", "val_accuracy": a, "seconds": 1.0} for n, a in zip(names, own)}
            points.append(PointStatus(_points.Point(e_lambda, r), "complete", recs, names))
    return ls.StudyStatus("hand", config, points, "sqlite:///hand.db")


def test_the_one_se_threshold_is_not_decided_by_float_rounding():
    """A mean equal to the threshold up to float rounding (1e-15 below it) is within one SE, a
    lambda's and the baseline's alike; 1e-9 below is not."""
    best = [0.97, 0.98, 0.99]
    threshold = 0.98 - _select.lambda_stats(_hand({1e-1: best}))[0].sem
    status = _hand({1e-1: best, 1e-2: [threshold - 1e-15] * 3, 1e-3: [threshold - 1e-9] * 3,
                    None: [threshold - 1e-15] * 3})
    sel = _select.select(status, "smaller")
    assert sel["one_se"]["candidates"] == [1e-2, 1e-1] and sel["one_se"]["e_lambda"] == 1e-2
    assert sel["verdict"]["baseline_within_one_se"] is True
    assert _select.reaches(threshold - 1e-15, threshold) and not _select.reaches(threshold - 1e-9, threshold)


@pytest.mark.parametrize("holdout", [None, 0.1])
def test_the_standard_error_with_repeats_allows_for_their_overlap(holdout):
    """One repeat: std / sqrt(folds), as glmnet; with repeats the folds share training images,
    so the t-test's corrected variance: std * sqrt(1/n + n_test/n_train)."""
    accs = [0.90, 0.92, 0.94, 0.91, 0.95, 0.93]
    ratio = holdout / (1 - holdout) if holdout else 1 / 2  # 3 folds: n_test/n_train = 1/2
    for repeats, n in ((1, 3), (2, 6)) if not holdout else ((3, 3), (6, 6)):
        s = _select.lambda_stats(_hand({1e-3: accs[:n]}, repeats=repeats, holdout=holdout))[0]
        std = statistics.stdev(accs[:n])
        assert s.std == pytest.approx(std)
        if repeats == 1:
            assert s.sem == pytest.approx(std / math.sqrt(n))
        else:
            assert s.sem == pytest.approx(std * math.sqrt(1 / n + ratio))


def test_a_difference_that_rounds_to_zero_is_never_minus_zero():
    from lambda_search.points import signed_pp

    assert [signed_pp(x) for x in (-1e-18, 0.0, -0.00004, 0.01234, -0.0049999)] == [
        "+0.00", "+0.00", "+0.00", "+1.23", "-0.50"]
    status = _hand({1e-1: [0.5, 0.6, 0.7], None: [0.5 + 1e-17, 0.6, 0.7]})
    assert "-0.00" not in _select.format_selection(_select.select(status))
