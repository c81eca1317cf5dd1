"""The paper's Table 2 (`lambda-search evaluate --networks A,B --set data.*`): the chosen lambda
carried to other networks and data sets, each (network, data set) a companion study of its
own, exactly once under kills, checked before anything is stored, read as the paper's table
(a column per network, a block per data set, each column's paired t-test, Holm on request)."""

import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from PIL import Image

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.config import final_parts, study_name_ok
from lambda_search.report.evaluation import asked_table, format_table2, holm_correction
from lambda_search.report.evaluation_plot import evaluation_figure_data
from lambda_search.search.columns import data_tag, final_config, held_checkpoints, other_data, searched_data
from lambda_search.store.status import CONFIG_ATTR, EVALUATE_ATTR
from lambda_search.train import plan as _plan

from conftest import SCRIPT, poll, write_config
from test_data import write_tree

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "figure4.ipynb"


# ---------------------------------------------------------------- names and data, without training


def _tag(config, data):
    return data_tag(_plan.make_plan(final_config(config, 1e-4, 1, data=data, tag="probe")))


def test_each_network_and_data_set_has_a_name_of_its_own(tmp_path):
    config = ls.load_config(write_config(tmp_path))  # synthetic 8 px, resnet20
    digits = other_data(config, ["data.dataset=digits"])
    tag = _tag(config, digits)
    assert tag.startswith("digits-") and len(tag) == len("digits-") + 6
    names = {(n, d): final_config(config, 1e-4, 2, n, d, tag if d else None).study.name
             for n in ("resnet20", "preresnet20", "tests.toy_networks:build") for d in (None, digits)}
    assert names[("resnet20", None)] == "tiny:final"  # the searched network and data: as before
    assert names[("preresnet20", None)] == "tiny:final:preresnet20"
    assert names[("tests.toy_networks:build", None)] == "tiny:final:tests.toy_networks.build"
    assert names[("preresnet20", digits)] == f"tiny:final:preresnet20@{tag}"
    assert names[("resnet20", digits)] == f"tiny:final:resnet20@{tag}"
    assert len(set(names.values())) == len(names)  # no two alike
    for name in names.values():  # reserved: a final evaluation's name, never a user's
        assert final_parts(name)[0] == "tiny" and study_name_ok(name)
    assert Path(final_config(config, 1e-4, 2, "preresnet20", digits, tag).study.checkpoint_dir).parts[-2:] == (
        "tiny.ckpt", f"final-preresnet20@{tag}")
    assert final_parts("tiny:final:preresnet20:baseline") is None and final_parts("tiny") is None
    with pytest.raises(ls.ConfigError, match="study.name ending in ':final' is a final evaluation's"):
        ls.load_config(write_config(tmp_path), ["study.name=x:final:preresnet20"])


def test_no_other_study_can_share_a_final_evaluations_checkpoints(tmp_path):
    """The final evaluation checkpoints inside its search's folder: a study named X-final (its
    folder X-final.ckpt) never shares it; a final study made by an earlier version keeps the
    folder it was made with (<ckpt>-final), so its checkpoints resume."""
    config = ls.load_config(write_config(tmp_path, name="x"))
    other = ls.load_config(write_config(tmp_path, name="x-final"))
    final = final_config(config, 1e-4, 2)
    assert Path(final.study.checkpoint_dir) == Path(config.study.checkpoint_dir) / "final"
    assert not Path(other.study.checkpoint_dir).is_relative_to(config.study.checkpoint_dir)
    assert Path(final.study.checkpoint_dir) != Path(other.study.checkpoint_dir)
    store = ls.open_store(config.study.storage, create=True)
    assert held_checkpoints(store, final) == final  # none made yet
    old = final.replace("study", checkpoint_dir=str(tmp_path / "x-final.ckpt"))
    store.create_study(final.study.name)
    store.set_study_attr(final.study.name, CONFIG_ATTR, old.to_dict())
    assert held_checkpoints(store, final).study.checkpoint_dir == str(tmp_path / "x-final.ckpt")


