"""Rows as the API shows them: database records turned into response schemas."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.api.schemas import BatchingIn, DatasetOut, EngineOut, JobOut, ModelOut
from app.core.orm import DatasetRecord, EngineRecord, JobRecord, ModelRecord
from app.services.jobs import ModelState, conversion_jobs, engine_ids_by_job, model_state
from engines.ingest.signature import assign_batch_axes, specs_from_dicts


def model_outs(session: Session, records: list[ModelRecord]) -> list[ModelOut]:
    """Models with their state (a converting model's conversion job decides it), in two queries."""
    conversions = conversion_jobs(session, [record.id for record in records])
    return [model_out(record, model_state(record, conversions.get(record.id))) for record in records]


def model_out(record: ModelRecord, state: ModelState | None = None) -> ModelOut:
    """`state`: from `app.services.jobs.model_state` (default: the row's own status and error)."""
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


def dataset_out(record: DatasetRecord) -> DatasetOut:
    return DatasetOut(
        id=record.id,
        name=record.name,
        filename=record.filename,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
        **record.info,
    )


def engine_out(record: EngineRecord) -> EngineOut:
    batching = (
        BatchingIn(max_batch_size=record.max_batch_size, max_queue_delay_ms=record.max_queue_delay_ms or 0.0)
        if record.max_batch_size
        else None
    )
    fields = {column.key: getattr(record, column.key) for column in EngineRecord.__table__.columns}
    return EngineOut.model_validate({**fields, "batching": batching})


def job_out(session: Session, job: JobRecord, engine_ids: list[str] | None = None) -> JobOut:
    if engine_ids is None:
        engine_ids = engine_ids_by_job(session, [job.id])[job.id]
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
    )
