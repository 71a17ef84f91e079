"""Run a recipe on one model: build each target, then measure every engine beside the original.

The original model is always measured in the same run, on the same machine, with the same
threads and inputs, interleaved with the engines, so every engine's speedup and accuracy delta
are side-by-side ratios.
The caller (a worker, a notebook, a benchmark) supplies a progress callback and a cancellation
check; the check may raise `engines.errors.Cancelled`, and is polled between timed runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from engines.backends.base import STATED_AXES_KEY, Backend, CompileOptions, EngineArtifact, Runner
from engines.backends.registry import check_precision, get_backend
from engines.errors import EngineError, InvalidRecipeError
from engines.graphopt.config import check_config
from engines.graphopt.stage import GraphStageResult, run_graph_stage
from engines.ingest.datasets import Dataset
from engines.ingest.sequence import (
    SequenceProfile,
    check_sequence_lengths,
    profile_from_specs,
    read_profile,
    sequence_axes,
)
from engines.ingest.signature import StatedAxes, TensorSpec, ambiguous_batch_axes, stated_batch_axes
from engines.measure.accuracy import accuracy_report, run_dataset, unfaithful_reason
from engines.measure.latency import latency_label, make_batch, measure_latency, memory_of
from engines.prune.criteria import criterion
from engines.prune.stage import run_prune_stage
from engines.quantize.weight_only import PRECISION_BITS, check_weight_only
from engines.recipe import Recipe
from engines.variants import ModelVariant, build_variant, uses_calibration

Progress = Callable[[float, str], None]
BASELINE_BACKEND = "onnxruntime-cpu"
BASELINE = "original"
#: What a target falls back to when the recipe's precision cannot be built there: the model as it is.
FALLBACK_PRECISION = "fp32"


@dataclass(frozen=True)
class Measurement:
    backend: str
    precision: str
    hardware: dict[str, Any]
    latency: dict[str, dict[str, float]]
    accuracy: dict[str, Any] | None
    memory_mb: float | None = None  # resident memory of loading the runner and running one largest batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BuiltEngine:
    artifact: EngineArtifact
    measurement: Measurement
    comparison: dict[str, Any]  # speedup per batch size and accuracy delta against the baseline


@dataclass
class PipelineResult:
    baseline: Measurement
    engines: list[BuiltEngine] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def validate_recipe(
    inputs: list[TensorSpec],
    recipe: Recipe,
    *,
    evaluation_samples: int | None = None,
    evaluation_has_labels: bool = False,
    calibration_samples: int | None = None,
    calibration_has_labels: bool = False,
    varying_unbatched: Sequence[str] = (),
    sequence: SequenceProfile | None = None,
) -> None:
    """Raise InvalidRecipeError for a recipe that cannot run on this model and these datasets.

    The API calls it when a job is created, so such a job is a 422 at once, not a failure later.
    `varying_unbatched` names inputs without a batch axis whose dataset rows differ. `sequence` is
    the model's sequence profile read from its graph (engines.ingest.sequence.read_profile), whose
    position table limits `sequence_lengths`; without it, the axes come from `inputs` and no limit
    is checked.
    """
    ambiguous = ambiguous_batch_axes(inputs)
    if ambiguous:
        raise InvalidRecipeError("; ".join(ambiguous))
    check_precision(recipe.targets, recipe.precision)
    check_config(recipe.graph_optimization)  # against the graph: engines.graphopt.stage
    profile = sequence or profile_from_specs(inputs)
    check_sequence_lengths(recipe.sequence_lengths, profile, inputs, what="sequence_lengths")
    wrong = [size for size in recipe.batch_sizes if size != 1]
    if varying_unbatched and wrong:
        names = ", ".join(f"'{name}'" for name in varying_unbatched)
        raise InvalidRecipeError(
            f"input {names} has no batch axis (every sample of a batch shares one value), and the "
            f"dataset's rows for it differ, so only batch size 1 can run: ask for batch_sizes [1], or "
            "give the same value in every row"
        )
    if recipe.finetune is not None and recipe.prune is None:
        raise InvalidRecipeError("finetune recovers accuracy after pruning: give a prune stage too")
    if recipe.prune is not None:
        if recipe.prune.sparsity_epochs and calibration_samples is None:
            raise InvalidRecipeError("sparsity training needs a calibration (training) dataset")
        criterion(recipe.prune.method).check_data(calibration_samples is not None)
        if recipe.finetune is not None and calibration_samples is None:
            raise InvalidRecipeError(
                "fine-tuning needs a calibration (training) dataset: give calibration_dataset_id"
            )
        if recipe.finetune is not None and not recipe.finetune.distill and not calibration_has_labels:
            raise InvalidRecipeError("fine-tuning without distillation needs labels in the calibration set")
    if recipe.qat is not None:
        _check_qat(recipe, calibration_samples, calibration_has_labels)
    if recipe.precision in PRECISION_BITS:
        check_weight_only(
            recipe.weight_only,
            PRECISION_BITS[recipe.precision],
            has_calibration=calibration_samples is not None,
        )
    if recipe.precision == "int8" and calibration_samples is None:
        raise InvalidRecipeError("int8 needs a calibration dataset: give calibration_dataset_id")
    budget = recipe.accuracy_budget
    if budget is not None:
        if recipe.precision != "int8":
            raise InvalidRecipeError("an accuracy budget applies to int8 only")
        if evaluation_samples is None:
            raise InvalidRecipeError(
                "an accuracy budget needs an evaluation dataset: give evaluation_dataset_id"
            )
        if budget.metric == "top1" and not evaluation_has_labels:
            raise InvalidRecipeError(
                "a top1 budget needs labels in the evaluation set; use metric 'fidelity'"
            )
    for spec in inputs:
        if isinstance(spec.batch_dim, int):
            wrong = [size for size in recipe.batch_sizes if size != spec.batch_dim]
            if wrong:
                raise InvalidRecipeError(
                    f"input '{spec.name}' has a static batch dim of {spec.batch_dim}, so batch sizes {wrong} "
                    f"cannot run; ask for [{spec.batch_dim}] or export the model with a dynamic batch dim"
                )
            if (
                recipe.precision == "int8"
                and calibration_samples is not None
                and calibration_samples < spec.batch_dim
            ):
                raise InvalidRecipeError(
                    f"the calibration set has {calibration_samples} samples, fewer than the model's static "
                    f"batch of {spec.batch_dim}"
                )
            if evaluation_samples is not None and evaluation_samples < spec.batch_dim:
                raise InvalidRecipeError(
                    f"the evaluation set has {evaluation_samples} samples, fewer than the model's static "
                    f"batch of {spec.batch_dim}"
                )
        sequence_axis = profile.axes.get(spec.name)
        dynamic = [
            axis
            for axis, dim in enumerate(spec.shape)
            if axis != spec.batch_axis
            and not isinstance(dim, int)
            and not (recipe.sequence_lengths and axis == sequence_axis)
        ]
        if dynamic and evaluation_samples is None and calibration_samples is None:
            generated = sequence_axis is not None and dynamic == [sequence_axis]
            raise InvalidRecipeError(
                f"input '{spec.name}' has dynamic dims {dynamic} besides the batch; give an evaluation or "
                "calibration dataset so there is something real to measure"
                + (
                    ", or ask for sequence_lengths (e.g. [128]) to time generated token inputs"
                    if generated
                    else ""
                )
            )


def _check_qat(recipe: Recipe, calibration_samples: int | None, calibration_has_labels: bool) -> None:
    """Quantization-aware training builds an INT8 model and trains on the calibration set."""
    if recipe.precision != "int8":
        raise InvalidRecipeError(
            f"qat trains an INT8 model: ask for precision 'int8' (not '{recipe.precision}'), or leave out qat"
        )
    if calibration_samples is None:
        raise InvalidRecipeError(
            "qat trains on the calibration (training) dataset: give calibration_dataset_id"
        )
    if not recipe.qat.distill and not calibration_has_labels:  # type: ignore[union-attr]
        raise InvalidRecipeError(
            "qat without distillation learns from labels: give a calibration set with labels, or distill"
        )
    if recipe.accuracy_budget is not None:
        raise InvalidRecipeError(
            "an accuracy budget searches post-training INT8 settings; qat trains one model: leave out one"
        )


def _calibration_batch(inputs: list[TensorSpec], calibration: Dataset | None, recipe: Recipe) -> int:
    static = [spec.batch_dim for spec in inputs if spec.has_static_batch()]
    if static:
        return int(static[0])
    if calibration is None:
        return 16
    available = calibration.largest_batch() or calibration.samples
    return max(1, min(16, available, recipe.quantize.calibration_samples or available))


def _evaluation_batch(inputs: list[TensorSpec], batch_sizes: tuple[int, ...], data: Dataset | None) -> int:
    static = [spec.batch_dim for spec in inputs if spec.has_static_batch()]
    if static:
        return int(static[0])
    return min(max(batch_sizes), (data and data.largest_batch()) or max(batch_sizes))


def compare(baseline: Measurement, candidate: Measurement) -> dict[str, Any]:
    """Side-by-side ratios: speedup per batch size and accuracy deltas.

    Speedup compares medians (baseline p50 / engine p50): on a shared machine a few stalls move
    the mean of a sub-millisecond model by tens of percent, the median hardly at all.
    """
    speedup = {
        size: baseline.latency[size]["p50_ms"] / stats["p50_ms"]
        for size, stats in candidate.latency.items()
        if size in baseline.latency
    }
    faster = [ratio > 1.0 for ratio in speedup.values()]
    speed = "faster" if all(faster) else "slower" if not any(faster) else "mixed"
    unfaithful = unfaithful_reason((candidate.accuracy or {}).get("fidelity"))
    result: dict[str, Any] = {
        "speedup": speedup,
        # an engine that does not reproduce the original is `unfaithful` however fast it is
        "verdict": "unfaithful" if unfaithful else speed,
        "speed_verdict": speed,
    }
    if unfaithful:
        result["unfaithful_reason"] = unfaithful
    if baseline.accuracy and candidate.accuracy:
        for metric in ("top1", "top5"):
            if metric in baseline.accuracy and metric in candidate.accuracy:
                result[f"{metric}_delta"] = candidate.accuracy[metric] - baseline.accuracy[metric]
    return result


def compile_engine(
    backend: Backend, onnx_path: Path, out_dir: Path, options: CompileOptions
) -> EngineArtifact:
    """`backend.compile`, with the batch axes the user stated (`options.batch_axes`) kept in the
    engine's metadata (its record's build_info): the engine file knows the graph only, and whoever
    loads the engine later (serving) loads it with them."""
    artifact = backend.compile(onnx_path, out_dir, options)
    if options.batch_axes:
        artifact.metadata[STATED_AXES_KEY] = dict(options.batch_axes)
    return artifact


def sequence_options(
    inputs: Sequence[TensorSpec], lengths: Sequence[int], *datasets: Dataset | None
) -> dict[str, Any]:
    """The sequence fields of CompileOptions for a model whose `inputs` (batch axes decided) have a
    sequence axis (engines.ingest.sequence.sequence_axes); none for another model. The lengths are
    the ones it is timed at (`lengths`: the recipe's or the search objective's; none named: the
    datasets' own, which it is then timed at), and the longest covers every dataset run through it
    (accuracy runs at the evaluation set's own length), so a build shaped by them takes every run."""
    axes = sequence_axes(inputs)
    if not axes:
        return {}
    own: set[int] = set()
    for data in datasets:
        feeds = {} if data is None else data.feeds(slice(0, 1))
        sized = {name: axis for name, axis in axes.items() if name in feeds and axis < feeds[name].ndim}
        own.update(feeds[name].shape[axis] for name, axis in sized.items())
    return {
        "sequence_axes": axes,
        "sequence_lengths": tuple(lengths) or tuple(sorted(own)),
        "max_sequence_length": max([*lengths, *own], default=None),
    }


def built_runner(
    backend: Backend,
    checks_dir: Path,
    threads: int | None,
    onnx_path: Path,
    batch_axes: StatedAxes | None = None,
    sequence: Mapping[str, Any] | None = None,
) -> Runner:
    """`onnx_path` compiled by `backend` and loaded: an accuracy check during a build runs what the
    target will run (for ONNX Runtime, cheap; for a GPU backend, its own engine), batched along the
    axes the user stated (`batch_axes`, engines.ingest.signature.decide_batch_axes), shaped for a
    token model's sequence (`sequence`: `sequence_options`)."""
    out_dir = checks_dir / onnx_path.stem
    batch_axes = batch_axes or {}
    options = CompileOptions(threads=threads, batch_axes=batch_axes, **(sequence or {}))
    artifact = backend.compile(onnx_path, out_dir, options)
    return backend.load(artifact.path, backend.options(threads=threads, batch_axes=batch_axes))


def verdict_messages(
    artifact: EngineArtifact, comparison: dict[str, Any], recipe: Recipe, evaluation: Dataset | None
) -> list[str]:
    """What a user must know about an engine: slower than the original somewhere, or unfaithful to
    it (with the exact recipe that searches for a faithful INT8 engine, when one can be searched)."""
    what = f"the {artifact.precision} {artifact.backend} engine"
    messages = []
    if comparison["speed_verdict"] != "faster":
        ratios = ", ".join(
            f"{latency_label(key)}: {ratio:.2f}×" for key, ratio in comparison["speedup"].items()
        )
        messages.append(
            f"{what} is not faster than the original everywhere ({ratios}); "
            "where it is slower, serve the original"
        )
    reason = comparison.get("unfaithful_reason")
    if reason:
        message = f"{what} is unfaithful to the original: {reason}"
        if artifact.precision == "int8" and recipe.accuracy_budget is None and evaluation is not None:
            metric = "top1" if evaluation.labels is not None else "fidelity"
            budgeted = {**recipe.to_dict(), "accuracy_budget": {"metric": metric, "max_drop": 0.01}}
            message += (
                "; an accuracy budget keeps the layers that lose it in float: send the same job with this "
                f"recipe: {json.dumps(budgeted, separators=(',', ':'))}"
            )
        messages.append(message)
    return messages


def run_recipe(
    model_path: Path,
    recipe: Recipe,
    workdir: Path,
    *,
    evaluation: Dataset | None = None,
    calibration: Dataset | None = None,
    progress: Progress = lambda fraction, stage: None,
    check_cancelled: Callable[[], None] = lambda: None,
    model_inputs: Sequence[TensorSpec] = (),
) -> PipelineResult:
    """Build every target of the recipe, then measure them side by side with the original model.

    `model_inputs` are the model's stored input specs: the batch axes a user stated among them
    (engines.ingest.signature.stated_batch_axes) are the ones every runner, build and measurement
    uses, and each engine's build_info keeps them (`batch_axes`) for serving; the others come from
    the graph, as the datasets were laid out with the same specs.
    """
    threads = recipe.measure.threads
    stated = stated_batch_axes(model_inputs)
    baseline_backend = get_backend(BASELINE_BACKEND)
    memory: dict[str, float] = {}
    # the graph's sequence axes and position limit, read only when the recipe measures lengths
    sequence = read_profile(model_path, model_inputs) if recipe.sequence_lengths else None

    def largest_batch(runner: Runner) -> dict[str, Any]:
        specs = runner.input_metadata()  # a static batch dim wins: the recipe is validated after loading
        data = evaluation or calibration
        return make_batch(
            specs,
            _evaluation_batch(specs, recipe.batch_sizes, data),
            data,
            sequence_length=max(recipe.sequence_lengths, default=None),
            sequence=sequence,
            padding=recipe.measure.padding,
        )

    runners: dict[str, Runner] = {}
    try:
        runners[BASELINE], memory[BASELINE] = memory_of(
            lambda: baseline_backend.load(
                model_path, baseline_backend.options(threads=threads, batch_axes=stated)
            ),
            largest_batch,
        )
        inputs = runners[BASELINE].input_metadata()
        validate_recipe(
            inputs,
            recipe,
            evaluation_samples=None if evaluation is None else evaluation.samples,
            evaluation_has_labels=evaluation is not None and evaluation.labels is not None,
            calibration_samples=None if calibration is None else calibration.samples,
            calibration_has_labels=calibration is not None and calibration.labels is not None,
            varying_unbatched=sorted(
                {
                    name
                    for data in (evaluation, calibration)
                    if data is not None
                    for name in data.varying_unbatched()
                }
            ),
            sequence=sequence,
        )
        eval_batch = _evaluation_batch(inputs, recipe.batch_sizes, evaluation)
        if (
            evaluation is not None
            and evaluation.samples % eval_batch
            and any(s.has_static_batch() for s in inputs)
        ):
            evaluation = evaluation.take(evaluation.samples - evaluation.samples % eval_batch)
        # a token model's sequence axes and lengths: every build shaped by them (TensorRT, CUDA graphs)
        shaped = sequence_options(inputs, recipe.sequence_lengths, evaluation, calibration)
        messages: list[str] = []
        if evaluation is None:
            messages.append("no evaluation dataset: latency only, no accuracy or fidelity")
        elif evaluation.labels is None:
            messages.append(
                "evaluation dataset has no labels: accuracy is reported as fidelity to the original"
            )
        if calibration is not None and not uses_calibration(recipe) and recipe.prune is None:
            messages.append(
                f"the calibration dataset is not used by {recipe.precision} engines (it calibrates int8 and "
                "int4-weight's gptq)"
            )

        artifacts: dict[str, EngineArtifact] = {}
        hardware = {BASELINE: baseline_backend.hardware(threads)}
        source, stage_metadata = model_path, {}
        # An engine's build time is all the work that made it: pruning and fine-tuning, graph fusion,
        # calibration and quantization, then the backend's compile (an INT8 ONNX Runtime engine's
        # compile alone is a few milliseconds).
        stage_seconds = 0.0
        stage_began = time.perf_counter()
        if recipe.prune is not None:
            progress(0.0, f"pruning ({recipe.prune.method})")
            stage = run_prune_stage(
                model_path,
                recipe.prune,
                recipe.finetune,
                workdir,
                inputs=inputs,
                output_names=[spec.name for spec in runners[BASELINE].output_metadata()],
                calibration=calibration,
                evaluation=evaluation,
                progress=progress,
                check_cancelled=check_cancelled,
            )
            messages += stage.messages
            source, stage_metadata = stage.path, {"prune": stage.metadata}
        graph: GraphStageResult | None = None  # transformer fusion, before any precision is built
        if recipe.graph_optimization.enabled:
            progress(0.2, "transformer graph optimization")
            graph = run_graph_stage(
                source,
                recipe.graph_optimization,
                workdir / "graphopt",
                targets=recipe.targets,
                inputs=inputs,
                data=evaluation or calibration,
                data_name="evaluation" if evaluation is not None else "calibration",
                threads=threads,
                runner_for=lambda target, path: built_runner(
                    get_backend(target),
                    workdir / target / "graphopt",
                    threads,
                    path,
                    batch_axes=stated,
                    sequence=shaped,
                ),
                timing_batch=min(recipe.batch_sizes),
                check_cancelled=check_cancelled,
            )
            messages += graph.messages
        stage_seconds = time.perf_counter() - stage_began
        # With pruning, the pruned fp32 model is a stage of its own: the report shows a row per stage.
        precisions = (
            ["fp32", recipe.precision]
            if source != model_path and recipe.precision != "fp32"
            else [recipe.precision]
        )
        # by (precision, profile, the model it starts from): targets that share one, share it
        variants: dict[tuple[str, str, Path], ModelVariant] = {}
        variant_seconds: dict[tuple[str, str, Path], float] = {}
        plan = [(precision, target) for precision in precisions for target in recipe.targets]
        first_fp32_failure: EngineError | None = None

        def build(index: int, precision: str, target: str) -> tuple[ModelVariant, EngineArtifact]:
            backend = get_backend(target)
            model_precision = backend.model_precision(precision)
            starts_from = graph.source_for(target, model_precision) if graph is not None else source
            key = (model_precision, backend.quantization_profile, starts_from)
            name = f"{target}/{precision}"
            if key not in variants:
                progress(
                    0.3 + 0.3 * index / len(plan),
                    f"preparing the {model_precision} model ({key[1]} profile)",
                )

                def make(model: Path) -> ModelVariant:
                    return build_variant(
                        model,
                        replace(recipe, precision=model_precision),
                        key[1],
                        workdir if model == source else workdir / "graphopt",
                        calibration=calibration,
                        evaluation=evaluation,
                        batch_size=_calibration_batch(inputs, calibration, recipe),
                        check_cancelled=check_cancelled,
                        runner_for=partial(
                            built_runner,
                            backend,
                            workdir / target / "checks",
                            threads,
                            batch_axes=stated,
                            sequence=shaped,
                        ),
                    )

                variant_began = time.perf_counter()
                variants[key] = (
                    make(source) if graph is None else graph.build(target, model_precision, make, messages)
                )
                variant_seconds[key] = time.perf_counter() - variant_began
                messages.extend(variants[key].messages)
            variant = variants[key]
            progress(0.3 + 0.3 * (index + 0.5) / len(plan), f"building {target} {precision}")
            options = CompileOptions(
                precision=precision,
                batch_sizes=recipe.batch_sizes,
                threads=threads,
                batch_axes=stated,
                **shaped,
            )
            artifact = compile_engine(backend, variant.path, workdir / target / precision, options)
            artifact.metadata["build_seconds"] = stage_seconds + variant_seconds[key] + artifact.build_seconds
            runners[name], memory[name] = memory_of(
                partial(backend.load, artifact.path, backend.options(threads=threads, batch_axes=stated)),
                largest_batch,
            )
            return variant, artifact

        for index, (precision, target) in enumerate(plan):
            name = f"{target}/{precision}"
            try:
                try:
                    variant, artifact = build(index, precision, target)
                except InvalidRecipeError:
                    raise
                except EngineError as exc:
                    if precision == "fp32" or (FALLBACK_PRECISION, target) in plan:
                        raise
                    # INT8 (or fp16) that cannot be built: the faithful float engine, with the reason
                    variant, artifact = build(index, FALLBACK_PRECISION, target)
                    name = f"{target}/{FALLBACK_PRECISION}"
                    artifact.metadata[f"{precision}_fallback"] = {
                        "precision": precision,
                        "code": exc.code,
                        "reason": exc.detail,
                    }
                    messages.append(
                        f"{target}: the {precision} engine could not be built ({exc.code}: {exc.detail}); "
                        f"the {FALLBACK_PRECISION} engine, faithful to the original, is handed over instead"
                    )
            except InvalidRecipeError:
                raise
            except EngineError as exc:
                # one target that cannot take the model (onnx2torch lacks an op) leaves the others;
                # when none is left, the first fp32 failure is the job's error, with its own code
                first_fp32_failure = first_fp32_failure or (exc if precision == "fp32" else None)
                messages.append(
                    f"{target} cannot run this {precision} model, so it has no engine: {exc.detail}"
                )
                continue
            artifact.metadata.update({**variant.metadata, **stage_metadata})
            variant.write_layer_errors(artifact.path.parent)
            artifacts[name] = artifact
            hardware[name] = get_backend(target).hardware(threads)
            check_cancelled()
        if not artifacts:
            if first_fp32_failure is not None:
                raise first_fp32_failure
            raise EngineError("no target could run the model: " + "; ".join(messages), code="no_engine_built")

        progress(0.6, "measuring latency side by side with the original")
        latency = measure_latency(
            runners,
            recipe.batch_sizes,
            recipe.measure,
            evaluation or calibration,
            check_cancelled,
            sequence_lengths=recipe.sequence_lengths,
            sequence=sequence,
        )
        accuracy: dict[str, dict[str, Any] | None] = dict.fromkeys(runners)
        if evaluation is not None:
            progress(0.85, "measuring accuracy")
            try:
                reference = run_dataset(runners[BASELINE], evaluation, eval_batch, check_cancelled)
                accuracy[BASELINE] = accuracy_report(reference, evaluation.labels, None)
                for target in artifacts:
                    outputs = run_dataset(runners[target], evaluation, eval_batch, check_cancelled)
                    accuracy[target] = accuracy_report(outputs, evaluation.labels, reference)
            except EngineError as exc:
                if exc.code != "outputs_not_comparable":
                    raise
                messages.append(f"accuracy not measured: {exc.detail}")
                accuracy = {
                    name: {"samples": evaluation.samples, "unavailable": exc.detail} for name in runners
                }

        def measurement(name: str, backend: str, precision: str) -> Measurement:
            return Measurement(
                backend, precision, hardware[name], latency[name], accuracy[name], memory[name]
            )

        baseline = measurement(BASELINE, BASELINE_BACKEND, "fp32")
        result = PipelineResult(baseline=baseline, messages=messages)
        for name, artifact in artifacts.items():
            built = measurement(name, artifact.backend, artifact.precision)
            comparison = compare(baseline, built)
            result.messages += verdict_messages(artifact, comparison, recipe, evaluation)
            result.engines.append(BuiltEngine(artifact, built, comparison))
        progress(1.0, "done")
        return result
    finally:  # sessions are given back whatever happened
        for runner in runners.values():
            runner.deactivate()
