"""bench: the projection's arithmetic, the timing rounds, the command and its JSON.
Speeds themselves are never asserted here (the machines are shared): the bench command
measures them."""

import json
import subprocess

import pytest
import torch

import lambda_search as ls
from lambda_search.bench import measure as _measure
from lambda_search.bench import projection as _projection
from lambda_search.bench import run as _bench
from lambda_search.cli import main
from lambda_search.nn import resnet as _models
from lambda_search.train import plan as _objective
from lambda_search.train.groups import pack_size

from conftest import SCRIPT


def test_projection_counts_every_point_fold_step_and_validation_pass(tiny_config):
    # 60 images, 3 folds: 40 train / 20 validation; batch 8: 5 steps an epoch; 3 epochs
    path = tiny_config(lambdas="[1e-3]", baseline="true", samples=60, epochs=3)
    config = ls.load_config(path, ["data.folds=3", "train.eval_every=2", "data.test_fraction=0"])
    plan = _objective.make_plan(config)
    assert [(len(f.train), len(f.val)) for f in plan.folds] == [(40, 20)] * 3
    p = _projection.project(plan, {"simam": 0.5, "none": 0.25}, eval_images_per_s=10.0)
    # epochs 2 and 3 are evaluated (every 2nd, and the last): 40 validation images a training
    assert (p.trainings, p.iterations, p.eval_images) == (6, 90, 240)
    assert p.seconds == pytest.approx(3 * (15 * 0.5 + 4) + 3 * (15 * 0.25 + 4))
    assert "6 trainings, 90 iterations and 240 validation images: 58 s" == p.describe()


def test_paper_figure4_projection_is_30_trainings_of_64k_iterations():
    # 1,200 images, 1/6 held out for the test: 200 test and 1,000 in 5 folds of 800/200
    config = ls.paper_figure4_config(["train.device='cpu'", "data.options.num_samples=1200"])
    plan = _objective.make_plan(config)
    assert (len(plan.data), plan.test_images, len(plan.folds[0].val)) == (1000, 200, 200)
    p = _projection.project(plan, {"simam": 0.01, "none": 0.02}, eval_images_per_s=1e3)
    assert (p.trainings, p.iterations) == (30, 30 * 64000)
    assert p.seconds == pytest.approx(30 * 64000 * 0.01 + p.eval_images / 1e3, rel=1e-9)
    # then `evaluate`: SimAM and the baseline, 3 seeds each, 64k iterations on all 1,000, the test once
    e = _projection.project(plan, {"simam": 0.01, "none": 0.02}, 1e3, trainings=_projection.evaluation_trainings(plan))
    assert (e.trainings, e.iterations, e.eval_images) == (6, 6 * 64000, 6 * 200)
    assert e.seconds == pytest.approx(3 * 64000 * 0.01 + 3 * 64000 * 0.02 + 6 * 200 / 1e3, rel=1e-12)


def test_rounds_rotate_and_time_every_variant_alike():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds, k = _measure.measure_steps(steps, torch.device("cpu"), rounds=3,
                                      block_seconds=0.0, warmup=1)
    assert k == 2 and set(seconds) == {"a", "b", "c"} and all(s >= 0 for s in seconds.values())
    timed = calls[6:]  # warm-up and the sizing step: 2 calls each
    assert timed == ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["b"] * 2 + ["c"] * 2 + ["a"] * 2 + \
        ["c"] * 2 + ["a"] * 2 + ["b"] * 2


def test_time_rounds_keeps_every_round_and_the_cpu_share():
    steps = {"a": lambda: None, "b": lambda: sum(range(1000))}
    timed = _measure.time_rounds(steps, torch.device("cpu"), rounds=4, block_seconds=0.0, warmup=1)
    assert timed.rounds == 4 and timed.steps == 2
    assert {name: len(v) for name, v in timed.seconds.items()} == {"a": 4, "b": 4}
    assert set(timed.cpu_share) == {"a", "b"} and all(0 <= s <= 1 for s in timed.cpu_share.values())
    seconds, k = _measure.measure_steps(steps, torch.device("cpu"), rounds=3, block_seconds=0.0)
    assert k == 2 and set(seconds) == {"a", "b"}


