"""What the search optimizes, what it must keep, and the candidates it may try, cheapest first.

A candidate is a lineage: which pruning (ratio, or the per-layer ratios of a sensitivity
analysis), which precision, which calibration method, whether the accuracy-aware float fallback
is on, whether INT8 is trained (QAT), which backend. The order is the search's first economy:
candidates that cost seconds to build (fp32, fp16, one INT8 calibration) come before those that cost
minutes, so a short time budget still sees the cheap wins; and every kind of move comes early once
(the first calibration method of each family, then the first pruning), so a long build of one kind
cannot starve the others. Calibration methods of a family already tried (minmax, entropy and
percentile are all ONNX Runtime's calibrators, and fail the same way) come last: the search tries
them only when the first of their family came close (engines.search.moves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from engines.errors import InvalidRecipeError
from engines.graphopt.config import AUTO, GraphOptConfig
from engines.measure.latency import latency_key
from engines.search.methods import default_calibrations, family_first

OBJECTIVE_METRICS = ("latency", "throughput", "size")


@dataclass(frozen=True)
class Objective:
    """Minimize latency (p50) or maximize throughput at `batch_size` (and, for a model with a
    sequence axis, at `sequence_length`: generated or dataset tokens cut or padded to it; None: the
    evaluation set's own length), or minimize the engine's size."""

    metric: str = "latency"
    batch_size: int = 1
    sequence_length: int | None = None

    @property
    def sequence_lengths(self) -> tuple[int, ...]:
        """The lengths the search times at (engines.measure.latency.measure_latency)."""
        return () if self.sequence_length is None else (self.sequence_length,)

    @property
    def shape(self) -> str:
        """`batch 8`, or `batch 8, sequence 128`: where the cost is measured, as people read it."""
        length = "" if self.sequence_length is None else f", sequence {self.sequence_length}"
        return f"batch {self.batch_size}{length}"

    def cost(self, latency: dict[str, dict[str, float]] | None, size_bytes: int) -> float:
        """Smaller is better, whatever the metric (throughput as its inverse)."""
        if self.metric == "size":
            return float(size_bytes)
        assert latency is not None
        stats = latency[latency_key(self.batch_size, self.sequence_length)]
        return stats["p50_ms"] if self.metric == "latency" else 1.0 / stats["throughput_per_s"]

    def describe(self, cost: float) -> str:
        if self.metric == "size":
            return f"{cost / 1e6:.2f} MB"
        if self.metric == "latency":
            return f"p50 {cost:.3f} ms at {self.shape}"
        return f"{1.0 / cost:.1f} samples/s at {self.shape}"

    def to_report(self) -> dict[str, Any]:
        """The objective as a report states it (the sequence length only where one was asked)."""
        data: dict[str, Any] = {"metric": self.metric, "batch_size": self.batch_size}
        if self.sequence_length is not None:
            data["sequence_length"] = self.sequence_length
        return data


@dataclass(frozen=True)
class Budget:
    """How much accuracy the engine may lose against the original: `max_drop` of top-1 (labels) or of
    fidelity (agreement with the original's outputs), in points (0.01 = 1 point) or, `relative`,
    as a fraction of the original's score."""

    metric: str = "top1"
    max_drop: float = 0.01
    relative: bool = False

    def allowed_drop(self, baseline_score: float) -> float:
        return self.max_drop * baseline_score if self.relative else self.max_drop


@dataclass(frozen=True)
class SearchSpace:
    """The choices the search may combine; the request's `space` narrows them."""

    backends: tuple[str, ...] = ()  # empty: every CPU backend this worker runs
    # every precision a backend here builds; those that do not apply to the model (or would not pay:
    # weight-only where MatMul weights are a small share) are skipped with the reason
    precisions: tuple[str, ...] = (
        "fp32", "fp16", "bf16", "int8", "int8-dynamic", "int8-weight", "int4-weight"
    )  # fmt: skip
    # every registered method, one per family first (engines.search.methods.default_calibrations)
    calibrations: tuple[str, ...] = field(default_factory=default_calibrations)
    prune_ratios: tuple[float, ...] = (0.3, 0.5)
    prune_method: str = "l1"
    finetune_epochs: int = 4
    float_fallback: bool = True  # an INT8 candidate that breaks the budget is retried with nodes in float
    max_full_evaluations: int = 30
    screen_samples: int = 128
    # INT8 trained with its quantization when post-training INT8 and its fallback break the budget; 0: never
    qat_epochs: int = 3
    # run a pruning sensitivity analysis in the search (per-layer ratios within the budget) when none
    # was made before and its measured cost fits; off by default: on a 224×224 network on 2 cores it
    # takes longer than the default time budget (docs in engines/search/autotune.py)
    sensitivity: bool = False
    # transformer fusion, once, before the first candidate (a pre-step, not a dimension: the search's
    # _Search.fuse_graph says why); "auto": detected, a transformer that is not identified runs unfused
    graph_optimization: GraphOptConfig = field(default_factory=lambda: GraphOptConfig(AUTO))


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str
    calibration: str | None = None
    prune_ratio: float = 0.0
    layer_ratios: tuple[tuple[str, float], ...] = ()  # from a sensitivity analysis
    float_fallback: bool = False
    qat_epochs: int = 0  # > 0: quantization-aware training (int8 only)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def pruned(self) -> bool:
        return self.prune_ratio > 0 or bool(self.layer_ratios)

    def label(self) -> str:
        parts = []
        if self.layer_ratios:
            parts.append("pruned (sensitivity)")
        elif self.prune_ratio:
            parts.append(f"pruned {self.prune_ratio:g}")
        parts.append(self.precision + (f" {self.calibration}" if self.calibration else ""))
        if self.qat_epochs:
            parts.append(f"qat {self.qat_epochs}e")
        if self.float_fallback:
            parts.append("+ float fallback")
        return f"{self.backend} " + " ".join(parts)

    def lineage(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_ratios"] = dict(self.layer_ratios) or None
        data.pop("notes")
        return data


def candidates(
    space: SearchSpace,
    backends: Sequence[str],
    precisions_of: dict[str, tuple[str, ...]],
    *,
    can_prune: bool,
    sensitivity_ratios: dict[str, float] | None = None,
) -> list[Candidate]:
    """Every candidate of the space on these backends, cheapest to build first, each kind of move
    early once: unpruned fp32, fp16, bf16, dynamic INT8 (no calibration: seconds to build), INT8 with
    the first method of each calibration family, weight-only int8 and int4 (round to nearest: seconds,
    no data); the first pruning (the sensitivity analysis's per-layer ratios, or else the smallest
    ratio), fp32 then INT8; the other methods of families already tried; the other prunings.

    The float fallback and QAT are not queued here: the search queues them right after the INT8
    candidate they rescue fails (engines.search.autotune)."""
    if not backends:
        raise InvalidRecipeError("no backend of the search space runs on this worker")

    def at(precision: str, **extra: Any) -> list[Candidate]:
        return [
            Candidate(backend, precision, **extra)
            for backend in backends
            if precision in precisions_of[backend] and precision in space.precisions
        ]

    firsts, rest = family_first(space.calibrations)
    found: list[Candidate] = [*at("fp32"), *at("fp16"), *at("bf16"), *at("int8-dynamic")]
    for calibration in firsts:
        found += at("int8", calibration=calibration)
    found += [*at("int8-weight"), *at("int4-weight")]
    prunings: list[dict[str, Any]] = []
    if can_prune:
        if sensitivity_ratios and any(sensitivity_ratios.values()):
            prunings.append({"layer_ratios": tuple(sorted(sensitivity_ratios.items()))})
        prunings += [{"prune_ratio": ratio} for ratio in sorted(set(space.prune_ratios)) if ratio > 0]

    def pruned(pruning: dict[str, Any]) -> list[Candidate]:
        return [*at("fp32", **pruning), *(at("int8", calibration=firsts[0], **pruning) if firsts else [])]

    if prunings:
        found += pruned(prunings[0])
    for calibration in rest:
        found += at("int8", calibration=calibration)
    for pruning in prunings[1:]:
        found += pruned(pruning)
    return found
