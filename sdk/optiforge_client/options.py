"""argparse types of the CLI's options: each reads its text once and refuses it with a sentence
that names the option (argparse prefixes `argument --flag:`), before anything is sent."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from optiforge_client.budget import BudgetError, parse_budget
from optiforge_client.limits import OBJECTIVE_METRICS


def budget(text: str) -> tuple[float, bool]:
    """--budget: `(max_drop, relative)` (budget.parse_budget)."""
    try:
        return parse_budget(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: `latency`, `latency@8`, `latency@1x128`.
_OBJECTIVE = re.compile(r"(\w+)(?:@(\d+)(?:x(\d+))?)?")


def parse_objective_at(text: str) -> tuple[str, int, int | None]:
    """`latency@8`, `throughput@32`, `size`; `latency@1x128`: batch 1 at sequence length 128 (a
    model with a sequence axis): (metric, batch size, sequence length or None)."""
    match = _OBJECTIVE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not METRIC, METRIC@BATCH or METRIC@BATCHxLENGTH")
    metric, batch, length = match.groups()
    return metric, int(batch) if batch else 1, int(length) if length else None


def parse_objective(text: str) -> tuple[str, int]:
    """`latency@8`, `throughput@32`, `size`: (metric, batch size)."""
    metric, batch, _length = parse_objective_at(text)
    return metric, batch


def objective(text: str) -> str:
    """--objective: `text` as given, once it reads (parse_objective_at)."""
    example = "e.g. latency@8, throughput@32, size, or latency@1x128 (batch × sequence length)"
    try:
        metric, batch, length = parse_objective_at(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: METRIC@BATCH, {example}") from None
    if metric not in OBJECTIVE_METRICS or batch < 1 or (length is not None and length < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: {' | '.join(OBJECTIVE_METRICS)}, {example}")
    return text


def int_list(text: str) -> list[int]:
    """--batch-sizes, --sequence-lengths: `1,8` -> [1, 8], whole numbers of 1 or more."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers, e.g. 1,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers of 1 or more, e.g. 1,8")
    return values


def _value(text: str) -> Any:
    """A KEY=VALUE value: JSON when it reads as JSON (`[64,64]`, `0.5`), else the text (`bilinear`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def preprocessing_item(text: str) -> dict[str, Any]:
    """One --preprocessing: a JSON object (`{"size": [64, 64]}`) or `KEY=VALUE` (`size=[64,64]`,
    `resize=bilinear`); repeated options merge (the later wins)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: not a JSON object ({exc.msg})") from None
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError(f"{text!r}: a JSON object, e.g. '{{\"size\": [64, 64]}}'")
        return spec
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: KEY=VALUE (e.g. size=[64,64]) or a JSON object (e.g. '{{\"size\": [64, 64]}}')"
        )
    return {key.strip(): _value(value.strip())}


def merged(items: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Repeated --preprocessing options as one spec (None: none given, the server's defaults)."""
    if not items:
        return None
    spec: dict[str, Any] = {}
    for item in items:
        spec.update(item)
    return spec