def test_a_data_sets_tag_is_of_its_images_not_of_how_they_were_named(tmp_path):
    """Two image folders never share a column; 61 and 61.0 name the same images."""
    config = ls.load_config(write_config(tmp_path))
    noisy = [other_data(config, [f"data.options.noise={v}"]) for v in ("61", "61.0", "62")]
    assert not any(searched_data(config, d) for d in noisy)
    tags = [_tag(config, d) for d in noisy]
    assert tags[0] == tags[1] != tags[2] and tags[0].startswith("synthetic-")
    moved = other_data(config, ["data.dataset=synthetic", "data.root=/elsewhere"])  # where it lies: the searched
    assert searched_data(config, moved) and moved.root == "/elsewhere"
    for name in ("a", "b"):
        write_tree(tmp_path / name)
        shutil.copytree(tmp_path / name / "train", tmp_path / name / "val")  # ImageNet's layout: train/ and val/
    Image.new("RGB", (20, 24), (9, 0, 0)).save(tmp_path / "b" / "train" / "emu" / "0.jpg")  # b: another image
    folders = [other_data(config, ["data.dataset=imagefolder", f"data.root={tmp_path / n}",
                                   "data.options.resolution=8"]) for n in ("a", "b")]
    assert not searched_data(config, folders[0])
    a, b = (_tag(config, d) for d in folders)
    assert a != b and a.startswith("imagefolder-")


def test_other_data_takes_that_data_sets_defaults(tmp_path):
    config = ls.load_config(write_config(tmp_path))
    assert other_data(config, ["data.root=/x", "train.device=cpu"]) is None  # where the searched data lie
    digits = other_data(config, ["data.dataset=digits"])
    assert (digits.dataset, digits.test_fraction, digits.seed, dict(digits.options)) == ("digits", 0.2, 0, {})
    cifar = other_data(config, ["data.dataset=cifar10", "data.root=/data"])
    assert (cifar.dataset, cifar.test_fraction, cifar.root) == ("cifar10", None, "/data")
    same = other_data(config, ["data.options.num_samples=60"])  # the searched data set, other options
    assert same.options["num_samples"] == 60 and same.options["image_size"] == 8
    for bad in ("data.folds=3", "data.holdout=0.1", "data.test=true"):
        with pytest.raises(ls.ConfigError, match=f"--set {bad.split('=')[0]}: a final evaluation trains on every"):
            other_data(config, [bad])
    with pytest.raises(ls.ConfigError, match="data.test_fraction applies to data sets without a test split"):
        other_data(config, ["data.dataset=cifar10", "data.test_fraction=0.2"])


