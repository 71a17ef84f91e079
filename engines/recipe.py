"""Recipes: which stages run, with which options. Frozen dataclasses, no loose option dicts.

The API's pydantic request models map 1:1 onto these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engines.measure.latency import MeasureConfig
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig
from engines.qat.config import QatConfig
from engines.quantize.budget import AccuracyBudget
from engines.quantize.int8 import QuantizeConfig


@dataclass(frozen=True)
class Recipe:
    targets: tuple[str, ...] = ("onnxruntime-cpu",)
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 8)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    accuracy_budget: AccuracyBudget | None = None
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    qat: QatConfig | None = None  # quantization-aware training instead of post-training INT8
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
            qat=QatConfig(**data["qat"]) if data.get("qat") else None,
            measure=MeasureConfig(**data.get("measure", {})),
        )
