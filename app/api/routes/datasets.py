"""/v1/datasets: upload `.npz` calibration and evaluation sets."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.api.deps import get_db, get_settings_dep, get_store_dep
from app.api.schemas import NAME_PATTERN, DatasetOut
from app.api.uploads import commit_upload, receive_upload
from app.api.views import dataset_out
from app.core.errors import ApiError, from_engine_error
from app.core.orm import DatasetRecord, JobRecord, JobStatus, new_id
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.services.records import get_dataset_record
from engines.errors import InvalidDatasetError
from engines.ingest.datasets import inspect_arrays, read_npz

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DATASET_FILENAME = "dataset.npz"


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload a dataset (.npz)")
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(
            description="an .npz with one array per model input (keyed by input name) and optional 'labels'"
        ),
    ],
    name: Annotated[str | None, Form(max_length=255, pattern=NAME_PATTERN)] = None,
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
    session: Session = Depends(get_db),
) -> DatasetOut:
    """Read every array without unpickling anything, check samples, dtypes and labels, and store it."""
    with receive_upload(file, settings.max_upload_bytes, DATASET_FILENAME) as received:
        try:
            info = inspect_arrays(read_npz(received.path, max_unpacked_bytes=settings.max_unpacked_bytes))
        except InvalidDatasetError as exc:
            raise from_engine_error(exc) from exc
        dataset_id = new_id("ds")
        prefix = f"datasets/{dataset_id}"
        staged = received.path.parent.parent / "stored"
        staged.mkdir()
        shutil.move(received.path, staged / DATASET_FILENAME)
        record = DatasetRecord(
            id=dataset_id,
            name=name or Path(received.filename).stem,
            filename=received.filename,
            sha256=received.sha256,
            size_bytes=received.size_bytes,
            artifact_key=f"{prefix}/{DATASET_FILENAME}",
            info=info.to_dict(),
        )
        commit_upload(session, store, prefix, staged, record)
    return dataset_out(record)


@router.get("", response_model=list[DatasetOut], summary="List datasets")
def list_datasets(session: Session = Depends(get_db)) -> list[DatasetOut]:
    records = session.scalars(select(DatasetRecord).order_by(DatasetRecord.created_at.desc()))
    return [dataset_out(record) for record in records]


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Describe a dataset")
def get_dataset(dataset_id: str, session: Session = Depends(get_db)) -> DatasetOut:
    return dataset_out(get_dataset_record(session, dataset_id))


@router.get(
    "/{dataset_id}/download",
    summary="Download the stored dataset",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_dataset(
    dataset_id: str, session: Session = Depends(get_db), store: ArtifactStore = Depends(get_store_dep)
) -> FileResponse:
    record = get_dataset_record(session, dataset_id)
    return FileResponse(
        store.local_path(record.artifact_key),
        media_type="application/octet-stream",
        filename=f"{Path(record.filename).stem}.npz",
    )


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset")
def delete_dataset(
    dataset_id: str, session: Session = Depends(get_db), store: ArtifactStore = Depends(get_store_dep)
) -> Response:
    """Finished jobs keep their results; a dataset that a queued or running job reads is refused (409)."""
    record = get_dataset_record(session, dataset_id)
    active = session.scalars(
        select(JobRecord.id).where(
            JobRecord.status.in_(JobStatus.ACTIVE),
            or_(
                JobRecord.calibration_dataset_id == dataset_id, JobRecord.evaluation_dataset_id == dataset_id
            ),
        )
    ).all()
    if active:
        raise ApiError(
            409, "dataset_in_use", f"jobs {list(active)} still use this dataset; cancel them first"
        )
    prefix = record.artifact_key.rsplit("/", 1)[0]
    session.delete(record)
    session.commit()
    store.delete(prefix)
    return Response(status_code=204)
