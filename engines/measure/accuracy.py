"""Accuracy against labels and fidelity to the original: what an engine computes, not how fast.

The scored output is read sample by sample along its batch axis over a whole dataset, then
compared: top-1/top-5 where there are labels, cosine similarity, top-1 agreement (class scores
only) and the largest error against the original's outputs otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engines.backends.base import Runner
from engines.errors import EngineError
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec, feed_batch_size
from engines.measure.latency import StopCheck
from engines.measure.spill import row_blocks, rows_array


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
    """The scored output of the runner over the whole dataset, samples first, in order.

    Batch by batch into one array allocated after the first (engines.measure.spill: on disk when
    large), so memory holds a batch and not the dataset's outputs twice over."""
    output, specs = scored_output(runner.output_metadata()), runner.input_metadata()
    collected: np.ndarray | None = None
    done = 0
    for start in range(0, dataset.samples, batch_size):
        if check_stop is not None:
            check_stop()
        feeds = dataset.batch(start, start + batch_size)
        result = np.asarray(runner.infer(feeds)[output.name])
        axis = _samples_axis(result, output.batch_axis, feed_batch_size(feeds, specs))
        chunk = result[None] if axis is None else np.moveaxis(result, axis, 0)
        if collected is None:
            rows = len(chunk) * -(-dataset.samples // batch_size)  # at most; trimmed at the end
            collected = rows_array((rows, *chunk.shape[1:]), chunk.dtype)
        elif chunk.shape[1:] != collected.shape[1:]:  # e.g. a detector whose box count depends on the image
            shapes = sorted([list(collected.shape[1:]), list(chunk.shape[1:])])
            raise EngineError(
                f"output '{output.name}' has a different shape per batch ({shapes}), "
                "so its outputs cannot be compared sample by sample",
                code="outputs_not_comparable",
            )
        collected[done : done + len(chunk)] = chunk
        done += len(chunk)
    assert collected is not None, "a dataset has at least one sample"
    return collected[:done]


def classification_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) of class scores against labels, counted
    a block of rows at a time (the scores may be a disk-backed array of the whole dataset)."""
    classes = math.prod(logits.shape[1:])
    top1 = top5 = 0
    for rows in row_blocks(logits):
        scores = np.asarray(logits[rows]).reshape(rows.stop - rows.start, -1)
        expected = np.asarray(labels[rows])
        top1 += int((scores.argmax(axis=1) == expected).sum())
        if classes >= 5:
            best = np.argpartition(-scores, 4, axis=1)[:, :5]  # the five best, in any order
            top5 += int((best == expected[:, None]).any(axis=1).sum())
    result = {"top1": top1 / len(logits)}
    if classes >= 5:
        result["top5"] = top5 / len(logits)
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
    class_scores = candidate.ndim == 2 and candidate.shape[1] > 1
    if math.prod(candidate.shape[1:]) == 1:
        # one value per sample (a score, a probability): the cosine of the columns, over all samples
        cand, ref = (np.asarray(a, dtype=np.float64).reshape(1, -1) for a in (candidate, reference))
        cosine = _cosines(cand, ref)
        return {
            "top1_agreement": None,
            "cosine_similarity": float(cosine.mean()),
            "max_abs_error": float(np.abs(cand - ref).max()),
        }
    cosine_sum, agreeing, max_error = 0.0, 0, 0.0
    for rows in row_blocks(candidate):  # a block at a time: the outputs may be disk-backed
        cand = np.asarray(candidate[rows], dtype=np.float64).reshape(rows.stop - rows.start, -1)
        ref = np.asarray(reference[rows], dtype=np.float64).reshape(rows.stop - rows.start, -1)
        cosine_sum += float(_cosines(cand, ref).sum())
        if class_scores:
            agreeing += int((cand.argmax(axis=1) == ref.argmax(axis=1)).sum())
        max_error = float(np.maximum(max_error, np.abs(cand - ref).max()))  # NaN stays NaN
    samples = len(candidate)
    return {
        "top1_agreement": agreeing / samples if class_scores else None,
        "cosine_similarity": cosine_sum / samples,
        "max_abs_error": max_error,
    }


def _cosines(cand: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The cosine of each row pair. An engine that outputs zeros where the original does not is as
    far from it as can be: 0, not 1; non-finite norms give NaN, reported as null and judged
    unfaithful."""
    cand_norm, ref_norm = np.linalg.norm(cand, axis=1), np.linalg.norm(ref, axis=1)
    both_zero = (cand_norm == 0) & (ref_norm == 0)
    return np.where(
        (cand_norm > 0) & (ref_norm > 0),
        (cand * ref).sum(axis=1) / np.maximum(cand_norm * ref_norm, 1e-300),
        np.where(both_zero, 1.0, np.where(np.isfinite(cand_norm) & np.isfinite(ref_norm), 0.0, np.nan)),
    )


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


def count_non_finite(outputs: np.ndarray) -> int | None:
    """How many of the values are NaN or ±infinity: 0 for integer and boolean outputs, None for
    outputs that are not numbers (strings). An engine that overflows on some samples can still
    average to a fine accuracy, and serving it sends those values to clients (as "NaN" in JSON):
    the report says how many there are. Never raises: a diagnostic never fails the job it diagnoses.
    """
    try:
        if outputs.dtype.kind in "biu":
            return 0
        if outputs.dtype.kind not in "fc":
            return None
        if outputs.ndim == 0:
            return int(not np.isfinite(outputs))
        return sum(
            int(np.asarray(outputs[rows]).size - np.count_nonzero(np.isfinite(outputs[rows])))
            for rows in row_blocks(outputs)
        )
    except (TypeError, ValueError, AttributeError):
        return None


def accuracy_report(
    outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None
) -> dict[str, Any]:
    """Accuracy against labels where there are labels; fidelity against the reference where given.

    `non_finite_outputs` counts the NaN and ±infinity values of the scored output over the whole
    evaluation set (0 when there are none), which are never silently averaged into the metrics.
    A metric that does not apply, or cannot be computed on these outputs, is named under
    `unavailable` instead of failing the job.
    """
    report: dict[str, Any] = {"samples": len(outputs), "non_finite_outputs": count_non_finite(outputs)}
    try:
        if labels is not None:
            report.update(classification_accuracy(outputs, labels))
        if reference is not None:
            with np.errstate(all="ignore"):
                report["fidelity"] = _json_safe(fidelity(outputs, reference))
    except EngineError as exc:  # a metric that does not apply never fails the job
        report["unavailable"] = exc.detail
    except (ValueError, IndexError, TypeError) as exc:  # TypeError: outputs that are not numbers
        report["unavailable"] = f"{type(exc).__name__}: {exc}"
    return report
