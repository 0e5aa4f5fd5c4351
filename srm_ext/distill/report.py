"""The results table: held-out accuracy per method (mean and std over seeds) and
the time each stage took."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

__all__ = ["summarise", "markdown_table"]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order) from per-run results
    ``{"method", "seed", "test_acc", "stage_times": {stage: seconds}}`` (and
    ``"loaded_from"`` for a model loaded rather than trained)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    rows = []
    for method, method_runs in by_method.items():
        accs = [r["test_acc"] for r in method_runs]
        stage_times: dict[str, list[float]] = defaultdict(list)
        for r in method_runs:
            for stage, seconds in r["stage_times"].items():
                stage_times[stage].append(seconds)
        rows.append(
            {
                "method": method,
                "runs": len(method_runs),
                "seeds": [r["seed"] for r in method_runs],
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accs": accs,
                "stage_time_mean": {s: statistics.fmean(t) for s, t in stage_times.items()},
                "loaded": all("loaded_from" in r for r in method_runs),  # not trained here
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test accuracy (%) | runs | time per stage, mean over runs (s) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        acc = f"{100 * row['acc_mean']:.2f}"
        if row["runs"] > 1:  # one run has no spread to state
            acc += f" ± {100 * row['acc_std']:.2f}"
        times = ", ".join(f"{s} {t:.1f}" for s, t in row["stage_time_mean"].items())
        times = times or ("loaded" if row.get("loaded") else "-")
        lines.append(f"| {row['method']} | {acc} | {row['runs']} | {times} |")
    return "\n".join(lines)
