"""Choosing lambda, honestly: per-lambda statistics over all folds, the best mean, the
one-standard-error rule, and paired comparisons with the corrected resampled t-test of
Nadeau and Bengio (2003, "Inference for the generalization error").

Everything here is a pure function of a StudyStatus (which holds only validation
accuracies of the search's folds: nothing is selected on data that is reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats as _stats

from ..config import Config, ConfigError
from ..points import format_lambda, signed_pp, summarize
from ..store.status import CHOSEN_ATTR, StudyStatus
from ..store.storage import Store

__all__ = ["LambdaStats", "lambda_stats", "corrected_t_test", "select", "format_selection", "nothing_selected",
           "test_train_ratio", "verdict", "verdict_text", "verdict_short", "record_choice", "PREFER", "ALPHA",
           "TIE_TOLERANCE"]

PREFER = ("larger", "smaller")


@dataclass
class LambdaStats:
    """One lambda (or the baseline, ``e_lambda=None``) over every fold of every repeat.
    ``state``: "complete", "running" (some folds missing), "interrupted" (some folds missing and
    nothing training it now: resumable), "diverged" or "pending"."""

    e_lambda: float | None
    state: str
    folds: dict[str, float] = field(default_factory=dict)  # fold name (rRfF) -> accuracy
    n_folds: int = 0  # folds in the plan
    mean: float | None = None
    std: float | None = None  # ddof=1
    sem: float | None = None
    reason: str | None = None

    @property
    def baseline(self) -> bool:
        return self.e_lambda is None

    def to_dict(self) -> dict:
        return {"e_lambda": self.e_lambda, "state": self.state, "mean": self.mean, "std": self.std, "sem": self.sem,
                "folds_done": len(self.folds), "folds": self.n_folds}


def lambda_stats(status: StudyStatus) -> list[LambdaStats]:
    """Per lambda, in the config's order, then the baseline: the accuracies of all its
    finished folds (of every repeat), their mean, std (ddof=1) and standard error."""
    groups: dict[float | None, list] = {}
    for p in status.points:
        groups.setdefault(p.point.e_lambda, []).append(p)
    out = []
    for e_lambda, points in groups.items():
        folds = {name: r["val_accuracy"] for p in points for name, r in p.folds.items()
                 if r.get("status") == "completed" and r.get("val_accuracy") is not None}
        n_folds = sum(len(p.fold_names) for p in points)
        states = {p.state for p in points}
        if "diverged" in states:
            state = "diverged"
        elif states == {"complete"}:
            state = "complete"
        elif "interrupted" in states and "running" not in states:
            state = "interrupted"  # stopped or killed, resumable: nothing trains it now
        elif folds or states & {"running", "complete"}:
            state = "running"
        else:
            state = "pending"
        reason = next((p.reason for p in points if p.state == "diverged"), None)
        moments = summarize(list(folds.values())) if folds else dict(mean=None, std=None, sem=None)
        sem = standard_error(moments, len(folds), status.config)
        out.append(LambdaStats(e_lambda, state, folds, n_folds, moments["mean"], moments["std"], sem, reason))
    return out


def standard_error(moments: dict, n: int, config: Config) -> float | None:
    """The standard error of a lambda's mean over its ``n`` fold scores: std / sqrt(n) with one
    repeat (k-fold cross-validation, as glmnet and the paper); with ``search.repeats`` > 1 the
    repeats' folds overlap in training images and are not independent, so the corrected
    variance of the t-test (Nadeau and Bengio): std * sqrt(1/n + n_test/n_train)."""
    if moments["std"] is None:
        return None
    if config.search.repeats == 1 or config.data.test:
        return moments["sem"]
    return moments["std"] * math.sqrt(1 / n + test_train_ratio(config))


def test_train_ratio(config: Config) -> float:
    """n_test / n_train of one split, the correction of Nadeau and Bengio; 0 for a final
    evaluation (data.test: every seed trains on the same images, tests on the same split, so
    the plain paired t-test over seeds)."""
    if config.data.test:
        return 0.0
    holdout = config.data.holdout
    if holdout is not None:
        return holdout / (1 - holdout)
    return 1 / (config.data.folds - 1)


# accuracies (fractions) closer than this are equal: counts divided by image counts, subtracted
# or summed in floats, differ by rounding noise (~1e-16) where the counts are equal
TIE_TOLERANCE = 1e-12


def corrected_t_test(a: dict[str, float], b: dict[str, float], ratio: float) -> dict:
    """Paired, corrected resampled t-test of ``a`` against ``b`` over their shared folds:
    t = mean(d) / sqrt((1/J + n_test/n_train) * var(d)), with d = a - b per fold, var with
    ddof=1, J shared folds, J - 1 degrees of freedom; two-sided p. Where d is the same on
    every fold (within TIE_TOLERANCE: float rounding of equal image counts) the test is
    undefined: t and p are None and ``reason`` says so (no p of 0 or 1 is made up)."""
    shared = sorted(set(a) & set(b))
    d = [a[k] - b[k] for k in shared]
    J = len(d)
    out = {"folds": J, "diff": None, "t": None, "p": None, "reason": None}
    if J == 0:
        out["reason"] = "no shared folds"
        return out
    mean = math.fsum(d) / J
    out["diff"] = mean
    if J < 2:
        out["reason"] = "one shared fold: no test"
        return out
    var = math.fsum((x - mean) ** 2 for x in d) / (J - 1)
    scale = math.sqrt((1 / J + ratio) * var)
    if max(d) - min(d) <= TIE_TOLERANCE:  # the same on every fold, up to float rounding: var(d) is 0
        same = "same accuracy" if abs(mean) <= TIE_TOLERANCE else "same difference"
        out["reason"] = f"{same} on every fold ({J} folds): the corrected test is undefined"
        return out
    t = mean / scale
    out["t"], out["p"] = t, float(2 * _stats.t.sf(abs(t), J - 1))
    return out


ALPHA = 0.05  # the verdict's significance level (two-sided)


def _preferred(stats: list[LambdaStats], prefer: str) -> LambdaStats:
    return max(stats, key=lambda s: s.e_lambda) if prefer == "larger" else min(stats, key=lambda s: s.e_lambda)


def _best(complete: list[LambdaStats], prefer: str) -> tuple[LambdaStats, list[float]]:
    """The best mean, ties taken as glmnet's getOptcv.glmnet does: of the lambdas tied at the
    best mean, the one at the preferred end (its own standard error sets the one-SE
    threshold). Returns it and the tied lambdas (ascending; one where there is no tie)."""
    top = max(s.mean for s in complete)
    tied = [s for s in complete if top - s.mean <= TIE_TOLERANCE]
    return _preferred(tied, prefer), sorted(s.e_lambda for s in tied)


def reaches(mean: float, threshold: float) -> bool:
    """Whether ``mean`` reaches the one-SE ``threshold``, equal within TIE_TOLERANCE (float
    rounding must not decide: a mean equal to the threshold in exact arithmetic reaches it)."""
    return mean >= threshold - TIE_TOLERANCE


def verdict(chosen: LambdaStats, baseline: LambdaStats | None, threshold: float, ratio: float) -> dict:
    """The chosen lambda against the baseline, in one word and one line: "helps" or "hurts"
    (the corrected t-test over shared folds, two-sided p < ALPHA), else "no difference" (not
    shown at these folds: p >= ALPHA or undefined); ``baseline_within_one_se``: whether the
    baseline's mean reaches the one-SE threshold. No verdict (None, and ``reason``) without a
    complete baseline."""
    if baseline is None or baseline.state != "complete":
        reason = ("no baseline in this study (search.baseline = true trains one)" if baseline is None else
                  f"the baseline is {baseline.state} ({len(baseline.folds)} of {baseline.n_folds} folds): no verdict "
                  "until it is complete")
        return {"verdict": None, "e_lambda": chosen.e_lambda, "diff": None, "p": None, "folds": 0, "alpha": ALPHA,
                "reason": reason, "baseline_within_one_se": None}
    test = corrected_t_test(chosen.folds, baseline.folds, ratio)
    word = "no difference"
    if test["p"] is not None and test["p"] < ALPHA:
        word = "helps" if test["diff"] > 0 else "hurts"
    return {"verdict": word, "e_lambda": chosen.e_lambda, "diff": test["diff"], "p": test["p"],
            "folds": test["folds"], "alpha": ALPHA, "reason": test["reason"],
            "baseline_within_one_se": reaches(baseline.mean, threshold)}


def _verdict_p(v: dict) -> str:
    """"p = 0.031, 5 folds", or why there is no p ("same difference on every fold (3 folds)")."""
    if v["p"] is None:
        return f"p undefined: {(v['reason'] or 'no test').split(':')[0]}"
    return f"p = {v['p']:.3f}, {v['folds']} fold{'s' if v['folds'] != 1 else ''}"


def verdict_short(v: dict) -> str | None:
    """The verdict for a figure: "SimAM helps: +0.17 pp vs no SimAM (p = 0.031, 5 folds)"."""
    if v is None or v["verdict"] is None:
        return None
    head = {"helps": "SimAM helps", "hurts": "SimAM hurts", "no difference": "no difference shown"}[v["verdict"]]
    return f"{head}: {signed_pp(v['diff'])} pp vs no SimAM ({_verdict_p(v)})"


def verdict_text(v: dict) -> str:
    """The verdict in one line: "SimAM helps: lambda = 1e-03 beats the baseline by +0.17 pp
    (p = 0.031, 5 folds, alpha 0.05); the baseline is not within one SE of the best mean"."""
    if v["verdict"] is None:
        return f"verdict: none ({v['reason']})"
    lam, diff = format_lambda(v["e_lambda"]), signed_pp(v["diff"])
    head = {"helps": f"SimAM helps: lambda = {lam} beats the baseline by {diff} pp",
            "hurts": f"SimAM hurts: lambda = {lam} trails the baseline by {diff} pp",
            "no difference": f"no difference shown at these folds: lambda = {lam} vs the baseline {diff} pp"}
    within = "within" if v["baseline_within_one_se"] else "not within"
    return (f"verdict: {head[v['verdict']]} ({_verdict_p(v)}, alpha {v['alpha']}); "
            f"the baseline is {within} one SE of the best mean")


