"""The CLI's reports: in a terminal a table sized to it (tables.py), in a file the server's
markdown as it is (a log or a pipe keeps every column; nothing there wraps).

The terminal tables are read from the JSON reports; a report the code here does not understand
(a newer server) falls back to the markdown, never to a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from pydantic import BaseModel
from rich.text import Text

from optiforge_client.client import Client
from optiforge_client.tables import Column, print_fitted
from optiforge_client.terminal import is_terminal, plain, terminal_console

#: Listing columns of free text (cut with … in a narrow terminal) and of numbers (right-aligned).
_FREE_TEXT = frozenset({"name", "stage", "alias"})
_NUMBERS = frozenset({"parameters", "macs", "size_bytes", "samples", "progress"})
#: The units of an autotune objective's cost (as the server's markdown report).
_COST_UNITS = {"latency": "p50 ms", "throughput": "ms/sample", "size": "MB"}


def _number(value: Any, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, fmt) + suffix


def _engine_label(row: dict[str, Any]) -> str:
    lineage = row.get("lineage") or {}
    return str(lineage.get("label") or f"{row.get('precision', '')} {row.get('backend', '')}".strip())


def shape_label(shape: str) -> str:
    """A latency key as the headers say it: `1` -> `b=1`, `1x128` -> `b=1×128` (batch × sequence)."""
    batch, _, length = shape.partition("x")
    return f"b={batch}" + (f"×{length}" if length else "")


def _shape_columns(shape: str, priority: int) -> list[Column]:
    def latency(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda row: _number(((row.get("latency") or {}).get(shape) or {}).get(key), ".3f")

    def speedup(row: dict[str, Any]) -> str:
        if row.get("speedup") is None:
            return "—"
        return _number((row["speedup"] or {}).get(shape), ".2f", "×")

    return [
        Column(f"Speedup {shape_label(shape)}", speedup, priority, right=True),
        Column(f"p50 {shape_label(shape)} ms", latency("p50_ms"), priority + 1, right=True),
        Column(f"p99 {shape_label(shape)} ms", latency("p99_ms"), priority + 4, right=True),
    ]


def job_report_columns(report: dict[str, Any]) -> list[Column]:
    """The job report's columns, the first batch size's speed and the accuracy first."""
    shapes: list[str] = []
    for row in report["rows"]:
        shapes += [shape for shape in row.get("latency") or {} if shape not in shapes]

    def delta(row: dict[str, Any]) -> str:
        value = row.get("top1_delta")
        return "—" if value is None else f"{value * 100:+.2f} pt"

    columns = [
        Column("Engine", lambda row: str(row.get("engine", "")), 1),
        Column("Lineage", _engine_label, 1, flexible=True),
    ]
    for index, shape in enumerate(shapes):
        columns += _shape_columns(shape, 1 if index == 0 else 3 + index)
    columns += [
        Column("Δ top-1", delta, 1, right=True),
        Column("Top-1", lambda row: _number(row.get("top1"), ".4f"), 3, right=True),
        Column("Size MB", lambda row: _number(row.get("size_mb"), ".3f"), 3, right=True),
        Column("Agreement", lambda row: _number(row.get("top1_agreement"), ".4f"), 4, right=True),
        Column(
            "Params M", lambda row: _number(row.get("params") and row["params"] / 1e6, ".3f"), 6, right=True
        ),
        Column("MACs M", lambda row: _number(row.get("macs") and row["macs"] / 1e6, ".1f"), 6, right=True),
    ]
    return columns


def autotune_columns(report: dict[str, Any]) -> list[Column]:
    """The search's candidates: what, outcome, speed against the original, drop, then why."""
    objective = report.get("objective") or {}
    metric = objective.get("metric", "latency")
    original = report.get("original") or {}

    def cost(row: dict[str, Any]) -> float | None:
        value = row.get("cost")
        if value is None:
            return None
        return value / 1e6 if metric == "size" else value * 1000.0 if metric == "throughput" else value

    def versus(row: dict[str, Any]) -> str:
        if row.get("speedup") is not None:
            return f"{row['speedup']:.2f}×"
        if (
            (row.get("status") == "accepted" or row.get("chosen"))
            and row.get("cost")
            and original.get("cost")
        ):
            return f"{original['cost'] / row['cost']:.2f}×"
        ratio = row.get("quick_ratio")
        return f"{1 / ratio:.2f}× (quick)" if ratio else "—"

    def outcome(row: dict[str, Any]) -> str:
        return "chosen" if row.get("chosen") else str(row.get("status", "")).replace("_", " ")

    def label(row: dict[str, Any]) -> str:
        lineage = row.get("lineage") or {}
        return str(row.get("label") or lineage.get("label") or "")

    return [
        Column("Candidate", label, 1, flexible=True),
        Column("Outcome", outcome, 1),
        Column("Speedup", versus, 1, right=True),
        Column("Drop pt", lambda row: _number(row.get("drop") and row["drop"] * 100, ".2f"), 1, right=True),
        Column(_COST_UNITS.get(metric, "cost"), lambda row: _number(cost(row), ".3f"), 2, right=True),
        Column("Front", lambda row: "yes" if row.get("on_front") else "", 3),
        Column("Why", lambda row: str(row.get("reason") or ""), 4, flexible=True),
    ]


