"""Tables, CSV/JSON files and plots of evaluation results."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from .harness import RunResult

__all__ = ["summarize", "format_table", "write_results"]


def summarize(results: Sequence[RunResult]) -> list[dict]:
    """Per (method, budget): mean accuracy overall and per task, mean recall and rows read."""
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for result in results:
        groups[(result.method, result.budget)].append(result)
    rows = []
    for (method, budget), items in groups.items():
        per_task: dict[str, list[float]] = defaultdict(list)
        for item in items:
            per_task[item.task].append(item.score)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "runs": len(items),
                "accuracy": sum(i.score for i in items) / len(items),
                "recall": sum(i.recall for i in items) / len(items),
                "far_recall": _mean_of_known([i.far_recall for i in items]),
                "rows_read": sum(i.rows_read for i in items) / len(items),
                **{f"acc_{task}": sum(scores) / len(scores) for task, scores in sorted(per_task.items())},
            }
        )
    order = {"dense": 0, "oracle": 1, "a2ats": 2, "quest": 3, "pqcache": 4, "streaming": 5}
    rows.sort(key=lambda r: (order.get(r["method"], 9), r["method"], r["budget"]))
    return rows


def _mean_of_known(values: list[float]) -> float:
    """Mean of the values that are not NaN (a run whose contexts had no far tokens has none)."""
    known = [v for v in values if v == v]
    return sum(known) / len(known) if known else float("nan")


def format_table(summary: Sequence[dict]) -> str:
    lines = [f"{'method':18} {'budget':>7} {'accuracy':>9} {'recall':>7} {'far recall':>10} {'rows read':>10}"]
    for row in summary:
        lines.append(
            f"{row['method']:18} {row['budget']:>7} {row['accuracy']:>9.3f} {row['recall']:>7.3f} "
            f"{row['far_recall']:>10.3f} {row['rows_read']:>10.1%}"
        )
    return "\n".join(lines)


def write_results(results: Sequence[RunResult], directory: str | Path) -> list[Path]:
    """results.csv (one row per run), summary.json, and accuracy/recall plots when matplotlib is there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    path = directory / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    written.append(path)
    summary = summarize(results)
    path = directory / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    written.append(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    for metric in ("accuracy", "recall", "far_recall"):
        figure, axis = plt.subplots(figsize=(6, 4))
        for method in sorted({row["method"] for row in summary}):
            dense = [row[metric] for row in summary if row["method"] == method and row["budget"] == "all"]
            if dense:
                axis.axhline(dense[0], linestyle="--", color="grey", label=method)
            for suffix, label in (("%", method), ("%/kv", f"{method} per KV head")):
                points = sorted(
                    (float(row["budget"][: -len(suffix)]), row[metric])
                    for row in summary
                    if row["method"] == method and row["budget"].endswith(suffix)
                )
                if points:
                    axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.set_xlabel("budget (% of tokens per query head, or per KV head)")
        axis.set_ylabel(metric)
        axis.legend()
        figure.tight_layout()
        path = directory / f"{metric}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
