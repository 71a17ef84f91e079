"""Run a recipe on one model: measure the original, build each target, measure it the same way.

The original model is always measured in the same run, on the same machine, with the same
threads and inputs, so every engine's speedup and accuracy delta are side-by-side ratios.
The caller (a worker, a notebook, a benchmark) supplies a progress callback and a cancellation
check; the check may raise `engines.errors.Cancelled`, and is polled between timed runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import CompileOptions, EngineArtifact, Runner
from engines.backends.registry import get_backend
from engines.datasets import Dataset
from engines.errors import InvalidRecipeError
from engines.measure import accuracy_report, measure_latency, run_dataset
from engines.recipe import Recipe
from engines.signature import TensorSpec

Progress = Callable[[float, str], None]
BASELINE_BACKEND = "onnxruntime-cpu"


@dataclass(frozen=True)
class Measurement:
    backend: str
    precision: str
    hardware: dict[str, Any]
    latency: dict[str, dict[str, float]]
    accuracy: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "hardware": self.hardware,
            "latency": self.latency,
            "accuracy": self.accuracy,
        }


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


def check_batch_sizes(inputs: list[TensorSpec], batch_sizes: tuple[int, ...]) -> None:
    """A model exported with a static batch dim runs only that batch size."""
    for spec in inputs:
        if spec.has_static_batch():
            wrong = [size for size in batch_sizes if size != spec.batch_dim]
            if wrong:
                raise InvalidRecipeError(
                    f"input '{spec.name}' has a static batch dim of {spec.batch_dim}, so batch sizes {wrong} "
                    f"cannot run; ask for [{spec.batch_dim}] or export the model with a dynamic batch dim"
                )


def _evaluation_batch(inputs: list[TensorSpec], batch_sizes: tuple[int, ...]) -> int:
    static = [spec.batch_dim for spec in inputs if spec.has_static_batch()]
    return int(static[0]) if static else max(batch_sizes)


def compare(baseline: Measurement, candidate: Measurement) -> dict[str, Any]:
    """Side-by-side ratios: speedup (baseline mean / engine mean) per batch size, accuracy deltas."""
    speedup = {
        size: baseline.latency[size]["mean_ms"] / stats["mean_ms"]
        for size, stats in candidate.latency.items()
        if size in baseline.latency
    }
    result: dict[str, Any] = {"speedup": speedup}
    if baseline.accuracy and candidate.accuracy:
        for metric in ("top1", "top5"):
            if metric in baseline.accuracy and metric in candidate.accuracy:
                result[f"{metric}_delta"] = candidate.accuracy[metric] - baseline.accuracy[metric]
    return result


def _measure(
    runner: Runner,
    *,
    backend: str,
    precision: str,
    hardware: dict[str, Any],
    recipe: Recipe,
    timing_data: Dataset | None,
    evaluation: Dataset | None,
    eval_batch: int,
    reference: np.ndarray | None,
    check_stop: Callable[[], None],
) -> tuple[Measurement, np.ndarray | None]:
    latency = measure_latency(runner, recipe.batch_sizes, recipe.measure, timing_data, check_stop)
    outputs = accuracy = None
    if evaluation is not None:
        outputs = run_dataset(runner, evaluation, eval_batch, check_stop)
        accuracy = accuracy_report(outputs, evaluation.labels, reference)
    measurement = Measurement(backend, precision, hardware, latency, accuracy)
    return measurement, outputs


def run_recipe(
    model_path: Path,
    recipe: Recipe,
    workdir: Path,
    *,
    evaluation: Dataset | None = None,
    calibration: Dataset | None = None,
    progress: Progress = lambda fraction, stage: None,
    check_cancelled: Callable[[], None] = lambda: None,
) -> PipelineResult:
    """Measure the original model, then build and measure every target of the recipe."""
    threads = recipe.measure.threads
    baseline_backend = get_backend(BASELINE_BACKEND)
    baseline_runner = baseline_backend.load(model_path, threads)
    inputs = baseline_runner.input_metadata()
    check_batch_sizes(inputs, recipe.batch_sizes)
    eval_batch = _evaluation_batch(inputs, recipe.batch_sizes)
    if (
        evaluation is not None
        and evaluation.samples % eval_batch
        and any(s.has_static_batch() for s in inputs)
    ):
        evaluation = evaluation.take(evaluation.samples - evaluation.samples % eval_batch)
    timing_data = evaluation or calibration
    steps = 1 + len(recipe.targets)

    progress(0.0, "measuring the original model")
    baseline, reference = _measure(
        baseline_runner,
        backend=BASELINE_BACKEND,
        precision="fp32",
        hardware=baseline_backend.hardware(threads),
        recipe=recipe,
        timing_data=timing_data,
        evaluation=evaluation,
        eval_batch=eval_batch,
        reference=None,
        check_stop=check_cancelled,
    )
    result = PipelineResult(baseline=baseline)
    if evaluation is None:
        result.messages.append("no evaluation dataset: latency only, no accuracy or fidelity")
    elif evaluation.labels is None:
        result.messages.append(
            "evaluation dataset has no labels: accuracy is reported as fidelity to the original"
        )

    for index, target in enumerate(recipe.targets, start=1):
        backend = get_backend(target)
        progress(index / (steps + 1), f"building {target} {recipe.precision}")
        options = CompileOptions(precision=recipe.precision, batch_sizes=recipe.batch_sizes, threads=threads)
        artifact = backend.compile(model_path, workdir / target, options)
        progress((index + 0.5) / (steps + 1), f"measuring {target} {recipe.precision}")
        measurement, _ = _measure(
            backend.load(artifact.path, threads),
            backend=target,
            precision=recipe.precision,
            hardware=backend.hardware(threads),
            recipe=recipe,
            timing_data=timing_data,
            evaluation=evaluation,
            eval_batch=eval_batch,
            reference=reference,
            check_stop=check_cancelled,
        )
        result.engines.append(BuiltEngine(artifact, measurement, compare(baseline, measurement)))
    progress(1.0, "done")
    return result
