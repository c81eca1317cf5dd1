"""Training one (lambda, fold): the protocol, determinism, resume, divergence."""

import dataclasses
import math

import pytest
import torch

import lambda_search as ls
from lambda_search.data import augment as _augment
from lambda_search.train import engine as _engine
from lambda_search.train import single as _train


@pytest.fixture(scope="module")
def small():
    data = ls.load_dataset("synthetic", num_samples=160, num_classes=4, image_size=8, seed=1)
    return data, ls.make_folds(data.labels, n_splits=4, seed=0)[0]


CFG = ls.TrainConfig(epochs=4, batch_size=24, lr=0.05, checkpoint_every_seconds=None)


def weights(engine):
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


def same_result(a, b):
    assert a.status == b.status and a.iterations == b.iterations
    assert a.val_accuracy == b.val_accuracy and a.val_loss == b.val_loss
    assert [(m.epoch, m.iteration, m.train_loss, m.val_accuracy, m.val_loss) for m in a.curve] == \
           [(m.epoch, m.iteration, m.train_loss, m.val_accuracy, m.val_loss) for m in b.curve]


@pytest.mark.slow
def test_digits_learns_well_above_chance():
    data = ls.load_dataset("digits")
    fold = ls.make_folds(data.labels, n_splits=3, seed=0)[0]
    result = ls.train_fold(data, fold, 1e-4, ls.TrainConfig(epochs=6, batch_size=64, lr=0.05))
    assert result.status == "completed"
    assert result.val_accuracy > 0.8  # chance is 0.1
    assert result.iterations == 6 * (len(fold.train) // 64)
    assert [m.epoch for m in result.curve] == [1, 2, 3, 4, 5, 6]


def test_same_seed_same_bits_and_another_seed_differs(small):
    data, fold = small
    e1, e2, e3 = (_engine.Engine("resnet20", 4) for _ in range(3))
    a = ls.train_fold(data, fold, 1e-4, CFG, seed=5, engine=e1)
    b = ls.train_fold(data, fold, 1e-4, CFG, seed=5, engine=e2)
    c = ls.train_fold(data, fold, 1e-4, CFG, seed=6, engine=e3)
    same_result(a, b)
    assert all(torch.equal(x, y) for x, y in zip(weights(e1).values(), weights(e2).values()))
    assert [m.train_loss for m in a.curve] != [m.train_loss for m in c.curve]


def test_reported_accuracy_is_the_final_models(small):
    data, fold = small
    engine = _engine.Engine("resnet20", 4)
    result = ls.train_fold(data, fold, 1e-3, CFG, engine=engine)
    engine.model.eval()
    with torch.no_grad():
        x = _augment.normalize(data.images[torch.as_tensor(fold.val)], data.mean, data.std)
        predicted = engine.model(x).argmax(1)
    accuracy = (predicted == data.labels[torch.as_tensor(fold.val)]).sum().item() / len(fold.val)
    assert result.val_accuracy == accuracy
    assert result.val_accuracy == result.curve[-1].val_accuracy


@pytest.mark.slow
def test_one_engine_serves_every_lambda_exactly(small):
    data, fold = small
    shared = _engine.Engine("resnet20", 4)
    for lam in (1e-4, 1e-1):
        fresh = ls.train_fold(data, fold, lam, CFG, engine=_engine.Engine("resnet20", 4))
        reused = ls.train_fold(data, fold, lam, CFG, engine=shared)
        same_result(fresh, reused)
    baseline = ls.train_fold(data, fold, None, CFG, attention="none")
    assert baseline.status == "completed" and baseline.e_lambda is None


def test_fresh_weights_are_a_seeds_and_leave_the_callers_rng(small):
    engine = _engine.Engine("resnet20", 4)
    before = torch.random.get_rng_state()
    fresh = engine.fresh(3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    engine.reset(3, 1e-4)
    assert fresh.keys() == engine.model.state_dict().keys()
    assert all(torch.equal(fresh[k], v) for k, v in engine.model.state_dict().items())
    assert not all(torch.equal(fresh[k], v) for k, v in engine.fresh(4).state_dict().items())


def test_budget_in_iterations_and_sparse_evaluation(small):
    data, fold = small
    cfg = ls.TrainConfig(iterations=13, batch_size=24, eval_every=2, checkpoint_every_seconds=None)
    result = ls.train_fold(data, fold, 1e-4, cfg)
    assert result.iterations == 13
    assert [m.iteration for m in result.curve] == [5, 10, 13]  # 5 iterations per epoch, a partial last
    assert [m.val_accuracy is None for m in result.curve] == [True, False, False]


@pytest.mark.slow
def test_stop_and_resume_equal_an_uninterrupted_run(small, tmp_path):
    data, fold = small
    whole = ls.train_fold(data, fold, 1e-4, CFG)
    seen = []

    def stop_after_two(metrics):
        seen.append(metrics.epoch)
        return metrics.epoch == 2

    ckpt = tmp_path / "fold.pt"
    stopped = ls.train_fold(data, fold, 1e-4, CFG, callback=stop_after_two, checkpoint=ckpt)
    assert stopped.status == "stopped" and stopped.iterations == 10 and seen == [1, 2]
    resumed = ls.train_fold(data, fold, 1e-4, CFG, checkpoint=ckpt)
    assert resumed.resumed_from_iteration == 10
    same_result(whole, resumed)
    again = ls.train_fold(data, fold, 1e-4, CFG, checkpoint=ckpt)  # finished: nothing to redo
    assert again.resumed_from_iteration == 4 * 5
    same_result(whole, again)


@pytest.mark.slow
def test_crash_mid_epoch_resumes_exactly(small, tmp_path, monkeypatch):
    data, fold = small
    cfg = ls.TrainConfig(epochs=4, batch_size=24, lr=0.05, checkpoint_every_seconds=0, checkpoint_every_epochs=100)
    whole = ls.train_fold(data, fold, 1e-4, cfg)
    real = _train.train_batch
    calls = []

    def crash_at_step_8(*args):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("the machine died")
        return real(*args)

    monkeypatch.setattr(_train, "train_batch", crash_at_step_8)
    ckpt = tmp_path / "fold.pt"
    with pytest.raises(RuntimeError, match="died"):
        ls.train_fold(data, fold, 1e-4, cfg, checkpoint=ckpt)
    monkeypatch.setattr(_train, "train_batch", real)
    resumed = ls.train_fold(data, fold, 1e-4, cfg, checkpoint=ckpt)
    assert resumed.resumed_from_iteration == 7  # mid-epoch 2: 5 iterations per epoch
    same_result(whole, resumed)


@pytest.mark.slow
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(small, tmp_path):
    data, fold = small
    whole = ls.train_fold(data, fold, 1e-4, CFG)
    ckpt = tmp_path / "fold.pt"
    ls.train_fold(data, fold, 1e-4, CFG, checkpoint=ckpt, callback=lambda m: m.epoch == 3)
    assert (tmp_path / "fold.pt.prev").exists() and not list(tmp_path.glob("*.tmp*"))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
        resumed = ls.train_fold(data, fold, 1e-4, CFG, checkpoint=ckpt)
    assert resumed.resumed_from_iteration == 10  # the epoch-2 state
    same_result(whole, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["e_lambda", "lr", "data", "seed"])
def test_a_checkpoint_of_another_run_is_set_aside_never_adopted(small, tmp_path, change):
    data, fold = small
    ckpt = tmp_path / "fold.pt"
    ls.train_fold(data, fold, 1e-4, CFG, checkpoint=ckpt, callback=lambda m: m.epoch == 2)  # .pt and .prev
    lam, cfg, seed, other = 1e-4, CFG, 0, data
    if change == "e_lambda":
        lam = 1e-2
    elif change == "lr":
        cfg = dataclasses.replace(CFG, lr=CFG.lr / 2)
    elif change == "data":
        other = dataclasses.replace(data, images=data.images.flip(-1).contiguous())  # same name and size
    else:
        seed = 1
    differs = {"lr": "config", "data": "data_fingerprint"}.get(change, change)
    with pytest.warns(UserWarning) as caught:
        result = ls.train_fold(other, fold, lam, cfg, checkpoint=ckpt, seed=seed)
    assert [str(w.message) for w in caught] == [
        f"set aside checkpoint {ckpt} as fold.pt.stale-1, fold.pt.prev as fold.pt.prev.stale-1: another run's (it "
        f"differs in {differs}), never adopted"]
    assert result.resumed_from_iteration is None
    same_result(ls.train_fold(other, fold, lam, cfg, seed=seed), result)
    assert (tmp_path / "fold.pt.stale-1").exists() and (tmp_path / "fold.pt.prev.stale-1").exists()


def test_divergence_ends_the_fold_with_the_step(small):
    data, fold = small
    cfg = ls.TrainConfig(epochs=3, batch_size=24, lr=1e6, momentum=0.9, checkpoint_every_seconds=None)
    result = ls.train_fold(data, fold, 1e-4, cfg)
    assert result.status == "diverged"
    assert result.val_accuracy is None and result.val_loss is None
    assert isinstance(result.diverged_at_step, int) and 1 <= result.diverged_at_step <= result.iterations
    assert all(math.isfinite(m.train_loss) for m in result.curve)


def test_the_papers_schedule():
    cfg = ls.TrainConfig(iterations=64_000)
    assert cfg.lr_at(0, 64_000) == 0.1 and cfg.lr_at(31_999, 64_000) == 0.1
    assert cfg.lr_at(32_000, 64_000) == pytest.approx(0.01) and cfg.lr_at(47_999, 64_000) == pytest.approx(0.01)
    assert cfg.lr_at(48_000, 64_000) == pytest.approx(0.001)
    assert (cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.9, 5e-4, 128)
    cosine = ls.TrainConfig(epochs=10, schedule="cosine")
    assert cosine.lr_at(0, 100) == 0.1 and cosine.lr_at(50, 100) == pytest.approx(0.05)
    imagenet = ls.TrainConfig(epochs=50, milestones=(0.3, 0.6, 0.9))
    assert imagenet.lr_at(14, 50) == 0.1 and imagenet.lr_at(45, 50) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "give exactly one budget"),
        (dict(epochs=2, iterations=5), "give exactly one budget"),
        (dict(epochs=0), "epochs must be an integer >= 1, got epochs=0"),
        (dict(epochs=2, batch_size=0), "batch_size must be an integer >= 1, got batch_size=0"),
        (dict(epochs=2, lr=float("nan")), "lr must be a finite number > 0, got lr=nan"),
        (dict(epochs=2, lr=-0.1), "lr must be a finite number > 0, got lr=-0.1"),
        (dict(epochs=2, schedule="linear"), "schedule must be 'step' or 'cosine', got schedule='linear'"),
        (dict(epochs=2, milestones=(0.75, 0.5)), "milestones must be increasing fractions"),
        (dict(epochs=2, device="gpu"), "device must be a torch device"),
        (dict(epochs=2, device="cpu:1"), r"\(the CPU is one: 'cpu' or 'cpu:0'\), got device='cpu:1'"),
    ],
)
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ls.TrainConfig(**kwargs)


