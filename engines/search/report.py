"""An autotune search as people read it: a markdown table of every candidate (chosen, front, the
rest with why), and a plot of cost against accuracy drop with the Pareto front and the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.measure.report import markdown_text

REPORT_JSON, REPORT_MD, REPORT_PNG = "autotune.json", "autotune.md", "autotune.png"
_COST_UNITS = {"latency": "p50 ms", "throughput": "ms per sample", "size": "MB"}


def _cost_value(metric: str, cost: float, batch_size: int) -> float:
    """The cost in the unit people read: ms, ms per sample (throughput), MB."""
    if metric == "size":
        return cost / 1e6
    if metric == "throughput":
        return cost * 1000.0
    return cost


def _at(objective: dict[str, Any]) -> str:
    """Where the cost was measured: `batch 8`, or `batch 8, sequence 128`."""
    length = objective.get("sequence_length")
    return f"batch {objective['batch_size']}" + ("" if length is None else f", sequence {length}")


def _versus_original(row: dict[str, Any], original: float, cost: float | None) -> str:
    """Speed against the original: from the final side-by-side timing for accepted candidates, from
    the quick timing (beside the original, in the same rounds) for the others, marked so."""
    if row["status"] == "accepted" or row["chosen"]:
        return "—" if cost is None else f"{original / cost:.2f}×"
    ratio = row.get("quick_ratio")
    return "—" if not ratio else f"{1 / ratio:.2f}× (quick)"


def markdown(report: dict[str, Any]) -> str:
    objective = report["objective"]
    metric, batch = objective["metric"], objective["batch_size"]
    unit = _COST_UNITS[metric]
    budget = report["budget"]
    lines = [
        f"Objective: {metric} at {_at(objective)}; budget: {report['allowed_drop'] * 100:.2f} pt of "
        f"{budget['metric']}; chosen: {report['chosen'] or 'none'}; {report['elapsed_s']:.0f} s"
        + (" (time budget ran out)" if report["timed_out"] else ""),
        "",
        f"| Candidate | Outcome | {unit} | vs original | Drop (pt) | Front | Why |",
        "|---|---|---|---|---|---|---|",
    ]
    original = _cost_value(metric, report["original"]["cost"], batch)
    lines.append(f"| original (onnxruntime-cpu fp32) | reference | {original:.3f} | 1.00× | 0.00 |  |  |")
    for row in report["candidates"]:
        cost = None if row["cost"] is None else _cost_value(metric, row["cost"], batch)
        cells = [
            ("**" + markdown_text(row["label"]) + "**") if row["chosen"] else markdown_text(row["label"]),
            ("served as the original" if row.get("served_as_original") else "chosen")
            if row["chosen"]
            else row["status"].replace("_", " "),
            "—" if cost is None else f"{cost:.3f}",
            _versus_original(row, original, cost),
            "—" if row["drop"] is None else f"{row['drop'] * 100:.2f}",
            "yes" if row["on_front"] else "",
            markdown_text(row["reason"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {markdown_text(message)}" for message in report["messages"])]
    lines += _not_tried(report["candidates"])
    return "\n".join(lines) + "\n"


def _not_tried(rows: list[dict[str, Any]]) -> list[str]:
    """The moves the search did not make: skipped for time, with what each would have cost, and
    held back or not applicable, with why."""
    skipped = [row for row in rows if row["status"] == "skipped_time"]
    held = [row for row in rows if row["status"] in ("held_back", "not_applicable")]
    lines: list[str] = []
    if skipped:
        total = sum(row.get("estimated_seconds") or 0.0 for row in skipped)
        lines += ["", f"Skipped for time (about {total:.0f} s of work in all):", ""]
        lines += [
            f"- {markdown_text(row['label'])}: ~{row.get('estimated_seconds') or 0.0:.0f} s"
            for row in skipped
        ]
    if held:
        lines += ["", "Held back:", ""]
        lines += [f"- {markdown_text(row['label'])}: {markdown_text(row['reason'])}" for row in held]
    return lines


def plot(report: dict[str, Any], path: Path) -> Path:
    """Speedup against drop, the unit of every other table: every scored candidate, the front
    joined, the chosen one starred, the original at (0, 1×), the budget as a vertical line. Labels
    live in the legend, never beside the points, so none can hide another; when the original is
    served, no star is drawn over its marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = report["objective"]
    original_cost = report["original"]["cost"]
    scored = [row for row in report["candidates"] if row["cost"] is not None and row["drop"] is not None]

    def gain(row: dict[str, Any]) -> float:
        return original_cost / row["cost"] if row["cost"] else 0.0

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for within in (True, False):
        rows = [row for row in scored if bool(row["within_budget"]) == within]
        if rows:
            axes.scatter(
                [row["drop"] * 100 for row in rows], [gain(row) for row in rows],
                color="tab:blue" if within else "tab:gray", s=30, alpha=0.8,
                label="within the budget" if within else "over the budget",
            )  # fmt: skip
    front = sorted((row for row in scored if row["on_front"]), key=lambda row: row["drop"])
    if front:
        axes.plot(
            [row["drop"] * 100 for row in front], [gain(row) for row in front],
            color="tab:orange", marker="o", label="Pareto front",
        )  # fmt: skip
    serves_original = bool(report.get("serves_original"))
    for row in scored:
        if row["chosen"] and not serves_original:  # else the original's own engine: marked as the original
            axes.scatter(
                row["drop"] * 100, gain(row), marker="*", s=250, color="tab:red",
                label=f"chosen: {row['label']} ({gain(row):.2f}×)", zorder=5,
            )  # fmt: skip
    axes.scatter(
        0, 1.0, marker="s", s=60, color="black",
        label="original, served (nothing beat it)" if serves_original else "original (1×)", zorder=6,
    )  # fmt: skip
    axes.axhline(1.0, color="black", linewidth=0.5)
    axes.axvline(report["allowed_drop"] * 100, color="tab:red", linestyle="--", linewidth=1, label="budget")
    axes.set_xlabel(f"accuracy drop ({report['budget']['metric']}, points)")
    better = "smaller" if objective["metric"] == "size" else "faster"
    axes.set_ylabel(f"speedup (×, {objective['metric']} at {_at(objective)}; higher is {better})")
    axes.set_title("Auto-optimize: every scored candidate, speedup against accuracy drop")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
