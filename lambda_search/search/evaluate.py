"""The last step of the paper's procedure: train the chosen lambda (and the network without
SimAM) on the whole training set, seed by seed, and report top-1 accuracy on the test split.

The final trainings are the points of a companion study ``NAME:final`` in the same storage:
its config is the search's with ``data.test`` on (every training image against the test
split: one "fold" per seed), ``search.lambdas`` the one lambda, ``search.repeats`` the seeds
(each seed a repeat, shared by both networks: paired) and ``train.eval_every`` past the
budget (the test split is evaluated once, on the final model). So each (network, seed)
runs exactly once under any workers and kills, resumes from its checkpoint, and records its
numerics, as a search's point does; a second ``evaluate`` trains nothing.

The paper's Table 2 carries the chosen lambda to other networks and data sets: each (network,
data set) is a companion study of its own, ``NAME:final:COLUMN`` (``search.columns``), made and
run the same way; a study name of a user's holds no ':', so none can collide with one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import HELD_OUT_TEST, Config, ConfigError, DataSection, check_lambda, final_parts
from ..configfile import parse_override
from ..nn.registry import MODEL_LABELS, network_spec
from ..points import format_lambda
from ..report.evaluation import asked_table, plural, read_evaluations
from ..report.select import PREFER, select
from ..store.status import (
    CONFIG_ATTR,
    EVALUATE_ATTR,
    FINGERPRINT_ATTR,
    StudyError,
    StudyStatus,
    completed_config,
    final_study_names,
    study_status,
)
from ..store.storage import Store, open_store
from ..train.plan import make_plan
from .columns import data_tag, final_config, held_checkpoints, other_data, searched_data
from .study import check_resumable, resume_config, run_search
from .study import dry_run as study_dry_run

__all__ = ["run_evaluation", "plan_evaluation", "EvaluationPlan"]

def _check(seeds: int, e_lambda: float | None, prefer: str, networks) -> None:
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if e_lambda is not None:
        check_lambda(e_lambda, "--lambda", repr(e_lambda))
    if prefer not in PREFER:
        raise ConfigError(f"prefer must be 'larger' or 'smaller', got prefer={prefer!r}")
    if networks is not None:
        if not networks or not all(networks) or len(set(networks)) != len(networks):
            raise ConfigError(f"--networks takes network names, each once, separated by commas, got "
                              f"{','.join(networks)!r}")
        for network in networks:
            try:
                network_spec(network)
            except ValueError as exc:
                raise ConfigError(f"--networks: {exc}") from None


def _evaluable(status: StudyStatus) -> None:
    """Refuse a study that is not finished."""
    if not status.finished:
        raise StudyError(f"study {status.name!r} is not finished ({status.complete} of {status.total} points "
                         f"complete): finish it first (lambda-search resume --storage {status.storage} --study "
                         f"{status.name})")


def _testable(data: DataSection, search: str, searched: bool) -> None:
    """Refuse a final evaluation with no image to test on."""
    if data.dataset in HELD_OUT_TEST and not data.test_fraction:
        if searched:
            raise StudyError(f"study {search!r} cross-validated on every image of {data.dataset!r} "
                             "(data.test_fraction = 0, or a study made before it existed): no image is left to test "
                             "on; run a new search with data.test_fraction > 0")
        raise ConfigError(f"--set data.test_fraction=0 leaves no image of {data.dataset!r} to test on; give a "
                          "fraction in (0, 1)")


def _same_data(store: Store, name: str, config: Config, device: str | None) -> None:
    """The training set the search cross-validated, whatever ``--set data.root`` says: the
    folds' fingerprint of ``config`` must be the stored one."""
    if make_plan(config, device).fingerprint != store.study_attrs(name).get(FINGERPRINT_ATTR):
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


def _check_final(store: Store, name: str, final: str, e_lambda: float, seeds: int) -> None:
    """A study's final evaluations, once made, evaluate one lambda (the rows of one table), and
    each its seeds: asking for others is refused, saying how to see them (nothing is trained
    or changed)."""
    for made in final_study_names(store, name):
        held = completed_config(store.study_attrs(made)[CONFIG_ATTR]).search
        if held.lambdas != (e_lambda,):
            raise StudyError(f"study {made!r} evaluates lambda = {format_lambda(held.lambdas[0])}, not "
                             f"{format_lambda(e_lambda)}: run evaluate --lambda {held.lambdas[0]!r} to see it (a "
                             "study's final evaluations are one table: one lambda)")
        if made == final and held.repeats != seeds:
            raise StudyError(f"study {final!r} trains {plural(held.repeats, 'seed')} per network, not {seeds}: "
                             f"run evaluate --seeds {held.repeats} to see it")


