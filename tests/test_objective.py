"""_objective on its own: the grid and its order, fold names, the summary over folds, lambda
labels, the device check and the refusals of make_plan (exact messages). No training: plans
are made on 8 px synthetic data, and run_point only meets folds that are already done."""

import math
import statistics

import numpy as np
import pytest
import torch

from lambda_search import ConfigError
from lambda_search import configfile as _configfile
from lambda_search.nn.registry import MODEL_NAMES
from lambda_search.points import Point, fold_names, format_lambda, grid_points, summarize
from lambda_search.train import plan as _objective
from lambda_search.train.engine import FoldResult
from lambda_search.train.plan import check_device, make_plan


def config(search=None, data=None, model=None, train=None):
    """A resolved config of 48 synthetic 8 px images, 3 classes, 2 folds (none held out for a
    test unless ``data`` says so)."""
    raw = {"search": {"lambdas": [1e-1, 1e-3], "baseline": True, **(search or {})},
           "data": {"dataset": "synthetic", "folds": 2, "test_fraction": 0,
                    "options": {"num_samples": 48, "num_classes": 3, "image_size": 8}, **(data or {})},
           "model": model or {}, "train": {"epochs": 1, "batch_size": 8, **(train or {})}}
    if "holdout" in (data or {}):
        del raw["data"]["folds"]
    return _configfile.resolve_config(raw, name="objective")


# ---------------------------------------------------------------- the grid


def test_grid_points_go_repeat_by_repeat_in_the_configs_order_with_the_baseline_last():
    c = config(search={"lambdas": [1e-1, 1e-4, 1e-2], "repeats": 2})
    assert grid_points(c) == [Point(1e-1, 0), Point(1e-4, 0), Point(1e-2, 0), Point(None, 0),
                              Point(1e-1, 1), Point(1e-4, 1), Point(1e-2, 1), Point(None, 1)]
    c = config(search={"lambdas": [1e-3, 1e-1], "baseline": False})
    assert grid_points(c) == [Point(1e-3, 0), Point(1e-1, 0)]  # not sorted: as written
    c = config(search={"lambdas": [1e-2], "baseline": True, "repeats": 3})
    assert [p.key for p in grid_points(c)] == ["e_lambda=0.01/repeat=0", "baseline/repeat=0",
                                               "e_lambda=0.01/repeat=1", "baseline/repeat=1",
                                               "e_lambda=0.01/repeat=2", "baseline/repeat=2"]


def test_fold_names_match_the_plans_folds():
    c = config(data={"folds": 3}, search={"repeats": 2})
    assert fold_names(c) == ["r0f0", "r0f1", "r0f2"]
    assert fold_names(c, repeat=1) == ["r1f0", "r1f1", "r1f2"]
    plan = make_plan(c)
    for r in (0, 1):
        assert [f.name for f in plan.folds_of(r)] == fold_names(c, r)
    assert plan.points == grid_points(c)


def test_a_holdout_has_one_fold_per_repeat():
    c = config(data={"holdout": 0.25}, search={"repeats": 2})
    assert fold_names(c) == ["r0f0"] and fold_names(c, 1) == ["r1f0"]
    plan = make_plan(c)
    assert [f.name for f in plan.folds] == ["r0f0", "r1f0"]
    assert [len(f.val) for f in plan.folds] == [12, 12]


def test_a_folds_training_seed_is_the_same_for_every_point(monkeypatch):
    """The seeds the trainings of two lambdas and the baseline get: the same on each fold (so
    points compare fold by fold), one per fold, other ones in another repeat."""
    plan = make_plan(config(search={"repeats": 2}))
    seen = {}

    def train_group(data, group, e_lambda, cfg, *, seeds, **kw):
        seen.setdefault(kw["attention"] + repr(e_lambda) + str(group[0].repeat), []).extend(
            (f.name, s) for f, s in zip(group, seeds))
        return [FoldResult("completed", 0.5, 1.0, 0.1, 1, seed=s) for s in seeds]

    monkeypatch.setattr(_objective, "train_group", train_group)
    for point in (Point(1e-1, 1), Point(1e-3, 1), Point(None, 1), Point(1e-1, 0)):
        assert _objective.run_point(plan, point).status == "completed"
    assert seen["simam0.11"] == seen["simam0.0011"] == seen["noneNone1"]  # every point, fold by fold
    assert [n for n, _ in seen["simam0.11"]] == ["r1f0", "r1f1"] and len({s for _, s in seen["simam0.11"]}) == 2
    assert not {s for _, s in seen["simam0.10"]} & {s for _, s in seen["simam0.11"]}  # another repeat, other seeds


