"""The paper's Figure 4: cross-validated accuracy against lambda on a log axis.

``figure4_data`` computes everything the picture shows (a pure function, tested);
``draw_figure4`` only draws it, with matplotlib, imported when called.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from ..nn.registry import MODEL_LABELS
from ..points import format_lambda
from ..store.status import StudyStatus
from ..store.storage import storage_file
from .select import lambda_stats, select, verdict_short

__all__ = ["figure4_data", "draw_figure4", "plot_figure4", "plot_title", "default_plot_path", "PLOT_FORMATS"]

PLOT_FORMATS = (".png", ".svg", ".pdf")
_DATASETS = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "digits": "digits (8x8)", "synthetic": "synthetic data"}
CROWDED_RATIO = 3.0  # neighbouring lambdas closer than this factor on the log axis: slanted tick labels
CROWDED_TICKS = 8  # more ticks than this: slanted tick labels


def plot_title(config: Config) -> str:
    """In the paper's style: "Cross-validation accuracy on CIFAR-100, ResNet-20"."""
    data = config.data
    if data.dataset == "imagefolder":
        res = data.options.get("resolution", 112)
        root = Path(data.root or "images")
        name = root.parent.name if root.name in ("train", "val") else root.name
        dataset = f"{name or 'image folder'} at {res} px"
    else:
        dataset = _DATASETS.get(data.dataset, data.dataset)
    model = MODEL_LABELS.get(config.model.name, config.model.name)
    return f"Cross-validation accuracy on {dataset}, {model}"


def _crowded_ticks(lambdas: list[float]) -> bool:
    """Whether the tick labels of ``lambdas`` (ascending) would collide on the log axis: two
    neighbours closer than a factor CROWDED_RATIO, or more than CROWDED_TICKS ticks."""
    close = any(a <= 0 or b / a < CROWDED_RATIO for a, b in zip(lambdas, lambdas[1:]))
    return close or len(lambdas) > CROWDED_TICKS


def _test_marks(evaluation: dict | None) -> dict | None:
    """The final evaluation's test accuracies (%) to mark: the chosen lambda's and the
    baseline's mean and std over seeds (None where there is none yet)."""
    if not evaluation:
        return None
    marks = {"seeds": evaluation["seeds"], "simam": None, "baseline": None}
    for n in evaluation["networks"]:
        if n["mean"] is not None:
            marks["simam" if n["network"] == "simam" else "baseline"] = {
                "e_lambda": n["e_lambda"], "mean": 100 * n["mean"], "std": None if n["std"] is None else 100 * n["std"]}
    return marks if marks["simam"] or marks["baseline"] else None


def figure4_data(status: StudyStatus, prefer: str = "larger", evaluation: dict | None = None) -> dict:
    """What Figure 4 shows, in percent: per lambda (ascending) its mean, std (ddof=1), fold
    accuracies and whether it is finished; the baseline's mean and std (or None); the
    chosen lambda (one-standard-error rule, ``prefer``), the best-mean lambda and the
    verdict against the baseline (a line under the title; None without one); the test
    accuracies of the final evaluation where given (``read_evaluation``); labels,
    the x tick labels (``format_lambda``, exact) and whether they are crowded (slanted)."""
    stats = lambda_stats(status)
    sel = select(status, prefer, stats)
    points = []
    for s in sorted((s for s in stats if not s.baseline), key=lambda s: s.e_lambda):
        points.append({
            "e_lambda": s.e_lambda, "state": s.state,
            "mean": None if s.mean is None else 100 * s.mean,
            "std": None if s.std is None else 100 * s.std,
            "folds": [100 * a for _, a in sorted(s.folds.items())],
            "folds_done": len(s.folds), "n_folds": s.n_folds,
        })
    base = next((s for s in stats if s.baseline), None)
    baseline = None
    if base is not None and base.mean is not None:
        baseline = {"mean": 100 * base.mean, "std": None if base.std is None else 100 * base.std,
                    "state": base.state, "folds_done": len(base.folds), "n_folds": base.n_folds}
    n = max((p["n_folds"] for p in points), default=0)
    test = _test_marks(evaluation)
    title = plot_title(status.config)
    return {
        "title": title.replace("Cross-validation accuracy", "Cross-validation and test accuracy") if test else title,
        "xlabel": "lambda (log scale, decreasing)",
        "ylabel": "accuracy (%): validation (blue), test (green)" if test else "validation accuracy (%)",
        "bar_label": f"mean +- std over {n} folds (ddof=1)",
        "points": points,
        "tick_labels": [format_lambda(p["e_lambda"]) for p in points],
        "crowded_ticks": _crowded_ticks([p["e_lambda"] for p in points]),
        "baseline": baseline,
        "chosen": sel["one_se"]["e_lambda"] if sel["one_se"] else None,
        "best": sel["best"]["e_lambda"] if sel["best"] else None,
        "prefer": prefer,
        "verdict": verdict_short(sel["verdict"]),
        "test": test,
        "finished": all(p["state"] in ("complete", "diverged") for p in points),
    }


