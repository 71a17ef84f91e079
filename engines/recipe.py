"""Recipes: which stages run, with which options. Frozen dataclasses, no loose option dicts.

The API's pydantic request models map 1:1 onto these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engines.graphopt.config import GraphOptConfig
from engines.measure.latency import MeasureConfig
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig
from engines.qat.config import QatConfig
from engines.quantize.budget import AccuracyBudget
from engines.quantize.dynamic import DynamicConfig
from engines.quantize.int8 import QuantizeConfig
from engines.quantize.weight_only import WeightOnlyConfig


@dataclass(frozen=True)
class Recipe:
    targets: tuple[str, ...] = ("onnxruntime-cpu",)
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 8)
    #: A model with a sequence axis (engines.ingest.sequence) is measured at each batch size and each of
    #: these lengths; empty: as any model, at the batch sizes alone (a dataset's own lengths).
    sequence_lengths: tuple[int, ...] = ()
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    accuracy_budget: AccuracyBudget | None = None
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    qat: QatConfig | None = None  # quantization-aware training instead of post-training INT8
    #: Transformer graph optimization before the precision (engines.graphopt): off unless asked.
    graph_optimization: GraphOptConfig = field(default_factory=GraphOptConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)  # precision int8-dynamic
    weight_only: WeightOnlyConfig = field(default_factory=WeightOnlyConfig)  # int4-weight, int8-weight
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # stored only where asked, so a recipe without them is stored as it was before they existed
        if not self.sequence_lengths:
            del data["sequence_lengths"]
        if not self.measure.padding:
            del data["measure"]["padding"]
        for name, default in (
            ("dynamic", DynamicConfig()),
            ("weight_only", WeightOnlyConfig()),
            ("graph_optimization", GraphOptConfig()),
        ):
            if getattr(self, name) == default:
                del data[name]
        return data

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
            sequence_lengths=tuple(data.get("sequence_lengths", ())),
            quantize=QuantizeConfig(**quantize),
            accuracy_budget=AccuracyBudget(**budget) if budget else None,
            prune=PruneConfig(**prune) if prune is not None else None,
            finetune=FinetuneConfig(**data["finetune"]) if data.get("finetune") else None,
            qat=QatConfig(**data["qat"]) if data.get("qat") else None,
            graph_optimization=GraphOptConfig(**data.get("graph_optimization") or {}),
            dynamic=DynamicConfig(**_tuples(data.get("dynamic"), "op_types", "nodes_to_exclude")),
            weight_only=WeightOnlyConfig(**_tuples(data.get("weight_only"), "nodes_to_exclude")),
            measure=MeasureConfig(**data.get("measure", {})),
        )


def _tuples(config: dict[str, Any] | None, *names: str) -> dict[str, Any]:
    """A stored config's fields, the list-valued ones as the tuples the frozen config holds."""
    values = dict(config or {})
    for name in names:
        if name in values:
            values[name] = tuple(values[name])
    return values
