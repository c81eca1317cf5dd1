"""The last step of the paper's procedure: train the chosen lambda (and the network without
SimAM) on the whole training set, seed by seed, and report top-1 accuracy on the test split.

The final trainings are the points of a companion study ``NAME:final`` in the same storage:
its config is the search's with ``data.test`` on (every training image against the test
split: one "fold" per seed), ``search.lambdas`` the one lambda, ``search.repeats`` the seeds
(each seed a repeat, shared by both networks: paired) and ``train.eval_every`` past the
budget (the test split is evaluated once, on the final model). So each (network, seed)
runs exactly once under any workers and kills, resumes from its checkpoint, and records its
numerics, as a search's point does; a second ``evaluate`` trains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import FINAL_SUFFIX, HELD_OUT_TEST, Config, ConfigError, check_lambda
from ..points import format_lambda
from ..report.evaluation import plural, read_evaluation
from ..report.select import PREFER, select
from ..store.status import (
    CONFIG_ATTR,
    EVALUATE_ATTR,
    FINGERPRINT_ATTR,
    StudyError,
    StudyStatus,
    completed_config,
    final_study_name,
    study_status,
)
from ..store.storage import Store, open_store
from ..train.plan import make_plan
from .study import resume_config, run_search

__all__ = ["run_evaluation", "final_config", "FINAL_EVAL_EVERY"]

FINAL_EVAL_EVERY = 2**31 - 1  # train.eval_every of a final training: past any budget, so only its end is tested


def final_config(config: Config, e_lambda: float, seeds: int) -> Config:
    """The config of study ``config``'s final evaluation: the same model, data, budget,
    schedule and optimiser; ``e_lambda`` alone (and the baseline where the search had one);
    ``seeds`` seeds; every training image against the test split; checkpoints beside the
    search's (``<checkpoint_dir>-final``)."""
    ckpt = config.study.checkpoint_dir
    if ckpt is not None:
        ckpt = str(Path(ckpt).with_name(Path(ckpt).stem + "-final" + Path(ckpt).suffix))
    return (config.replace("study", name=final_study_name(config.study.name), checkpoint_dir=ckpt)
            .replace("search", lambdas=(float(e_lambda),), repeats=seeds, strategy="grid")  # the chosen lambda only
            .replace("data", test=True).replace("train", eval_every=FINAL_EVAL_EVERY))


def _check(seeds: int, e_lambda: float | None, prefer: str) -> None:
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if e_lambda is not None:
        check_lambda(e_lambda, "--lambda", repr(e_lambda))
    if prefer not in PREFER:
        raise ConfigError(f"prefer must be 'larger' or 'smaller', got prefer={prefer!r}")


def _evaluable(status: StudyStatus, config: Config) -> None:
    """Refuse a study that is not finished, or whose folds covered every image."""
    if not status.finished:
        raise StudyError(f"study {status.name!r} is not finished ({status.complete} of {status.total} points "
                         f"complete): finish it first (lambda-search resume --storage URL --study {status.name})")
    data = config.data
    if data.dataset in HELD_OUT_TEST and not data.test_fraction:
        raise StudyError(f"study {status.name!r} cross-validated on every image of {data.dataset!r} "
                         "(data.test_fraction = 0, or a study made before it existed): no image is left to test "
                         "on; run a new search with data.test_fraction > 0")


def _same_data(store: Store, name: str, config: Config) -> None:
    """The training set the search cross-validated, whatever ``--set data.root`` says: the
    folds' fingerprint of ``config`` must be the stored one."""
    if make_plan(config).fingerprint != store.study_attrs(name).get(FINGERPRINT_ATTR):
        raise StudyError(f"the data set or its folds differ from those study {name!r} was made with; check data.root "
                         "(--set data.root=...): the final evaluation trains on the images the search saw")


def _choice(status: StudyStatus, e_lambda: float | None, prefer: str) -> tuple[float, str]:
    """The lambda to evaluate and how it was chosen."""
    if e_lambda is not None:
        return float(e_lambda), "given with --lambda, not chosen by the rule"
    sel = select(status, prefer)
    if sel["one_se"] is None:
        raise StudyError(f"study {status.name!r}: no lambda can be chosen ({sel['diverged']} of {sel['lambdas']} "
                         "diverged); give one with --lambda")
    return sel["one_se"]["e_lambda"], f"chosen by the one-SE rule (prefer {prefer})"


def _check_final(store: Store, name: str, e_lambda: float, seeds: int) -> None:
    """A final study, once made, evaluates one lambda with its seeds: asking for another is
    refused, saying how to see it (nothing is trained or changed)."""
    final = final_study_name(name)
    attrs = store.study_attrs(final)
    if CONFIG_ATTR not in attrs:  # none, or killed as it was made
        return
    held = completed_config(attrs[CONFIG_ATTR]).search
    if held.lambdas != (e_lambda,):
        raise StudyError(f"study {final!r} evaluates lambda = {format_lambda(held.lambdas[0])}, not "
                         f"{format_lambda(e_lambda)}: run evaluate --lambda {held.lambdas[0]!r} to see it")
    if held.repeats != seeds:
        raise StudyError(f"study {final!r} trains {plural(held.repeats, 'seed')} per network, not {seeds}: "
                         f"run evaluate --seeds {held.repeats} to see it")


def run_evaluation(url: str, name: str, *, seeds: int = 3, e_lambda: float | None = None, prefer: str = "larger",
                   overrides=(), workers: int | str | None = None, log: Callable[[str], None] = print,
                   progress: Callable[[str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Train the lambda ``select`` chooses (or ``e_lambda``) and the baseline, ``seeds``
    seeds each, on study ``name``'s whole training set, test each final model on the test
    split, and return :func:`read_evaluation`. Everything is checked before anything is
    stored; ``overrides`` change where and how fast it runs, as for ``resume``."""
    _check(seeds, e_lambda, prefer)
    if name.endswith(FINAL_SUFFIX):
        raise StudyError(f"study {name!r} is a final evaluation: evaluate its search, --study "
                         f"{name[: -len(FINAL_SUFFIX)]}")
    store = open_store(url, write=True)
    status = study_status(store, name)
    config = resume_config(url, name, overrides)
    _evaluable(status, config)
    _same_data(store, name, config)
    lam, how = _choice(status, e_lambda, prefer)
    _check_final(store, name, lam, seeds)
    final = final_config(config, lam, seeds)
    log(f"final evaluation of study {name!r}: lambda = {format_lambda(lam)}, {how}, and "
        f"{'the baseline' if config.search.baseline else 'no baseline (search.baseline = false)'}, "
        f"{seeds} seed{'s' if seeds > 1 else ''} each (seed N is repeat N), as study {final.study.name!r}")
    run_search(final, workers=workers, log=log, progress=progress, should_stop=should_stop)
    if EVALUATE_ATTR not in store.study_attrs(final.study.name):  # how the lambda was chosen: the first run's
        store.set_study_attr(final.study.name, EVALUATE_ATTR, {"e_lambda": lam, "chosen_by": how, "seeds": seeds})
    return read_evaluation(store, name)
