"""Recipes: which stages run, with which options. Frozen dataclasses, no loose option dicts.

The API's pydantic request models map 1:1 onto these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engines.finetune import FinetuneConfig
from engines.prune import PruneConfig
from engines.quantize import QuantizeConfig

PRECISIONS = ("fp32", "int8", "fp16")
BUDGET_METRICS = ("top1", "fidelity")


@dataclass(frozen=True)
class MeasureConfig:
    """How latency is measured: warm-up runs are discarded, timed runs give the percentiles.

    Timing goes on until both `timed_runs` runs and `min_seconds` are reached (sub-millisecond
    models need many runs for a stable p99), but never past `max_runs`.
    """

    warmup_runs: int = 10
    timed_runs: int = 50
    min_seconds: float = 1.0
    max_runs: int = 100_000
    threads: int | None = None  # None: all cores


@dataclass(frozen=True)
class AccuracyBudget:
    """Keep the most error-prone nodes in float until the drop against the float model is at most
    `max_drop` (a fraction: 0.01 is one point of top-1; for `fidelity`, the cosine similarity to the
    float model's outputs, and for class scores the top-1 agreement too, stay at or above 1 - max_drop)."""

    metric: str = "top1"
    max_drop: float = 0.01


@dataclass(frozen=True)
class Recipe:
    targets: tuple[str, ...] = ("onnxruntime-cpu",)
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 8)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    accuracy_budget: AccuracyBudget | None = None
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        quantize = dict(data.get("quantize") or {})
        quantize["nodes_to_exclude"] = tuple(quantize.get("nodes_to_exclude", ()))
        budget = data.get("accuracy_budget")
        prune = dict(data["prune"]) if data.get("prune") else None
        if prune is not None:
            prune["ignore"] = tuple(prune.get("ignore", ()))
            prune.pop("ratios_from_sensitivity", None)  # resolved into layer_ratios when the job was made
        return cls(
            targets=tuple(data.get("targets", cls.targets)),
            precision=data.get("precision", cls.precision),
            batch_sizes=tuple(data.get("batch_sizes", cls.batch_sizes)),
            quantize=QuantizeConfig(**quantize),
            accuracy_budget=AccuracyBudget(**budget) if budget else None,
            prune=PruneConfig(**prune) if prune is not None else None,
            finetune=FinetuneConfig(**data["finetune"]) if data.get("finetune") else None,
            measure=MeasureConfig(**data.get("measure", {})),
        )