def test_holm_correction():
    assert holm_correction([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm_correction([0.5, 0.9]) == [1.0, 1.0]
    assert holm_correction([]) == [] and holm_correction([None]) == [None]


def _column(model, dataset, base, simam, p, tag=None):
    arm = lambda name, seeds: {"network": name, "seeds": seeds, "seed_states": ["complete"] * len(seeds),  # noqa: E731
                               "mean": sum(seeds) / len(seeds), "std": 0.01, "complete": len(seeds), "diverged": 0,
                               "test_images": 100, "e_lambda": 1e-4 if name == "simam" else None}
    diff = sum(simam) / len(simam) - sum(base) / len(base)
    return {"model": model, "dataset": dataset, "test_split": "its own", "column": model, "seeds": len(base),
            "data_tag": tag, "data_label": dataset if tag is None else f"{dataset} (root=/c10)",
            "networks": [arm("simam", simam), arm("none", base)], "complete": 2 * len(base), "total": 2 * len(base),
            "finished": True, "difference": {"diff": diff, "t": 1.0, "p": p, "seeds": len(base), "reason": None}}


def test_the_table_has_the_papers_shape():
    columns = [_column("resnet20", "cifar100", [0.68, 0.69], [0.70, 0.71], 0.02),
               _column("preresnet20", "cifar100", [0.68, 0.69], [0.68, 0.70], 0.5),
               _column("resnet20", "cifar10", [0.91, 0.92], [0.92, 0.93], 0.01, tag="cifar10-abcdef")]
    table = {"study": "s", "e_lambda": 1e-4, "chosen_by": "chosen by the one-SE rule (prefer larger)",
             "columns": columns, "correction": None, "complete": 12, "total": 12, "finished": True}
    text = format_table2(table)
    lines = text.splitlines()
    assert lines[0].startswith("final evaluation of study 's': test accuracy % (mean +- std over seeds, ddof=1)")
    cifar100 = lines.index("cifar100: 100 test images (its own)")
    assert lines[cifar100 + 1].split() == ["ResNet-20", "PreResNet-20"]
    assert lines[cifar100 + 2].split() == ["baseline", "68.50", "+-", "1.00", "68.50", "+-", "1.00"]
    assert lines[cifar100 + 3].split()[:4] == ["+", "SimAM", "(1e-04)", "70.50"]
    assert lines[cifar100 + 4].split() == ["difference", "(pp)", "+2.00", "+0.50"]
    assert lines[cifar100 + 5].split() == ["p", "(paired", "t)", "0.020", "0.500"]
    assert "cifar10 (root=/c10): 100 test images (its own)" in lines and "p (Holm)" not in text
    assert "diverged" not in text and lines[cifar100 + 6].split() == ["seeds", "paired", "2", "of", "2", "2", "of", "2"]
    assert "not corrected across the 3 columns with a p (--holm corrects them)" in text
    for c, p in zip(columns, holm_correction([0.02, 0.5, 0.01])):
        c["difference"]["p_holm"] = p
    text = format_table2({**table, "correction": "holm"})
    assert [ln.split()[2:] for ln in text.splitlines() if ln.startswith("p (Holm)")] == [["0.040", "0.500"], ["0.030"]]
    figure = evaluation_figure_data({**table, "correction": "holm"})
    assert [p["title"] for p in figure["panels"]] == ["ResNet-20, cifar100", "PreResNet-20, cifar100",
                                                      "ResNet-20, cifar10 (root=/c10)"]
    assert figure["panels"][0]["baseline"]["seeds"] == [68.0, 69.0] and figure["panels"][0]["note"] == (
        "+2.00 pp, p = 0.040 (Holm)")
    simam = columns[1]["networks"][0]  # a diverged seed, and a column without a baseline
    simam.update(seeds=[0.68, None], seed_states=["complete", "diverged"], diverged=1, mean=0.68, std=None)
    columns[1]["difference"].update(seeds=1, p=None, diff=None)
    del columns[2]["networks"][1]
    columns[2]["difference"] = None
    lines = format_table2({**table, "correction": None}).splitlines()
    assert [ln.split()[1:] for ln in lines if ln.startswith("diverged ")] == [["0", "1"], ["0"]]
    assert [ln.split()[2:] for ln in lines if ln.startswith("seeds paired")] == [
        ["2", "of", "2", "1", "of", "2"], ["-", "(no", "baseline)"]]
    assert lines[-1].startswith("diverged: trainings with a non-finite loss; means are over the other seeds")
    assert "columns with a p" not in "\n".join(lines)  # one p left: nothing to correct across
    asked = asked_table(None, "s", ["s:final", "s:final:preresnet20"])
    assert asked["finished"] is False and asked["not_started"] == ["s:final", "s:final:preresnet20"]
    assert format_table2(asked).endswith("no training made yet (interrupted before the first): run the same "
                                         "command to go on")


# ---------------------------------------------------------------- the quickstart's digits, end to end


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quickstart (real digits, 8 px) scaled down: 2 lambdas, 2 folds of its 1,437 images."""
    folder = tmp_path_factory.mktemp("table2")
    path = folder / "quick.toml"
    shutil.copy(QUICKSTART, path)
    assert main(["search", str(path), "--set", "study.name=quick", "--set", "search.lambdas=[1e-3, 1e-1]",
                 "--set", "data.folds=2", "--set", "train.epochs=3", "--set", "search.workers=1"]) == 0
    return f"sqlite:///{folder / 'quick.db'}", folder


def _expected(url, network, seeds):
    """Each (arm, seed)'s test accuracy from a direct training of the final plan."""
    search = ls.study_status(ls.open_store(url), "quick").config
    lam = ls.select(ls.study_status(ls.open_store(url), "quick"))["one_se"]["e_lambda"]
    final = final_config(search, lam, seeds, network)
    plan = _plan.make_plan(final)
    return {arm: [ls.train_fold(plan.data, f, lam if arm == "simam" else None, plan.train, model=network,
                                shortcut=final.model.shortcut, attention=arm, seed=plan.train_seed(f)).val_accuracy
                  for f in plan.folds]
            for arm in ("simam", "none")}


def _trials(url, study):
    by_point = {}
    for name in (study, study + ":baseline"):
        for t in optuna.load_study(study_name=name, storage=url).trials:
            by_point.setdefault(json.dumps(t.system_attrs.get("lambda_search:point")), []).append(t.state.name)
    return by_point


@pytest.mark.slow
def test_networks_killed_and_resumed_train_each_network_seed_and_arm_once(quick, cli_env, tmp_path):
    url, folder = quick
    command = [str(SCRIPT), "evaluate", "--storage", url, "--study", "quick", "--seeds", "2", "--networks",
               "resnet20,preresnet20", "--workers", "1", "--set", "train.checkpoint_every_epochs=1"]
    proc = subprocess.Popen(command, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = folder / "quick.ckpt" / "final-preresnet20"  # killed in the second column, its first checkpoint written
    assert poll(lambda: any(ckpt.glob("*/r0f0.pt")), timeout=300), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    held = ls.open_store(url).study_attrs("quick:final:preresnet20")[EVALUATE_ATTR]  # stored before its first trial
    assert held["chosen_by"] == "chosen by the one-SE rule (prefer larger)" and held["prefer"] == "larger"
    result = subprocess.run([*command, "--json"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(result.stdout)
    assert [(c["final_study"], c["model"], c["dataset"]) for c in table["columns"]] == [
        ("quick:final", "resnet20", "digits"), ("quick:final:preresnet20", "preresnet20", "digits")]
    for column in table["columns"]:
        by_point = _trials(url, column["final_study"])
        assert len(by_point) == 4 and all(s.count("COMPLETE") == 1 for s in by_point.values()), by_point
        expected = _expected(url, column["model"], 2)
        assert [n["seeds"] for n in column["networks"]] == [expected["simam"], expected["none"]], column["model"]
        assert column["seeds"] == 2 and column["difference"]["seeds"] == 2 and column["finished"]
        d = [a - b for a, b in zip(expected["simam"], expected["none"])]
        assert column["difference"]["diff"] == pytest.approx(sum(d) / 2)
        if d[0] != d[1]:  # each column's own paired t-test over its seeds, df 1
            t = (sum(d) / 2) / math.sqrt(((d[0] - d[1]) ** 2 / 2) / 2)
            assert column["difference"]["p"] == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-9)
    assert "FAIL" in [s for v in _trials(url, "quick:final:preresnet20").values() for s in v]  # the killed one
    assert table["columns"][0]["chosen_by"] == "chosen by the one-SE rule (prefer larger)"  # kept from the start
    assert (folder / "quick+evaluation.png").stat().st_size > 0

    before = {n: len(_trials(url, n)) for n in ("quick:final", "quick:final:preresnet20")}
    result = subprocess.run([*command, "--holm"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial" not in result.stdout  # a rerun trains nothing
    assert {n: len(_trials(url, n)) for n in before} == before
    out = result.stdout
    table_text = out[out.index("final evaluation of study 'quick': test accuracy"):]
    assert "digits: 360 test images" in table_text and "p (Holm)" in table_text
    assert table_text.splitlines()[3].split() == ["ResNet-20", "PreResNet-20"]
    assert f"figure: {folder / 'quick+evaluation.png'}" in out

    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"LAMBDA_SEARCH_STORAGE": url, "LAMBDA_SEARCH_STUDY": "quick"}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for key in env:
            del os.environ[key]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "p (Holm)" in text and "PreResNet-20" in text
    assert sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs) == 2


@pytest.mark.slow
def test_evaluate_refuses_before_storing_anything(quick, capsys):
    url, _ = quick
    names = ls.open_store(url).study_names()
    for extra, message in [
        (["--networks", "mobilenetv2"], "model.name='mobilenetv2' needs images of at least 9 px, the data set has 8"),
        (["--networks", "resnet20,nope"], "--networks: unknown model name='nope'"),
        (["--networks", "resnet20,resnet20"], "--networks takes network names, each once"),
        (["--networks", "preresnet56", "--lambda", "0.5"], "evaluates lambda = "),  # one table, one lambda
        (["--set", "data.folds=3"], "--set data.folds: a final evaluation trains on every training image"),
        (["--set", "data.dataset=cifar10", "--set", "data.root=/nowhere"], "cifar10"),
        (["--set", "data.dataset=digits", "--set", "data.test_fraction=0"], "leaves no image of 'digits' to test"),
    ]:
        if "evaluates lambda" in message and not any(final_parts(n) for n in names):
            assert main(["evaluate", "--storage", url, "--study", "quick", "--seeds", "1", "--lambda", "0.1",
                         "--networks", "resnet44"]) in (0, 1)  # a column, so that a table exists
            names = ls.open_store(url).study_names()
        capsys.readouterr()
        assert main(["evaluate", "--storage", url, "--study", "quick", "--seeds", "1", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert ls.open_store(url).study_names() == names, extra  # nothing stored


@pytest.mark.slow
def test_a_run_stopped_before_a_column_says_so(quick, capsys):
    """Stopped (Ctrl-C) before its first new column: the table says what was asked and not
    started, and is not finished; nothing of it is stored."""
    url, _ = quick
    names = ls.open_store(url).study_names()
    table = ls.run_evaluation(url, "quick", seeds=2, networks=["resnet32"], log=lambda s: None,
                              should_stop=lambda: True)
    assert table["not_started"] == ["quick:final:resnet32"] and table["finished"] is False
    assert ls.open_store(url).study_names() == names
    assert "1 column asked for not started yet: quick:final:resnet32" in format_table2(table)


@pytest.mark.slow
def test_a_companion_study_is_not_read_as_a_search(quick, capsys):
    """select, plot, export, status and resume read searches: given a final evaluation's study
    (its seeds are no folds) or a baseline companion, each says what it is and which command
    reads it, in one line, exit 2, and writes nothing."""
    url, folder = quick
    db = folder / "quick.db"
    before = db.read_bytes()
    for study, said in (("quick:final", "is a final evaluation of study 'quick' (made by `lambda-search evaluate`), "
                                        "not a search that `{command}` reads: "),
                        ("quick:final:preresnet20", "is a final evaluation of study 'quick'"),
                        ("quick:baseline", "holds the baseline network's trials (no SimAM) of study 'quick', a "
                                           "companion of it: read it with --study quick")):
        for command, extra in (("select", []), ("plot", ["-o", str(folder / "c.png")]), ("status", []),
                               ("export", ["--output", str(folder / "c.csv")]), ("resume", [])):
            capsys.readouterr()
            assert main([command, "--storage", url, "--study", study, *extra]) == 2, (command, study)
            err = capsys.readouterr().err
            assert said.format(command=command) in err and len(err.strip().splitlines()) == 1, err
            hint = "goes on with it" if command == "resume" else "`lambda-search status --study quick` shows its table"
            assert study == "quick:baseline" or hint in err
    assert db.read_bytes() == before and not list(folder.glob("c.*"))
