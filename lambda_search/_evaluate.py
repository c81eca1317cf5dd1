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

import copy
import math
from pathlib import Path
from typing import Callable

from ._config import E_LAMBDA_MIN, FINAL_SUFFIX, HELD_OUT_TEST, ConfigError, resolve_config
from ._data import TEST_SPLITS
from ._models import MODEL_LABELS
from ._objective import format_lambda, make_plan, summarize
from ._select import PREFER, corrected_t_test, lambda_stats, select
from ._status import CONFIG_ATTR, FINGERPRINT_ATTR, StudyError, StudyStatus, study_id, study_status
from ._storage import Store, open_store
from ._study import resume_config, run_search

__all__ = ["run_evaluation", "read_evaluation", "format_evaluation", "final_study_name", "final_config",
           "EVALUATE_ATTR", "FINAL_EVAL_EVERY"]

EVALUATE_ATTR = "lambda_search:evaluate"  # on NAME:final: its lambda and how it was chosen
FINAL_EVAL_EVERY = 2**31 - 1  # train.eval_every of a final training: past any budget, so only its end is tested


def final_study_name(name: str) -> str:
    return name + FINAL_SUFFIX


def final_config(config: dict, e_lambda: float, seeds: int) -> dict:
    """The config of study ``config``'s final evaluation: the same model, data, budget,
    schedule and optimiser; ``e_lambda`` alone (and the baseline where the search had one);
    ``seeds`` seeds; every training image against the test split; checkpoints beside the
    search's (``<checkpoint_dir>-final``)."""
    final = copy.deepcopy(config)
    final["study"]["name"] = final_study_name(config["study"]["name"])
    if final["study"]["checkpoint_dir"] is not None:
        ckpt = Path(final["study"]["checkpoint_dir"])
        final["study"]["checkpoint_dir"] = str(ckpt.with_name(ckpt.stem + "-final" + ckpt.suffix))
    final["search"].update(lambdas=[float(e_lambda)], repeats=seeds)
    final["data"]["test"] = True
    final["train"]["eval_every"] = FINAL_EVAL_EVERY
    return resolve_config(final, origin=f"the final evaluation of study {config['study']['name']!r}")


def _check(seeds: int, e_lambda: float | None, prefer: str) -> None:
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if e_lambda is not None and not (isinstance(e_lambda, (int, float)) and math.isfinite(e_lambda)
                                     and e_lambda >= E_LAMBDA_MIN):
        raise ConfigError(f"--lambda must be a finite number >= {E_LAMBDA_MIN!r} (lambda > 0), got {e_lambda!r}")
    if prefer not in PREFER:
        raise ConfigError(f"prefer must be 'larger' or 'smaller', got prefer={prefer!r}")


def _evaluable(status: StudyStatus, config: dict) -> None:
    """Refuse a study that is not finished, or whose folds covered every image."""
    if not status.finished:
        raise StudyError(f"study {status.name!r} is not finished ({status.complete} of {status.total} points "
                         f"complete): finish it first (lambda-search resume --storage URL --study {status.name})")
    data = config["data"]
    if data["dataset"] in HELD_OUT_TEST and not data["test_fraction"]:
        raise StudyError(f"study {status.name!r} cross-validated on every image of {data['dataset']!r} "
                         "(data.test_fraction = 0, or a study made before it existed): no image is left to test "
                         "on; run a new search with data.test_fraction > 0")


def _same_data(store: Store, name: str, config: dict) -> None:
    """The training set the search cross-validated, whatever ``--set data.root`` says: the
    folds' fingerprint of ``config`` must be the stored one."""
    if make_plan(config).fingerprint != store.storage.get_study_user_attrs(study_id(store, name)).get(FINGERPRINT_ATTR):
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
    sid = study_id(store, final)
    if sid is None:
        return
    held = store.storage.get_study_user_attrs(sid).get(CONFIG_ATTR, {}).get("search", {})
    if held.get("lambdas") and held["lambdas"] != [e_lambda]:
        raise StudyError(f"study {final!r} evaluates lambda = {format_lambda(held['lambdas'][0])}, not "
                         f"{format_lambda(e_lambda)}: run evaluate --lambda {held['lambdas'][0]!r} to see it")
    if held.get("repeats") not in (None, seeds):
        raise StudyError(f"study {final!r} trains {_plural(held['repeats'], 'seed')} per network, not {seeds}: "
                         f"run evaluate --seeds {held['repeats']} to see it")


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
        f"{'the baseline' if config['search']['baseline'] else 'no baseline (search.baseline = false)'}, "
        f"{seeds} seed{'s' if seeds > 1 else ''} each (seed N is repeat N), as study {final['study']['name']!r}")
    run_search(final, workers=workers, log=log, progress=progress, should_stop=should_stop)
    sid = study_id(store, final["study"]["name"])
    if EVALUATE_ATTR not in store.storage.get_study_user_attrs(sid):  # how the lambda was chosen: the first run's
        store.storage.set_study_user_attr(sid, EVALUATE_ATTR, {"e_lambda": lam, "chosen_by": how, "seeds": seeds})
    return read_evaluation(store, name)


