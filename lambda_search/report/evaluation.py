"""A study's final evaluation, read: the chosen lambda and the baseline trained on the whole
training set, seed by seed, tested once on the test split (the companion study ``NAME:final``
that ``lambda_search.search.evaluate`` runs), as the paper's Table 2 shows it. No torch here.
"""

from __future__ import annotations

from ..config import HELD_OUT_TEST, TEST_SPLITS, Config, DataSection, final_parts
from ..configfile import data_differences
from ..nn.registry import MODEL_LABELS
from ..points import format_lambda, signed_pp, summarize
from ..store.status import (
    CONFIG_ATTR,
    EVALUATE_ATTR,
    StudyStatus,
    final_study_name,
    final_study_names,
    study_status,
)
from ..store.storage import Store
from .select import corrected_t_test, lambda_stats

__all__ = ["read_evaluation", "read_evaluations", "asked_table", "format_evaluation", "format_table2",
           "holm_correction", "column_arm", "plural"]


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
    """Study ``name``'s final evaluation of the searched network on the searched data, as it
    stands (None where there is none): per network its test accuracy on each seed, mean and
    std (ddof=1); the paired t-test over seeds of SimAM minus baseline; the cross-validated
    accuracy of the same networks beside them."""
    fname = final_study_name(name)
    if CONFIG_ATTR not in store.study_attrs(fname):  # none, or killed as it was made
        return None
    return _column(store, study_status(store, name), fname)


def read_evaluations(store: Store, name: str, holm: bool = False) -> dict | None:
    """Every final evaluation of study ``name`` (None where there is none): one column per
    (network, data set), as :func:`read_evaluation` reads the searched one, in the order they
    were made; with ``holm``, each column's p-value also corrected across the columns (Holm's
    step-down method) as ``difference.p_holm``."""
    names = final_study_names(store, name)
    if not names:
        return None
    search = study_status(store, name)  # (read once: each column shows its cross-validation or data against it)
    columns = [_column(store, search, fname) for fname in names]
    if holm:
        diffs = [c["difference"] or {} for c in columns]
        for d, p in zip(diffs, holm_correction([d.get("p") for d in diffs])):
            d["p_holm"] = p
    first = columns[0]
    return {"study": name, "e_lambda": first["e_lambda"], "chosen_by": first["chosen_by"], "columns": columns,
            "correction": "holm" if holm else None, "complete": sum(c["complete"] for c in columns),
            "total": sum(c["total"] for c in columns), "finished": all(c["finished"] for c in columns)}


def _data_label(search: Config, final: Config) -> str:
    """The data set of a final evaluation, and what of its data section differs from the search's."""
    diffs = [f"{k[5:]}={v}" for k, _, v in data_differences(search, final) if k != "data.dataset" and v is not None]
    return final.data.dataset + (f" ({', '.join(diffs)})" if diffs else "")


def asked_table(table: dict | None, name: str, asked: list[str]) -> dict:
    """``table`` (:func:`read_evaluations`, None where nothing is made yet) with what a run asked
    for: ``asked`` (final study names), and ``not_started``, those of them not made yet (the
    run was interrupted before them), which leave the table unfinished."""
    table = table or {"study": name, "e_lambda": None, "chosen_by": None, "columns": [], "correction": None,
                      "complete": 0, "total": 0, "finished": True}
    made = {c["final_study"] for c in table["columns"]}
    missing = [n for n in asked if n not in made]
    return {**table, "asked": asked, "not_started": missing, "finished": table["finished"] and not missing}


