"""Is the fused model the same model? Its outputs against the unfused model's, in real ONNX Runtime
sessions, on the job's own data (evaluation, else calibration) or on inputs made to look like a
transformer's (token ids inside the embedding table, a padding mask with padding in it).

Fusion must never change outputs beyond FUSION_MIN_COSINE in fp32: the cosine is taken per sample
and per output, and the worst one decides; integer outputs (ids passed through) must be equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.ingest.datasets import Dataset
from engines.ingest.embeddings import embedding_rows
from engines.ingest.signature import TensorSpec

#: The worst per-sample cosine a fused model may have against the unfused one (fp32).
FUSION_MIN_COSINE = 0.9999
#: Samples compared: enough to see a mask or a position handled wrongly, few enough to take a second.
MAX_SAMPLES = 16
#: A dynamic dim other than the batch, in generated inputs (a sequence length).
GENERATED_LENGTH = 16
GENERATED_BATCH = 2


@dataclass(frozen=True)
class FidelityCheck:
    min_cosine: float
    max_abs_error: float
    samples: int
    data: str  # evaluation | calibration | generated
    worst_output: str

    @property
    def faithful(self) -> bool:
        return bool(np.isfinite(self.min_cosine)) and self.min_cosine >= FUSION_MIN_COSINE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "threshold": FUSION_MIN_COSINE, "faithful": self.faithful}


def generated_batches(
    model_path: Path, specs: Sequence[TensorSpec], *, batch_size: int = GENERATED_BATCH, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Inputs shaped like a transformer's: ids inside the table they index, masks with padding,
    token types zero, positions counting up; floats from a normal distribution."""
    import onnx

    tables = embedding_rows(onnx.load(str(model_path), load_external_data=False))
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        batch = spec.batch_dim if isinstance(spec.batch_dim, int) else batch_size
        dims = [
            batch if axis == spec.batch_axis else dim if isinstance(dim, int) else GENERATED_LENGTH
            for axis, dim in enumerate(spec.shape)
        ]
        dtype = np.dtype(spec.dtype)
        lowered = spec.name.lower()
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(dims, dtype=dtype)
        elif "mask" in lowered:
            mask = np.ones(dims, dtype=dtype)
            if mask.ndim >= 2 and mask.shape[0] > 1 and mask.shape[-1] > 2:
                mask[1:, -(mask.shape[-1] // 4) :] = 0  # padding at the end of the later rows
            feeds[spec.name] = mask
        elif "type" in lowered or "segment" in lowered:
            feeds[spec.name] = np.zeros(dims, dtype=dtype)
        elif "position" in lowered and dims:
            feeds[spec.name] = np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
        else:
            rows = tables.get(spec.name) or 2
            feeds[spec.name] = rng.integers(0, rows, size=dims).astype(dtype)
    return [feeds]


def dataset_batches(specs: Sequence[TensorSpec], data: Dataset) -> list[dict[str, np.ndarray]]:
    """Up to MAX_SAMPLES samples of the dataset, in batches its static batch dim (if any) allows."""
    static = [spec.batch_dim for spec in specs if spec.has_static_batch()]
    count = min(MAX_SAMPLES, data.samples)
    size = int(static[0]) if static else min(8, count)
    count = max(size, count - count % size)
    return [data.feeds(np.arange(start, min(start + size, count))) for start in range(0, count, size)]


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosines(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    rows = candidate.shape[0] if candidate.ndim >= 2 else 1
    cand = np.asarray(candidate, dtype=np.float64).reshape(rows, -1)
    ref = np.asarray(reference, dtype=np.float64).reshape(rows, -1)
    norms = np.linalg.norm(cand, axis=1) * np.linalg.norm(ref, axis=1)
    both_zero = (np.linalg.norm(cand, axis=1) == 0) & (np.linalg.norm(ref, axis=1) == 0)
    return np.where(both_zero, 1.0, (cand * ref).sum(axis=1) / np.maximum(norms, 1e-300))


def compare_outputs(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str]
) -> tuple[float, float, str]:
    """(worst per-sample cosine, largest absolute error, the output where the cosine was worst)."""
    worst, worst_name, max_error = 1.0, "", 0.0
    for name, ref, cand in zip(names, reference, candidate, strict=True):
        if ref.shape != cand.shape:
            return 0.0, float("inf"), name
        if ref.size == 0:
            continue
        if ref.dtype.kind != "f":
            cosine = 1.0 if np.array_equal(ref, cand) else 0.0
        else:
            cosine = float(np.min(_cosines(cand, ref)))
            max_error = max(max_error, float(np.abs(cand.astype(np.float64) - ref).max()))
        if not cosine >= worst:  # NaN is worst
            worst, worst_name = cosine, name
    return worst, max_error, worst_name


def check_fidelity(
    unfused: Path,
    fused: Path,
    batches: list[dict[str, np.ndarray]],
    data: str,
    *,
    threads: int | None = None,
) -> FidelityCheck:
    """Both models in ONNX Runtime sessions on the same batches; the worst output decides."""
    reference_session, fused_session = _session(unfused, threads), _session(fused, threads)
    names = [output.name for output in reference_session.get_outputs()]
    worst, max_error, worst_name, samples = 1.0, 0.0, "", 0
    for feeds in batches:
        cosine, error, name = compare_outputs(
            reference_session.run(None, feeds), fused_session.run(names, feeds), names
        )
        samples += len(next(iter(feeds.values()))) if feeds else 0
        max_error = max(max_error, error)
        if not cosine >= worst:
            worst, worst_name = cosine, name
    return FidelityCheck(worst, max_error, samples, data, worst_name)
