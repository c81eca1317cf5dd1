"""The final evaluation (`lambda-search evaluate`): the test split is held out before the
folds (or is the data set's own), the chosen lambda and the baseline train on every training
image, seed by seed, as the trials of a companion study NAME:final, exactly once under kills,
and their test accuracies, paired comparison and table are what a direct training gives."""

import json
import math
import shutil
import signal
import subprocess

import numpy as np
import optuna
import pytest
import torch

import lambda_search as ls
from lambda_search import configfile as _configfile
from lambda_search.cli import main
from lambda_search.data import datasets as _data
from lambda_search.data import folds as _folds
from lambda_search.report import select as _select
from lambda_search.search.columns import final_config
from lambda_search.store import status as _status
from lambda_search.train import plan as _objective

from conftest import SCRIPT, poll, write_config
from test_data import write_cifar10, write_tree


def _plan(config):
    return _objective.make_plan(config)


# ---------------------------------------------------------------- the test split


def test_the_test_split_is_held_out_before_the_folds(tmp_path):
    config = ls.load_config(write_config(tmp_path))  # 48 synthetic images, 3 classes, 2 folds
    assert config.data.test_fraction == 0.2  # the documented default
    full = ls.load_dataset("synthetic", num_samples=48, num_classes=3, image_size=8, noise=60.0)
    keep, test = _folds.test_split(full.labels.numpy(), 0.2, seed=0)
    assert (len(keep), len(test)) == (38, 10) and not set(keep) & set(test)
    assert sorted(np.bincount(full.labels.numpy()[test])) == [3, 3, 4]  # stratified
    plan = _plan(config)
    assert torch.equal(plan.data.images, full.images[keep]) and plan.test_images == 10
    assert sorted(np.concatenate([f.val for f in plan.folds]).tolist()) == list(range(38))  # folds: the 38 alone
    assert plan.data.mean == _data._stats(full.images[keep])[0]  # normalised without the test images
    other = _plan(ls.load_config(write_config(tmp_path), ["data.test_fraction=0.3"]))
    assert other.fingerprint != plan.fingerprint and len(other.data) == 33

    final = _plan(final_config(config, 1e-3, 2))
    assert final.config.study.name == "tiny:final" and final.config.data.test is True
    assert torch.equal(final.data.images[:38], plan.data.images) and torch.equal(final.data.images[38:],
                                                                                  full.images[test])
    assert [f.name for f in final.folds] == ["r0f0", "r1f0"]  # a seed is a repeat
    for f in final.folds:
        assert f.train.tolist() == list(range(38)) and f.val.tolist() == list(range(38, 48))
    assert final.train_seed(final.folds[0]) != final.train_seed(final.folds[1])
    assert final.train.eval_every > final.train.total_iterations(38)  # tested once, at the end
    assert final.data.mean == plan.data.mean


def test_test_fraction_rules(tmp_path):
    digits = _configfile.resolve_config({"search": {"lambdas": [1e-3]}, "data": {"dataset": "digits"},
                                     "train": {"epochs": 1}}, name="d")
    assert digits.data.test_fraction == 0.2
    with pytest.raises(ls.ConfigError, match="data.test_fraction applies to data sets without a test split of "
                       r"their own \(digits, synthetic\); 'cifar10' has one, got data.test_fraction=0.1"):
        _configfile.resolve_config({"search": {"lambdas": [1e-3]}, "data": {"dataset": "cifar10", "test_fraction": 0.1},
                                "train": {"epochs": 1}}, name="c")
    path = write_config(tmp_path)
    with pytest.raises(ls.ConfigError, match="data.test is set by `lambda-search evaluate` only"):
        ls.load_config(path, ["data.test=true"])
    with pytest.raises(ls.ConfigError, match="study.name ending in ':final' is a final evaluation's"):
        ls.load_config(path, ["study.name='tiny:final'"])
    (tmp_path / "bad.toml").write_text("data = 5\n")
    with pytest.raises(ls.ConfigError, match=r"data must be a table \[data\], got 5"):
        ls.load_config(tmp_path / "bad.toml")
    old = json.loads(json.dumps(digits.to_dict()))
    del old["data"]["test_fraction"]  # a study stored before the key: it held nothing out, its folds stay
    assert _status.completed_config(old).data.test_fraction == 0.0
    with pytest.raises(ls.ConfigError, match="none is left to test on"):
        _plan(final_config(ls.load_config(path, ["data.test_fraction=0"]), 1e-3, 1))