def _network(final: StudyStatus, attention: str) -> dict:
    points = sorted((p for p in final.points if p.point.attention == attention), key=lambda p: p.point.repeat)
    records = [p.folds.get(f"r{p.point.repeat}f0", {}) for p in points]
    accs = [r.get("val_accuracy") if r.get("status") == "completed" else None for r in records]
    states = [p.state for p in points]
    done = [a for a in accs if a is not None]
    moments = summarize(done) if done else {"mean": None, "std": None}
    mean, std = moments["mean"], moments["std"]
    return {"network": attention, "e_lambda": points[0].point.e_lambda if points else None, "seeds": accs,
            "seed_states": states,
            "mean": mean, "std": std, "std_ddof": 1, "complete": states.count("complete"),
            "diverged": states.count("diverged"), "test_images": next((r["val_images"] for r in records
                                                                      if r.get("val_images")), None)}


def read_evaluation(store: Store, name: str) -> dict | None:
    """Study ``name``'s final evaluation as it stands (None where there is none): per network
    its test accuracy on each seed, mean and std (ddof=1); the paired t-test over seeds of
    SimAM minus baseline; the cross-validated accuracy of the same networks beside them."""
    fname = final_study_name(name)
    sid = study_id(store, fname)
    attrs = {} if sid is None else store.storage.get_study_user_attrs(sid)
    if CONFIG_ATTR not in attrs:  # none, or killed as it was made
        return None
    final, search = study_status(store, fname), study_status(store, name)
    attrs = attrs.get(EVALUATE_ATTR, {})
    seeds = final.config["search"]["repeats"]
    cv = {s.e_lambda: s for s in lambda_stats(search)}
    networks = []
    for attention in ("simam", "none"):
        if any(p.point.attention == attention for p in final.points):
            row = _network(final, attention)
            stats = cv.get(row["e_lambda"])
            row.update(cv_mean=stats.mean if stats else None, cv_std=stats.std if stats else None)
            networks.append(row)
    pair = {}
    if len(networks) == 2:
        a, b = ({f"s{i}": x for i, x in enumerate(n["seeds"]) if x is not None} for n in networks)
        pair = corrected_t_test(a, b, 0.0)  # n_test/n_train = 0: the plain paired t-test over seeds
        pair["reason"] = pair["reason"] and pair["reason"].replace("fold", "seed")
    data = final.config["data"]
    return {"study": name, "final_study": fname, "e_lambda": final.config["search"]["lambdas"][0],
            "chosen_by": attrs.get("chosen_by"), "seeds": seeds, "model": final.config["model"]["name"],
            "dataset": data["dataset"], "test_split": _test_split(data), "networks": networks,
            "difference": {"diff": pair.get("diff"), "t": pair.get("t"), "p": pair.get("p"),
                           "seeds": pair.get("folds", 0), "reason": pair.get("reason")} if pair else None,
            "complete": final.complete, "total": final.total, "finished": final.finished}


def _test_split(data: dict) -> str:
    if data["dataset"] in HELD_OUT_TEST:
        return f"held out before the folds: {data['test_fraction']:g} of the data set, by class; data.test_fraction"
    return TEST_SPLITS.get(data["dataset"]) or "the data set's test split"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _seed(accuracy, state: str) -> str:
    return _pct(accuracy) if accuracy is not None else ("diverged" if state == "diverged" else "-")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def format_evaluation(ev: dict) -> str:
    """The final evaluation in the paper's Table 2 style."""
    model = MODEL_LABELS.get(ev["model"], ev["model"])
    images = next((n["test_images"] for n in ev["networks"] if n["test_images"]), None)
    lines = [f"final evaluation of study {ev['study']!r}: {_plural(ev['seeds'], 'seed')} per "
             f"network, trained on every training image, tested on "
             f"{f'{images:,} images' if images else 'the test split'} ({ev['test_split']})"]
    head = ["network", "lambda", "test acc % (mean +- std)"] + [f"seed {i}" for i in range(ev["seeds"])] + [
        "CV acc % (mean +- std)"]
    rows = []
    for n in ev["networks"]:
        simam = n["network"] == "simam"
        std = f" +- {_pct(n['std'])}" if n["std"] is not None else ""
        cv = f"{_pct(n['cv_mean'])} +- {_pct(n['cv_std'])}" if n["cv_mean"] is not None else "n/a"
        rows.append([f"{model} + SimAM" if simam else model, format_lambda(n["e_lambda"]) if simam else "-",
                     f"{_pct(n['mean'])}{std}"] + [_seed(a, s) for a, s in zip(n["seeds"], n["seed_states"])] + [cv])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    d = ev["difference"]
    if d and d["diff"] is not None:
        test = (f"t = {d['t']:.2f}, p = {d['p']:.3f}" if d["p"] is not None else d["reason"])
        lines.append(f"SimAM - baseline: {100 * d['diff']:+.2f} pp (paired t-test over {_plural(d['seeds'], 'seed')}: "
                     f"{test})")
    elif len(ev["networks"]) == 1:
        lines.append("the study has no baseline (search.baseline = false): the lambda is evaluated alone")
    lines.append(f"lambda {format_lambda(ev['e_lambda'])}: {ev['chosen_by'] or 'evaluated'}; std over seeds with "
                 "ddof=1; each accuracy is the final model's, on a test split the search never saw")
    diverged = sum(n["diverged"] for n in ev["networks"])
    if diverged:
        lines.append(f"{_plural(diverged, 'training')} diverged (a non-finite loss): means are over the other seeds")
    if not ev["finished"]:
        lines.append(f"{ev['complete']} of {ev['total']} trainings complete: run the same command to go on")
    return "\n".join(lines)