def _three_fold_plan(tiny_config):
    path = tiny_config(lambdas="[1e-3]", baseline="true", samples=60, epochs=3)
    return _objective.make_plan(ls.load_config(path, ["data.folds=3", "train.eval_every=2", "data.test_fraction=0"]))


def test_projection_range_runs_from_the_fastest_to_the_slowest_round(tiny_config):
    """Made-up timings: seconds from the medians, low from the fastest round of each
    measurement (training steps and validation passes), high from the slowest."""
    plan = _three_fold_plan(tiny_config)
    p = _projection.project_rounds(plan, {"simam": [0.5, 0.4, 0.6], "none": [0.25, 0.3, 0.2]}, [10.0, 8.0, 20.0],
                          packs={"simam": 1, "none": 1}, steps=7, cpu_share=0.95)
    mid = _projection.project(plan, {"simam": 0.5, "none": 0.25}, 10.0)
    assert (p.trainings, p.iterations, p.eval_images, p.seconds) == (mid.trainings, mid.iterations,
                                                                     mid.eval_images, mid.seconds)
    assert p.low == pytest.approx(3 * (15 * 0.4 + 40 / 20) + 3 * (15 * 0.2 + 40 / 20))  # 39 s
    assert p.high == pytest.approx(3 * (15 * 0.6 + 40 / 8) + 3 * (15 * 0.3 + 40 / 8))  # 70.5 s
    assert p.low <= p.seconds <= p.high and (p.rounds, p.steps) == (3, 7)
    assert p.describe() == ("6 trainings, 90 iterations and 240 validation images: 58 s "
                            "(39-70 s: 3 rounds of 7 steps, fastest..slowest)")
    # timed steps that got under 80 % of their CPU: a busy machine, said with the full-speed figure
    busy = _projection.project_rounds(plan, {"simam": [0.5], "none": [0.25]}, [10.0], steps=1, cpu_share=0.25)
    assert busy.describe() == ("6 trainings, 90 iterations and 240 validation images: 58 s "
                               "(58-58 s: 1 round of 1 step, fastest..slowest); the timed steps got 25% of "
                               "their CPU time, a busy machine: about 14 s at full speed")


def test_range_is_written_in_the_unit_of_its_high_end():
    assert _projection.format_range(45, 110) == "45-110 s"
    assert _projection.format_range(100, 200) == "1.7-3.3 min"
    assert _projection.format_range(3000, 9000) == "0.8-2.5 h"
    assert _projection.format_seconds(58.4) == "58 s" and _projection.format_seconds(936) == "15.6 min"


def test_pack_pick_is_the_faster_point_on_gpus_and_one_at_a_time_on_the_cpu(tiny_config):
    plan = _three_fold_plan(tiny_config)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pack_size(plan.train, 3, cuda, {1: 1.0, 3: 2.0}) == 3  # a point: 3 steps of one or 2 s packed
    assert pack_size(plan.train, 3, cuda, {1: 1.0, 3: 2.9}) == 1  # under 5 % faster: one at a time
    assert pack_size(plan.train, 3, cpu, {1: 1.0, 3: 2.0}) == 1
    assert pack_size(plan.train, 3, cuda) is None and pack_size(plan.train, 3, cpu) == 1  # "auto" measures on a GPU