def test_official_test_splits_cifar_and_an_image_folder(tmp_path):
    write_cifar10(tmp_path / "c", per_batch=12)
    cifar = _configfile.resolve_config({"search": {"lambdas": [1e-3]}, "train": {"epochs": 1, "batch_size": 8},
                                    "data": {"dataset": "cifar10", "root": str(tmp_path / "c"), "folds": 2}}, name="c")
    plan, final = _plan(cifar), _plan(final_config(cifar, 1e-3, 1))
    test = ls.load_dataset("cifar10", root=tmp_path / "c", split="test")
    assert len(plan.data) == 60 and plan.test_images is None
    assert len(final.data) == 72 and torch.equal(final.data.images[60:], test.images)
    assert final.folds[0].val.tolist() == list(range(60, 72))
    write_tree(tmp_path / "f")
    shutil.copytree(tmp_path / "f" / "train", tmp_path / "f" / "val")  # ImageNet's layout: train/ and val/
    (tmp_path / "f" / "val" / "emu" / "0.jpg").unlink()
    folder = _configfile.resolve_config({"search": {"lambdas": [1e-3]}, "train": {"epochs": 1, "batch_size": 4},
                                     "model": {"name": "resnet20"},
                                     "data": {"dataset": "imagefolder", "root": str(tmp_path / "f"), "folds": 2,
                                              "options": {"resolution": 8}}}, name="f")
    final = _plan(final_config(folder, 1e-3, 1))
    assert (len(final.folds[0].train), len(final.folds[0].val)) == (12, 11)
    train = ls.load_dataset("imagefolder", root=tmp_path / "f", resolution=8)
    val = ls.load_dataset("imagefolder", root=tmp_path / "f", split="test", resolution=8)
    assert torch.equal(final.data.images[:12], train.images) and torch.equal(final.data.images[12:], val.images)
    joined = list((tmp_path / "f" / ".lambda_search_cache").glob("joined-*.u8.npy"))
    assert len(joined) == 1  # on disk, memory-mapped: an ImageNet-sized training set never held in memory
    assert _plan(final_config(folder, 1e-3, 1)).fingerprint == final.fingerprint  # the file reused, the same


# ---------------------------------------------------------------- evaluate, end to end


def _expected(config, e_lambda, seeds):
    """Each (network, seed)'s test accuracy from a direct training on the final plan."""
    plan = _plan(final_config(config, e_lambda, seeds))
    out = {}
    for network, lam in (("simam", e_lambda), ("none", None)):
        out[network] = [ls.train_fold(plan.data, f, lam, plan.train, attention=network,
                                      seed=plan.train_seed(f)).val_accuracy for f in plan.folds]
    return out


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    path = write_config(folder, lambdas="[1e-4, 1e-1]", baseline="true")
    assert main(["search", str(path)]) == 0
    return f"sqlite:///{folder / 'tiny.db'}", ls.load_config(path), folder


