"""Serving: from an engine's row to outputs, shared by the /v1 and the /v2 (Open Inference Protocol) routes.

The route decodes tensors; this module finds the engine, loads it through the pool, checks the
inputs against its signature, runs it (batched or not) and records the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.engine_pool import LoadedEngine
from app.errors import ApiError
from app.orm import EngineRecord, ModelRecord
from app.store import ArtifactStore
from engines.batching import BatchingConfig, InferResult
from engines.errors import EngineError
from engines.signature import validate_feeds


@dataclass(frozen=True)
class ServedEngine:
    """What serving needs from an engine's row, detached from the database session."""

    id: str
    model_id: str
    backend: str
    path: Path
    batching: BatchingConfig | None

    @classmethod
    def of(cls, record: EngineRecord, store: ArtifactStore) -> ServedEngine:
        batching = (
            BatchingConfig(record.max_batch_size, record.max_queue_delay_ms or 0.0)
            if record.max_batch_size
            else None
        )
        path = store.local_path(f"{record.artifact_prefix}/{record.engine_file}")
        return cls(record.id, record.model_id, record.backend, path, batching)


def find_engine(session: Session, name: str, version: str | None = None) -> EngineRecord:
    """The engine a client names: an engine id, an alias, or a model id with an engine id as version.

    A model id without a version means the model's newest engine.
    """
    record = session.get(EngineRecord, name) or session.scalar(
        select(EngineRecord).where(EngineRecord.alias == name)
    )
    if record is not None:
        if version not in (None, "", record.id):
            raise ApiError(
                404, "version_not_found", f"'{name}' has one version, '{record.id}', not '{version}'"
            )
        return record
    if session.get(ModelRecord, name) is not None:
        engines = model_engines(session, name)
        if not version and engines:
            return engines[-1]
        for engine in engines:
            if engine.id == version:
                return engine
        detail = (
            f"model '{name}' has no engine '{version}'" if version else f"model '{name}' has no engines yet"
        )
        raise ApiError(404, "version_not_found", detail)
    raise ApiError(404, "model_not_found", f"no engine, alias or model named '{name}'")


def model_engines(session: Session, model_id: str) -> list[EngineRecord]:
    """A model's engines, oldest first: the versions `/v2/models/{model_id}` serves."""
    query = select(EngineRecord).where(EngineRecord.model_id == model_id).order_by(EngineRecord.created_at)
    return list(session.scalars(query))


def load(state: Any, engine: ServedEngine) -> LoadedEngine:
    """The engine loaded in this process (BackendUnavailableError on a node that cannot run it)."""
    try:
        return state.engine_pool.get(engine.id, engine.backend, engine.path, engine.batching)
    except EngineError as exc:
        state.metrics.inference_errors.labels(engine.id, exc.code).inc()
        raise


def infer(state: Any, engine: ServedEngine, feeds: Mapping[str, np.ndarray], protocol: str) -> InferResult:
    """Validate `feeds` against the engine's inputs and run them; errors are EngineErrors with a code."""
    loaded = load(state, engine)
    try:
        validate_feeds(dict(feeds), loaded.runner.input_metadata())
        result = loaded.infer(feeds)
    except EngineError as exc:
        state.metrics.inference_errors.labels(engine.id, exc.code).inc()
        raise
    state.metrics.observe_inference(engine.id, protocol, result)
    return result
