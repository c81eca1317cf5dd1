"""Cross-validation folds over a training set.

A fold is a pair of index arrays (train, validation). The same labels and seed give the
same folds, whatever lambda is trained on them, so lambdas compare fold by fold.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

__all__ = ["Fold", "make_folds", "folds_fingerprint", "derive_seed", "test_split", "final_folds", "TEST_SPLIT_KEY"]

TEST_SPLIT_KEY = 23  # derive_seed(data.seed, TEST_SPLIT_KEY): the held-out test split's own seed


@dataclass(frozen=True, eq=False)
class Fold:
    repeat: int  # which repetition of the split (0 ... repeats-1)
    index: int  # which fold of that split (0 ... n_splits-1; 0 for a holdout)
    train: np.ndarray  # int64 indices into the training set, sorted
    val: np.ndarray
    seed: int  # the seed that made this repeat's split

    @property
    def name(self) -> str:
        return f"r{self.repeat}f{self.index}"


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and ``keys`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    return int(value)


def test_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split of a data set without a test split of its own: (the indices
    the folds are made from, the held-out test indices), sorted. ``fraction`` of the images
    (rounded up) are held out, by ``derive_seed(seed, TEST_SPLIT_KEY)``: the same labels,
    fraction and seed give the same split, and the folds never see its test images."""
    y = np.asarray(labels)
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"test_fraction must be a fraction in (0, 1), got test_fraction={fraction!r}")
    classes = len(np.unique(y))
    n_test = int(np.ceil(fraction * len(y)))
    if n_test < classes or len(y) - n_test < classes:
        raise ValueError(f"test_fraction={fraction} leaves {n_test} test and {len(y) - n_test} other images; "
                         f"each side needs at least one per class ({classes})")
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=derive_seed(seed, TEST_SPLIT_KEY))
    keep, test = next(splitter.split(np.zeros(len(y)), y))
    return np.sort(keep).astype(np.int64), np.sort(test).astype(np.int64)


def final_folds(n_train: int, n_test: int, seed: int, seeds: int) -> list[Fold]:
    """The final evaluation's "folds": every training image (the first ``n_train``) against the
    test images after them, once per seed; fold ``r`` is seed ``r`` (its repeat)."""
    train, test = np.arange(n_train, dtype=np.int64), np.arange(n_train, n_train + n_test, dtype=np.int64)
    return [Fold(r, 0, train, test, derive_seed(int(seed), TEST_SPLIT_KEY, r)) for r in range(seeds)]


def make_folds(labels, n_splits: int = 5, seed: int = 0, repeats: int = 1,
               holdout: float | None = None) -> list[Fold]:
    """Stratified folds: ``n_splits``-fold cross-validation, or one stratified ``holdout``
    split (the validation fraction, e.g. 0.1 for the paper's 45k/5k), repeated ``repeats``
    times with seeds derived from ``seed``."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    repeats = _check_int("repeats", repeats, 1)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got seed={seed!r}")
    counts = np.unique(y, return_counts=True)[1]
    smallest = int(counts.min())
    if holdout is None:
        n_splits = _check_int("n_splits", n_splits, 2)
        if n_splits > smallest:
            raise ValueError(
                f"n_splits must be <= the smallest class count ({smallest}), got n_splits={n_splits}"
            )
    else:
        if not isinstance(holdout, numbers.Real) or isinstance(holdout, bool) or not 0 < holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1), got holdout={holdout!r}")
        n_val = int(np.ceil(holdout * len(y)))
        if n_val < len(counts) or len(y) - n_val < len(counts):
            raise ValueError(
                f"holdout={holdout} leaves {n_val} validation and {len(y) - n_val} training images; "
                f"each side needs at least one per class ({len(counts)})"
            )
    folds = []
    for r in range(repeats):
        rseed = derive_seed(int(seed), r)
        if holdout is None:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=rseed)
        else:
            splitter = StratifiedShuffleSplit(n_splits=1, test_size=holdout, random_state=rseed)
        for i, (train, val) in enumerate(splitter.split(np.zeros(len(y)), y)):
            folds.append(Fold(r, i, np.sort(train).astype(np.int64), np.sort(val).astype(np.int64), rseed))
    return folds


def folds_fingerprint(folds: list[Fold], data_fingerprint: str = "") -> str:
    """SHA-256 of a data set's fingerprint and the fold assignment."""
    h = hashlib.sha256(data_fingerprint.encode())
    for fold in folds:
        h.update(f"{fold.repeat}:{fold.index}:{len(fold.train)}:{len(fold.val)}\n".encode())
        h.update(fold.val.astype(np.int64).tobytes())
        h.update(fold.train.astype(np.int64).tobytes())
    return h.hexdigest()
