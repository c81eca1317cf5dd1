"""What fixes a training's rounding: train.threads, the pinned SimAM kernel and pack sizes,
recorded per fold, and reported when a study's folds were trained under more than one."""

import json

import pytest
import torch

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.nn import kernels as _kernels
from lambda_search.search import study as _study
from lambda_search.search import supervise as _supervise
from lambda_search.train.pack import train_pack


@pytest.mark.slow
def test_a_training_runs_on_train_threads_and_gives_the_threads_back():
    data = ls.load_dataset("synthetic", num_samples=40, num_classes=2, image_size=8)
    fold = ls.make_folds(data.labels, n_splits=2, seed=0)[0]
    seen = []
    before = torch.get_num_threads()
    for threads in (1, 2):
        cfg = ls.TrainConfig(iterations=2, batch_size=8, threads=threads, checkpoint_every_seconds=None)
        ls.train_fold(data, fold, 1e-4, cfg, callback=lambda m: seen.append(torch.get_num_threads()))
        train_pack(data, [fold], [1e-4], cfg, seeds=[0], callback=lambda i, m: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 2, 2] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1 \(CPU threads per training\), got "
                                         "threads=0"):
        ls.TrainConfig(iterations=2, threads=0)


needs_kernel = pytest.mark.skipif(_kernels._load() is None, reason="SimAM's CPU kernel cannot be built here")


@needs_kernel
def test_use_kernels_switches_the_kernel_within_a_block(monkeypatch):
    monkeypatch.delenv(_kernels.KERNELS_ENV, raising=False)
    built = _kernels.cpu_kernel()
    with _kernels.use_kernels(False):
        assert _kernels.cpu_kernel() is None
        with _kernels.use_kernels(None):  # None: as it was
            assert _kernels.cpu_kernel() is None
        with _kernels.use_kernels(True):
            assert _kernels.cpu_kernel() is built
    assert _kernels.cpu_kernel() is built
    monkeypatch.setenv(_kernels.KERNELS_ENV, "0")
    assert _kernels.cpu_kernel() is None
    with _kernels.use_kernels(True):  # a study's pin wins over the environment
        assert _kernels.cpu_kernel() is built



@pytest.mark.slow
def test_each_fold_records_its_numerics_and_the_study_its_pin(tiny_config, capsys):
    config = ls.load_config(tiny_config(baseline="true"))
    ls.run_search(config, log=lambda s: None)
    status = ls.study_status(ls.open_store(config.study.storage), "tiny")
    kernel = _kernels.cpu_kernel() is not None
    assert status.pinned == {"cpu": {"simam_kernel": kernel, "packs": {"simam": 1, "none": 1}}}
    [only] = status.numerics
    n = only["numerics"]
    assert only["folds"] == 6 and not status.mixed_numerics
    assert n["device"] == "cpu" and n["dtype"] == "float32" and n["autocast"] is None and n["threads"] == 1
    assert n["simam_kernel"] == (_kernels.kernel_isa() if kernel else "off")
    assert (n["kernel_build"] is not None) == kernel
    assert n["pack"] == 1 and n["compile"] is False and n["channels_last"] is True and n["torch"] == torch.__version__
    assert n["isa"] == torch.backends.cpu.get_cpu_capability().lower()
    out = status.to_dict()
    assert out["numerics"] == {"mixed": False, "mixed_folds": [], "distinct": status.numerics, "pinned": status.pinned}
    assert all(p["fold_numerics"] == [n, n] for p in out["points"])
    assert f"trained under one numerics: cpu ({n['processor']}, {n['isa']}), float32, 1 thread" in \
        ls.status_table(status)
    assert ls.folds_frame(status)["numerics"].nunique() == 1