def test_quick_projection_measures_rounds_and_a_range(tiny_config):
    plan = _objective.make_plan(ls.load_config(tiny_config(lambdas="[1e-4]", baseline="true")))
    engines = _measure.Engines(plan)
    p = _measure.quick_projection(plan, engines=engines, rounds=3, block_seconds=0.02)
    assert engines.built() == ["none", "simam"] and p.packs == {"simam": 1, "none": 1}
    assert (p.trainings, p.rounds) == (4, 3) and p.steps >= 2
    assert 0 < p.low <= p.seconds <= p.high
    assert p.cpu_share is not None and 0 <= p.cpu_share <= 1
    assert "3 rounds of" in p.describe() and "fastest..slowest" in p.describe()


def _official_simam(x, e_lambda):
    """SimAM as the paper's code writes it (simam_module.forward), for comparison."""
    b, c, h, w = x.size()
    n = w * h - 1
    x_minus_mu_square = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
    y = x_minus_mu_square / (4 * (x_minus_mu_square.sum(dim=[2, 3], keepdim=True) / n + e_lambda)) + 0.5
    return x * torch.sigmoid(y)


def test_reference_pipeline_runs_the_official_formula(tiny_config, monkeypatch):
    """The reference network runs SimAM's tensor formula in eager operations, not our kernel:
    every block's attention is the official formula with the study's lambda, lambda_search's
    SimAM (kernel or fused) never runs, and a step trains the network."""
    from lambda_search.nn import simam as _simam

    plan = _objective.make_plan(ls.load_config(tiny_config()))
    built, calls = [], []
    real_spec, real_formula = _bench.network_spec, _bench.simam_reference

    class Spec:  # the network's spec, keeping what it builds
        def __init__(self, name):
            self.real = real_spec(name)

        def build(self, *args, **kwargs):
            built.append(self.real.build(*args, **kwargs))
            return built[-1]

        def checked_options(self, **given):
            return self.real.checked_options(**given)

    def formula(x, e_lambda):
        y = real_formula(x, e_lambda)
        torch.testing.assert_close(y, _official_simam(x, e_lambda), rtol=1e-5, atol=1e-6)
        calls.append((tuple(x.shape), e_lambda))
        return y

    def ours(*args, **kwargs):
        raise AssertionError("lambda_search's SimAM ran in the reference pipeline")

    monkeypatch.setattr(_bench, "network_spec", Spec)
    monkeypatch.setattr(_bench, "simam_reference", formula)
    monkeypatch.setattr(_simam, "simam", ours)
    monkeypatch.setattr(_simam._SimAMFunction, "apply", ours)
    monkeypatch.setattr(_simam._SimAMBatchNormFunction, "apply", ours)
    step = _bench._reference_step(plan, 1e-4, torch.device("cpu"), workers=0)
    try:
        (model,) = built
        blocks = [m for m in model.modules() if isinstance(m, _models.BasicBlock)]
        assert len(blocks) == 9  # resnet20: 3 stages of 3 blocks
        assert all(type(b.attn).__name__ == "_OfficialSimAM" and b.attn.e_lambda == 1e-4 for b in blocks)
        assert not any(isinstance(m, ls.SimAM) for m in model.modules())
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert len(calls) == 9 and {lam for _, lam in calls} == {1e-4}
        assert {shape[0] for shape, _ in calls} == {plan.train.batch_size}
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it trained
        step()
        assert len(calls) == 18
    finally:
        step.close()


@pytest.mark.slow
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
    # 48 images, 10 held out for the test: folds of 19 training images, 2 steps of 8 an epoch, 2 epochs
    assert out["projection"]["trainings"] == 4 and out["projection"]["iterations"] == 4 * 2 * 2
    evaluation = out["evaluation"]  # then 2 networks x 3 seeds on all 38: 4 steps an epoch, the 10 tested once
    assert (evaluation["trainings"], evaluation["iterations"], evaluation["eval_images"]) == (6, 6 * 4 * 2, 6 * 10)
    assert out["projected_seconds"] == out["projection"]["seconds"] > 0


@pytest.mark.parametrize("args, message", [
    (["bench", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["bench", "--set", "train.device=cpux"], "'cpu', 'cuda' or 'cuda:"),
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
