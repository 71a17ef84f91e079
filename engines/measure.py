"""One measurement harness for every runner: latency per batch size, accuracy and fidelity.

Jobs and benchmarks both use it, so the numbers a job stores and the numbers bench/ prints
come from the same code. Results are plain dicts, ready to store as JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Runner
from engines.datasets import Dataset
from engines.errors import EngineError, InvalidRecipeError
from engines.recipe import MeasureConfig
from engines.signature import TensorSpec, feed_batch_size

#: Called between runs; raises to stop (e.g. engines.errors.Cancelled). It must be cheap: throttle inside.
StopCheck = Callable[[], None]


def resident_mb() -> float:
    """This process's resident memory (Linux /proc; elsewhere the peak, which only grows)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_of(
    load: Callable[[], Runner], batch: Callable[[Runner], dict[str, np.ndarray]]
) -> tuple[Runner, float]:
    """Load a runner and run one batch: the resident memory that took, in MiB.

    Approximate: the allocator may reuse memory freed earlier in the process, so read it as the
    engine's footprint on top of what is already loaded, not as an exact figure.
    """
    before = resident_mb()
    runner = load()
    runner.infer(batch(runner))
    return runner, max(0.0, resident_mb() - before)


def latency_stats(samples_ms: np.ndarray, batch_size: int) -> dict[str, float]:
    mean = float(samples_ms.mean())
    return {
        "batch_size": batch_size,
        "runs": len(samples_ms),
        "mean_ms": mean,
        "p50_ms": float(np.percentile(samples_ms, 50)),
        "p90_ms": float(np.percentile(samples_ms, 90)),
        "p99_ms": float(np.percentile(samples_ms, 99)),
        "min_ms": float(samples_ms.min()),
        "throughput_per_s": batch_size * 1000.0 / mean,
    }


def make_batch(
    specs: list[TensorSpec], batch_size: int, dataset: Dataset | None, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch for timing: real samples when a dataset is given (repeated if it is small), else random."""
    if dataset is not None:
        return {
            name: np.ascontiguousarray(array)
            for name, array in dataset.feeds(np.arange(batch_size) % dataset.samples).items()
        }
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    for spec in specs:
        dims = []
        for axis, dim in enumerate(spec.shape):
            if axis == spec.batch_axis:
                dims.append(batch_size)
            elif isinstance(dim, int):
                dims.append(dim)
            else:
                raise InvalidRecipeError(
                    f"input '{spec.name}' has a dynamic dim {axis} ({dim!r}); "
                    "give a dataset so it can be measured"
                )
        if np.dtype(spec.dtype).kind == "f":
            feeds[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(dims, dtype=spec.dtype)
    return feeds


def measure_latency(
    runners: Mapping[str, Runner],
    batch_sizes: tuple[int, ...],
    config: MeasureConfig,
    dataset: Dataset | None = None,
    check_stop: StopCheck | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Latency stats per runner and batch size (batch keys are str, as JSON wants them).

    Runners are timed side by side: every round gives each runner a short slice of timed runs,
    so load from elsewhere on a noisy machine falls on all of them alike and their ratios hold.
    Each runner gets at least `timed_runs` runs and `min_seconds` of timing per batch size.
    """
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in runners}
    slice_runs = max(1, min(10, config.timed_runs))
    for batch_size in batch_sizes:
        feeds = {
            name: make_batch(runner.input_metadata(), batch_size, dataset) for name, runner in runners.items()
        }
        for name, runner in runners.items():
            for _ in range(config.warmup_runs):
                runner.infer(feeds[name])
                if check_stop is not None:
                    check_stop()
        timings: dict[str, list[float]] = {name: [] for name in runners}
        spent = dict.fromkeys(runners, 0.0)
        while any(
            len(timings[name]) < config.timed_runs or spent[name] < config.min_seconds * 1000
            for name in runners
        ) and all(len(values) < config.max_runs for values in timings.values()):
            for name, runner in runners.items():
                for _ in range(slice_runs):
                    started = time.perf_counter_ns()
                    runner.infer(feeds[name])
                    elapsed_ms = (time.perf_counter_ns() - started) / 1e6
                    timings[name].append(elapsed_ms)
                    spent[name] += elapsed_ms
                    if check_stop is not None:  # cheap: the check throttles itself
                        check_stop()
        for name, values in timings.items():
            results[name][str(batch_size)] = latency_stats(np.asarray(values), batch_size)
    return results


def scored_output(outputs: list[TensorSpec]) -> TensorSpec:
    """The output accuracy and fidelity are computed on: the first floating-point one.

    Exporters of transformers and detectors often put integer outputs first (an echo of the
    token ids, a count of boxes): comparing those says nothing about the engine.
    """
    return next((spec for spec in outputs if spec.dtype.startswith(("float", "bfloat"))), outputs[0])


def _samples_axis(result: np.ndarray, declared: int | None, rows: int) -> int | None:
    """Where the samples of one batch are in an output: the declared batch axis when its size is the
    number of rows fed, else the first axis of that size (declared shapes can lie: an output declared
    [1, 5] under a dynamic batch), else none (one value per batch)."""
    if declared is not None and declared < result.ndim and result.shape[declared] == rows:
        return declared
    return next((axis for axis, size in enumerate(result.shape) if size == rows), None)