@pytest.mark.slow
def test_evaluate_trains_each_network_and_seed_once_and_reports_the_table(searched, capsys):
    url, config, folder = searched
    capsys.readouterr()
    assert main(["evaluate", "--storage", url, "--study", "tiny", "--seeds", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    ev = json.loads(out)  # stdout: the JSON alone; the progress went to stderr
    chosen = ls.select(ls.study_status(ls.open_store(url), "tiny"))["one_se"]["e_lambda"]
    assert "final evaluation of study 'tiny'" in err and ev["e_lambda"] == chosen
    assert "lambda=" in err and " seed 1: test acc " in err and "trainings done" in err  # seeds, not folds
    assert "val acc" not in err and "folds done" not in err
    assert ev["chosen_by"] == "chosen by the one-SE rule (prefer larger)" and ev["finished"]
    expected = _expected(config, chosen, 2)
    simam, base = ev["networks"]
    assert (simam["network"], base["network"]) == ("simam", "none")
    assert simam["seeds"] == expected["simam"] and base["seeds"] == expected["none"]
    assert simam["test_images"] == 10 and simam["std_ddof"] == 1
    assert simam["mean"] == pytest.approx(sum(expected["simam"]) / 2)
    d = [a - b for a, b in zip(expected["simam"], expected["none"])]
    assert ev["difference"]["diff"] == pytest.approx(sum(d) / 2) and ev["difference"]["seeds"] == 2
    if d[0] != d[1]:  # the paired t-test over seeds, df 1: p = 1 - 2 atan(|t|) / pi
        t = (sum(d) / 2) / math.sqrt(((d[0] - d[1]) ** 2 / 2) / 2)
        assert ev["difference"]["p"] == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-9)
    stats = {s.e_lambda: s for s in _select.lambda_stats(ls.study_status(ls.open_store(url), "tiny"))}
    assert simam["cv_mean"] == stats[chosen].mean and base["cv_mean"] == stats[None].mean
    trials = optuna.load_study(study_name="tiny:final", storage=url).trials
    trials += optuna.load_study(study_name="tiny:final:baseline", storage=url).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4  # each (network, seed) once

    assert main(["evaluate", "--storage", url, "--study", "tiny", "--seeds", "2", "--lambda", repr(chosen)]) == 0
    capsys.readouterr()  # the same lambda given: nothing trained, how it was chosen kept from the first run
    final_study = optuna.load_study(study_name="tiny:final", storage=url)
    assert final_study.user_attrs["lambda_search:evaluate"]["chosen_by"] == ev["chosen_by"]
    assert "lambda_search:chosen" not in final_study.user_attrs  # the search's choice is the search's alone
    assert main(["evaluate", "--storage", url, "--study", "tiny", "--seeds", "2"]) == 0  # trains nothing
    out = capsys.readouterr().out
    assert "4 of 4 points complete" in out and "trial" not in out
    table = out[out.index("final evaluation of study 'tiny': 2 seeds"):]
    assert "ResNet-20 + SimAM" in table and "paired t-test over 2 seeds" in table and "ddof=1" in table
    assert main(["status", "--storage", url, "--study", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluation"] == ev
    marks = ls.figure4_data(ls.study_status(ls.open_store(url), "tiny"), evaluation=ev)["test"]
    assert marks["simam"]["mean"] == pytest.approx(100 * simam["mean"]) and marks["seeds"] == 2
    assert main(["plot", "--storage", url, "--study", "tiny", "-o", str(folder / "f4.png")]) == 0


@pytest.mark.slow
def test_evaluate_refuses_bad_input_and_changes_nothing(searched, tmp_path, capsys):
    url, config, folder = searched
    db = folder / "tiny.db"
    unfinished = write_config(tmp_path, name="half", lambdas="[1e-3, 1e-1]")
    ls.run_search(ls.load_config(unfinished), log=lambda s: None, should_stop=lambda: True)
    half = f"sqlite:///{tmp_path / 'half.db'}"
    cases = [
        ([url, "nope"], [], "no study named 'nope'"),
        ([url, "tiny:final"], [], "study 'tiny:final' is a final evaluation: evaluate its search, --study tiny"),
        ([half, "half"], [], "study 'half' is not finished (0 of 2 points complete)"),
        ([url, "tiny"], ["--lambda", "-1"], "--lambda must be a finite number > 0, got -1.0"),
        ([url, "tiny"], ["--lambda", "nan"], "--lambda must be a finite number"),
        ([url, "tiny"], ["--lambda", "1e300"], "--lambda must be <= 3.4028234663852886e+38 (the largest float32"),
        ([url, "tiny:final:resnet56"], [], "is a final evaluation: evaluate its search, --study tiny"),
        ([url, "tiny"], ["--networks", "resnet20,"], "--networks takes network names, each once"),
        ([url, "tiny"], ["--seeds", "0"], "argument --seeds: must be an integer >= 1, got '0'"),
        ([url, "tiny"], ["--set", "train.epochs=9"], "a stored study's config can only change where"),
    ]
    for (store, study), extra, message in cases:
        before = {p: p.read_bytes() for p in (db, tmp_path / "half.db")}
        try:
            code = main(["evaluate", "--storage", store, "--study", study, *extra])
        except SystemExit as exc:  # a usage error: argparse's exit
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert {p: p.read_bytes() for p in before} == before
    every = write_config(tmp_path, name="every", lambdas="[1e-1]")  # folds over every image: nothing to test on
    assert main(["search", str(every), "--set", "data.test_fraction=0"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--storage", f"sqlite:///{tmp_path / 'every.db'}", "--study", "every"]) == 2
    assert "no image is left to test on" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_without_a_baseline_evaluates_its_lambda_alone(tmp_path, capsys):
    path = write_config(tmp_path, name="alone", lambdas="[1e-1]")
    assert main(["search", str(path)]) == 0
    capsys.readouterr()
    url = f"sqlite:///{tmp_path / 'alone.db'}"
    assert main(["evaluate", "--storage", url, "--study", "alone", "--seeds", "1", "--lambda", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "no baseline (search.baseline = false)" in out
    assert "the study has no baseline (search.baseline = false): the lambda is evaluated alone" in out
    assert "lambda 1e-02: given with --lambda, not chosen by the rule" in out
    ev = ls.read_evaluation(ls.open_store(url), "alone")
    assert [n["network"] for n in ev["networks"]] == ["simam"] and ev["difference"] is None
    assert ev["networks"][0]["cv_mean"] is None  # 1e-2 was not in the search's pool
    assert main(["evaluate", "--storage", url, "--study", "alone", "--seeds", "1"]) == 2  # the rule picks 1e-1
    assert "evaluates lambda = 1e-02, not 1e-01: run evaluate --lambda 0.01 to see it" in capsys.readouterr().err


# ---------------------------------------------------------------- a kill mid-training


@pytest.mark.slow
def test_evaluate_killed_mid_training_finishes_each_training_once(tmp_path, cli_env):
    """A SIGKILL while a final training runs; the same command again completes every
    (network, seed) exactly once, with the accuracies of an uninterrupted run."""
    path = write_config(tmp_path, name="k", lambdas="[1e-1]", baseline="true", samples=192, epochs=8)
    path.write_text(path.read_text().replace("image_size = 8", "image_size = 16").replace(
        "[train]\n", "[train]\ncheckpoint_every_epochs = 1\n"))
    assert main(["search", str(path)]) == 0
    url = f"sqlite:///{tmp_path / 'k.db'}"
    command = [str(SCRIPT), "evaluate", "--storage", url, "--study", "k", "--seeds", "2", "--workers", "1"]
    proc = subprocess.Popen(command, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "k.ckpt" / "final" / "lambda-0.1-r0" / "r0f0.pt"
    assert poll(ckpt.exists, timeout=240), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    result = subprocess.run([*command, "--json"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ev = json.loads(result.stdout)
    expected = _expected(ls.load_config(path), 0.1, 2)
    assert [n["seeds"] for n in ev["networks"]] == [expected["simam"], expected["none"]]
    trials = optuna.load_study(study_name="k:final", storage=url).trials
    by_point = {}
    for t in trials + optuna.load_study(study_name="k:final:baseline", storage=url).trials:
        by_point.setdefault(json.dumps(t.system_attrs.get("lambda_search:point")), []).append(t.state.name)
    assert len(by_point) == 4 and all(states.count("COMPLETE") == 1 for states in by_point.values()), by_point
    assert "FAIL" in [s for states in by_point.values() for s in states]  # the killed one, taken back once


@pytest.mark.slow
def test_json_stays_alone_on_stdout_with_several_workers(tmp_path, cli_env):
    """The worker processes' lines go to stderr too: stdout is the JSON, whole."""
    path = write_config(tmp_path, name="j", lambdas="[1e-1]", baseline="true")
    assert main(["search", str(path)]) == 0
    result = subprocess.run([str(SCRIPT), "evaluate", "--storage", f"sqlite:///{tmp_path / 'j.db'}", "--study", "j",
                             "--seeds", "1", "--workers", "2", "--json"], env=cli_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["finished"] is True
    assert "[w0]" in result.stderr and "[w1]" in result.stderr


@pytest.mark.slow
def test_plot_and_figure4_follow_the_evaluation(tmp_path, capsys, monkeypatch):
    """`plot` stars the lambda evaluate chose (its --prefer) unless told otherwise; evaluate
    redraws the study's Figure 4 with the test marks, titled so."""
    path = write_config(tmp_path, name="p", lambdas="[1e-4, 1e-1]", baseline="true")
    assert main(["search", str(path)]) == 0
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["evaluate", "--storage", url, "--study", "p", "--seeds", "1", "--prefer", "smaller"]) == 0
    out = capsys.readouterr().out
    assert f"figure: {tmp_path / 'p.png'}" in out and f"figure: {tmp_path / 'p+evaluation.png'}" in out
    ev = ls.read_evaluation(ls.open_store(url), "p")
    assert ev["prefer"] == "smaller"
    data = ls.figure4_data(ls.study_status(ls.open_store(url), "p"), "smaller", evaluation=ev)
    assert data["title"].startswith("Cross-validation and test accuracy on ") and data["test"]["simam"]
    seen = []
    from lambda_search.cli import commands

    monkeypatch.setattr(commands, "plot_figure4", lambda status, out, prefer, *a: seen.append(prefer) or out)
    for extra, prefer in (([], "smaller"), (["--prefer", "larger"], "larger")):
        main(["plot", "--storage", url, "--study", "p", "-o", str(tmp_path / "x.png"), *extra])
        assert seen[-1] == prefer
