"""Whether a dataset can be used. A large image folder is decoded by a `decode_images` job
(workers.handlers.run_decode_images) while its dataset is `processing`; the job decides, as a
convert job decides its model's state (app.services.jobs.model_state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import ApiError
from app.core.orm import DatasetRecord, DatasetStatus, JobKind, JobRecord, JobStatus, new_id


@dataclass(frozen=True)
class DatasetState:
    """As the API shows it: `status` (DatasetStatus), `error` when it failed, and the job that
    decodes it (None for a dataset stored at upload)."""

    status: str
    error: dict[str, Any] | None
    processing_job_id: str | None


def decode_jobs(session: Session, dataset_ids: list[str]) -> dict[str, JobRecord]:
    """The decode_images job of each dataset that has one, in one query."""
    if not dataset_ids:
        return {}
    rows = session.scalars(
        select(JobRecord)
        .where(JobRecord.evaluation_dataset_id.in_(dataset_ids), JobRecord.kind.in_(JobKind.DATASET_KINDS))
        .order_by(JobRecord.created_at, JobRecord.id)
    )
    return {job.evaluation_dataset_id: job for job in rows if job.evaluation_dataset_id}


def dataset_state(record: DatasetRecord, job: JobRecord | None) -> DatasetState:
    """A `processing` row whose job ended without the worker saying so (cancelled while queued,
    failed by the sweeper, a broker that was down) is `failed`, with the job's error."""
    job_id = job.id if job is not None else None
    if record.status != DatasetStatus.PROCESSING:
        return DatasetState(record.status, record.error, job_id)
    if job is None:
        error = {"code": "decoding_failed", "detail": "the dataset has no decoding job; upload it again"}
        return DatasetState(DatasetStatus.FAILED, error, None)
    if job.status == JobStatus.CANCELLED:
        return DatasetState(DatasetStatus.FAILED, DatasetStatus.cancelled_error(job.id), job_id)
    if job.status == JobStatus.FAILED:
        error = job.error or {"code": "decoding_failed", "detail": "the decoding job failed"}
        return DatasetState(DatasetStatus.FAILED, error, job_id)
    return DatasetState(DatasetStatus.PROCESSING, None, job_id)


def processing_states(session: Session, records: list[DatasetRecord]) -> dict[str, DatasetState]:
    """The state of each dataset of `records` still `processing`, from its job (one query)."""
    processing = [record for record in records if record.status == DatasetStatus.PROCESSING]
    jobs = decode_jobs(session, [record.id for record in processing])
    return {record.id: dataset_state(record, jobs.get(record.id)) for record in processing}


def state_of(session: Session, record: DatasetRecord) -> DatasetState:
    return dataset_state(record, decode_jobs(session, [record.id]).get(record.id))


def require_dataset_ready(session: Session, record: DatasetRecord) -> None:
    """A dataset whose images are still being decoded, or whose decoding failed, has no arrays:
    a job that would read it is a 409 `dataset_not_ready` that says which, and why."""
    if record.status == DatasetStatus.READY:
        return
    state = state_of(session, record)
    if state.status == DatasetStatus.PROCESSING:
        raise ApiError(
            409,
            "dataset_not_ready",
            f"dataset '{record.id}' is still being decoded (job '{state.processing_job_id}'); wait "
            "until its status is ready",
            dataset_status=state.status,
            processing_job_id=state.processing_job_id,
        )
    error = state.error or {}
    raise ApiError(
        409,
        "dataset_not_ready",
        f"dataset '{record.id}' failed to decode ({error.get('code', 'decoding_failed')}: "
        f"{error.get('detail', '')}); fix the images and upload them again",
        dataset_status=state.status,
        processing_job_id=state.processing_job_id,
        error=error,
    )


def new_decode_job(
    project_id: str, dataset_id: str, options: dict[str, Any], kind: str = JobKind.DECODE_IMAGES
) -> JobRecord:
    """The job that decodes a stored image folder (`DatasetRecord.SOURCE_FILE`) with `options`
    (preprocessing, classes, input_name, as uploaded). A job like any other: listed, cancellable,
    counted in flight; its dataset is its evaluation_dataset_id, so the dataset cannot be deleted
    while it runs. `kind`: tokenize_texts for a long JSONL of texts (options: the resolved
    tokenization, classes, the model it is for)."""
    return JobRecord(
        id=new_id("job"),
        project_id=project_id,
        model_id=None,
        kind=kind,
        evaluation_dataset_id=dataset_id,
        recipe=options,
        messages=[],
    )
