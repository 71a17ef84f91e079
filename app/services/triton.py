"""Engines named by id or alias, exported as one Triton model repository (a zip).

The rows say what the exporter (`engines.export.triton`) cannot know by itself: each engine's
signature (its model's), its dynamic batching, the batch sizes it was measured at, the runtime that
saved it and, for a TensorRT plan, the GPU it was built on (`compute_capability`, `gpu_model` in its
build metadata or hardware record, as the TensorRT backend writes them). The engine files are read
where the artifact store keeps them, never copied in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.core.errors import ApiError
from app.core.orm import EngineRecord
from app.core.store import ArtifactStore
from app.services.records import get_model_record
from app.serving.inference import find_engine
from engines.errors import EngineError
from engines.export.triton import GpuTarget, TritonEngine, write_repository_zip
from engines.ingest.signature import specs_from_dicts
from engines.measure.latency import measured_batch_sizes

#: The build-metadata key holding the version of the runtime that saved each backend's engines.
_RUNTIME_KEYS = {"onnxruntime-cpu": "onnxruntime", "tensorrt": "tensorrt", "openvino-cpu": "openvino"}


@dataclass(frozen=True)
class TritonExport:
    path: Path  # the zip
    model_names: list[str]  # in the order the engines were named


def engine_by_id_or_alias(session: Session, name: str, project_id: str) -> EngineRecord:
    """The engine `name` is the id or the alias of (a 404 `engine_not_found` otherwise). A model id,
    which the inference protocol also takes, is refused: an export names the engine it ships."""
    try:
        record = find_engine(session, name, project_id=project_id)
    except ApiError:
        record = None
    if record is None or name not in (record.id, record.alias):
        raise ApiError(404, "engine_not_found", f"no engine with id or alias '{name}'")
    return record


def triton_engine(session: Session, store: ArtifactStore, record: EngineRecord) -> TritonEngine:
    """What the exporter needs from an engine's row: its alias (else its id) as the model's name."""
    model = get_model_record(session, record.model_id, record.project_id)
    key = f"{record.artifact_prefix}/{record.engine_file}"
    try:
        engine_path = store.local_path(key)
    except FileNotFoundError:
        raise EngineError(
            f"engine '{record.id}': its file '{key}' is not in the artifact store", code="engine_file_missing"
        ) from None
    built = {**record.hardware, **record.build_info}
    capability = built.get("compute_capability") if record.backend == "tensorrt" else None
    runtime = _RUNTIME_KEYS.get(record.backend)
    return TritonEngine(
        name=record.alias or record.id,
        engine_id=record.id,
        backend=record.backend,
        precision=record.precision,
        engine_path=engine_path,
        inputs=tuple(specs_from_dicts(model.info["inputs"])),
        outputs=tuple(specs_from_dicts(model.info["outputs"])),
        max_batch_size=_max_batch_size(record),
        dynamic_batching_delay_ms=(record.max_queue_delay_ms or 0.0) if record.max_batch_size else None,
        built_with=f"{runtime} {built[runtime]}" if runtime in built else None,
        gpu=GpuTarget(str(capability), built.get("gpu_model")) if capability else None,
    )


def export_triton_zip(
    session: Session, store: ArtifactStore, names: Sequence[str], directory: Path, *, project_id: str
) -> TritonExport:
    """Write the repository of the named engines as `directory/model_repository.zip`; the caller owns
    `directory` (the API streams the zip from a temporary one, then removes it)."""
    records = [engine_by_id_or_alias(session, name, project_id) for name in names]
    engines = [triton_engine(session, store, record) for record in records]
    path = write_repository_zip(engines, directory / "model_repository.zip")
    return TritonExport(path, [engine.name for engine in engines])


def _max_batch_size(record: EngineRecord) -> int:
    """Triton's max_batch_size: the dynamic batcher's when it is on, else the largest batch the
    engine was measured at (the recipe's batch sizes, all it is known to run); never above the top
    of a TensorRT plan's optimization profile, which the plan cannot exceed."""
    measured = measured_batch_sizes(record.metrics.get("latency"))
    wanted = record.max_batch_size or max(measured, default=1)
    top = _profile_top(record.build_info.get("optimization_profile"))
    return max(1, min(wanted, top)) if top else wanted


def _profile_top(profile: Any) -> int | None:
    """The largest batch (dim 0 of the max shapes) every input of an optimization profile takes:
    `{input: [min shape, opt shape, max shape]}`, as the TensorRT backend records it."""
    if not isinstance(profile, dict):
        return None
    tops = []
    for shapes in profile.values():
        top = shapes[2] if isinstance(shapes, list | tuple) and len(shapes) == 3 else None
        if isinstance(top, list | tuple) and top and isinstance(top[0], int):
            tops.append(top[0])
    return min(tops, default=None)
