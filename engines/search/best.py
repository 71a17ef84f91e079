"""The search's current best as its running stage says it, and read back from that stage.

A running search reports one line (the job's `stage`): how many candidates were tried and the best
within the budget so far. It spoke of "0.94× the original's cost" while every table speaks of
speedup; it now says speedup (×, higher is better; for a size objective, how many times smaller).
The API reads the same line back into the job's `best` (app.services.job_fields), so the two are
written and parsed here, side by side, and cannot disagree.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: What the stage calls a ratio, by objective metric: higher is better for both.
_WORDS = {"size": "smaller"}
_DEFAULT_WORD = "speedup"
#: A job's stage is a 255-character column: a long label is shortened to keep the line within it.
MAX_STAGE_CHARS = 255
_BEST = re.compile(
    r"best within budget: (?P<label>.+) \((?P<speedup>[0-9.]+)× (?:speedup|smaller), "
    r"drop (?P<drop>-?[0-9.]+) pt\)$"
)


def speedup_of(cost_ratio: float) -> float | None:
    """Speedup (the original's cost over the candidate's) from a cost ratio; None when not timed."""
    if not math.isfinite(cost_ratio) or cost_ratio <= 0:
        return None
    return 1.0 / cost_ratio


def ratio_text(cost_ratio: float, metric: str = "latency") -> str:
    """`1.52× speedup` (or `4.00× smaller` for size), from a candidate's cost / the original's."""
    speedup = speedup_of(cost_ratio)
    word = _WORDS.get(metric, _DEFAULT_WORD)
    return "not timed" if speedup is None else f"{speedup:.2f}× {word}"


def searching_stage(
    tried: int, left: int, best: tuple[str, float, float | None] | None, metric: str = "latency"
) -> str:
    """The running stage: `best` is (label, cost ratio to the original, drop as a fraction)."""
    head = f"searching: {tried} tried, {left} left; "
    if best is None:
        return head + "best within budget: none yet"
    label, cost_ratio, drop = best
    drop_pt = 0.0 if drop is None else drop * 100
    tail = f" ({ratio_text(cost_ratio, metric)}, drop {drop_pt:.2f} pt)"
    room = MAX_STAGE_CHARS - len(head) - len("best within budget: ") - len(tail)
    if len(label) > room:
        label = label[: max(1, room - 1)] + "…"
    return head + f"best within budget: {label}{tail}"


def parse_best(stage: str) -> dict[str, Any] | None:
    """{"label", "speedup", "drop"} of a running search's stage (drop as a fraction); None when it
    names no best yet (or is another stage)."""
    found = _BEST.search(stage or "")
    if found is None:
        return None
    return {
        "label": found["label"],
        "speedup": float(found["speedup"]),
        "drop": float(found["drop"]) / 100,
    }