# ---------------------------------------------------------------- the summary over folds


@pytest.mark.parametrize("values", [[0.91, 0.93, 0.92], [0.5, 0.75], [0.1, 0.2, 0.3, 0.4, 0.95],
                                    [0.9] * 4, [0.123456789, 0.987654321, 0.5, 0.25, 0.75, 0.3333]])
def test_summarize_is_the_mean_and_the_sample_std(values):
    s = summarize(values)
    assert set(s) == {"mean", "std", "std_ddof", "sem", "n"}
    assert (s["n"], s["std_ddof"]) == (len(values), 1)
    assert s["mean"] == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert s["mean"] == pytest.approx(float(np.mean(values)), abs=1e-15)
    assert s["std"] == pytest.approx(statistics.stdev(values), abs=1e-15)
    assert s["std"] == pytest.approx(float(np.std(values, ddof=1)), abs=1e-15)
    assert s["std"] != pytest.approx(float(np.std(values, ddof=0))) or s["std"] == 0  # not the population one
    assert s["sem"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), abs=1e-15)


def test_summarize_of_one_value_has_no_spread():
    assert summarize([0.875]) == {"mean": 0.875, "std": None, "std_ddof": 1, "sem": None, "n": 1}


# ---------------------------------------------------------------- points and their labels


@pytest.mark.parametrize("value, text", [(1e-4, "1e-04"), (0.5, "5e-01"), (1.0, "1e+00"), (1e-30, "1e-30"),
                                         (1e100, "1e+100"), (123.0, "1.23e+02"), (-1e-3, "-1e-03"),
                                         (float("inf"), "inf"), (float("nan"), "nan")])
def test_format_lambda(value, text):
    assert format_lambda(value) == text


def test_point_key_slug_label():
    p, b = Point(1e-3), Point(None, 2)
    assert (p.baseline, p.attention, b.baseline, b.attention) == (False, "simam", True, "none")
    assert (p.key, p.slug, p.label()) == ("e_lambda=0.001/repeat=0", "lambda-0.001-r0", "lambda=1e-03")
    assert (b.key, b.slug, b.label()) == ("baseline/repeat=2", "baseline-r2", "baseline (no SimAM) repeat 2")
    assert Point(0.1, 1).label() == "lambda=1e-01 repeat 1"
    close = [Point(1e-3), Point(1.0000000000000002e-3)]  # one float step apart
    assert len({q.key for q in close}) == len({q.slug for q in close}) == len({q.label() for q in close}) == 2
    assert Point(1e-3, 0) == Point(0.001) and len({Point(1e-3), Point(0.001)}) == 1  # frozen: a dict key
    assert "/" not in Point(1e-3).slug and "/" not in b.slug  # a folder name


# ---------------------------------------------------------------- the device check


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_check_device_takes_the_cpu(device):
    check_device(device)


@pytest.mark.parametrize("device", ["mps", "meta", "gpu", "", "cuda:x", None, "cpu:1"])
def test_check_device_refuses_what_cannot_train(device):
    with pytest.raises(ConfigError) as info:
        check_device(device)
    assert str(info.value) == f"train.device must be 'cpu', 'cuda' or 'cuda:N', got train.device={device!r}"


def test_check_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as info:
            check_device(device)
        assert str(info.value) == (f"train.device={device!r} asks for a GPU, but none is available here; "
                                   "use --set train.device=cpu (or --device cpu for a worker)")


