"""A study's final evaluation, read: the chosen lambda and the baseline trained on the whole
training set, seed by seed, tested once on the test split (the companion study ``NAME:final``
that ``lambda_search.search.evaluate`` runs), as the paper's Table 2 shows it. No torch here.
"""

from __future__ import annotations

from ..config import HELD_OUT_TEST, TEST_SPLITS, DataSection
from ..nn.registry import MODEL_LABELS
from ..points import format_lambda, summarize
from ..store.status import CONFIG_ATTR, EVALUATE_ATTR, StudyStatus, final_study_name, study_status
from ..store.storage import Store
from .select import corrected_t_test, lambda_stats

__all__ = ["read_evaluation", "format_evaluation", "plural"]


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
    attrs = store.study_attrs(fname)
    if CONFIG_ATTR not in attrs:  # none, or killed as it was made
        return None
    final, search = study_status(store, fname), study_status(store, name)
    attrs = attrs.get(EVALUATE_ATTR, {})
    seeds = final.config.search.repeats
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
    data = final.config.data
    return {"study": name, "final_study": fname, "e_lambda": final.config.search.lambdas[0],
            "chosen_by": attrs.get("chosen_by"), "seeds": seeds, "model": final.config.model.name,
            "dataset": data.dataset, "test_split": _test_split(data), "networks": networks,
            "difference": {"diff": pair.get("diff"), "t": pair.get("t"), "p": pair.get("p"),
                           "seeds": pair.get("folds", 0), "reason": pair.get("reason")} if pair else None,
            "complete": final.complete, "total": final.total, "finished": final.finished}


def _test_split(data: DataSection) -> str:
    if data.dataset in HELD_OUT_TEST:
        return f"held out before the folds: {data.test_fraction:g} of the data set, by class; data.test_fraction"
    return TEST_SPLITS.get(data.dataset) or "the data set's test split"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _seed(accuracy, state: str) -> str:
    return _pct(accuracy) if accuracy is not None else ("diverged" if state == "diverged" else "-")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def format_evaluation(ev: dict) -> str:
    """The final evaluation in the paper's Table 2 style."""
    model = MODEL_LABELS.get(ev["model"], ev["model"])
    images = next((n["test_images"] for n in ev["networks"] if n["test_images"]), None)
    lines = [f"final evaluation of study {ev['study']!r}: {plural(ev['seeds'], 'seed')} per "
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
        lines.append(f"SimAM - baseline: {100 * d['diff']:+.2f} pp (paired t-test over {plural(d['seeds'], 'seed')}: "
                     f"{test})")
    elif len(ev["networks"]) == 1:
        lines.append("the study has no baseline (search.baseline = false): the lambda is evaluated alone")
    lines.append(f"lambda {format_lambda(ev['e_lambda'])}: {ev['chosen_by'] or 'evaluated'}; std over seeds with "
                 "ddof=1; each accuracy is the final model's, on a test split the search never saw")
    diverged = sum(n["diverged"] for n in ev["networks"])
    if diverged:
        lines.append(f"{plural(diverged, 'training')} diverged (a non-finite loss): means are over the other seeds")
    if not ev["finished"]:
        lines.append(f"{ev['complete']} of {ev['total']} trainings complete: run the same command to go on")
    return "\n".join(lines)