def draw_figure4(data: dict, path) -> Path:
    """Draw ``figure4_data`` to ``path`` (.png, .svg or .pdf)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    try:
        pts = data["points"]
        if data["baseline"] is not None:
            b = data["baseline"]
            label = "baseline (no SimAM)" + (" mean +- std" if b["std"] is not None else " mean")
            if b["state"] != "complete":
                label += f", {b['folds_done']}/{b['n_folds']} folds"
            ax.axhline(b["mean"], color="0.35", lw=1, ls="--", label=label)
            if b["std"] is not None:
                ax.axhspan(b["mean"] - b["std"], b["mean"] + b["std"], color="0.5", alpha=0.15, lw=0)
        labelled = False
        for p in pts:
            if p["folds"]:
                ax.scatter([p["e_lambda"]] * len(p["folds"]), p["folds"], s=10, color="tab:blue", alpha=0.25,
                           lw=0, zorder=2, label=None if labelled else "a fold's validation accuracy")
                labelled = True
        done = [p for p in pts if p["state"] == "complete"]
        partial = [p for p in pts if p["state"] in ("running", "interrupted") and p["mean"] is not None]
        if done:
            ax.errorbar([p["e_lambda"] for p in done], [p["mean"] for p in done],
                        yerr=[p["std"] or 0 for p in done], fmt="o-", color="tab:blue", capsize=4, lw=1.5,
                        zorder=3, label=f"SimAM, {data['bar_label']}")
        if partial:
            ax.errorbar([p["e_lambda"] for p in partial], [p["mean"] for p in partial],
                        yerr=[p["std"] or 0 for p in partial], fmt="o", mfc="white", color="tab:blue", capsize=4,
                        zorder=3, label="unfinished (folds so far)")
            for p in partial:
                ax.annotate(f"{p['folds_done']}/{p['n_folds']}", (p["e_lambda"], p["mean"]), textcoords="offset points",
                            xytext=(6, -10), fontsize=7, color="tab:blue")
        ymin, ymax = ax.get_ylim()
        for p in pts:
            unfinished = p["state"] in ("running", "interrupted")
            if p["state"] in ("pending", "diverged") or (unfinished and p["mean"] is None):
                ax.annotate("diverged" if p["state"] == "diverged" else "pending", (p["e_lambda"], ymin),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="tab:red",
                            rotation=90)
        if data["chosen"] is not None:
            chosen = next(p for p in pts if p["e_lambda"] == data["chosen"])
            ax.axvline(chosen["e_lambda"], color="tab:orange", lw=1, ls=":", zorder=1)
            ax.plot([chosen["e_lambda"]], [chosen["mean"]], marker="*", ms=14, color="tab:orange", zorder=4, ls="none",
                    label=f"chosen: lambda = {format_lambda(chosen['e_lambda'])} (one-SE rule, {data['prefer']})")
        _draw_test(ax, data["test"])
        _dress(ax, data)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


TEST_OFFSET = 1.6  # the test diamond sits this factor right of its lambda on the (inverted) log axis: beside the star


def _draw_test(ax, test: dict | None) -> None:
    """The final evaluation's test accuracies: a green diamond beside the chosen lambda (mean
    +- std over seeds), a green dotted line and band for the baseline (mean +- std)."""
    if not test:
        return
    seeds = f"{test['seeds']} seed{'s' if test['seeds'] > 1 else ''}"
    if test["baseline"]:
        b = test["baseline"]
        ax.axhline(b["mean"], color="tab:green", lw=1, ls=":",
                   label=f"baseline, test accuracy (mean{' +- std' if b['std'] is not None else ''}, {seeds})")
        if b["std"] is not None:
            ax.axhspan(b["mean"] - b["std"], b["mean"] + b["std"], color="tab:green", alpha=0.08, lw=0)
    if test["simam"]:
        s = test["simam"]
        ax.errorbar([s["e_lambda"] / TEST_OFFSET], [s["mean"]], yerr=[s["std"] or 0], fmt="D", color="tab:green",
                    capsize=4, zorder=5, label=f"lambda = {format_lambda(s['e_lambda'])}, test accuracy (mean +- std, "
                                               f"{seeds})")


def _dress(ax, data: dict) -> None:
    """Axes, ticks, title, labels and legend."""
    pts = data["points"]
    ax.set_xscale("log")
    if pts:
        xs = [p["e_lambda"] for p in pts]
        tested = ([data["test"]["simam"]["e_lambda"] / TEST_OFFSET] if data["test"] and data["test"]["simam"]
                  else [])
        ax.set_xlim(min(xs + tested) / 2.5, max(xs + tested) * 2.5)  # (a lambda given to evaluate: in sight)
        ax.set_xticks(xs)
        if data["crowded_ticks"]:
            ax.set_xticklabels(data["tick_labels"], fontsize=7, rotation=45, ha="right", rotation_mode="anchor")
        else:
            ax.set_xticklabels(data["tick_labels"], fontsize=8)
        ax.minorticks_off()
        ax.invert_xaxis()  # as the paper: from 1e-1 on the left down to the smallest lambda
    if all(p["mean"] is None for p in pts) and data["baseline"] is None and not data["test"]:
        ax.set_ylim(0, 100)  # nothing to show (every lambda diverged, or none finished a fold): the axis in %
    title = data["title"] + ("" if data["finished"] else " (still running)")
    ax.set_title(title + (f"\n{data['verdict']}" if data["verdict"] else ""), fontsize=10)
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: no legend
        ax.legend(fontsize=7, loc="best")


def default_plot_path(status: StudyStatus) -> Path:
    """Where a search leaves its plot: beside its database (or journal) file, named after it,
    ``<file>.png`` (``<file>+<study>.png`` where the file is named otherwise: no study name holds
    a '+'), so that a copied
    database never writes over the original's plot, nor two storages in one folder over each
    other's; for a server storage (PostgreSQL), beside the checkpoint folder."""
    file = storage_file(status.storage)
    if file is not None:
        return file.with_name((file.stem if file.stem == status.name else f"{file.stem}+{status.name}") + ".png")
    return Path(status.config.study.checkpoint_dir).with_suffix(".png")


def plot_figure4(status: StudyStatus, path, prefer: str = "larger", make_folder: bool = False,
                 evaluation: dict | None = None) -> Path:
    """Write Figure 4 of ``status`` to ``path``; the format follows the extension. With
    ``make_folder`` (the search's own plot), its folder is made where missing; with
    ``evaluation`` (``read_evaluation``), the test accuracies are marked."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"the plot file must end in .png, .svg or .pdf, got {str(path)!r}")
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    return draw_figure4(figure4_data(status, prefer, evaluation), path)
