"""Packed training: a pack of N networks equals N separate trainings with the same seeds."""

import pytest
import torch

import lambda_search as ls
from lambda_search.train import engine as _engine
from lambda_search.train import pack as _pack
from lambda_search.train.pack import train_pack

CFG = ls.TrainConfig(epochs=3, batch_size=17, lr=0.05, checkpoint_every_seconds=None)
LAMBDAS = [1e-4, 1e-1, 3.0]


@pytest.fixture(scope="module")
def data():
    # folds of 67, 67 and 68 training images: 3, 3 and 4 steps per epoch, so members end their
    # epochs, and the pack, at different steps
    data = ls.load_dataset("synthetic", num_samples=101, num_classes=4, image_size=8, seed=3)
    return data, ls.make_folds(data.labels, n_splits=3, seed=0)


def checkpoint(path):
    return torch.load(path, weights_only=True)


def close_results(packed, alone, tol=2e-4):
    assert packed.status == alone.status == "completed"
    assert packed.iterations == alone.iterations and packed.seed == alone.seed and packed.fold == alone.fold
    assert packed.val_accuracy == alone.val_accuracy
    assert packed.val_loss == pytest.approx(alone.val_loss, rel=tol, abs=tol)
    assert [(m.epoch, m.iteration, m.lr, m.val_accuracy) for m in packed.curve] == \
           [(m.epoch, m.iteration, m.lr, m.val_accuracy) for m in alone.curve]
    for a, b in zip(packed.curve, alone.curve):
        assert a.train_loss == pytest.approx(b.train_loss, rel=tol, abs=tol)