@pytest.mark.slow
def test_folds_trained_under_two_numerics_are_reported(tiny_config, capsys, monkeypatch):
    from lambda_search.train import plan as _objective

    real, calls = _objective.training_numerics, []

    def elsewhere(*args):  # the fourth training runs on another kind of machine
        calls.append(1)
        n = real(*args)
        return {**n, "processor": "AMD EPYC 7763", "isa": "avx2", "simam_kernel": "avx2"} if len(calls) == 4 else n

    monkeypatch.setattr(_objective, "training_numerics", elsewhere)
    path = tiny_config(baseline="true")
    url = ls.load_config(path).study.storage
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: on 1 fold (r0f1) the points were trained under more than one numerics, so lambdas are not" in out
    assert "  cpu (AMD EPYC 7763, avx2), float32, 1 thread, SimAM kernel avx2, pack 1, torch" in out
    assert "(5 folds)" in out and "(1 fold)" in out
    assert "WARNING: the points of r0f1 were trained under more than one numerics" in out
    status = ls.study_status(ls.open_store(url), "tiny")
    assert status.mixed_numerics and status.mixed_folds == ["r0f1"]
    assert [k["folds"] for k in status.numerics] == [5, 1]
    assert main(["status", "--storage", url, "--study", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["numerics"]["mixed"] is True and out["numerics"]["mixed_folds"] == ["r0f1"]
    assert len(out["numerics"]["distinct"]) == 2
    point = next(p for p in out["points"] if p["e_lambda"] == 0.1)
    assert point["fold_numerics"][1]["processor"] == "AMD EPYC 7763"
    assert main(["select", "--storage", url, "--study", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["numerics"]["mixed"] is True


@pytest.mark.slow
def test_a_shorter_last_pack_is_not_mixed_numerics(tiny_config):
    # 3 folds in packs of 2: fold r0f2 trains alone, for every point alike
    config = ls.load_config(tiny_config(baseline="true", samples=60), ["data.folds=3", "train.pack=2"])
    _, status = ls.run_search(config, log=lambda s: None)
    assert status.finished and not status.mixed_numerics
    assert sorted((k["numerics"]["pack"], k["folds"]) for k in status.numerics) == [(1, 3), (2, 6)]
    assert "each fold trained under one numerics for every point: " in ls.status_table(status)


def test_a_checkpoint_from_before_train_threads_resumes(tmp_path):
    # fold checkpoints written before train.threads existed have no threads in their key
    data = ls.load_dataset("synthetic", num_samples=40, num_classes=2, image_size=8)
    fold = ls.make_folds(data.labels, n_splits=2, seed=0)[0]
    cfg = ls.TrainConfig(epochs=3, batch_size=5, lr=0.05, checkpoint_every_seconds=None)
    path = tmp_path / "f.pt"
    steps = []
    ls.train_fold(data, fold, 1e-3, cfg, checkpoint=path, should_stop=lambda: steps.append(1) or len(steps) >= 5)
    payload = torch.load(path, weights_only=True)
    steps_done = payload["iteration"]
    payload["key"]["config"].pop("threads", None)
    torch.save(payload, path)
    resumed = ls.train_fold(data, fold, 1e-3, cfg, checkpoint=path)
    assert resumed.resumed_from_iteration == steps_done > 0
    assert resumed.val_loss == ls.train_fold(data, fold, 1e-3, cfg).val_loss


@pytest.mark.slow
@needs_kernel
def test_a_study_keeps_the_kernel_it_was_created_with(tiny_config, monkeypatch):
    config = ls.load_config(tiny_config(lambdas="[1e-3, 1e-1]"))
    monkeypatch.setenv(_kernels.KERNELS_ENV, "0")  # created with the kernel off
    done = []
    _, first = ls.run_search(config, log=lambda s: done.append(s) if "complete:" in s else None,
                             should_stop=lambda: bool(done))
    assert first.complete == 1 and not first.finished  # the other point trains after the resume
    monkeypatch.delenv(_kernels.KERNELS_ENV)  # resumed where it is on: the study's pin decides
    _, status = ls.run_search(config, log=lambda s: None)
    assert status.finished and status.pinned["cpu"]["simam_kernel"] is False
    assert [k["numerics"]["simam_kernel"] for k in status.numerics] == ["off"]
    # a new study here pins it on
    other = ls.load_config(tiny_config(name="other", lambdas="[1e-3]"))
    _, status = ls.run_search(other, log=lambda s: None)
    assert status.pinned["cpu"]["simam_kernel"] is True
    assert [k["numerics"]["simam_kernel"] for k in status.numerics] == [_kernels.kernel_isa()]


def test_what_changes_rounding_cannot_change_on_resume(tiny_config):
    config = ls.load_config(tiny_config(lambdas="[1e-3]"))
    ls.run_search(config, log=lambda s: None)
    url = config.study.storage
    for key in ("train.threads=2", "train.pack=2", "train.compile=true"):
        with pytest.raises(ls.ConfigError, match=f"--set {key.split('=')[0]}: a stored study's config can only change"):
            _study.resume_config(url, "tiny", [key])
        with pytest.raises(ls.StudyError, match=f"config conflicts with study 'tiny': {key.split('=')[0]}"):
            ls.run_search(ls.load_config(tiny_config(lambdas="[1e-3]"), [key]), log=lambda s: None)


def test_workers_on_the_cpu_are_capped_at_cores_over_threads(monkeypatch, tiny_config):
    monkeypatch.setattr(_supervise, "_cores", lambda: 4)
    config = ls.load_config(tiny_config())
    assert _supervise.worker_count(config, "auto", pending=10) == (4, None)
    assert _supervise.worker_count(config, "auto", pending=3) == (3, None)
    assert _supervise.worker_count(config, 4, pending=10) == (4, None)
    assert _supervise.worker_count(config, 2, pending=2) == (2, None)
    assert _supervise.worker_count(config, 2, pending=10) == (
        2, "2 workers of 1 thread on 4 cores: --workers auto would use 4")
    n, note = _supervise.worker_count(config, 6, pending=10)
    assert n == 4 and note == ("6 workers asked for, 4 started: each training uses train.threads = 1 (the "
                               "study's), and this machine has 4 cores")
    config = config.replace("train", threads=3)
    assert _supervise.worker_count(config, "auto", pending=10) == (1, None)
    config = config.replace("train", threads=8)
    assert _supervise.worker_count(config, None, pending=10)[0] == 1  # tiny.toml: search.workers = 1
    config = config.replace("train", threads=2).replace("search", workers="auto")
    assert _supervise.worker_count(config, None, pending=10) == (2, None)


def test_the_simam_kernels_source_is_pinned():
    """SimAM's C kernel is part of what a fold records (its build, hashed from the source to the
    byte): a changed byte, a comment's included, reports a study resumed after the change as
    trained under two numerics. Change it on purpose only, and then this hash with it."""
    import hashlib

    assert hashlib.sha256(_kernels.SOURCE.read_bytes()).hexdigest() == (
        "14947ddd82541d370f4e865dee9ea6783310d2b1a7403b271d1ad41d1b37d1c1")
