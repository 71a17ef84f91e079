"""The search: the fastest (or smallest) engine whose accuracy drop stays within the budget, found
within a time budget, with every candidate's outcome kept.

How it spends its time, cheapest evidence first:
1. the original is measured once (ONNX Runtime fp32): its score on the evaluation set, its outputs
   (the reference for fidelity) and a quick latency at the objective's batch size;
2. candidates come cheapest to build first (engines.search.space.candidates); each is built,
   then **screened** on a slice of the evaluation set (`screen_samples`): one that already breaks
   the budget there by a margin is rejected without more work;
3. a **quick timing** (a few interleaved runs beside the original) drops candidates more than 30 %
   slower than the best so far: successive halving on timing, so losers cost one build and a
   second, not a full evaluation;
4. the survivors are scored on the whole evaluation set (at most `max_full_evaluations`);
5. what a candidate showed decides the next moves (engines.search.moves): an INT8 candidate that
   breaks the budget, on the screening slice or in full, is retried at once with the accuracy-aware
   float fallback (engines.quantize.budget keeps the fewest nodes the per-layer report names in
   float), and when that fails too, with quantization-aware training; other methods of a
   calibration family that failed by far, and pruning the data cannot recover, are held back with
   the reason;
6. the time budget is checked before each candidate against what it is expected to take (the
   median of its kind so far; for a first pruning or QAT, a training step measured on the
   calibration set; for a first fallback, its quantize-and-evaluate rounds): a candidate is never
   cut in half, the final timing has its own reserve, and a candidate that would not fit is
   skipped with its estimate; when time runs out, the best candidate found so far wins;
7. the accepted candidates are timed again side by side with the original (the final figures),
   the Pareto front of cost against drop is computed over every candidate that has both, and the
   cheapest candidate within the budget is chosen; when none beats the original, the original is
   what is served, and the report says so.

A sensitivity analysis (`space.sensitivity`, off by default) runs before the first pruning when the
job brought none: measured on a 224×224 MobileNet-V2-shaped network on this 2-core machine, it
takes minutes and measures 3 of 49 layers (the others are coupled by residual adds and depthwise
convolutions), so it is not worth the default time budget; it gets at most a quarter of the time
left and is stopped (with its estimate) when it would overrun.
The worker stores the chosen engine and the other front members; dominated candidates remain
report rows with their lineage, metrics and outcome (built, rejected by accuracy, slower, failed
and why, held back or skipped for time with what it would have cost).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import CompileOptions, EngineArtifact, Runner, engine_size
from engines.backends.registry import backend_class, get_backend
from engines.errors import Cancelled, EngineError, InvalidRecipeError
from engines.graphopt.config import GraphOptConfig
from engines.graphopt.stage import GraphStageResult, run_graph_stage
from engines.ingest.datasets import Dataset
from engines.ingest.sequence import SequenceProfile, check_sequence_lengths, read_profile
from engines.ingest.signature import StatedAxes, TensorSpec, stated_batch_axes
from engines.measure.accuracy import accuracy_report, run_dataset
from engines.measure.latency import MeasureConfig, measure_latency
from engines.pipeline import (
    BASELINE,
    BASELINE_BACKEND,
    BuiltEngine,
    Measurement,
    built_runner,
    compare,
    compile_engine,
    sequence_options,
)
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig
from engines.prune.sensitivity import DEFAULT_RATIOS, SensitivityConfig, analyse, ratios_within
from engines.prune.stage import run_prune_stage
from engines.qat.config import QatConfig
from engines.quantize.budget import HEAVY_OPS, AccuracyBudget, score_outputs
from engines.quantize.int8 import QuantizeConfig
from engines.recipe import Recipe
from engines.search.best import ratio_text, searching_stage
from engines.search.lineage import candidate_lineage, original_lineage
from engines.search.methods import not_applicable
from engines.search.moves import Moves, pruning_key
from engines.search.pareto import pareto_front
from engines.search.space import Budget, Candidate, Objective, SearchSpace, candidates
from engines.variants import ModelVariant, build_variant, precision_not_applicable

Progress = Callable[[float, str], None]
#: A screened candidate this much past the budget on the slice is not worth a full evaluation.
SCREEN_MARGIN = 0.02
#: Quick-timed candidates slower than the best so far by more than this are dropped.
HALVING_FACTOR = 1.3
#: Share of the time budget kept for the final side-by-side timing.
FINAL_TIMING_SHARE = 0.1
QUICK = MeasureConfig(warmup_runs=5, timed_runs=20, min_seconds=0.3)
FINAL = MeasureConfig(warmup_runs=5, timed_runs=30, min_seconds=1.0)
#: A training step of QAT (fake-quantized forward and backward, plus the teacher's forward) against
#: a float training step of the same batch.
QAT_STEP_FACTOR = 2.5
#: A distillation step (the pruned student's forward and backward, the teacher's forward) against a
#: float training step.
DISTILL_STEP_FACTOR = 1.3
#: The share of the time left a sensitivity analysis may take.
SENSITIVITY_SHARE = 0.25


@dataclass(frozen=True)
class AutotuneRequest:
    objective: Objective
    budget: Budget
    time_budget_s: float
    space: SearchSpace = field(default_factory=SearchSpace)
    sensitivity_ratios: dict[str, float] | None = None  # per layer, within the budget (a prior analysis)

    def to_dict(self) -> dict[str, Any]:
        """What an autotune job's row keeps (its `recipe` column); the objective's sequence length
        only where one was asked, so other rows read as before it existed."""
        data = asdict(self)
        data["objective"] = self.objective.to_report()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutotuneRequest:
        known = set(SearchSpace.__dataclass_fields__)
        space = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in data["space"].items()
            if key in known
        }
        if isinstance(space.get("graph_optimization"), dict):
            space["graph_optimization"] = GraphOptConfig(**space["graph_optimization"])
        return cls(
            objective=Objective(**data["objective"]),
            budget=Budget(**data["budget"]),
            time_budget_s=float(data["time_budget_s"]),
            space=SearchSpace(**space),
            sensitivity_ratios=data.get("sensitivity_ratios"),
        )


@dataclass
class CandidateOutcome:
    """One row of the report: what was tried, what became of it, its figures where it got that far."""

    candidate: Candidate
    # accepted | rejected_accuracy | slower | failed | skipped_time | skipped_limit | held_back |
    # not_applicable
    status: str
    reason: str = ""
    cost: float | None = None
    drop: float | None = None
    score: float | None = None
    latency: dict[str, dict[str, float]] | None = None
    accuracy: dict[str, Any] | None = None
    size_bytes: int | None = None
    quick_ratio: float = float("inf")  # cost / the original's, timed in the same rounds
    build_seconds: float | None = None
    estimated_seconds: float | None = None  # what it was expected to take (skipped_time: why)
    on_front: bool = False
    chosen: bool = False
    artifact: EngineArtifact | None = field(default=None, repr=False)
    runner: Runner | None = field(default=None, repr=False)

    @property
    def within_budget(self) -> bool:
        """Only a candidate whose full evaluation kept the budget is accepted."""
        return self.status == "accepted"

    def to_dict(self, prune_method: str | None = None) -> dict[str, Any]:
        metadata = self.artifact.metadata if self.artifact is not None else None
        return {
            "label": self.candidate.label(),
            "lineage": candidate_lineage(self.candidate.lineage(), criterion=prune_method, metadata=metadata),
            "status": self.status,
            "reason": self.reason,
            "cost": self.cost,
            # cost / the original's, timed in the same rounds (the quick timing; None when not timed)
            "quick_ratio": None if self.quick_ratio == float("inf") else self.quick_ratio,
            "drop": self.drop,
            "score": self.score,
            "latency": self.latency,
            "size_bytes": self.size_bytes,
            "build_seconds": self.build_seconds,
            "estimated_seconds": self.estimated_seconds,
            "on_front": self.on_front,
            "chosen": self.chosen,
            "within_budget": self.within_budget,
        }


@dataclass
class AutotuneResult:
    baseline: Measurement
    baseline_cost: float
    baseline_score: float
    allowed_drop: float
    outcomes: list[CandidateOutcome]
    engines: list[BuiltEngine]  # the chosen one first, then the other stored front members
    chosen: CandidateOutcome | None
    messages: list[str]
    elapsed_s: float
    timed_out: bool
    serves_original: bool = False  # no candidate beats the original within the budget
    prune_method: str = "l1"  # the space's pruning criterion, for the rows' lineage

    def _row(self, outcome: CandidateOutcome) -> dict[str, Any]:
        """A candidate's row. When nothing beat the original, the row `chosen` is the original's own
        engine (what the alias points at): `served_as_original` says so, so that no client reads
        it as a candidate that won."""
        row = outcome.to_dict(self.prune_method)
        row["served_as_original"] = bool(row["chosen"] and self.serves_original)
        return row

    def report(self, objective: Objective, budget: Budget) -> dict[str, Any]:
        return {
            "objective": objective.to_report(),
            "budget": {"metric": budget.metric, "max_drop": budget.max_drop, "relative": budget.relative},
            "allowed_drop": self.allowed_drop,
            "original": {
                "cost": self.baseline_cost,
                "score": self.baseline_score,
                "latency": self.baseline.latency,
                "backend": BASELINE_BACKEND,
            },
            "chosen": (
                f"the original ({BASELINE_BACKEND} fp32)"
                if self.serves_original
                else self.chosen.candidate.label()
                if self.chosen
                else None
            ),
            "serves_original": self.serves_original,
            "original_lineage": original_lineage(BASELINE_BACKEND),
            "candidates": [self._row(outcome) for outcome in self.outcomes],
            "messages": self.messages,
            "elapsed_s": self.elapsed_s,
            "timed_out": self.timed_out,
        }


class _Search:
    """State of one search: the original's figures, caches of built models, the outcomes so far."""

    def __init__(
        self,
        model_path: Path,
        request: AutotuneRequest,
        workdir: Path,
        calibration: Dataset | None,
        evaluation: Dataset,
        progress: Progress,
        check_cancelled: Callable[[], None],
        clock: Callable[[], float],
        stated: StatedAxes,
    ):
        self.model_path, self.request, self.workdir = model_path, request, workdir
        self.stated = stated  # the batch axes a user stated: every runner and build goes by them
        self.calibration, self.evaluation = calibration, evaluation
        self.progress, self.check_cancelled, self.clock = progress, check_cancelled, clock
        self.started = clock()
        self.deadline = self.started + request.time_budget_s * (1 - FINAL_TIMING_SHARE)
        self.objective, self.budget = request.objective, request.budget
        self.screen = evaluation.take(min(request.space.screen_samples, evaluation.samples))
        self.pruned_models: dict[tuple, Path | str] = {}  # a path, or why pruning failed
        self.outcomes: list[CandidateOutcome] = []
        self.full_evaluations = 0
        self.finished = False
        self.durations: dict[str, list[float]] = {}  # seconds per candidate of a kind (_kind)
        self.prune_seconds: list[float] = []  # seconds per pruning (with recovery training)
        self.last_prune_seconds = 0.0
        self.prune_took: dict[tuple, float] = {}  # seconds of each pruning (by pruning_key)
        self.train_step: tuple[float, float] | str | None = None  # measured lazily (_train_step)
        self.qat_variants: dict[tuple[Any, ...], Any] = {}  # one QAT training per pruning and profile
        self.not_applicable: dict[str, str | None] = {}
        self.sensitivity_pending = False
        self.messages: list[str] = []
        self.graph: GraphStageResult | None = None  # the fusion pre-step's outcome (fuse_graph)

    # ------------------------------------------------------------ the original

    def measure_original(self) -> None:
        backend = get_backend(BASELINE_BACKEND)
        self.original = backend.load(self.model_path, backend.options(batch_axes=self.stated))
        self.inputs = self.original.input_metadata()
        self.output_names = [spec.name for spec in self.original.output_metadata()]
        self.sequence: SequenceProfile | None = None  # read only when the objective names a length
        if self.objective.sequence_length is not None:
            self.sequence = read_profile(self.model_path, self.inputs)
            check_sequence_lengths(
                self.objective.sequence_lengths, self.sequence, self.inputs, what="objective.sequence_length"
            )
        # a token model's sequence axes and lengths: every build shaped by them (TensorRT, CUDA graphs)
        self.shaped = sequence_options(
            self.inputs, self.objective.sequence_lengths, self.evaluation, self.calibration
        )
        self.eval_batch = max(1, min(self.objective.batch_size, self.evaluation.samples))
        began = self.clock()
        self.reference = run_dataset(self.original, self.evaluation, self.eval_batch, self.check_cancelled)
        self.eval_seconds = self.clock() - began
        self.screen_reference = self.reference[: self.screen.samples]
        self.baseline_accuracy = accuracy_report(self.reference, self.evaluation.labels, None)
        self.baseline_score = self._score(self.reference, self.evaluation, self.reference)
        self.allowed = self.budget.allowed_drop(self.baseline_score)
        self.baseline_size = self.model_path.stat().st_size
        classes = int(self.reference.shape[1]) if self.reference.ndim == 2 else None
        samples = self.calibration.samples if self.calibration is not None else 0
        self.moves = Moves(self.request.space, self.allowed, samples, classes)
        from onnx import load

        graph = load(str(self.model_path), load_external_data=False).graph
        self.heavy_nodes = sum(node.op_type in HEAVY_OPS for node in graph.node)

    def _score(self, outputs: np.ndarray, data: Dataset, reference: np.ndarray) -> float:
        return score_outputs(outputs, data, self.budget.metric, reference)

    # ------------------------------------------------------------ transformer fusion, once

    def fuse_graph(self, backends: Sequence[str]) -> None:
        """Fuse a transformer once, before the first candidate (engines.graphopt.stage): every
        unpruned candidate of a backend and precision that takes the fused graph starts from it.

        A pre-step, not a dimension of the space: fusion is checked to change no output beyond
        cosine 0.9999, and each backend keeps the fused graph only where it measured no slower
        than the unfused one at the objective's batch (timed side by side on that backend), so a
        candidate built from the unfused graph as well would only repeat a slower twin: doubling
        every candidate would halve what the time budget sees. The precisions
        whose quantizers cannot reach into fused operators (static QDQ INT8, weight-only) start
        from the unfused model whatever this step decides (engines.graphopt.targets).

        Left on "auto", a model that is not a transformer (or whose heads cannot be found) is
        searched unfused, with a message; values stated in the request that the graph contradicts
        were refused when the job was made."""
        config = self.request.space.graph_optimization
        if not config.enabled:
            return
        began = self.clock()
        try:
            self.graph = run_graph_stage(
                self.model_path,
                config,
                self.workdir / "graphopt",
                targets=backends,
                inputs=self.inputs,
                data=self.evaluation,
                data_name="evaluation",
                runner_for=lambda target, path: built_runner(
                    get_backend(target),
                    self.workdir / "graphopt" / target,
                    None,
                    path,
                    batch_axes=self.stated,
                    sequence=self.shaped,
                ),
                timing_batch=self.objective.batch_size,
                check_cancelled=self.check_cancelled,
            )
        except InvalidRecipeError as exc:
            if config != GraphOptConfig(config.model_type) or config.stated_type:  # values were stated
                raise
            self.messages.append(f"graph optimization: {exc.detail}; the search runs the model unfused")
            return
        self.messages += self.graph.messages
        self.graph.report["search_seconds"] = round(self.clock() - began, 3)

    # ------------------------------------------------------------ building a candidate

    def _source(self, candidate: Candidate) -> Path:
        """The model the candidate's precision starts from: the original, or a pruned copy (built
        once per pruning and shared by the precisions that use it)."""
        if not candidate.pruned:
            return self.model_path
        key = (candidate.prune_ratio, candidate.layer_ratios)
        if key not in self.pruned_models:
            space = self.request.space
            config = PruneConfig(
                method=space.prune_method,
                ratio=candidate.prune_ratio or 0.5,
                layer_ratios=dict(candidate.layer_ratios) or None,
            )
            recovery = (
                FinetuneConfig(epochs=space.finetune_epochs, distill=True)
                if self.calibration is not None and space.finetune_epochs
                else None
            )
            workdir = self.workdir / f"pruned-{len(self.pruned_models)}"
            workdir.mkdir(parents=True)
            began = self.clock()
            stage = run_prune_stage(
                self.model_path,
                config,
                recovery,
                workdir,
                inputs=self.inputs,
                output_names=self.output_names,
                calibration=self.calibration,
                evaluation=None,
                progress=lambda fraction, stage: None,
                check_cancelled=self.check_cancelled,
            )
            self.last_prune_seconds = self.clock() - began
            self.prune_took[pruning_key(candidate)] = self.last_prune_seconds
            self.pruned_models[key] = stage.path if stage.pruned else "; ".join(stage.messages)
        source = self.pruned_models[key]
        if isinstance(source, str):
            raise EngineError(source or "pruning was skipped", code="pruning_skipped")
        return source

    def build(self, candidate: Candidate, index: int) -> tuple[EngineArtifact, Runner]:
        backend = get_backend(candidate.backend)
        source = self._source(candidate)
        precision = candidate.precision
        model_precision = backend.model_precision(precision)
        recipe = Recipe(
            targets=(candidate.backend,),
            precision=model_precision,
            batch_sizes=(self.objective.batch_size,),
            quantize=QuantizeConfig(calibration=candidate.calibration or "minmax"),
            qat=QatConfig(epochs=candidate.qat_epochs) if candidate.qat_epochs else None,
            accuracy_budget=AccuracyBudget(
                "top1" if self.budget.metric == "top1" else "fidelity", self.allowed
            )
            if candidate.float_fallback
            else None,
        )
        workdir = self.workdir / f"candidate-{index}"
        trained = (pruning_key(candidate), backend.quantization_profile, candidate.qat_epochs)
        variant = self.qat_variants.get(trained) if candidate.qat_epochs else None
        if variant is None:

            def make(model: Path) -> ModelVariant:
                return build_variant(
                    model,
                    recipe,
                    backend.quantization_profile,
                    workdir if model == source else workdir / "fused",
                    calibration=self.calibration,
                    evaluation=self.evaluation if candidate.float_fallback else None,
                    batch_size=min(16, (self.calibration.samples if self.calibration else 16)),
                    check_cancelled=self.check_cancelled,
                    # the target scores it
                    runner_for=partial(
                        built_runner,
                        backend,
                        workdir / "checks",
                        None,
                        batch_axes=self.stated,
                        sequence=self.shaped,
                    ),
                )

            # the unpruned model, fused where the pre-step kept fusion for this backend and precision
            graph = None if candidate.pruned else self.graph
            variant = make(source) if graph is None else graph.build(
                candidate.backend, model_precision, make, self.messages
            )  # fmt: skip
        if candidate.qat_epochs:
            if not any("qat" in key for key in variant.metadata):
                raise EngineError(
                    "this worker's INT8 builder did not train the model (no QAT stage ran); the "
                    "search goes on with the other candidates",
                    code="qat_unavailable",
                )
            self.qat_variants[trained] = variant  # another backend of the same profile reuses it
        options = CompileOptions(
            precision=precision,
            batch_sizes=(self.objective.batch_size,),
            batch_axes=self.stated,
            **self.shaped,
        )
        artifact = compile_engine(backend, variant.path, workdir / "engine", options)
        artifact.metadata.update({**variant.metadata, "lineage": candidate.lineage()})
        variant.write_layer_errors(artifact.path.parent)
        return artifact, backend.load(artifact.path, backend.options(batch_axes=self.stated))

    # ------------------------------------------------------------ one candidate

    def best_accepted(self) -> CandidateOutcome | None:
        """The accepted candidate of lowest cost (the final figures once timed, the quick ratio before)."""
        accepted = [o for o in self.outcomes if o.status == "accepted" and o.cost is not None]
        if not accepted:
            return None
        return min(accepted, key=lambda o: o.cost if self.finished else o.quick_ratio)  # type: ignore[arg-type,return-value]

    def _quick_timing(
        self, runner: Runner, size_bytes: int
    ) -> tuple[dict[str, dict[str, float]], float, float]:
        """A few runs interleaved with the original's: the latency, the cost, and the cost relative to
        the original's measured in the same rounds (candidates timed at different moments of a noisy
        machine compare by that ratio, not by their raw figures)."""
        runners = {BASELINE: self.original, "candidate": runner}
        batch = (self.objective.batch_size,)
        quick = measure_latency(
            runners,
            batch,
            QUICK,
            self.evaluation,
            self.check_cancelled,
            sequence_lengths=self.objective.sequence_lengths,
            sequence=self.sequence,
        )
        cost = self.objective.cost(quick["candidate"], size_bytes)
        return quick["candidate"], cost, cost / self.objective.cost(quick[BASELINE], self.baseline_size)

    def try_candidate(self, candidate: Candidate) -> CandidateOutcome:
        outcome = CandidateOutcome(candidate, "failed")
        started = self.clock()
        try:
            artifact, runner = self.build(candidate, len(self.outcomes))
        except Cancelled:
            raise
        except InvalidRecipeError as exc:
            if not candidate.qat_epochs:  # the request's own error; QAT is the search's move
                raise
            outcome.reason = f"{exc.code}: {exc.detail}"
            return outcome
        except EngineError as exc:
            outcome.reason = f"{exc.code}: {exc.detail}"
            return outcome
        outcome.artifact, outcome.runner = artifact, runner
        outcome.build_seconds = self.clock() - started
        if candidate.pruned and not self.last_prune_seconds:  # its pruned model was built before
            outcome.build_seconds += self.prune_took.get(pruning_key(candidate), 0.0)
        # the engine's record: the whole build (pruning, quantization, compilation), not the
        # backend's compile step alone (workers.handlers.store_engines)
        artifact.metadata["build_seconds"] = outcome.build_seconds
        outcome.size_bytes = engine_size(artifact.path)
        try:
            screened = run_dataset(runner, self.screen, self.eval_batch, self.check_cancelled)
            screen_drop = self._drop(self._score(screened, self.screen, self.screen_reference))
            if screen_drop > self.allowed + SCREEN_MARGIN:
                return self._drop_runner(
                    outcome, "rejected_accuracy", f"screened on {self.screen.samples} samples: drop "
                    f"{screen_drop * 100:.2f} pt, budget {self.allowed * 100:.2f} pt", drop=screen_drop
                )  # fmt: skip
            outcome.latency, outcome.cost, outcome.quick_ratio = self._quick_timing(
                runner, outcome.size_bytes
            )
            best = self.best_accepted()
            if best is not None and outcome.quick_ratio > HALVING_FACTOR * best.quick_ratio:
                metric = self.objective.metric
                reason = (
                    f"quick timing beside the original: {ratio_text(outcome.quick_ratio, metric)}, "
                    f"the best so far {ratio_text(best.quick_ratio, metric)}"
                )
                return self._drop_runner(outcome, "slower", reason)
            if self.full_evaluations >= self.request.space.max_full_evaluations:
                return self._drop_runner(
                    outcome, "skipped_limit", "the limit of full evaluations was reached"
                )
            self.full_evaluations += 1
            outputs = run_dataset(runner, self.evaluation, self.eval_batch, self.check_cancelled)
            outcome.accuracy = accuracy_report(outputs, self.evaluation.labels, self.reference)
            outcome.score = self._score(outputs, self.evaluation, self.reference)
            outcome.drop = self._drop(outcome.score)
        except (Cancelled, InvalidRecipeError):
            runner.deactivate()
            raise
        except EngineError as exc:
            return self._drop_runner(outcome, "failed", f"{exc.code}: {exc.detail}")
        if outcome.drop > self.allowed:
            return self._drop_runner(
                outcome, "rejected_accuracy",
                f"drop {outcome.drop * 100:.2f} pt, budget {self.allowed * 100:.2f} pt",
            )  # fmt: skip
        outcome.status = "accepted"
        return outcome

    @staticmethod
    def _kind(candidate: Candidate) -> str:
        if candidate.qat_epochs:
            return "qat"
        if candidate.float_fallback:
            return "fallback"
        return "plain"

    def _expected_seconds(self, candidate: Candidate) -> float:
        """What the candidate is expected to take: a candidate that would overrun the budget is
        skipped rather than started. Its kind's median so far (plain builds, fallbacks, QAT), plus
        its pruning when that is not built yet; a kind without precedent is estimated: a fallback
        from its quantize-and-evaluate rounds, a pruning or QAT from a measured training step."""
        expected = 0.0
        if candidate.pruned and pruning_key(candidate) not in self.pruned_models:
            expected += self._prune_estimate()
        kind = self._kind(candidate)
        seen = self.durations.get(kind)
        if Moves.is_plain_int8(candidate) and self.durations.get("int8"):
            seen = self.durations["int8"]  # calibration makes INT8 slower to build than fp32
        if seen:
            scale = self._method_build_ratio(candidate) if kind == "fallback" else 1.0
            return expected + float(np.median(seen)) * scale
        if kind == "fallback":
            return expected + self._fallback_estimate() * self._method_build_ratio(candidate)
        if kind == "qat":
            return expected + self._qat_estimate()
        return expected

    def _plain_int8_seconds(self) -> tuple[float, float]:
        """(build, whole candidate) seconds of the post-training INT8 candidates so far (medians)."""
        plain = [o for o in self.outcomes if Moves.is_plain_int8(o.candidate) and o.build_seconds is not None]
        build = float(np.median([o.build_seconds for o in plain])) if plain else self.eval_seconds
        return build, float(np.median(self.durations.get("int8", [build + self.eval_seconds])))

    def _method_build_ratio(self, candidate: Candidate) -> float:
        """How much slower (or faster) this candidate's INT8 method builds than the median post-training
        INT8 build so far: a fallback re-quantizes several times, so it scales with it (cross-layer
        equalization built in 64 s where minmax took 14 s on EfficientNet-Lite0, and its fallback
        took 452 s against an estimate of 93 s)."""
        build, _ = self._plain_int8_seconds()
        own = [
            o.build_seconds
            for o in self.outcomes
            if Moves.is_plain_int8(o.candidate)
            and o.candidate.calibration == candidate.calibration
            and o.build_seconds is not None
        ]
        return float(np.median(own)) / build if own and build > 0 else 1.0

    def _fallback_estimate(self) -> float:
        """The float fallback quantizes and evaluates once for every node, once with only the heavy
        ops quantized, then with 1, 2, 4, … of the ranked nodes in float: at most
        2 + log2(heavy nodes) rounds; it stops when the budget holds, so the estimate is the typical
        case, half the doublings (an upper bound would skip the fallback on 224×224 networks within
        ten minutes, issue 20; the final timing's reserve takes an overrun)."""
        build, _ = self._plain_int8_seconds()
        rounds = 2 + int(np.ceil(np.log2(max(2, self.heavy_nodes)) / 2))
        return rounds * (build + self.eval_seconds) + self.eval_seconds

    def _train_step(self) -> tuple[float, float] | None:
        """(seconds per training sample of the float model, seconds to convert it to torch): one
        forward and backward on a calibration batch, measured once; None when it cannot be."""
        if self.train_step is None:
            self.train_step = _measure_train_step(self.model_path, self.calibration, self.clock)
        return None if isinstance(self.train_step, str) else self.train_step

    def _prune_estimate(self) -> float:
        """A pruning's seconds: as the earlier ones took, or its recovery training's steps at the
        measured step time (a third of the budget when the step cannot be measured)."""
        if self.prune_seconds:
            return float(np.median(self.prune_seconds))
        step = self._train_step()
        if step is None:
            return self.request.time_budget_s / 3
        per_sample, convert = step
        samples = self.calibration.samples if self.calibration is not None else 0
        epochs = self.request.space.finetune_epochs
        return 3 * convert + epochs * samples * per_sample * DISTILL_STEP_FACTOR

    def _qat_estimate(self) -> float:
        """QAT's seconds: its training steps at the measured float step time × QAT_STEP_FACTOR, plus
        an INT8 candidate's build and evaluation (a quarter of the budget when the step cannot be
        measured)."""
        step = self._train_step()
        if step is None:
            return self.request.time_budget_s / 4
        per_sample, convert = step
        samples = self.calibration.samples if self.calibration is not None else 0
        _, int8 = self._plain_int8_seconds()
        return 2 * convert + self.request.space.qat_epochs * samples * per_sample * QAT_STEP_FACTOR + int8

    def _drop(self, score: float) -> float:
        return (self.baseline_score if self.budget.metric == "top1" else 1.0) - score

    @staticmethod
    def _drop_runner(
        outcome: CandidateOutcome, status: str, reason: str, drop: float | None = None
    ) -> CandidateOutcome:
        """Close the candidate's runner (its files stay until the search ends) and record why."""
        if outcome.runner is not None:
            outcome.runner.deactivate()
            outcome.runner = None
        outcome.status, outcome.reason = status, reason
        if drop is not None:
            outcome.drop = drop
        return outcome

    # ------------------------------------------------------------ the whole search

    def _not_applicable(self, candidate: Candidate) -> str | None:
        """Why the candidate does not apply to this model: its backend cannot compute its precision on
        this machine (bf16 without bfloat16 arithmetic), its precision has nothing to work on here or
        would not pay (engines.variants' rules: dynamic INT8 and weight-only need MatMul weights), or
        its calibration method does not apply (the methods' registry says)."""
        unavailable = backend_class(candidate.backend).precision_unavailable(candidate.precision)
        if unavailable:
            return unavailable
        key = f"precision {candidate.precision}"
        if key not in self.not_applicable:
            self.not_applicable[key] = precision_not_applicable(
                candidate.precision, self.model_path, searching=True
            )
        if self.not_applicable[key]:
            return self.not_applicable[key]
        if not Moves.is_plain_int8(candidate) or not candidate.calibration:
            return None
        name = candidate.calibration
        if name not in self.not_applicable:
            self.not_applicable[name] = not_applicable(name, self.model_path)
        return self.not_applicable[name]

    def _sensitivity(self, candidate: Candidate, queue: list[Candidate]) -> None:
        """Before the first pruning: a sensitivity analysis on the calibration set, within
        SENSITIVITY_SHARE of the time left; its per-layer ratios within the budget (measured without
        recovery, so they need none) become candidates ahead of the uniform ratios."""
        share = SENSITIVITY_SHARE * max(0.0, self.deadline - self.clock())
        began = self.clock()
        assert self.calibration is not None
        data = self.calibration

        def watch(fraction: float, stage: str) -> None:
            self.check_cancelled()
            elapsed = self.clock() - began
            expected = elapsed / fraction if fraction > 0 else elapsed
            if expected > share:
                raise _OverShare(expected)

        config = SensitivityConfig(method=self.request.space.prune_method, ratios=DEFAULT_RATIOS,
                                   max_samples=min(500, data.samples))  # fmt: skip
        try:
            report = analyse(self.model_path, list(self.inputs), data, config, progress=watch)
        except _OverShare as over:
            self.messages.append(
                f"sensitivity analysis stopped: it would take ~{over.expected:.0f} s, more than its share "
                f"({share:.0f} s) of the time left; the search tries uniform ratios"
            )
            return
        except Cancelled:
            raise
        except Exception as exc:  # a model torch cannot take: the uniform ratios say the same
            detail = exc.detail if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            self.messages.append(f"sensitivity analysis skipped: {detail}")
            return
        ratios = {layer: ratio for layer, ratio in ratios_within(report, self.allowed).items() if ratio > 0}
        measured = sum(any(drop is not None for drop in d.values()) for d in report["layers"].values())
        self.messages.append(
            f"sensitivity analysis: {measured} of {len(report['layers'])} layers could be pruned alone, "
            f"{len(ratios)} within the budget, in {self.clock() - began:.0f} s on {report['samples']} samples"
        )
        if ratios:
            layer_ratios = tuple(sorted(ratios.items()))
            same = [c for c in queue if pruning_key(c) == pruning_key(candidate)]  # it is queue[0]
            queue[:0] = [replace(c, prune_ratio=0.0, layer_ratios=layer_ratios) for c in same]

    def run(self, queue: list[Candidate]) -> AutotuneResult:
        timed_out = False
        while queue:
            candidate = queue.pop(0)
            self.check_cancelled()
            if self.sensitivity_pending and candidate.pruned:
                self.sensitivity_pending = False
                queue.insert(0, candidate)
                self._sensitivity(candidate, queue)
                continue
            reason = self._not_applicable(candidate)
            held = None if reason else self.moves.held_back(candidate)
            if reason or held:
                status = "not_applicable" if reason else "held_back"
                self.outcomes.append(CandidateOutcome(candidate, status, reason or held or ""))
                continue
            expected = self._expected_seconds(candidate)
            left = self.deadline - self.clock()
            if expected > left:
                timed_out = True
                self.outcomes.append(
                    CandidateOutcome(
                        candidate,
                        "skipped_time",
                        f"it would take ~{expected:.0f} s; {max(0.0, left):.0f} s of the search were left",
                        estimated_seconds=expected,
                    )
                )
                queue[:0] = self.moves.skipped(candidate)
                continue
            began = self.clock()
            self.last_prune_seconds = 0.0
            outcome = self.try_candidate(candidate)
            outcome.estimated_seconds = expected or None
            took = self.clock() - began - self.last_prune_seconds
            if self.last_prune_seconds:
                self.prune_seconds.append(self.last_prune_seconds)
            self.durations.setdefault(self._kind(candidate), []).append(took)
            if Moves.is_plain_int8(candidate):
                self.durations.setdefault("int8", []).append(took)
            self.outcomes.append(outcome)
            queue[:0] = self.moves.record(
                candidate, outcome.status, outcome.drop, cost_ratio=outcome.quick_ratio
            )
            best = self.best_accepted()
            elapsed = self.clock() - self.started
            self.progress(
                min(0.9, elapsed / self.request.time_budget_s),
                searching_stage(
                    len(self.outcomes),
                    len(queue),
                    None if best is None else (self._lineage_label(best), best.quick_ratio, best.drop),
                    self.objective.metric,
                ),
            )
        return self.finish(timed_out)

    def _lineage_label(self, outcome: CandidateOutcome) -> str:
        """The candidate's lineage label (the table's), for the running stage."""
        return str(outcome.to_dict(self.request.space.prune_method)["lineage"]["label"])

    def finish(self, timed_out: bool) -> AutotuneResult:
        self.progress(0.9, "timing the accepted candidates side by side with the original")
        accepted = [o for o in self.outcomes if o.status == "accepted" and o.runner is not None]
        runners = {BASELINE: self.original, **{str(i): o.runner for i, o in enumerate(accepted)}}
        final = measure_latency(
            runners,
            (self.objective.batch_size,),
            FINAL,
            self.evaluation,
            self.check_cancelled,  # type: ignore[arg-type]
            sequence_lengths=self.objective.sequence_lengths,
            sequence=self.sequence,
        )
        baseline_cost = self.objective.cost(final[BASELINE], self.baseline_size)
        self.finished = True
        for index, outcome in enumerate(accepted):
            outcome.latency = final[str(index)]
            outcome.cost = self.objective.cost(outcome.latency, outcome.size_bytes or 0)
        scored = [o for o in self.outcomes if o.cost is not None and o.drop is not None]
        for index in pareto_front([(o.cost, o.drop) for o in scored]):  # type: ignore[misc]
            scored[index].on_front = True
        best = self.best_accepted()
        messages = list(self.messages)
        serves_original = best is None or best.cost >= baseline_cost  # type: ignore[operator]
        chosen = best
        if best is not None and serves_original:
            # the original as it is (compiled by the reference backend, unchanged) is what is served
            chosen = next((o for o in accepted if o.candidate == Candidate(BASELINE_BACKEND, "fp32")), None)
            messages.append(
                "no candidate beats the original within the budget: the original is served"
                + (f" (its {chosen.candidate.label()} engine)" if chosen else "")
                + f"; the fastest within the budget, {best.candidate.label()}, measured "
                f"{self.objective.describe(best.cost)} against the original's "  # type: ignore[arg-type]
                f"{self.objective.describe(baseline_cost)}"
            )
        if chosen is not None:
            chosen.chosen = True
        if best is not None and not serves_original:
            messages.append(
                f"chosen: {best.candidate.label()}: {self.objective.describe(best.cost)} against the "  # type: ignore[arg-type]
                f"original's {self.objective.describe(baseline_cost)}, drop {best.drop * 100:.2f} pt of "  # type: ignore[operator]
                f"{self.budget.metric} (budget {self.allowed * 100:.2f} pt)"
            )
        elif best is None:
            measured = [o for o in self.outcomes if o.drop is not None]  # screened ones too
            closest = min(measured, key=lambda o: o.drop, default=None)  # type: ignore[arg-type,return-value]
            messages.append(
                "no candidate met the budget"
                + (
                    f"; the closest is {closest.candidate.label()} with a drop of {closest.drop * 100:.2f} pt"  # type: ignore[operator]
                    if closest
                    else ""
                )
                + "; the original is served"
            )
        if timed_out:
            skipped = [o for o in self.outcomes if o.status == "skipped_time"]
            work = sum(o.estimated_seconds or 0.0 for o in skipped)
            messages.append(
                f"the time budget ran out: {len(skipped)} candidates were not tried (about {work:.0f} s "
                "of work); the best found is kept"
            )
        baseline = Measurement(
            BASELINE_BACKEND,
            "fp32",
            get_backend(BASELINE_BACKEND).hardware(),
            final[BASELINE],
            self.baseline_accuracy,
        )
        engines = self._stored_engines(baseline, serves_original)
        for outcome in self.outcomes:
            if outcome.runner is not None:
                outcome.runner.deactivate()
        self.original.deactivate()
        return AutotuneResult(
            baseline, baseline_cost, self.baseline_score, self.allowed, self.outcomes, engines, chosen,
            messages, self.clock() - self.started, timed_out, serves_original,
            self.request.space.prune_method,
        )  # fmt: skip

    def _stored_engines(self, baseline: Measurement, serves_original: bool) -> list[BuiltEngine]:
        """The chosen engine first, then the other front members that were built. `serves_original`:
        the chosen one is the original's own engine (nothing beat it), which its record says."""
        stored = [o for o in self.outcomes if (o.chosen or o.on_front) and o.artifact is not None]
        stored.sort(key=lambda o: not o.chosen)
        engines = []
        for outcome in stored:
            artifact = outcome.artifact
            assert artifact is not None and outcome.latency is not None
            artifact.metadata["autotune"] = {
                "chosen": outcome.chosen,
                "on_front": outcome.on_front,
                "within_budget": outcome.within_budget,
                "drop": outcome.drop,
                "serves_original": outcome.chosen and serves_original,
            }
            hardware = backend_class(artifact.backend)().hardware()
            measurement = Measurement(
                artifact.backend, artifact.precision, hardware, outcome.latency, outcome.accuracy
            )
            engines.append(BuiltEngine(artifact, measurement, compare(baseline, measurement)))
        return engines


