"""Looking a record up by id within the caller's project: the row, or a 404 `<kind>_not_found`
that names what was asked for. Another project's record is a 404 too (not a 403): a key learns
nothing about what other projects hold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from sqlalchemy.orm import Session

from app.core.errors import not_found
from app.core.orm import DatasetRecord, EngineRecord, JobRecord, ModelRecord
from app.core.outages import is_storage_full
from app.core.space import DiskReserve
from app.core.store import ArtifactStore

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


def delete_records(
    session: Session,
    store: ArtifactStore,
    reserve: DiskReserve,
    records: Sequence[object],
    prefixes: Sequence[str],
    after_commit: Callable[[], None] = lambda: None,
) -> None:
    """Delete `records` (committed), call `after_commit`, then remove their files under `prefixes`;
    on a full disk too, since deleting is how space is won back.

    The rows go first: a row never points at files that are gone. When the disk is too full for
    the database to write its journal (or the store its trash folder), the data directory's reserve
    (app.core.space) is given up and the step tried once more; the reserve is written back after
    the files are gone, if there is room."""

    def commit() -> None:
        for record in records:
            session.delete(record)
        session.commit()

    _with_reserve(reserve, commit, before_retry=session.rollback)
    after_commit()
    for prefix in prefixes:
        _with_reserve(reserve, lambda prefix=prefix: store.delete(prefix))
    reserve.ensure(keep_free_bytes=reserve.size_bytes)


def _with_reserve(
    reserve: DiskReserve, step: Callable[[], None], before_retry: Callable[[], None] = lambda: None
) -> None:
    try:
        step()
    except Exception as exc:
        before_retry()
        if not (is_storage_full(exc) and reserve.release()):
            raise
        step()