def run_dataset(
    runner: Runner, dataset: Dataset, batch_size: int, check_stop: StopCheck | None = None
) -> np.ndarray:
    """The scored output of the runner over the whole dataset, samples first, in order."""
    output, specs = scored_output(runner.output_metadata()), runner.input_metadata()
    chunks = []
    for start in range(0, dataset.samples, batch_size):
        if check_stop is not None:
            check_stop()
        feeds = dataset.batch(start, start + batch_size)
        result = np.asarray(runner.infer(feeds)[output.name])
        axis = _samples_axis(result, output.batch_axis, feed_batch_size(feeds, specs))
        chunks.append(result[None] if axis is None else np.moveaxis(result, axis, 0))
    shapes = {chunk.shape[1:] for chunk in chunks}
    if len(shapes) > 1:  # e.g. a detector whose box count depends on the image
        raise EngineError(
            f"output '{output.name}' has a different shape per batch ({sorted(map(list, shapes))[:3]}), "
            "so its outputs cannot be compared sample by sample",
            code="outputs_not_comparable",
        )
    return np.concatenate(chunks, axis=0)


def classification_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) of class scores against labels."""
    scores = logits.reshape(len(logits), -1)
    result = {"top1": float((scores.argmax(axis=1) == labels).mean())}
    if scores.shape[1] >= 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        result["top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    return result


#: Below these an engine does not reproduce its original: its verdict is `unfaithful`.
FAITHFUL_COSINE = 0.99
FAITHFUL_AGREEMENT = 0.95


def fidelity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """How closely an engine reproduces the original model's outputs, for models without labels.

    `top1_agreement` is only meaningful for class scores (one vector per sample): for feature maps,
    boxes or token embeddings the argmax of a flattened tensor says nothing, and it is None. The
    cosine is taken per sample; with one value per sample (where it would only compare signs), over
    the column of all samples.
    """
    if candidate.shape != reference.shape:
        raise EngineError(
            f"output shapes differ: {list(candidate.shape)} vs the original's {list(reference.shape)}",
            code="outputs_not_comparable",
        )
    if candidate.size == 0:  # e.g. a detector that found nothing, in both
        return {"top1_agreement": None, "cosine_similarity": 1.0, "max_abs_error": 0.0}
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    if cand.shape[1] == 1:  # one value per sample (a score, a probability): the cosine of the columns
        cand, ref = cand.T, ref.T
    cand_norm, ref_norm = np.linalg.norm(cand, axis=1), np.linalg.norm(ref, axis=1)
    both_zero = (cand_norm == 0) & (ref_norm == 0)
    # an engine that outputs zeros where the original does not is as far from it as can be: 0, not 1;
    # non-finite norms give NaN, reported as null and judged unfaithful
    cosine = np.where(
        (cand_norm > 0) & (ref_norm > 0),
        (cand * ref).sum(axis=1) / np.maximum(cand_norm * ref_norm, 1e-300),
        np.where(both_zero, 1.0, np.where(np.isfinite(cand_norm) & np.isfinite(ref_norm), 0.0, np.nan)),
    )
    class_scores = candidate.ndim == 2 and candidate.shape[1] > 1
    return {
        "top1_agreement": float((cand.argmax(axis=1) == ref.argmax(axis=1)).mean()) if class_scores else None,
        "cosine_similarity": float(cosine.mean()),
        "max_abs_error": float(np.abs(cand - ref).max()),
    }


def fidelity_score(values: dict[str, float | None]) -> float:
    """One number for a fidelity budget: the cosine similarity, or the top-1 agreement where lower."""
    scores = [values[key] for key in ("cosine_similarity", "top1_agreement") if values.get(key) is not None]
    return float(min(scores)) if scores else 0.0


def unfaithful_reason(values: dict[str, Any] | None) -> str | None:
    """Why an engine's fidelity to the original is poor, or None when it is faithful (or unmeasured)."""
    if not values:
        return None
    cosine, agreement = values.get("cosine_similarity"), values.get("top1_agreement")
    if cosine is None and values.get("max_abs_error") is None:
        return "its outputs are not finite"
    if cosine is not None and cosine < FAITHFUL_COSINE:
        return f"cosine similarity to the original {cosine:.4f} < {FAITHFUL_COSINE}"
    if agreement is not None and agreement < FAITHFUL_AGREEMENT:
        return f"top-1 agreement with the original {agreement:.4f} < {FAITHFUL_AGREEMENT}"
    return None


def _json_safe(values: dict[str, float | None]) -> dict[str, float | None]:
    """NaN and ±Inf (an engine that overflows) become None: JSON has no such numbers."""
    return {
        key: (value if value is not None and np.isfinite(value) else None) for key, value in values.items()
    }


def accuracy_report(
    outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None
) -> dict[str, Any]:
    """Accuracy against labels where there are labels; fidelity against the reference where given.

    Non-finite outputs are counted and reported, never silently averaged into the metrics.
    """
    report: dict[str, Any] = {"samples": len(outputs)}
    non_finite = int(outputs.size - np.isfinite(outputs).sum())
    if non_finite:
        report["non_finite_outputs"] = non_finite
    try:
        if labels is not None:
            report.update(classification_accuracy(outputs, labels))
        if reference is not None:
            with np.errstate(all="ignore"):
                report["fidelity"] = _json_safe(fidelity(outputs, reference))
    except EngineError as exc:  # a metric that does not apply never fails the job
        report["unavailable"] = exc.detail
    except (ValueError, IndexError) as exc:
        report["unavailable"] = f"{type(exc).__name__}: {exc}"
    return report