def autotune(
    model_path: Path,
    request: AutotuneRequest,
    workdir: Path,
    *,
    evaluation: Dataset,
    calibration: Dataset | None = None,
    progress: Progress = lambda fraction, stage: None,
    check_cancelled: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
    model_inputs: Sequence[TensorSpec] = (),
) -> AutotuneResult:
    """Search the space for the engine that best meets the objective within the accuracy budget.

    `model_inputs`: the model's stored input specs, whose stated batch axes every runner and build
    of the search uses (as engines.pipeline.run_recipe does)."""
    if request.budget.metric == "top1" and evaluation.labels is None:
        raise InvalidRecipeError("a top1 budget needs labels in the evaluation set; use metric 'fidelity'")
    space = request.space
    backends = list(space.backends or _cpu_backends())
    precisions_of = {name: backend_class(name).precisions for name in backends}
    needs_calibration = calibration is None and bool(space.calibrations or space.prune_ratios)
    if needs_calibration:
        space = replace(space, calibrations=(), prune_ratios=())
    stated = stated_batch_axes(model_inputs)
    search = _Search(
        model_path, request, workdir, calibration, evaluation, progress, check_cancelled, clock, stated
    )
    progress(0.0, "measuring the original")
    search.measure_original()
    search.fuse_graph(backends)
    if needs_calibration:
        search.messages.append("no calibration set: INT8 and pruning were left out of the search")
    can_prune = calibration is not None and all(spec.batch_axis == 0 for spec in search.inputs)
    queue = candidates(
        space, backends, precisions_of, can_prune=can_prune, sensitivity_ratios=request.sensitivity_ratios
    )
    search.sensitivity_pending = space.sensitivity and can_prune and not request.sensitivity_ratios
    return search.run(queue)


