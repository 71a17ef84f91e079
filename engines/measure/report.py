"""The comparison table every model-compression write-up ends with, as data and as markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engines.measure.latency import latency_label, sorted_latency_keys

#: What a (batch, sequence length) entry adds to a report row's latency cells.
SEQUENCE_CELLS = ("batch_size", "sequence_length", "tokens_per_s")


def report_row(
    network: str,
    label: str,
    measurement: dict[str, Any],
    comparison: dict[str, Any] | None,
    size_bytes: int | None = None,
    params: int | None = None,
    macs: int | None = None,
) -> dict[str, Any]:
    """One row: a measured runner (the baseline when `comparison` is None) against the baseline."""
    accuracy = measurement.get("accuracy") or {}
    fidelity = accuracy.get("fidelity") or {}
    return {
        "network": network,
        "engine": label,
        "precision": measurement["precision"],
        "backend": measurement["backend"],
        "latency": {shape: _latency_cells(stats) for shape, stats in measurement["latency"].items()},
        "top1": accuracy.get("top1"),
        "top5": accuracy.get("top5"),
        "top1_agreement": fidelity.get("top1_agreement"),
        "cosine_similarity": fidelity.get("cosine_similarity"),  # what says fidelity for embeddings
        "size_mb": None if size_bytes is None else size_bytes / 1e6,
        "params": params,
        "macs": macs,
        "speedup": (comparison or {}).get("speedup"),
        "top1_delta": (comparison or {}).get("top1_delta"),
    }


def _latency_cells(stats: dict[str, Any]) -> dict[str, Any]:
    """What a report row keeps of one measured shape; a (batch, sequence length) entry also says
    its shape and tokens per second."""
    cells = {key: stats[key] for key in ("mean_ms", "p50_ms", "p99_ms", "throughput_per_s")}
    if "sequence_length" in stats:
        cells.update({key: stats[key] for key in SEQUENCE_CELLS if key in stats})
    return cells


#: Characters that mean something inside a markdown table cell, backslash-escaped.
_MARKDOWN_SPECIALS = frozenset("\\`*_[]|~")
#: And in the HTML that markdown passes through: as entities.
_HTML_SPECIALS = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def markdown_text(text: object) -> str:
    """`text` as one markdown table cell, shown as written: a user's model name may hold a pipe
    (a new column), a line break (a new row), HTML (`<img onerror=…>` in a viewer that renders it)
    or emphasis and link syntax. Control characters become spaces."""
    out = []
    for char in str(text):
        if char in _HTML_SPECIALS:
            out.append(_HTML_SPECIALS[char])
        elif char in _MARKDOWN_SPECIALS:
            out.append("\\" + char)
        elif char < " " or char == "\x7f" or char in "\u2028\u2029\x85":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render_markdown(rows: Sequence[dict[str, Any]], hardware: dict[str, Any] | None = None) -> str:
    """A markdown table: latency per batch size, or per (batch, sequence length) (p50, p99, speedup
    of p50s), top-1, deltas vs baseline."""
    sizes = sorted_latency_keys(size for row in rows for size in row["latency"])
    # Where each engine came from (pruning, calibration, nodes kept in float): without it a pruned
    # fp32 engine reads like the unpruned one. Rows of reports stored before lineage have none.
    with_lineage = any((row.get("lineage") or {}).get("label") for row in rows)
    header = ["Network", "Engine", *(["Lineage"] if with_lineage else []), "Precision", "Backend"]
    header += ["Params (M)", "MACs (M)"]
    for size in sizes:
        shape = latency_label(size)
        header += [f"p50 ({shape}) ms", f"p99 ({shape}) ms", f"Speedup ({shape})"]
    header += ["Top-1", "Δ top-1 vs baseline", "Agreement", "Size (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [markdown_text(row["network"]), markdown_text(row["engine"])]
        if with_lineage:
            cells.append(markdown_text((row.get("lineage") or {}).get("label") or "—"))
        cells += [markdown_text(row["precision"]), markdown_text(row["backend"])]
        cells += [
            _cell(row["params"] and row["params"] / 1e6, ".3f"),
            _cell(row["macs"] and row["macs"] / 1e6, ".1f"),
        ]
        for size in sizes:
            stats = row["latency"].get(size)
            speedup = (row["speedup"] or {}).get(size)
            cells += [
                _cell(stats and stats["p50_ms"], ".3f"),
                _cell(stats and stats["p99_ms"], ".3f"),
                "—" if row["speedup"] is None else _cell(speedup, ".2f") + "×",
            ]
        delta = row["top1_delta"]
        cells += [
            _cell(row["top1"], ".4f"),
            "—" if delta is None else f"{delta * 100:+.2f} pt",
            _cell(row["top1_agreement"], ".4f"),
            _cell(row["size_mb"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if hardware:
        lines.append("")
        lines.append(
            f"Measured on {hardware.get('cpu_model')} ({hardware.get('threads')} threads, "
            f"onnxruntime {hardware.get('onnxruntime')})."
        )
    return "\n".join(lines) + "\n"