def holm_correction(ps: list) -> list:
    """Holm's step-down adjusted p-values of ``ps`` (None stays None, and is not counted)."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out, running = [None] * len(ps), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def _column(store: Store, search: StudyStatus, fname: str) -> dict:
    final, name = study_status(store, fname), search.name
    attrs = store.study_attrs(fname).get(EVALUATE_ATTR, {})
    searched = fname == final_study_name(name)  # the cross-validated accuracies are of this network and data
    cv = {s.e_lambda: s for s in lambda_stats(search)} if searched else {}
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
        pair["reason"] = pair["reason"] and pair["reason"].replace("fold", "seed").replace("corrected", "paired")
    config = final.config
    column = final_parts(fname)[1]
    return {"study": name, "final_study": fname, "column": column,
            "data_tag": column.split("@", 1)[1] if column and "@" in column else None,
            "data_label": _data_label(search.config, config),
            "e_lambda": config.search.lambdas[0], "chosen_by": attrs.get("chosen_by"), "prefer": attrs.get("prefer"),
            "seeds": config.search.repeats, "model": config.model.name, "dataset": config.data.dataset,
            "test_split": _test_split(config.data), "networks": networks,
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
        lines.append(f"SimAM - baseline: {signed_pp(d['diff'])} pp (paired t-test over {plural(d['seeds'], 'seed')}: "
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


TABLE_WIDTH = 110  # a block's columns wrap past this many characters


def column_arm(column: dict, attention: str) -> dict | None:
    """The arm of a column (``read_evaluations``): "simam" or "none" (the baseline), or None."""
    return next((n for n in column["networks"] if n["network"] == attention), None)


def _cell(arm: dict | None) -> str:
    if arm is None or arm["mean"] is None:
        return "n/a" if arm is None else "-"
    return _pct(arm["mean"]) + (f" +- {_pct(arm['std'])}" if arm["std"] is not None else "")


def _table2_cells(column: dict, correction: str | None, diverged: bool) -> list[str]:
    """One column of the table: the baseline, SimAM, their difference, its p, the seeds."""
    d = column["difference"] or {}
    p = "-" if d.get("p") is None else f"{d['p']:.3f}"
    cells = [_cell(column_arm(column, "none")), _cell(column_arm(column, "simam")),
             "-" if d.get("diff") is None else f"{signed_pp(d['diff'])}", p]
    if correction:
        cells.append("-" if d.get("p_holm") is None else f"{d['p_holm']:.3f}")
    if diverged:
        cells.append(str(sum(n["diverged"] for n in column["networks"])))
    paired = f"{d.get('seeds', 0)} of {column['seeds']}" if len(column["networks"]) == 2 else "- (no baseline)"
    return cells + [paired]


def _blocks(table: dict) -> list[list[dict]]:
    """The columns by data set (the searched one, then each other, in order of appearance),
    each wrapped to TABLE_WIDTH."""
    by_data: dict = {}
    for c in table["columns"]:
        by_data.setdefault(c.get("data_tag"), []).append(c)
    blocks = []
    per_line = max(1, (TABLE_WIDTH - 20) // 18)
    for columns in by_data.values():
        blocks += [columns[i:i + per_line] for i in range(0, len(columns), per_line)]
    return blocks


def format_table2(table: dict) -> str:
    """Every final evaluation of a study in the shape of the paper's Table 2: rows the baseline
    and + SimAM, one column per network, a block per data set."""
    if not table["columns"]:
        return (f"final evaluation of study {table['study']!r}: no training made yet (interrupted before the first): "
                "run the same command to go on")
    lam = format_lambda(table["e_lambda"])
    diverged = any(n["diverged"] for c in table["columns"] for n in c["networks"])
    heads = ["baseline", f"+ SimAM ({lam})", "difference (pp)", "p (paired t)"]
    heads += (["p (Holm)"] if table["correction"] else []) + (["diverged"] if diverged else []) + ["seeds paired"]
    lines = [f"final evaluation of study {table['study']!r}: test accuracy % (mean +- std over seeds, ddof=1), "
             f"lambda {lam} {table['chosen_by'] or 'evaluated'}; each network trained on every training image"]
    for block in _blocks(table):
        images = next((n["test_images"] for c in block for n in c["networks"] if n["test_images"]), None)
        tested = f"{images:,} test images" if images else "the test split"
        lines += ["", f"{block[0].get('data_label', block[0]['dataset'])}: {tested} ({block[0]['test_split']})"]
        cells = [[MODEL_LABELS.get(c["model"], c["model"])] + _table2_cells(c, table["correction"], diverged)
                 for c in block]
        rows = [[""] + [c[0] for c in cells]] + [[h] + [c[i + 1] for c in cells] for i, h in enumerate(heads)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                  for r in rows]
    return "\n".join(lines + _table2_notes(table, diverged))


def _table2_notes(table: dict, diverged: bool) -> list[str]:
    n_p = sum((c["difference"] or {}).get("p") is not None for c in table["columns"])
    across = ""
    if n_p > 1:
        across = (f", and Holm's step-down correction across the {n_p} columns with a p" if table["correction"] else
                  f", not corrected across the {n_p} columns with a p (--holm corrects them)")
    notes = ["", "difference: SimAM - baseline; p: each column's own paired t-test over its seeds (two-sided)" + across]
    if diverged:
        notes.append("diverged: trainings with a non-finite loss; means are over the other seeds, and a seed pairs "
                     "only where both trainings finished")
    if table.get("not_started"):
        notes.append(f"{plural(len(table['not_started']), 'column')} asked for not started yet: "
                     + ", ".join(table["not_started"]))
    if not table["finished"]:
        notes.append(f"{table['complete']} of {table['total']} trainings complete: run the same command to go on")
    return notes