def select(status: StudyStatus, prefer: str = "larger", table: list[LambdaStats] | None = None) -> dict:
    """The lambda with the best mean (of lambdas tied at the best mean, the one at the
    ``prefer`` end, as glmnet); the one-standard-error choice (among the lambdas whose mean is
    at least best mean - best's standard error, the largest lambda when ``prefer`` is
    "larger": SimAM's energy closest to switched off, the conservative end; or the smallest);
    the verdict (the choice against the baseline); and each lambda compared with the best and
    with the baseline over shared folds.
    Only complete lambdas are candidates. ``table``: ``lambda_stats(status)``, when at hand."""
    if prefer not in PREFER:
        raise ConfigError(f"prefer must be 'larger' or 'smaller', got prefer={prefer!r}")
    table = lambda_stats(status) if table is None else table
    ratio = test_train_ratio(status.config)
    lambdas = [s for s in table if not s.baseline]
    baseline = next((s for s in table if s.baseline), None)
    complete = [s for s in lambdas if s.state == "complete"]
    result = {"study": status.name, "prefer": prefer, "test_train_ratio": ratio, "std_ddof": 1,
              "best": None, "one_se": None, "verdict": None, "baseline": baseline.to_dict() if baseline else None,
              "complete": len(complete), "lambdas": len(lambdas),
              "diverged": sum(s.state == "diverged" for s in lambdas), "comparisons": [],
              "numerics": {"mixed": status.mixed_numerics, "mixed_folds": status.mixed_folds,
                           "distinct": status.numerics}}
    if not complete:
        return result
    best, tied = _best(complete, prefer)
    threshold = best.mean - (best.sem or 0.0)
    near = [s for s in complete if reaches(s.mean, threshold)]
    one_se = _preferred(near, prefer)
    result["best"] = {"e_lambda": best.e_lambda, "mean": best.mean, "std": best.std, "sem": best.sem, "tied": tied}
    result["one_se"] = {"e_lambda": one_se.e_lambda, "mean": one_se.mean, "std": one_se.std, "sem": one_se.sem,
                        "threshold": threshold, "candidates": sorted(s.e_lambda for s in near)}
    result["verdict"] = verdict(one_se, baseline, threshold, ratio)
    base_ok = baseline is not None and baseline.folds
    for s in lambdas:
        row = s.to_dict()
        if s.reason:
            row["reason"] = s.reason
        row["vs_best"] = corrected_t_test(s.folds, best.folds, ratio) if s.folds else None
        row["vs_baseline"] = corrected_t_test(s.folds, baseline.folds, ratio) if (base_ok and s.folds) else None
        result["comparisons"].append(row)
    return result


