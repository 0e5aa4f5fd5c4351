"""PNG plots of a run: loss curves per stage and the accuracy comparison."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_loss_curves", "plot_accuracy"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(history: list[dict[str, Any]], path: Path) -> None:
    """One panel per stage name, one line per run, training loss against epoch;
    held-out accuracy on a second axis where the stage recorded it. Without
    any epochs, a figure that says so."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    curves: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in history:
        curves[record["stage"]][record["run"]].append(record)
    if not curves:
        # Still write the file, so a run's outputs do not depend on its epochs.
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.text(0.5, 0.5, "no epochs ran", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (stage, runs) in zip(axes.flat, curves.items()):
        acc_ax = None
        for run, records in runs.items():
            epochs = [r["epoch"] for r in records]
            line = ax.plot(epochs, [r["loss"] for r in records], label=run)[0]
            if any("test_acc" in r for r in records):
                acc_ax = acc_ax or ax.twinx()
                acc_ax.plot(
                    epochs,
                    [100 * r.get("test_acc", math.nan) for r in records],
                    linestyle="--",
                    color=line.get_color(),
                )
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss")
        if acc_ax is not None:
            acc_ax.set_ylabel("test accuracy (%) (dashed)")
        if acc_ax is None:
            ax.legend(fontsize="x-small", loc="best")
        else:
            # On the top axis, at the right middle where the falling loss and
            # the rising accuracy leave room, so neither is drawn over it.
            handles, labels = ax.get_legend_handles_labels()
            acc_ax.legend(handles, labels, fontsize="x-small", loc="center right")
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of the mean held-out accuracy per method with std error bars and
    the individual seeds as dots."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    names = [row["method"] for row in rows]
    means = [100 * row["acc_mean"] for row in rows]
    stds = [100 * row["acc_std"] for row in rows]
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
    for i, row in enumerate(rows):
        ax.scatter([i] * len(row["accs"]), [100 * a for a in row["accs"]], color="black", s=10, zorder=3)
    low = min(min(100 * a for a in row["accs"]) for row in rows)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("held-out accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
