"""Rows as the API shows them: database records turned into response schemas.

A row may hold what no response can show: text with an unpaired surrogate ("\\ud800"), which a
JSON column stores escaped but no UTF-8 response can hold (the API took such text in until it was
refused at the door, app.api.schemas.unstorable_text). Such a row never takes a listing down: the
listing leaves it out and logs its id (`json_array`); asked for alone, it is a 409
`unrenderable_record` that says so (`shown`), not a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError
from sqlalchemy.orm import Session

from app.api.schemas import BatchingIn, DatasetOut, EngineOut, JobOut, ModelOut
from app.core.errors import ApiError
from app.core.orm import DatasetRecord, EngineRecord, JobRecord, ModelRecord
from app.services.datasets import DatasetState
from app.services.job_fields import JobContext, job_context, job_fields, lineage_of
from app.services.jobs import ModelState, conversion_jobs, model_state
from app.serving.limits import engine_max_batch
from engines.ingest.signature import assign_batch_axes, specs_from_dicts

logger = logging.getLogger(__name__)
Out = TypeVar("Out", bound=BaseModel)


def unrenderable(out: BaseModel) -> ApiError:
    """The 409 of a record that cannot be written as JSON."""
    kind = type(out).__name__.removesuffix("Out").lower()
    record_id = getattr(out, "id", "?")
    return ApiError(
        409,
        "unrenderable_record",
        f"{kind} '{record_id}' holds text that cannot be written as JSON (an unpaired UTF-16 surrogate, "
        "stored before the API refused such text); listings leave it out. Delete it, or have an "
        "administrator repair the row",
        record_id=record_id,
    )


def shown(out: Out) -> Out:
    """`out`, once it is known to serialize (ApiError 409 `unrenderable_record` if it does not)."""
    try:
        out.__pydantic_serializer__.to_json(out)
    except PydanticSerializationError:
        logger.warning("%s cannot be written as JSON", getattr(out, "id", out))
        raise unrenderable(out) from None
    return out


def json_array(outs: Iterable[BaseModel]) -> bytes:
    """A listing's body: each record serialized once; one that cannot be is left out and logged."""
    parts = []
    for out in outs:
        try:
            parts.append(out.__pydantic_serializer__.to_json(out))
        except PydanticSerializationError:
            logger.warning("left out of a listing: %s cannot be written as JSON", getattr(out, "id", out))
    return b"[" + b",".join(parts) + b"]"


def model_list(session: Session, records: list[ModelRecord]) -> bytes:
    """Models with their state (a converting model's conversion job decides it), in two queries."""
    conversions = conversion_jobs(session, [record.id for record in records])
    return json_array(_model(record, model_state(record, conversions.get(record.id))) for record in records)


def model_out(record: ModelRecord, state: ModelState | None = None) -> ModelOut:
    """`state`: from `app.services.jobs.model_state` (default: the row's own status and error)."""
    return shown(_model(record, state))


def _model(record: ModelRecord, state: ModelState | None) -> ModelOut:
    if state is None:
        state = ModelState(record.status, record.error, None)
    info = record.info or {}  # empty until a converted model is ready
    inputs = specs_from_dicts(info.get("inputs", []))  # batch axes decided afresh, for older rows too
    outputs = assign_batch_axes(inputs, specs_from_dicts(info.get("outputs", [])))
    return ModelOut(
        id=record.id,
        name=record.name,
        filename=record.filename,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
        **{
            **info,
            "status": state.status,
            "error": state.error,
            "conversion_job_id": state.conversion_job_id,
            "inputs": [spec.to_dict() for spec in inputs],
            "outputs": [spec.to_dict() for spec in outputs],
        },
    )


def dataset_list(records: Iterable[DatasetRecord], states: Mapping[str, DatasetState] | None = None) -> bytes:
    """`states`: what the decoding jobs say of the datasets still `processing` (one query for the
    page: app.services.datasets.processing_states), so a listing agrees with the single GET."""
    states = states or {}
    return json_array(_dataset(record, states.get(record.id)) for record in records)


def dataset_out(record: DatasetRecord, state: DatasetState | None = None) -> DatasetOut:
    """`state` (app.services.datasets.state_of): what its decoding job says, when it has one."""
    return shown(_dataset(record, state))


def _dataset(record: DatasetRecord, state: DatasetState | None = None) -> DatasetOut:
    status, error = (record.status, record.error) if state is None else (state.status, state.error)
    return DatasetOut(
        id=record.id,
        name=record.name,
        filename=record.filename,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
        status=status or "ready",
        error=error,
        **record.info,
    )


def engine_list(records: Iterable[EngineRecord], default_max_batch: int) -> bytes:
    return json_array(_engine(record, default_max_batch) for record in records)


def engine_out(record: EngineRecord, default_max_batch: int) -> EngineOut:
    """`default_max_batch`: the server's (app.api.deps.DefaultMaxBatchDep), from which the engine's
    own limit is derived as serving derives it."""
    return shown(_engine(record, default_max_batch))


def _engine(record: EngineRecord, default_max_batch: int) -> EngineOut:
    batching = (
        BatchingIn(max_batch_size=record.max_batch_size, max_queue_delay_ms=record.max_queue_delay_ms or 0.0)
        if record.max_batch_size
        else None
    )
    fields = {column.key: getattr(record, column.key) for column in EngineRecord.__table__.columns}
    max_batch = engine_max_batch(record.metrics, record.build_info, default_max_batch)
    lineage = lineage_of(record, None)
    return EngineOut.model_validate(
        {**fields, "batching": batching, "max_batch": max_batch, "lineage": lineage}
    )


def job_list(session: Session, jobs: list[JobRecord]) -> bytes:
    """Jobs with their engines, model names and best engine, in three queries."""
    context = job_context(session, jobs)
    return json_array(_job(job, context) for job in jobs)


def job_out(session: Session, job: JobRecord) -> JobOut:
    return shown(_job(job, job_context(session, [job])))


def _job(job: JobRecord, context: JobContext) -> JobOut:
    engine_ids = [engine.id for engine in context.engines.get(job.id, [])]
    return JobOut(
        id=job.id,
        model_id=job.model_id,
        kind=job.kind,
        calibration_dataset_id=job.calibration_dataset_id,
        evaluation_dataset_id=job.evaluation_dataset_id,
        recipe=job.recipe,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        messages=job.messages or [],
        error=job.error,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        worker=job.worker,
        heartbeat_at=job.heartbeat_at,
        engine_ids=engine_ids,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        **job_fields(job, context),
    )
