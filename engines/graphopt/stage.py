"""The graph-optimization stage: detect, fuse, prove it is the same model, hand each target the
model it runs best. The pipeline runs it after pruning and before precision conversion; the
search runs it once before its first candidate (engines.search.autotune).

What can happen, and what the job says:
- the recipe's values disagree with the graph, or a transformer's heads or hidden size are neither
  stated nor in the graph: InvalidRecipeError naming how to state them (`check_graph_optimization`
  makes it a 422 when the job is created; the stage raises the same in a worker);
- the model is not identified as a transformer (or was optimized already): it runs unfused, and a
  message says why;
- the optimizer fails, fuses nothing, or its model's outputs differ from the unfused model's beyond
  cosine FUSION_MIN_COSINE (fp32, real ONNX Runtime sessions, the job's data or generated inputs):
  the unfused model is kept, and a message says why;
- otherwise each target that reads the fused graph gets whichever of the two models measured
  faster on its own runner, the others the unfused one (engines.graphopt.targets), and every
  engine's metadata records the detection, the counts per fused operator, what was left unfused
  and why, the fidelity check and the model it was built from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from engines.backends.base import Runner
from engines.errors import Cancelled, EngineError, InvalidRecipeError
from engines.graphopt.config import GraphOptConfig
from engines.graphopt.detect import Detection, FusionPlan, detect, plan_fusion
from engines.graphopt.fidelity import (
    FUSION_MIN_COSINE,
    check_fidelity,
    compare_outputs,
    dataset_batches,
    generated_batches,
)
from engines.graphopt.fuse import fuse
from engines.graphopt.targets import FUSED_GRAPH_READERS, UNREADABLE, precision_takes_fused
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec

#: (target backend, ONNX model) -> an active runner of that backend for it (compiled and loaded).
RunnerFor = Callable[[str, Path], Runner]
#: A measured target keeps the fused model only where its p50 is at most this times the unfused one's.
#: No margin in fusion's favour: on MiniLM-L3 (ONNX Runtime 1.32, this project's Xeon) the fused graph
#: ran at 0.83-0.93× the unfused graph's speed in fp32, and no faster after dynamic INT8 (QAttention
#: against MatMulInteger), at batch 1, sequence 128.
FUSED_SLOWER_TOLERANCE = 1.0
#: Interleaved timing of the fused and unfused runners: rounds of TIMING_RUNS runs of each, until each
#: has run TIMING_MIN_RUNS times and for TIMING_MIN_SECONDS (at most TIMING_MAX_RUNS).
TIMING_RUNS, TIMING_MIN_RUNS, TIMING_MAX_RUNS, TIMING_MIN_SECONDS = 3, 12, 300, 1.0
METADATA_KEY = "graph_optimization"


class _HasMetadata(Protocol):
    metadata: dict[str, Any]


Variant = TypeVar("Variant", bound=_HasMetadata)


@dataclass(frozen=True)
class TargetChoice:
    fused: bool
    reason: str
    latency_ms: dict[str, float] | None = None  # p50 of each model on the target's runner, when measured

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"model": "fused" if self.fused else "unfused", "reason": self.reason}
        if self.latency_ms:
            found["latency_ms"] = self.latency_ms
        return found


@dataclass
class GraphStageResult:
    source: Path  # the unfused model
    fused_path: Path | None = None  # None: every target runs the unfused model
    report: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    targets: dict[str, TargetChoice] = field(default_factory=dict)

    def source_for(self, target: str, precision: str) -> Path:
        """The model a target's variant of `precision` is built from."""
        return self.fused_path if self._fused_for(target, precision)[0] else self.source  # type: ignore[return-value]

    def _fused_for(self, target: str, precision: str) -> tuple[bool, str]:
        if self.fused_path is None:
            return False, self.report.get("kept_reason", "no fused model")
        choice = self.targets.get(target)
        if choice is None or not choice.fused:
            return False, choice.reason if choice else "not a target of this stage"
        return precision_takes_fused(precision)

    def _metadata(self, fused: bool, reason: str) -> dict[str, Any]:
        return {**self.report, "built_from": {"model": "fused" if fused else "unfused", "reason": reason}}

    def build(
        self, target: str, precision: str, make: Callable[[Path], Variant], messages: list[str]
    ) -> Variant:
        """`make` the target's `precision` variant from the model it starts from; a variant that
        cannot be made from the fused graph is made from the unfused model, and a message says why.
        The variant's metadata (which its engine's metadata takes) records the stage's report and
        which model it was built from."""
        fused, reason = self._fused_for(target, precision)
        if fused:
            assert self.fused_path is not None
            try:
                variant = make(self.fused_path)
                variant.metadata[METADATA_KEY] = self._metadata(True, reason)
                return variant
            except (Cancelled, InvalidRecipeError):
                raise
            except EngineError as exc:
                reason = f"the {precision} model could not be built from the fused graph ({exc.detail})"
                messages.append(f"graph optimization: {target}: {reason}; it is built from the unfused model")
        variant = make(self.source)
        variant.metadata[METADATA_KEY] = self._metadata(False, reason)
        return variant