def record_choice(store: Store, status: StudyStatus) -> dict | None:
    """Once ``status``'s study is finished, store its choice (one-SE rule, the larger end, as
    ``select`` by default) and verdict as the study's user attribute CHOSEN_ATTR, for Optuna's
    own tools and the dashboard. Returns it (None while the study is not finished)."""
    if not status.finished or status.config.data.test:  # (a final evaluation reports itself)
        return None
    sel = select(status)
    if sel["one_se"] is None:
        return None
    v = sel["verdict"]
    chosen = {"e_lambda": sel["one_se"]["e_lambda"], "mean": sel["one_se"]["mean"], "rule": "one-SE",
              "prefer": sel["prefer"], "best_e_lambda": sel["best"]["e_lambda"], "best_mean": sel["best"]["mean"],
              "verdict": v["verdict"], "diff_vs_baseline": v["diff"], "p_vs_baseline": v["p"], "folds": v["folds"]}
    if store.study_attrs(status.name).get(CHOSEN_ATTR) != chosen:
        store.set_study_attr(status.name, CHOSEN_ATTR, chosen)
    return chosen


def _pct(v) -> str:
    return "  n/a" if v is None else f"{100 * v:.2f}"


def _p(test) -> str:
    if not test or test["diff"] is None:
        return "n/a"
    if test["p"] is None:
        why = "(undefined*)" if "every fold" in (test["reason"] or "") else "(1 fold)"
        return f"{signed_pp(test['diff'])} {why}"
    return f"{signed_pp(test['diff'])} (p={test['p']:.3f})"