def test_fold_level_errors(small):
    data, fold = small
    with pytest.raises(ValueError, match="batch_size=500 exceeds the fold's 120 training images"):
        ls.train_fold(data, fold, 1e-4, ls.TrainConfig(epochs=1, batch_size=500))
    with pytest.raises(ValueError, match="e_lambda must be a finite number > 0"):
        ls.train_fold(data, fold, 0.0, CFG)
    with pytest.raises(ValueError, match="the engine was built for"):
        ls.train_fold(data, fold, 1e-4, CFG, engine=_engine.Engine("resnet20", 10))


@pytest.mark.slow
def test_dropout_draws_the_same_masks_however_the_training_runs(small, tmp_path):
    """A network that draws random numbers as it trains (the WideResNets' dropout) draws them
    from the training's seed and the step: two runs, and a run stopped and resumed from its
    checkpoint with the process's generator moved on in between, give the same numbers."""
    data, fold = small
    model = "toy_networks:TINY_WIDE"
    cfg = ls.TrainConfig(epochs=2, batch_size=24, lr=0.05, checkpoint_every_seconds=None)
    whole = ls.train_fold(data, fold, 1e-4, cfg, model=model)
    torch.rand(1000)  # the caller's generator elsewhere: no matter
    same_result(whole, ls.train_fold(data, fold, 1e-4, cfg, model=model))
    ckpt = tmp_path / "fold.pt"
    stopped = ls.train_fold(data, fold, 1e-4, cfg, model=model, callback=lambda m: m.epoch == 1, checkpoint=ckpt)
    assert stopped.status == "stopped"
    torch.rand(1000)
    same_result(whole, ls.train_fold(data, fold, 1e-4, cfg, model=model, checkpoint=ckpt))
    before = torch.random.get_rng_state()
    ls.train_fold(data, fold, 1e-4, cfg, model=model)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is left as it was
