"""Uploads deduplicated by content within a project: the same file with the same options is the
same record.

`optiforge optimize` used to upload its model and datasets on every run (seven "digits" models and
twelve identical datasets after a few runs). An upload now computes its key, the sha256 of the
file's sha256 and of the options that change what is stored (a model's `batch_axis` or `opset`; a
dataset's preprocessing, classes, input name, tokenizer and tokenization), and when a usable record
of the caller's project has that key, the route returns it (200, `deduplicated: true`) and stores
nothing. The name is no part of the key: it labels a record, it does not change it. A record that
failed (a conversion or decoding that did not finish) is never matched: the upload makes a new one.

Two identical uploads at the same instant may both store a record (the key is indexed, not unique:
rows made before keys existed hold duplicates already); the next upload matches the older one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, BinaryIO, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.artifacts.manifest import stream_sha256
from app.core.orm import DatasetRecord, ModelRecord, ModelStatus
from app.services.datasets import state_of
from app.services.jobs import conversion_jobs, model_state

Record = TypeVar("Record", ModelRecord, DatasetRecord)


def _canonical(value: str | None) -> Any:
    """A JSON form field as a value (so `{"a": 1}` and `{ "a":1 }` are the same option); text that is
    not JSON stays text (its upload is refused anyway, and never stored under this key)."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


def upload_key(file_sha256: str, kind: str, options: dict[str, Any]) -> str:
    """The hex key of an upload: its file and the options that change what is stored."""
    document = {"kind": kind, "sha256": file_sha256, "options": options}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()


def model_key(file_sha256: str, *, batch_axis: str | None, opset: int | None) -> str:
    return upload_key(file_sha256, "model", {"batch_axis": _canonical(batch_axis), "opset": opset})


def dataset_key(file_sha256: str, *, form: dict[str, str | None], tokenizer_sha256: str | None) -> str:
    """`form`: the upload's option fields as sent (JSON ones compared as values)."""
    options = {name: _canonical(value) for name, value in form.items()}
    return upload_key(file_sha256, "dataset", {**options, "tokenizer": tokenizer_sha256})


def file_sha256(handle: BinaryIO) -> str:
    """The sha256 of a spooled form file, read from its start and rewound for whoever reads it next."""
    handle.seek(0)
    digest = stream_sha256(handle)
    handle.seek(0)
    return digest


def _with_key(session: Session, record_type: type[Record], project_id: str, key: str) -> list[Record]:
    """The project's records of `record_type` with this key, oldest first."""
    return list(
        session.scalars(
            select(record_type)
            .where(record_type.project_id == project_id, record_type.dedup_key == key)
            .order_by(record_type.created_at, record_type.id)
        ).all()
    )


def existing_model(session: Session, project_id: str, key: str) -> ModelRecord | None:
    """The project's oldest model with this key that is ready or still converting (None: upload it)."""
    records = _with_key(session, ModelRecord, project_id, key)
    if not records:
        return None
    conversions = conversion_jobs(session, [record.id for record in records])
    for record in records:
        if model_state(record, conversions.get(record.id)).status != ModelStatus.FAILED:
            return record
    return None


def existing_dataset(session: Session, project_id: str, key: str) -> DatasetRecord | None:
    """The project's oldest dataset with this key that is ready or still processing (None: upload it)."""
    for record in _with_key(session, DatasetRecord, project_id, key):
        state = state_of(session, record)
        status = record.status if state is None else state.status
        if status != "failed":
            return record
    return None