def original_row(report: dict[str, Any]) -> dict[str, Any]:
    """The search's reference, first in its table as in the server's markdown."""
    lineage = report.get("original_lineage") or {}
    return {
        "label": lineage.get("label") or "original",
        "status": "reference",
        "cost": (report.get("original") or {}).get("cost"),
        "speedup": 1.0,
        "drop": 0.0,
    }


def _shown_in_table(row: dict[str, Any]) -> bool:
    """Candidates not tried (skipped for time, held back, not applicable) are counted below the
    table, not drawn in it."""
    return row.get("status") not in ("skipped_time", "held_back", "not_applicable")


def print_job_report(client: Client, job_id: str, stream: IO[str] | None = None) -> None:
    """The comparison table of a job: fitted to a terminal, the markdown elsewhere."""
    stream = stream or sys.stdout
    if not is_terminal(stream):
        stream.write(client.job_report(job_id, format="md"))
        return
    report = client.job_report(job_id)
    try:
        console = terminal_console(stream)
        title = f"{report.get('network', '')} · job {job_id}"
        more = f"all of them: optiforge jobs report {job_id} --format md"
        print_fitted(console, report["rows"], job_report_columns(report), title, more)
        hardware = report.get("hardware") or {}
        if hardware.get("cpu_model"):
            console.print(
                Text(plain(f"Measured on {hardware['cpu_model']} ({hardware.get('threads')} threads)."))
            )
        for message in report.get("messages") or []:
            console.print(Text(f"- {plain(message)}"))
    except (KeyError, TypeError, ValueError, AttributeError):
        stream.write(client.job_report(job_id, format="md"))


def print_autotune_report(client: Client, job_id: str, stream: IO[str] | None = None) -> None:
    """An auto-optimize search's candidates: fitted to a terminal, the markdown elsewhere."""
    stream = stream or sys.stdout
    if not is_terminal(stream):
        stream.write(client.autotune_report(job_id, format="md"))
        return
    report = client.autotune_report(job_id)
    try:
        console = terminal_console(stream)
        budget = report.get("budget") or {}
        title = (
            f"chosen: {report.get('chosen') or 'none'} · budget {report['allowed_drop'] * 100:.2f} pt of "
            f"{budget.get('metric', '?')} · {report.get('elapsed_s', 0):.0f} s"
        )
        candidates = report.get("candidates") or []
        rows = [row for row in candidates if _shown_in_table(row)]
        more = f"all of them: optiforge jobs report {job_id} --format md"
        print_fitted(console, [original_row(report), *rows], autotune_columns(report), title, more)
        for message in report.get("messages") or []:
            console.print(Text(f"- {plain(message)}"))
        not_tried = len(candidates) - len(rows)
        if not_tried:
            console.print(Text(f"{not_tried} more not tried (skipped for time or held back): {more}"))
    except (KeyError, TypeError, ValueError, AttributeError):
        stream.write(client.autotune_report(job_id, format="md"))


def print_listing(rows: Sequence[BaseModel], headers: Sequence[str], stream: IO[str] | None = None) -> None:
    """A listing (models, datasets, jobs, engines): fitted to a terminal (the first columns kept
    longest), plain aligned columns elsewhere (what scripts cut with `split`)."""
    stream = stream or sys.stdout
    dumped = [row.model_dump(mode="json") for row in rows]
    if is_terminal(stream):
        columns = [
            Column(
                header,
                lambda row, header=header: _cell(row.get(header)),
                index + 1,
                flexible=header in _FREE_TEXT,
                right=header in _NUMBERS,
            )
            for index, header in enumerate(headers)
        ]
        print_fitted(terminal_console(stream), dumped, columns)
        return
    cells = [[_cell(row.get(header)) for header in headers] for row in dumped]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, header in enumerate(headers)]
    stream.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for line in cells:
        stream.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return plain(str(value.get("label") or value))
    return plain(str(value))
