"""Looking a record up by id within the caller's project: the row, or a 404 `<kind>_not_found`
that names what was asked for. Another project's record is a 404 too (not a 403): a key learns
nothing about what other projects hold."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from app.core.errors import not_found
from app.core.orm import DatasetRecord, EngineRecord, JobRecord, ModelRecord

Record = TypeVar("Record", ModelRecord, DatasetRecord, JobRecord, EngineRecord)


def _get(session: Session, kind: type[Record], name: str, record_id: str, project_id: str) -> Record:
    record = session.get(kind, record_id)
    if record is None or record.project_id != project_id:
        raise not_found(name, record_id)
    return record


def get_model_record(session: Session, model_id: str, project_id: str) -> ModelRecord:
    return _get(session, ModelRecord, "model", model_id, project_id)


def get_dataset_record(session: Session, dataset_id: str, project_id: str) -> DatasetRecord:
    return _get(session, DatasetRecord, "dataset", dataset_id, project_id)


def get_job_record(session: Session, job_id: str, project_id: str) -> JobRecord:
    return _get(session, JobRecord, "job", job_id, project_id)


def get_engine_record(session: Session, engine_id: str, project_id: str) -> EngineRecord:
    return _get(session, EngineRecord, "engine", engine_id, project_id)