# ---------------------------------------------------------------- checks before a job exists


def check_graph_optimization(model_path: Path, config: GraphOptConfig) -> FusionPlan:
    """The plan for this model (or why it is skipped); InvalidRecipeError for stated values the graph
    contradicts and for a transformer whose heads or hidden size cannot be found: the job service
    calls it when a job is created, so such a job is a 422 at once. Reads the graph, not the weights'
    values (a model of hundreds of MB takes a fraction of a second)."""
    import onnx

    if not config.enabled:
        return FusionPlan(skip="graph optimization is off")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # an upload was validated: this is the store, not the user
        raise EngineError(
            f"the model could not be read: {type(exc).__name__}", code="model_unreadable"
        ) from exc
    return plan_fusion(config, detect(model))


# ---------------------------------------------------------------- the stage


def _describe(plan: FusionPlan) -> str:
    stated = f", {' and '.join(plan.stated)} stated" if plan.stated else ""
    return f"{plan.model_type}, {plan.num_heads} heads, hidden {plan.hidden_size}{stated}"


def _timing_batches(
    model_path: Path, inputs: Sequence[TensorSpec], data: Dataset | None, batch_size: int
) -> dict[str, np.ndarray]:
    if data is not None:
        return data.feeds(np.arange(batch_size) % data.samples)
    return generated_batches(model_path, inputs, batch_size=batch_size)[0]


def _timed_runs(runner: Runner, feeds: dict[str, np.ndarray], times: list[float]) -> None:
    for _ in range(TIMING_RUNS):
        began = time.perf_counter()
        runner.infer(feeds, check_inputs=False)
        times.append((time.perf_counter() - began) * 1000.0)


def choose_by_timing(
    target: str,
    unfused: Path,
    fused: Path,
    runner_for: RunnerFor,
    feeds: dict[str, np.ndarray],
    check_cancelled: Callable[[], None],
) -> TargetChoice:
    """The faster of the two models on the target's own runner, timed side by side (interleaved
    rounds, medians), after checking that the target computes the fused model's outputs as it
    computes the unfused model's."""
    runners: dict[str, Runner] = {}
    try:
        try:
            runners["unfused"] = runner_for(target, unfused)
            runners["fused"] = runner_for(target, fused)
        except (Cancelled, InvalidRecipeError):
            raise
        except EngineError as exc:
            return TargetChoice(False, f"{target} could not build the fused model: {exc.detail}")
        names = [spec.name for spec in runners["unfused"].output_metadata()]
        outputs = {key: runner.infer(feeds) for key, runner in runners.items()}
        cosine, _, worst = compare_outputs(
            [outputs["unfused"][n] for n in names], [outputs["fused"][n] for n in names], names
        )
        if not cosine >= FUSION_MIN_COSINE:
            return TargetChoice(
                False, f"{target} computes the fused model differently (cosine {cosine:.6f} on '{worst}')"
            )
        times: dict[str, list[float]] = {key: [] for key in runners}
        for runner in runners.values():  # warm-up
            _timed_runs(runner, feeds, [])
        while len(times["fused"]) < TIMING_MAX_RUNS and (
            len(times["fused"]) < TIMING_MIN_RUNS
            or min(sum(values) for values in times.values()) < TIMING_MIN_SECONDS * 1000.0
        ):
            check_cancelled()
            for key, runner in runners.items():
                _timed_runs(runner, feeds, times[key])
        latency = {key: float(np.median(values)) for key, values in times.items()}
        ratio = latency["fused"] / latency["unfused"]
        verdict = (
            f"measured on {target}: fused p50 {latency['fused']:.3f} ms, unfused {latency['unfused']:.3f} ms"
        )
        if ratio > FUSED_SLOWER_TOLERANCE:
            return TargetChoice(
                False, f"{verdict}: the unfused model, with its own fusions, is faster", latency
            )
        return TargetChoice(True, verdict, latency)
    finally:
        for runner in runners.values():
            runner.deactivate()