def close_states(packed, alone, tol=2e-4):
    assert packed.keys() == alone.keys()
    for key in alone:
        assert packed[key].shape == alone[key].shape, key
        torch.testing.assert_close(packed[key], alone[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("shortcut", ["B", "A"])
def test_a_pack_equals_separate_trainings(data, tmp_path, shortcut):
    # in float64, so that float rounding stays far below what the training amplifies: a
    # grouped convolution sums in another order than a plain one, and a few SGD steps on
    # noise turn 1e-7 into 1e-2 in float32 (see the float32 test below)
    data, folds = data
    seeds = [11, 12, 13]
    engine = _engine.Engine("resnet20", data.num_classes, shortcut=shortcut, dtype=torch.float64)
    alone = [ls.train_fold(data, fold, lam, CFG, seed=seed, shortcut=shortcut, engine=engine,
                           checkpoint=tmp_path / f"alone-{fold.name}.pt")
             for fold, lam, seed in zip(folds, LAMBDAS, seeds)]
    packed = train_pack(data, folds, LAMBDAS, CFG, seeds=seeds, shortcut=shortcut, engine=engine,
                           checkpoints=[tmp_path / f"pack-{f.name}.pt" for f in folds])
    assert [r.iterations for r in packed] == [9, 9, 12]
    for fold, p, a in zip(folds, packed, alone):
        close_results(p, a, tol=1e-9)
        cp, ca = checkpoint(tmp_path / f"pack-{fold.name}.pt"), checkpoint(tmp_path / f"alone-{fold.name}.pt")
        assert cp["key"] == ca["key"] and cp["iteration"] == ca["iteration"]
        assert cp["epoch_loss"] == ca["epoch_loss"] == 0 and cp["epoch_steps"] == ca["epoch_steps"] == 0
        close_states(cp["model"], ca["model"], tol=1e-9)
        cb, ab = ({i: s["momentum_buffer"] for i, s in c["optimizer"]["state"].items()} for c in (cp, ca))
        close_states(cb, ab, tol=1e-9)
        assert cp["optimizer"]["param_groups"] == ca["optimizer"]["param_groups"]
        assert cp["generator"].equal(ca["generator"])


def test_a_float32_pack_matches_separate_trainings_on_its_first_step(data, tmp_path):
    # float32 (SimAM's CPU kernel with per-channel lambdas), one SGD step: the two sum in
    # different orders, and after a few steps on noise training turns that into whole
    # percents, differently on each CPU; one step compares the arithmetic itself (the
    # float64 test above is the proof over many steps)
    data, folds = data
    cfg = ls.TrainConfig(iterations=1, batch_size=17, lr=0.05, checkpoint_every_seconds=None)
    engine = _engine.Engine("resnet20", data.num_classes)
    alone = [ls.train_fold(data, fold, lam, cfg, seed=7, engine=engine, checkpoint=tmp_path / f"a{fold.name}.pt")
             for fold, lam in zip(folds, LAMBDAS)]
    packed = train_pack(data, folds, LAMBDAS, cfg, seeds=[7, 7, 7], engine=engine,
                           checkpoints=[tmp_path / f"p{fold.name}.pt" for fold in folds])
    for fold, p, a in zip(folds, packed, alone):
        assert p.iterations == a.iterations == 1 and p.status == a.status == "completed"
        assert p.curve[0].train_loss == pytest.approx(a.curve[0].train_loss, rel=1e-5)
        assert p.val_loss == pytest.approx(a.val_loss, rel=1e-4)
        close_states(checkpoint(tmp_path / f"p{fold.name}.pt")["model"],
                     checkpoint(tmp_path / f"a{fold.name}.pt")["model"], tol=1e-5)


def test_a_pack_of_the_baseline_network_with_nesterov(data):
    data, folds = data
    cfg = ls.TrainConfig(iterations=7, batch_size=16, lr=0.05, nesterov=True, weight_decay=1e-3,
                         checkpoint_every_seconds=None)
    engine = _engine.Engine("resnet20", data.num_classes, attention="none", dtype=torch.float64)
    alone = [ls.train_fold(data, f, None, cfg, attention="none", seed=5, engine=engine) for f in folds[:2]]
    packed = train_pack(data, folds[:2], [None, None], cfg, attention="none", seeds=[5, 5], engine=engine)
    for p, a in zip(packed, alone):
        close_results(p, a, tol=1e-9)


@pytest.mark.slow
def test_a_stopped_pack_resumes_packed_or_alone(data, tmp_path):
    data, folds = data
    seeds = [1, 2, 3]
    paths = [tmp_path / f"{f.name}.pt" for f in folds]
    steps = []
    engine = _engine.Engine("resnet20", data.num_classes, dtype=torch.float64)
    stopped = train_pack(data, folds, LAMBDAS, CFG, seeds=seeds, checkpoints=paths, engine=engine,
                            should_stop=lambda: steps.append(1) or len(steps) >= 2)
    assert [r.status for r in stopped] == ["stopped"] * 3
    assert all(checkpoint(p)["iteration"] == 2 for p in paths)  # mid-epoch
    # member 0 resumes on its own, members 1 and 2 as a pack of two
    first = ls.train_fold(data, folds[0], LAMBDAS[0], CFG, seed=seeds[0], checkpoint=paths[0], engine=engine)
    rest = train_pack(data, folds[1:], LAMBDAS[1:], CFG, seeds=seeds[1:], checkpoints=paths[1:], engine=engine)
    for fold, lam, seed, resumed in zip(folds, LAMBDAS, seeds, [first, *rest]):
        assert resumed.resumed_from_iteration == 2
        close_results(resumed, ls.train_fold(data, fold, lam, CFG, seed=seed, engine=engine), tol=1e-9)


def test_a_diverging_member_fails_alone(data):
    data, folds = data
    cfg = ls.TrainConfig(iterations=4, batch_size=16, lr=0.05, checkpoint_every_seconds=None)
    engine = _engine.Engine("resnet20", data.num_classes, dtype=torch.float64)
    packs = _pack.Packs(engine)
    pack = packs(2)
    real_load = pack.load

    def poisoned(p, state, momentum, e_lambda):  # member 1 starts with a NaN weight
        real_load(p, state, momentum, e_lambda)
        if p == 1:
            with torch.no_grad():
                pack.model.fc.weight[1, 0, 0] = float("nan")

    pack.load = poisoned
    good, bad = train_pack(data, folds[:2], [1e-4, 1e-4], cfg, seeds=[0, 0], packs=packs)
    assert bad.status == "diverged" and bad.diverged_at_step == 1 and bad.val_accuracy is None
    close_results(good, ls.train_fold(data, folds[0], 1e-4, cfg, seed=0, engine=engine), tol=1e-9)


def test_pack_errors_name_the_value(data):
    data, folds = data
    with pytest.raises(ValueError, match="one lambda, seed"):
        train_pack(data, folds, [1e-4], CFG, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="e_lambda must be a finite number > 0, got e_lambda=0"):
        train_pack(data, folds[:1], [0], CFG, seeds=[0])
    with pytest.raises(ValueError, match="pack size must be an integer >= 1, got size=0"):
        _pack.Pack(_engine.Engine("resnet20", 4), 0)


def test_a_pack_of_one_equals_train_fold(data):
    # what the search runs on GPUs for a single fold (there as a CUDA graph)
    data, folds = data
    engine = _engine.Engine("resnet20", data.num_classes, dtype=torch.float64)
    alone = ls.train_fold(data, folds[2], 0.1, CFG, seed=4, engine=engine)
    [packed] = train_pack(data, folds[2:], [0.1], CFG, seeds=[4], engine=engine)
    close_results(packed, alone, tol=1e-9)


def test_packed_validation_equals_each_network_alone(data):
    # validation sets of different lengths, batches that do not divide them, a skipped slot
    data, folds = data
    engine = _engine.Engine("resnet20", data.num_classes, dtype=torch.float64)
    pack = _pack.Pack(engine, 3)
    states = [engine.fresh(seed).state_dict() for seed in (1, 2, 3)]
    for p, (state, lam) in enumerate(zip(states, LAMBDAS)):
        pack.load(p, state, None, lam)
    indices = [torch.as_tensor(folds[0].val), None, torch.as_tensor(folds[2].val[:20])]
    got = pack.evaluate(data, indices, batch_size=16)
    assert got[1] is None
    for p in (0, 2):
        engine.model.load_state_dict(states[p])
        ls.set_e_lambda(engine.model, LAMBDAS[p])
        accuracy, loss = _engine._evaluate(engine, data, indices[p], 16)
        assert got[p][0] == accuracy
        assert got[p][1] == pytest.approx(loss, rel=1e-12)


def test_packs_are_kept_by_their_owner_not_by_the_engine(data):
    # the packed path knows the engine, never the other way round: a Packs (kept by whoever
    # owns the engine) builds a pack once per size and train_pack takes it from there
    data, folds = data
    cfg = ls.TrainConfig(iterations=2, batch_size=16, lr=0.05, checkpoint_every_seconds=None)
    engine = _engine.Engine("resnet20", data.num_classes, dtype=torch.float64)
    packs = _pack.Packs(engine)
    assert packs(2) is packs(2) and packs(3) is not packs(2) and packs(2).engine is engine
    assert not any("pack" in name for name in vars(engine))
    built = packs(2)
    kept = train_pack(data, folds[:2], [1e-4, 0.1], cfg, seeds=[0, 1], packs=packs)
    assert packs(2) is built
    own = train_pack(data, folds[:2], [1e-4, 0.1], cfg, seeds=[0, 1], engine=engine)  # a pack of its own
    for a, b in zip(kept, own):
        close_results(a, b, tol=0)
    with pytest.raises(ValueError, match="packs of another engine"):
        train_pack(data, folds[:2], [1e-4, 0.1], cfg, seeds=[0, 1], packs=packs,
                      engine=_engine.Engine("resnet20", data.num_classes, dtype=torch.float64))
