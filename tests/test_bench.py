"""bench: the projection's arithmetic, the timing rounds, the command and its JSON.
Speeds themselves are never asserted here (the machines are shared): the bench command
measures them."""

import json
import subprocess

import pytest
import torch

import lambda_search as ls
from lambda_search import _bench
from lambda_search.cli import main

from conftest import SCRIPT


def test_projection_counts_every_point_fold_step_and_validation_pass(tiny_config):
    # 60 images, 3 folds: 40 train / 20 validation; batch 8: 5 steps an epoch; 3 epochs
    path = tiny_config(lambdas="[1e-3]", baseline="true", samples=60, epochs=3)
    config = ls.load_config(path, ["data.folds=3", "train.eval_every=2"])
    plan = ls.make_plan(config)
    assert [(len(f.train), len(f.val)) for f in plan.folds] == [(40, 20)] * 3
    p = ls.project(plan, {"simam": 0.5, "none": 0.25}, eval_images_per_s=10.0)
    # epochs 2 and 3 are evaluated (every 2nd, and the last): 40 validation images a training
    assert (p.trainings, p.iterations, p.eval_images) == (6, 90, 240)
    assert p.seconds == pytest.approx(3 * (15 * 0.5 + 4) + 3 * (15 * 0.25 + 4))
    assert "6 trainings, 90 iterations and 240 validation images: 58 s" == p.describe()


def test_paper_figure4_projection_is_30_trainings_of_64k_iterations():
    config = ls.paper_figure4_config(["train.device='cpu'", "data.options.num_samples=500"])
    plan = ls.make_plan(config)
    p = ls.project(plan, {"simam": 0.01, "none": 0.01}, eval_images_per_s=1e9)
    assert (p.trainings, p.iterations) == (30, 30 * 64000)
    assert p.seconds == pytest.approx(30 * 64000 * 0.01 + p.eval_images / 1e9, rel=1e-9)


def test_rounds_rotate_and_time_every_variant_alike():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds, k = _bench.measure_steps(steps, torch.device("cpu"), rounds=3,
                                      block_seconds=0.0, warmup=1)
    assert k == 2 and set(seconds) == {"a", "b", "c"} and all(s >= 0 for s in seconds.values())
    timed = calls[6:]  # warm-up and the sizing step: 2 calls each
    assert timed == ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["b"] * 2 + ["c"] * 2 + ["a"] * 2 + \
        ["c"] * 2 + ["a"] * 2 + ["b"] * 2


def test_reference_pipeline_runs_the_official_formula(tiny_config):
    """The reference network runs SimAM's tensor formula in eager operations, not our kernel."""
    plan = ls.make_plan(ls.load_config(tiny_config()))
    step = _bench._reference_step(plan, 1e-4, torch.device("cpu"), workers=0)
    try:
        step()
    finally:
        step.close()


def test_bench_command_prints_its_figures_as_json(tiny_config, cli_env):
    path = tiny_config(lambdas="[1e-4]", baseline="true")
    result = subprocess.run([str(SCRIPT), "bench", str(path), "--json", "--rounds", "2", "--loader-workers", "0"],
                            capture_output=True, text=True, env=cli_env, timeout=600)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("device", "reference_images_per_s", "engine_images_per_s", "speedup", "simam_overhead",
                "projected_seconds"):
        assert key in out
    assert out["device"] == "cpu" and out["batch_size"] == 8 and out["image_size"] == 8
    assert out["speedup"] == pytest.approx(out["engine_images_per_s"] / out["reference_images_per_s"])
    assert out["simam_overhead"] == pytest.approx(out["baseline_images_per_s"] / out["engine_images_per_s"] - 1)
    assert out["projection"]["trainings"] == 4 and out["projection"]["iterations"] == 4 * 2 * 3
    assert out["projected_seconds"] == out["projection"]["seconds"] > 0


@pytest.mark.parametrize("args, message", [
    (["bench", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["bench", "--set", "train.device=cpux"], "device must be a torch device"),
    (["bench", "--set", "train.batch_size=0"], "train.batch_size must be an integer >= 1"),
    (["bench", "--rounds", "0"], "--rounds: must be an integer >= 1"),
    (["bench", "--loader-workers", "-1"], "--loader-workers: must be an integer >= 0"),
])
def test_bench_refuses_bad_input(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