def _finals(store: Store, status: StudyStatus, config: Config, lam: float, seeds: int, networks,
            data: DataSection | None, moved: bool, device: str | None) -> list[Config]:
    """Every final evaluation asked for, each checked (its data and network loaded, a column
    made before against it) before any is stored or trained."""
    _testable(data or config.data, status.name, data is None)
    if data is None:
        _same_data(store, status.name, config, device)
    tag = None if data is None else data_tag(make_plan(final_config(config, lam, 1, data=data, tag="probe"), device))
    finals = [final_config(config, lam, seeds, network, data, tag) for network in networks or [config.model.name]]
    if not moved:  # (--set study.checkpoint_dir moves them all)
        finals = [held_checkpoints(store, final) for final in finals]
    for final in finals:
        _check_final(store, status.name, final.study.name, lam, seeds)
        check_resumable(store, final, make_plan(final, device))  # data, network, smallest input, every value
    return finals


@dataclass
class EvaluationPlan:
    """The final evaluations asked for, each checked: their configs (one study each), the
    choice stored with each before its first trial, the storage."""

    store: Store
    name: str
    finals: list[Config]
    chosen: dict
    said: str  # what it evaluates, one line

    @property
    def studies(self) -> list[str]:
        return [f.study.name for f in self.finals]


def plan_evaluation(url: str, name: str, *, seeds: int = 3, e_lambda: float | None = None, prefer: str = "larger",
                    networks=None, overrides=(), write: bool = True, device: str | None = None) -> EvaluationPlan:
    """Check everything :func:`run_evaluation` would train (the study finished, the lambda,
    the networks, the data), storing nothing. ``device``: the device to check the plans on
    instead of train.device (``submit`` on a login node without the study's GPU)."""
    _check(seeds, e_lambda, prefer, networks)
    if final_parts(name) is not None:
        raise StudyError(f"study {name!r} is a final evaluation: evaluate its search, --study {final_parts(name)[0]}")
    store = open_store(url, write=write)  # (a dry run reads: it repairs nothing, stores nothing)
    status = study_status(store, name)
    data = other_data(status.config, overrides)
    config = resume_config(url, name, [o for o in overrides if data is None or parse_override(o)[0] != "data"])
    if data is not None and searched_data(config, data):  # the searched data set, where the overrides say it lies
        config, data = config.replace("data", root=data.root, download=data.download), None
    _evaluable(status)
    lam, how = _choice(status, e_lambda, prefer)
    moved = any(parse_override(o)[:2] == ("study", "checkpoint_dir") for o in overrides)
    finals = _finals(store, status, config, lam, seeds, networks, data, moved, device)
    chosen = {EVALUATE_ATTR: {"e_lambda": lam, "chosen_by": how, "seeds": seeds,  # stored before the first trial
                              "prefer": None if e_lambda is not None else prefer}}
    said = (f"final evaluation of study {name!r}: lambda = {format_lambda(lam)}, {how}, and "
            f"{'the baseline' if config.search.baseline else 'no baseline (search.baseline = false)'}, "
            f"{plural(seeds, 'seed')} each (seed N is repeat N), as "
            + ", ".join(f"study {f.study.name!r} ({MODEL_LABELS.get(f.model.name, f.model.name)}, {f.data.dataset})"
                        for f in finals))
    return EvaluationPlan(store, name, finals, chosen, said)


def run_evaluation(url: str, name: str, *, seeds: int = 3, e_lambda: float | None = None, prefer: str = "larger",
                   networks=None, overrides=(), workers: int | str | None = None, holm: bool = False,
                   dry_run: bool = False,
                   log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Train the lambda ``select`` chooses (or ``e_lambda``) and the baseline, ``seeds`` seeds
    each, on study ``name``'s whole training set, test each final model on the test split,
    and return :func:`read_evaluations` (every column the study's evaluation holds). With
    ``networks`` (names), each of them instead of the searched network; with ``--set
    data.KEY=...`` among ``overrides``, on that data set (:func:`other_data`): each (network,
    data set) its own companion study, so a later run with more of them reuses what is done.
    Everything is checked before anything is stored (:func:`plan_evaluation`); the other
    ``overrides`` change where and how fast it runs, as for ``resume``. With ``dry_run``, what
    each would train and its projection are logged, and nothing is stored or trained."""
    ev = plan_evaluation(url, name, seeds=seeds, e_lambda=e_lambda, prefer=prefer, networks=networks,
                         overrides=overrides, write=not dry_run)
    log(ev.said)
    for final in ev.finals:
        if should_stop is not None and should_stop():
            break
        if dry_run:  # what it would train, and the projection: nothing stored
            for line in study_dry_run(final):
                log("  " + line)
            continue
        run_search(final, workers=workers, log=log, progress=progress, should_stop=should_stop, attrs=ev.chosen)
    return asked_table(read_evaluations(ev.store, name, holm=holm), name, ev.studies)
