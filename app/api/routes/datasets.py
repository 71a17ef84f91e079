"""/v1/datasets: upload calibration and evaluation sets: `.npz` arrays, or a `.zip` of images in
class folders turned into arrays by a stored preprocessing spec (engines.ingest.images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.api.deps import PrincipalDep, ProjectDep, get_db, get_settings_dep, get_store_dep
from app.api.schemas import NAME_PATTERN, DatasetOut
from app.api.uploads import commit_upload, receive_upload
from app.api.views import dataset_out
from app.core.audit import audit
from app.core.errors import ApiError, from_engine_error
from app.core.orm import DatasetRecord, JobRecord, JobStatus, new_id
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.services.records import get_dataset_record
from engines.errors import InvalidDatasetError
from engines.ingest.datasets import DatasetInfo, inspect_arrays, inspect_npz
from engines.ingest.images import ImagePreprocessing, is_image_folder_archive, read_image_folder

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DATASET_FILENAME = "dataset.npz"


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload a dataset (.npz or images)")
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(
            description="an .npz with one array per model input (keyed by input name) and optional "
            "'labels'; or a .zip of images, in class folders (cat/001.jpg: labelled) or not"
        ),
    ],
    principal: PrincipalDep,
    name: Annotated[str | None, Form(max_length=255, pattern=NAME_PATTERN)] = None,
    preprocessing: Annotated[
        str | None,
        Form(
            max_length=4096,
            description="images only: JSON, any of size [h, w], resize, resize_size, interpolation, "
            "mean, std (0-1 scale), channel_order (RGB/BGR/GRAY), layout (NCHW/NHWC), dtype; "
            "default: torchvision's ImageNet evaluation transform",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        Form(
            max_length=1_000_000,
            description="images only: JSON list of class folder names in the model's output order "
            "(default: the folders, sorted)",
        ),
    ] = None,
    input_name: Annotated[
        str | None, Form(max_length=255, pattern=NAME_PATTERN, description="images only: the array's name")
    ] = None,
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
    session: Session = Depends(get_db),
) -> DatasetOut:
    """Read every array without unpickling anything (or decode every image with the spec), check
    samples, dtypes and labels, and store it as an `.npz`."""
    image_options = {"preprocessing": preprocessing, "classes": classes, "input_name": input_name}
    with receive_upload(file, settings, DATASET_FILENAME) as received:
        dataset_id = new_id("ds")
        prefix = f"datasets/{dataset_id}"
        staged = received.subdir("stored")
        try:
            if is_image_folder_archive(received.path):
                info = _store_image_folder(
                    received.path, staged / DATASET_FILENAME, settings, **image_options
                )
            else:
                given = sorted(option for option, value in image_options.items() if value is not None)
                if given:
                    raise InvalidDatasetError(
                        f"{given} apply to a .zip of images; an .npz holds its arrays as they are",
                        code="invalid_preprocessing",
                    )
                info = inspect_npz(received.path, max_unpacked_bytes=settings.max_unpacked_bytes).to_dict()
                shutil.move(received.path, staged / DATASET_FILENAME)
        except InvalidDatasetError as exc:
            raise from_engine_error(exc) from exc
        record = DatasetRecord(
            id=dataset_id,
            project_id=principal.project_id,
            name=name or Path(received.filename).stem,
            filename=received.filename,
            sha256=received.sha256,
            size_bytes=received.size_bytes,
            artifact_key=f"{prefix}/{DATASET_FILENAME}",
            info=info,
        )
        commit_upload(session, store, received, prefix, staged, record)
    audit(principal, "dataset.create", record.id, name=record.name, size_bytes=record.size_bytes)
    return dataset_out(record)


def _store_image_folder(
    archive: Path,
    npz_path: Path,
    settings: Settings,
    *,
    preprocessing: str | None,
    classes: str | None,
    input_name: str | None,
) -> dict[str, Any]:
    """Decode the images with the spec into arrays, check them like any `.npz`, and write the
    `.npz` every job reads; the spec and class names are kept in the dataset's description."""
    spec = ImagePreprocessing.from_dict(_json_form(preprocessing, "preprocessing", dict) or {})
    class_names = _json_form(classes, "classes", list)
    folder = read_image_folder(
        archive,
        spec,
        max_unpacked_bytes=settings.max_unpacked_bytes,
        max_images=settings.max_dataset_images,
        input_name=input_name or "input",
        classes=class_names,
    )
    arrays = folder.npz_arrays()
    info: DatasetInfo = inspect_arrays(arrays)
    np.savez(npz_path, **arrays)
    return {**info.to_dict(), "image_folder": folder.describe()}


def _json_form(value: str | None, field: str, kind: type) -> Any:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise InvalidDatasetError(f"{field} is not valid JSON: {exc}", code="invalid_preprocessing") from exc
    if not isinstance(parsed, kind):
        raise InvalidDatasetError(f"{field} must be a JSON {kind.__name__}", code="invalid_preprocessing")
    return parsed


@router.get("", response_model=list[DatasetOut], summary="List datasets")
def list_datasets(project: ProjectDep, session: Session = Depends(get_db)) -> list[DatasetOut]:
    records = session.scalars(
        select(DatasetRecord)
        .where(DatasetRecord.project_id == project)
        .order_by(DatasetRecord.created_at.desc())
    )
    return [dataset_out(record) for record in records]


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Describe a dataset")
def get_dataset(dataset_id: str, project: ProjectDep, session: Session = Depends(get_db)) -> DatasetOut:
    return dataset_out(get_dataset_record(session, dataset_id, project))


@router.get(
    "/{dataset_id}/download",
    summary="Download the stored dataset",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_dataset(
    dataset_id: str,
    project: ProjectDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> FileResponse:
    record = get_dataset_record(session, dataset_id, project)
    return FileResponse(
        store.local_path(record.artifact_key),
        media_type="application/octet-stream",
        filename=f"{Path(record.filename).stem}.npz",
    )


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset")
def delete_dataset(
    dataset_id: str,
    principal: PrincipalDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """Finished jobs keep their results; a dataset that a queued or running job reads is refused (409)."""
    record = get_dataset_record(session, dataset_id, principal.project_id)
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
    audit(principal, "dataset.delete", dataset_id)
    return Response(status_code=204)
