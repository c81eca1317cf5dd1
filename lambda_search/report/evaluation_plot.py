"""The final evaluations of a study as a figure (the paper's Table 2 drawn): one panel per
network and data set, each seed's test accuracy as a dot (a grey line joins the baseline
and SimAM of one seed: they are paired), the means with +- std bars, the difference and its
p-value in the panel's title. The data are computed by a pure function, drawn apart. No torch.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import ConfigError
from ..nn.registry import MODEL_LABELS
from ..points import format_lambda, signed_pp
from .evaluation import column_arm
from .plot import PLOT_FORMATS

__all__ = ["evaluation_figure_data", "draw_evaluation_figure", "plot_evaluation", "evaluation_plot_path"]

PANELS_PER_ROW = 4


def _arm(column: dict, attention: str) -> dict | None:
    arm = column_arm(column, attention)
    if arm is None:
        return None
    seeds = [None if a is None else 100 * a for a in arm["seeds"]]
    return {"seeds": seeds, "mean": None if arm["mean"] is None else 100 * arm["mean"],
            "std": None if arm["std"] is None else 100 * arm["std"]}


def evaluation_figure_data(table: dict) -> dict:
    """What the figure shows, in percent: per column (``read_evaluations``) its title (network,
    data set), the baseline's and SimAM's seed accuracies, means and stds (ddof=1), and the
    difference with its p-value (Holm's where the table has it)."""
    panels = []
    for c in table["columns"]:
        d = c["difference"] or {}
        p = d.get("p_holm") if table["correction"] else d.get("p")
        note = "" if d.get("diff") is None else f"{signed_pp(d['diff'])} pp" + (
            "" if p is None else f", p = {p:.3f}" + (" (Holm)" if table["correction"] else ""))
        panels.append({"title": f"{MODEL_LABELS.get(c['model'], c['model'])}, {c.get('data_label', c['dataset'])}",
                       "note": note,
                       "baseline": _arm(c, "none"), "simam": _arm(c, "simam"), "seeds": c["seeds"],
                       "finished": c["finished"]})
    return {"title": f"study {table['study']!r}: test accuracy, lambda = {format_lambda(table['e_lambda'])} "
                     f"against the baseline", "ylabel": "test accuracy (%)",
            "xticks": ["baseline", f"SimAM ({format_lambda(table['e_lambda'])})"], "panels": panels}


def draw_evaluation_figure(data: dict, path) -> Path:
    """Draw ``evaluation_figure_data`` to ``path`` (.png, .svg or .pdf)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(data["panels"])
    cols = min(n, PANELS_PER_ROW)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.9 * rows + 0.5), dpi=150, squeeze=False)
    try:
        for i, (ax, panel) in enumerate(zip(axes.flat, data["panels"])):
            _panel(ax, panel, data, legend=i == 0)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(data["title"], fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _panel(ax, panel: dict, data: dict, legend: bool) -> None:
    arms = [(0, panel["baseline"], "0.35"), (1, panel["simam"], "tab:blue")]
    base, simam = panel["baseline"], panel["simam"]
    if base and simam:  # one grey line per seed: the pair
        for a, b in zip(base["seeds"], simam["seeds"]):
            if a is not None and b is not None:
                ax.plot([-0.08, 0.92], [a, b], color="0.7", lw=0.8, zorder=1)
    for x, arm, color in arms:
        if arm is None:
            continue
        done = [a for a in arm["seeds"] if a is not None]
        ax.scatter([x - 0.08] * len(done), done, s=14, color=color, alpha=0.6, lw=0, zorder=2,
                   label="a seed" if x == 1 else None)
        if arm["mean"] is not None:
            ax.errorbar([x + 0.08], [arm["mean"]], yerr=[arm["std"] or 0], fmt="s", color=color, capsize=4,
                        zorder=3, label="mean +- std" if x == 1 else None)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(data["xticks"], fontsize=7)
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel(data["ylabel"], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    title = panel["title"] + ("" if panel["finished"] else " (running)")
    ax.set_title(title + (f"\n{panel['note']}" if panel["note"] else ""), fontsize=8)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")


def evaluation_plot_path(search_plot: Path) -> Path:
    """Where ``evaluate`` leaves the figure: beside the search's plot, ``<study>+evaluation.png``
    (no study name holds a '+': no study's plot can be it)."""
    search_plot = Path(search_plot)
    return search_plot.with_name(search_plot.stem + "+evaluation" + search_plot.suffix)


def plot_evaluation(table: dict, path, make_folder: bool = False) -> Path:
    """Write the figure of ``table`` (``read_evaluations``) to ``path``; the format follows the
    extension."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"the plot file must end in .png, .svg or .pdf, got {str(path)!r}")
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    return draw_evaluation_figure(evaluation_figure_data(table), path)