@pytest.mark.parametrize("count, device, message", [
    (2, "cuda:2", "train.device='cuda:2': this machine has 2 GPUs, cuda:0 to cuda:1"),
    (1, "cuda:1", "train.device='cuda:1': this machine has 1 GPU, cuda:0 to cuda:0"),
    (2, "cuda:1", None), (1, "cuda", None), (1, "cuda:0", None),
])
def test_check_device_counts_the_gpus(monkeypatch, count, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if message is None:
        check_device(device)
    else:
        with pytest.raises(ConfigError) as info:
            check_device(device)
        assert str(info.value) == message


# ---------------------------------------------------------------- make_plan's refusals


def _refused(c, device=None) -> str:
    with pytest.raises(ConfigError) as info:
        make_plan(c, device)
    return str(info.value)


def test_make_plan_refuses_an_unknown_model():
    c = config()
    c = c.replace("model", name="vgg16")  # the config layer checks only that it is a string
    assert _refused(c) == (f"model.name must be one of {', '.join(MODEL_NAMES)}, or a network of your own as "
                           "'module:function', got model.name='vgg16'")
    assert "resnet20" in MODEL_NAMES


def test_make_plan_refuses_a_batch_above_the_smallest_fold():
    assert _refused(config(train={"batch_size": 25})) == ("train.batch_size must be <= the smallest fold's 24 "
                                                          "training images, got train.batch_size=25")
    assert _refused(config(data={"folds": 3}, train={"batch_size": 33})) == (
        "train.batch_size must be <= the smallest fold's 32 training images, got train.batch_size=33")
    assert make_plan(config(train={"batch_size": 24})).train.batch_size == 24  # equal is fine


def test_make_plan_refuses_other_values_by_their_key():
    assert _refused(config(model={"name": "resnet18"})) == ("model.name='resnet18' needs images of at least 33 px, "
                                                            "the data set has 8 px")
    assert _refused(config(data={"folds": 30})) == ("data: data.folds must be <= the smallest class count (16), "
                                                    "got data.folds=30")
    assert _refused(config(data={"dataset": "nope"})).startswith("data: unknown data set name='nope'; valid names: ")
    assert _refused(config(), device="mps") == ("train.device must be 'cpu', 'cuda' or 'cuda:N', "
                                                "got train.device='mps'")
    assert _refused(config(data={"holdout": 0.999})).endswith("(data.holdout)")


# ---------------------------------------------------------------- run_point on folds already done


def _record(acc, status="completed", step=None):
    return {"status": status, "val_accuracy": acc, "val_loss": 1.0, "seconds": 0.5, "iterations": 3, "seed": 1,
            "diverged_at_step": step, "resumed_from_iteration": None, "numerics": None}


def test_run_point_summarizes_folds_already_done_without_training(monkeypatch):
    plan = make_plan(config())
    # an engine that cannot train: any training (or numerics of one) would fail on it
    monkeypatch.setattr(_objective, "engine_for", lambda *a, **k: object())
    done = {"r0f0": _record(0.5), "r0f1": _record(0.75)}
    out = _objective.run_point(plan, Point(1e-3), done, pack=2)
    assert out.status == "completed" and out.reason is None
    assert out.folds == done and out.folds is not done  # a copy
    assert out.summary == summarize([0.5, 0.75])


def test_run_point_stops_at_a_diverged_fold(monkeypatch):
    plan = make_plan(config())
    monkeypatch.setattr(_objective, "engine_for", lambda *a, **k: pytest.fail("no engine for a diverged point"))
    done = {"r0f0": _record(0.5), "r0f1": _record(None, "diverged", step=7)}
    out = _objective.run_point(plan, Point(1e-1), done)
    assert (out.status, out.summary) == ("diverged", None)
    assert out.reason == "diverged: the training loss became NaN or infinite at step 7 of fold r0f1"


# ---------------------------------------------------------------- checkpoint folders


def test_own_checkpoints_sets_another_runs_folder_aside(tmp_path):
    point = Point(1e-3)
    assert _objective.own_checkpoints(None, point, "run-a") is None
    assert _objective.own_checkpoints(tmp_path, point, "run-a") is None  # new: made, marked, no note
    folder = tmp_path / point.slug
    assert (folder / "RUN").read_text() == "run-a\n"
    (folder / "r0f0.pt").write_bytes(b"x")
    assert _objective.own_checkpoints(tmp_path, point, "run-a") is None  # its own: kept
    assert (folder / "r0f0.pt").exists()
    note = _objective.own_checkpoints(tmp_path, point, "run-b")  # another run's: set aside, never adopted
    assert note.startswith(f"set aside checkpoint folder {folder} as ") and "never adopted" in note
    assert (folder / "RUN").read_text() == "run-b\n" and not (folder / "r0f0.pt").exists()
    aside = [p for p in tmp_path.iterdir() if p != folder]
    assert len(aside) == 1 and (aside[0] / "r0f0.pt").read_bytes() == b"x" and aside[0].name in note
    _objective.remove_checkpoints(tmp_path, point)
    assert not folder.exists()
