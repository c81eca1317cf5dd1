"""Batched augmentation and cross-validation folds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lambda_search as ls
from lambda_search.data import augment as _augment
from lambda_search.data import folds as _folds


def images(n=64, c=3, size=8, seed=0):
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_crops_stay_inside_the_padded_image_and_cover_every_offset():
    x = images(n=400)
    pad = 2
    out = _augment.random_crop_flip(x, pad, False, torch.Generator().manual_seed(1))
    padded = F.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])]
        assert found, f"image {i} is not a window of its padded image"
        offsets.add(found[0])
    assert len(offsets) == (2 * pad + 1) ** 2


def test_flips_flip_about_half():
    x = images(n=1000)
    out = _augment.random_crop_flip(x, 0, True, torch.Generator().manual_seed(2))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 400 < int(flipped.sum()) < 600
    assert torch.equal(_augment.random_crop_flip(x, 0, False, torch.Generator()), x)


def test_augmentation_is_reproducible_from_the_generator():
    x = images()
    a = _augment.random_crop_flip(x, 4, True, torch.Generator().manual_seed(5))
    b = _augment.random_crop_flip(x, 4, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_random_resized_crop_of_the_whole_image_is_the_image():
    x = images(n=8, size=16)
    g = torch.Generator().manual_seed(0)
    whole = _augment.random_resized_crop(x, 16, (1.0, 1.0), (1.0, 1.0), False, g)
    torch.testing.assert_close(whole, x.float(), atol=1e-3, rtol=0)
    half = _augment.random_resized_crop(x, 8, (1.0, 1.0), (1.0, 1.0), False, g)
    torch.testing.assert_close(
        half, F.interpolate(x.float(), size=8, mode="bilinear", align_corners=False), atol=1e-3, rtol=0
    )
    flipped = _augment.random_resized_crop(x, 16, (1.0, 1.0), (1.0, 1.0), True, torch.Generator().manual_seed(3))
    for o, i in zip(flipped, x.float()):
        assert torch.allclose(o, i, atol=1e-3) or torch.allclose(o, i.flip(2), atol=1e-3)


def test_random_resized_crop_boxes_lie_inside_the_image():
    """A constant image with a bright border: a crop inside the image never sees outside."""
    x = torch.full((200, 1, 32, 32), 100, dtype=torch.uint8)
    out = _augment.random_resized_crop(x, 8, (0.08, 1.0), (3 / 4, 4 / 3), True, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, torch.full_like(out, 100.0))
    assert out.shape == (200, 1, 8, 8)


def test_normalize():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    torch.testing.assert_close(_augment.normalize(x, (0.5,), (0.25,)), torch.tensor([[[[-2.0, 2.0]]]]))


def labels(counts=(30, 20, 12)):
    return np.repeat(np.arange(len(counts)), counts)


def test_folds_are_disjoint_covering_and_stratified():
    y = labels()
    folds = ls.make_folds(y, n_splits=4, seed=0)
    assert len(folds) == 4
    vals = np.concatenate([f.val for f in folds])
    assert sorted(vals.tolist()) == list(range(len(y)))
    for f in folds:
        assert len(np.intersect1d(f.train, f.val)) == 0
        assert len(f.train) + len(f.val) == len(y)
        for k, count in enumerate((30, 20, 12)):
            assert abs((y[f.val] == k).sum() - count / 4) <= 1
        assert f.train.dtype == np.int64 and np.all(np.diff(f.train) > 0)


def test_folds_are_reproducible_and_repeats_differ():
    y = labels()
    a = ls.make_folds(y, n_splits=3, seed=11, repeats=2)
    b = ls.make_folds(y, n_splits=3, seed=11, repeats=2)
    assert [f.name for f in a] == ["r0f0", "r0f1", "r0f2", "r1f0", "r1f1", "r1f2"]
    assert all(np.array_equal(p.val, q.val) for p, q in zip(a, b))
    assert not np.array_equal(a[0].val, a[3].val)
    c = ls.make_folds(y, n_splits=3, seed=12)
    assert not np.array_equal(a[0].val, c[0].val)
    assert _folds.folds_fingerprint(a, "d") == _folds.folds_fingerprint(b, "d")
    assert _folds.folds_fingerprint(a, "d") != _folds.folds_fingerprint(c, "d")
    assert _folds.folds_fingerprint(a, "d") != _folds.folds_fingerprint(a, "e")


def test_holdout_is_one_stratified_split_per_repeat():
    y = labels((500, 300, 200))
    folds = ls.make_folds(y, holdout=0.1, seed=0, repeats=5)
    assert len(folds) == 5 and {f.index for f in folds} == {0}
    for f in folds:
        assert len(f.val) == 100 and len(f.train) == 900
        assert [(y[f.val] == k).sum() for k in range(3)] == [50, 30, 20]
    assert len({f.val.tobytes() for f in folds}) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_splits=1), "n_splits must be an integer >= 2, got n_splits=1"),
        (dict(n_splits=13), r"n_splits must be <= the smallest class count \(12\), got n_splits=13"),
        (dict(n_splits=2.5), "n_splits must be an integer >= 2, got n_splits=2.5"),
        (dict(holdout=0.0), r"holdout must be a fraction in \(0, 1\), got holdout=0.0"),
        (dict(holdout=1.0), r"holdout must be a fraction in \(0, 1\), got holdout=1.0"),
        (dict(holdout=-0.2), r"holdout must be a fraction in \(0, 1\), got holdout=-0.2"),
        (dict(holdout=0.01), "each side needs at least one per class"),
        (dict(repeats=0), "repeats must be an integer >= 1, got repeats=0"),
        (dict(seed=-1), "seed must be an integer >= 0, got seed=-1"),
    ],
)
def test_fold_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ls.make_folds(labels(), **kwargs)