UNDEFINED_NOTE = ("* the same difference on every fold: the corrected t-test is undefined; more folds (data.folds) "
                  "or repeats (search.repeats) give a usable test")


def nothing_selected(sel: dict) -> str | None:
    """Why ``sel`` chose no lambda, in one line (None where it chose one)."""
    if sel["best"] is not None:
        return None
    n, diverged = sel["lambdas"], sel.get("diverged", 0)
    if diverged == n:
        return f"every lambda diverged ({n} of {n}): nothing to select; try a smaller train.lr"
    if diverged:
        return (f"no lambda is complete yet ({n - diverged} of {n} still to run, {diverged} diverged): "
                "nothing to select")
    return f"no lambda is complete yet (0 of {n}): nothing to select"


def _choice_lines(sel: dict) -> list[str]:
    b, o = sel["best"], sel["one_se"]
    tied = [x for x in b.get("tied", [b["e_lambda"]]) if x != b["e_lambda"]]
    tie = (f" (tied with {', '.join(format_lambda(x) for x in tied)}: the {sel['prefer'][:-2]}est of them, as glmnet)"
           if tied else "")
    lines = [
        f"best mean:        lambda = {format_lambda(b['e_lambda'])}  {_pct(b['mean'])} % +- {_pct(b['std'])} "
        f"(std over folds){tie}",
        f"one-SE rule:      lambda = {format_lambda(o['e_lambda'])}  {_pct(o['mean'])} % "
        f"(the {sel['prefer'][:-2]}est lambda whose mean is >= {_pct(o['threshold'])} %, " + (
            "the best mean minus its standard error)" if b["sem"] is not None else
            "the best mean: one split per lambda has no standard error, so this is the best mean's lambda)"),
    ]
    if sel["baseline"] and sel["baseline"]["mean"] is not None:
        bl = sel["baseline"]
        lines.append(f"baseline:         no SimAM       {_pct(bl['mean'])} % +- {_pct(bl['std'])}")
    if sel.get("verdict"):
        lines.append(verdict_text(sel["verdict"]))
    return lines


def format_selection(sel: dict) -> str:
    """The selection as text: the choice, why, the verdict and the comparison table."""
    if sel["best"] is None:
        return nothing_selected(sel)
    lines = _choice_lines(sel) + [""]
    labels = [format_lambda(c["e_lambda"]) for c in sel["comparisons"]]
    width = max([len("lambda")] + [len(x) for x in labels])
    lines.append(f"{'lambda':<{width}}  state      mean %  std %   vs best: diff (p)     vs baseline: diff (p)")
    best = sel["best"]["e_lambda"]
    for label, c in zip(labels, sel["comparisons"]):
        vs_best = "(the best)" if c["e_lambda"] == best else _p(c["vs_best"])
        lines.append(f"{label:<{width}}  {c['state']:<9} {_pct(c['mean']):>7} {_pct(c['std']):>6}   "
                     f"{vs_best:<20}  {_p(c['vs_baseline'])}")
    lines.append("p: two-sided corrected resampled t-test (Nadeau & Bengio 2003) over shared folds, "
                 f"n_test/n_train = {sel['test_train_ratio']:.3g}; std with ddof=1")
    if any("(undefined*)" in line for line in lines):
        lines.append(UNDEFINED_NOTE)
    if sel["complete"] < sel["lambdas"]:
        lines.append(f"only {sel['complete']} of {sel['lambdas']} lambdas are complete: the choice may change")
    if sel["numerics"]["mixed"]:
        mixed = sel["numerics"]["mixed_folds"]
        lines.append(f"WARNING: the points of {', '.join(mixed)} were trained under more than one numerics "
                     "(`lambda-search status` lists them): lambdas are not compared bit for bit there")
    return "\n".join(lines)