class _OverShare(Exception):
    """A sensitivity analysis that would overrun its share of the time (its extrapolated seconds)."""

    def __init__(self, expected: float):
        super().__init__(expected)
        self.expected = expected


def _measure_train_step(
    model_path: Path, calibration: Dataset | None, clock: Callable[[], float]
) -> tuple[float, float] | str:
    """(seconds per sample of a float training step, seconds to convert the model to torch), from
    one forward and backward on a calibration batch after a warm-up one; or why it cannot be."""
    if calibration is None:
        return "no calibration set"
    try:
        import torch

        from engines.torch_bridge import first_output, onnx_to_torch

        began = clock()
        module = onnx_to_torch(model_path)
        convert = clock() - began
        batch = min(16, calibration.samples)
        inputs = tuple(
            torch.from_numpy(np.ascontiguousarray(array[:batch])) for array in calibration.inputs.values()
        )
        module.train()
        took = 0.0
        for _ in range(2):
            began = clock()
            first_output(module(*inputs)).float().square().mean().backward()
            took = clock() - began
        return took / batch, convert
    except Cancelled:
        raise
    except Exception as exc:  # a model torch cannot take: the estimate falls back to a share
        return f"{type(exc).__name__}: {exc}"


def _cpu_backends() -> list[str]:
    """The backends of the CPU queue this worker can run (GPU backends are asked for by name)."""
    from engines.backends.registry import backend_names, unavailable_reason

    return [
        name
        for name in backend_names()
        if backend_class(name).queue == "cpu" and unavailable_reason(name) is None
    ]
