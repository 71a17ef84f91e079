"""Recipes: which stages run, with which options. Frozen dataclasses, no loose option dicts.

The API's pydantic request models map 1:1 onto these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PRECISIONS = ("fp32",)


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
class Recipe:
    targets: tuple[str, ...] = ("onnxruntime-cpu",)
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 8)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(
            targets=tuple(data.get("targets", cls.targets)),
            precision=data.get("precision", cls.precision),
            batch_sizes=tuple(data.get("batch_sizes", cls.batch_sizes)),
            measure=MeasureConfig(**data.get("measure", {})),
        )