def run_graph_stage(
    model_path: Path,
    config: GraphOptConfig,
    workdir: Path,
    *,
    targets: Sequence[str],
    inputs: Sequence[TensorSpec],
    data: Dataset | None = None,
    data_name: str = "generated",
    threads: int | None = None,
    runner_for: RunnerFor | None = None,
    timing_batch: int = 1,
    check_cancelled: Callable[[], None] = lambda: None,
) -> GraphStageResult:
    """Detect, fuse, check fidelity and choose a model per target (this module's docstring).

    `data` (named `data_name`) feeds the fidelity check; without it, inputs are generated. A target
    that reads the fused graph gets the faster of the two models on its own runner (`runner_for`),
    timed at `timing_batch`; without `runner_for` (a notebook), ONNX Runtime gets the fused model
    untimed and OpenVINO the unfused one."""
    result = GraphStageResult(model_path)
    plan = check_graph_optimization(model_path, config)
    detection: Detection | None = plan.detection
    requested = {
        "model_type": config.model_type,
        "num_heads": config.num_heads,
        "hidden_size": config.hidden_size,
    }
    result.report = {"requested": requested, "detected": detection.to_dict() if detection else None}

    def keep_unfused(reason: str) -> GraphStageResult:
        result.report.update(kept="unfused", kept_reason=reason)
        result.targets = {target: TargetChoice(False, reason) for target in targets}
        result.messages.append(f"graph optimization: {reason}")
        return result

    if plan.skip:
        return keep_unfused(plan.skip)
    result.report.update(model_type=plan.model_type, num_heads=plan.num_heads, hidden_size=plan.hidden_size)
    workdir.mkdir(parents=True, exist_ok=True)
    check_cancelled()
    try:
        fusion = fuse(model_path, plan, workdir / "fused.onnx")
    except EngineError as exc:
        return keep_unfused(f"{exc.detail}; the unfused model is kept")
    result.report.update(
        fused=fusion.fused, not_fused=fusion.not_fused, fusion_seconds=round(fusion.seconds, 3)
    )
    if not fusion.fused_anything:
        reasons = "; ".join(f"{item['fusion']}: {item['reason']}" for item in fusion.not_fused)
        return keep_unfused(
            f"the optimizer fused nothing in this {_describe(plan)} model ({reasons}); it runs unfused"
        )
    check_cancelled()
    batches = dataset_batches(inputs, data) if data is not None else generated_batches(model_path, inputs)
    try:
        fidelity = check_fidelity(
            model_path, fusion.path, batches, data_name if data is not None else "generated", threads=threads
        )
    except Exception as exc:  # the fused model does not load or run in ONNX Runtime
        return keep_unfused(
            f"the fused model does not run in ONNX Runtime ({type(exc).__name__}); the unfused model is kept"
        )
    result.report["fidelity"] = fidelity.to_dict()
    if not fidelity.faithful:
        return keep_unfused(
            f"the fused model's outputs differ from the unfused model's (worst cosine "
            f"{fidelity.min_cosine:.6f} on '{fidelity.worst_output}', below {FUSION_MIN_COSINE}, on "
            f"{fidelity.samples} {fidelity.data} samples); the unfused model is kept"
        )
    result.fused_path = fusion.path
    result.report.update(kept="fused", kept_reason="the fused model is as faithful as the threshold asks")
    counts = ", ".join(f"{op} ×{count}" for op, count in fusion.fused.items())
    message = (
        f"graph optimization ({_describe(plan)}): fused {counts}; outputs within cosine "
        f"{fidelity.min_cosine:.6f} of the unfused model on {fidelity.samples} {fidelity.data} samples"
    )
    if fusion.not_fused:
        message += "; not fused: " + "; ".join(
            f"{item['left']} of {item['expected']} {item['fusion']} ({item['reason']})"
            for item in fusion.not_fused
        )
    result.messages.append(message)
    feeds: dict[str, np.ndarray] | None = None
    for target in targets:
        if target not in FUSED_GRAPH_READERS:
            choice = TargetChoice(False, UNREADABLE)
        elif runner_for is not None:
            feeds = feeds if feeds is not None else _timing_batches(model_path, inputs, data, timing_batch)
            choice = choose_by_timing(target, model_path, fusion.path, runner_for, feeds, check_cancelled)
        elif target == "onnxruntime-cpu":
            choice = TargetChoice(True, "ONNX Runtime runs its fused operators (not timed)")
        else:
            choice = TargetChoice(False, "it fuses on its own, and the fused model was not timed there")
        result.targets[target] = choice
        model = "the fused model" if choice.fused else "the unfused model"
        result.messages.append(f"graph optimization: {target} gets {model}: {choice.reason}")
    result.report["targets"] = {target: choice.to_dict() for target, choice in result.targets.items()}
    return result
