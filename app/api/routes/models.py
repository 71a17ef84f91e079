"""/v1/models: upload, list, inspect, download and delete ONNX models."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from app.api.deps import ServingDep, get_db, get_settings_dep, get_store_dep
from app.api.schemas import NAME_PATTERN, AutotuneCreate, JobOut, ModelOut, SensitivityCreate
from app.api.uploads import commit_upload, receive_upload
from app.api.views import job_out, model_out
from app.core.errors import ApiError, from_engine_error
from app.core.orm import EngineRecord, JobRecord, JobStatus, ModelRecord, new_id
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.services.jobs import create_autotune_job, create_sensitivity_job
from app.services.records import get_model_record
from engines.errors import InvalidModelError
from engines.ingest.model import inspect_model, unpack_upload, write_normalized

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("", status_code=201, response_model=ModelOut, summary="Upload an ONNX model")
def upload_model(
    file: Annotated[
        UploadFile, File(description="an .onnx file, or a .zip of one .onnx plus its data files")
    ],
    name: Annotated[str | None, Form(max_length=255, pattern=NAME_PATTERN)] = None,
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
    session: Session = Depends(get_db),
) -> ModelOut:
    """Validate the model fully (ONNX checker, shape inference, external-data paths) and store it.

    Nothing is stored unless every check passes.
    """
    with receive_upload(file, settings.max_upload_bytes, "model.onnx") as received:
        workdir = received.path.parent.parent
        try:
            onnx_path = unpack_upload(
                received.path, workdir / "bundle", max_unpacked_bytes=settings.max_unpacked_bytes
            )
            info = inspect_model(onnx_path)
            normalized_dir = workdir / "normalized"
            write_normalized(onnx_path, normalized_dir)
        except InvalidModelError as exc:
            raise from_engine_error(exc) from exc
        model_id = new_id("mdl")
        prefix = f"models/{model_id}"
        record = ModelRecord(
            id=model_id,
            name=name or Path(received.filename).stem,
            filename=received.filename,
            sha256=received.sha256,
            size_bytes=received.size_bytes,
            artifact_prefix=prefix,
            info=info.to_dict(),
        )
        commit_upload(session, store, prefix, normalized_dir, record)
    return model_out(record)


@router.get("", response_model=list[ModelOut], summary="List models")
def list_models(session: Session = Depends(get_db)) -> list[ModelOut]:
    records = session.scalars(select(ModelRecord).order_by(ModelRecord.created_at.desc()))
    return [model_out(record) for record in records]


@router.get("/{model_id}", response_model=ModelOut, summary="Describe a model")
def get_model(model_id: str, session: Session = Depends(get_db)) -> ModelOut:
    return model_out(get_model_record(session, model_id))


@router.get(
    "/{model_id}/download",
    summary="Download the stored model",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}, "application/zip": {}}}},
)
def download_model(
    model_id: str, session: Session = Depends(get_db), store: ArtifactStore = Depends(get_store_dep)
) -> Response:
    """The model as stored (`.onnx`), or a `.zip` with its external-data file for models over 2 GiB."""
    record = get_model_record(session, model_id)
    model_dir = store.local_path(record.artifact_prefix)
    files = sorted(path for path in model_dir.iterdir() if path.is_file())
    stem = Path(record.filename).stem
    if len(files) == 1:
        return FileResponse(files[0], media_type="application/octet-stream", filename=f"{stem}.onnx")
    handle, bundle_path = tempfile.mkstemp(suffix=".zip")
    os.close(handle)
    with zipfile.ZipFile(bundle_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as bundle:
        for path in files:
            bundle.write(path, arcname=path.name)
    return FileResponse(
        bundle_path,
        media_type="application/zip",
        filename=f"{stem}.zip",
        background=BackgroundTask(os.unlink, bundle_path),
    )


@router.delete("/{model_id}", status_code=204, summary="Delete a model, its jobs and engines")
def delete_model(
    model_id: str,
    serving: ServingDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    record = get_model_record(session, model_id)
    jobs = session.scalars(select(JobRecord).where(JobRecord.model_id == model_id)).all()
    active = [job.id for job in jobs if job.status in JobStatus.ACTIVE]
    if active:
        raise ApiError(
            409, "model_in_use", f"jobs {active} are still running on this model; cancel them first"
        )
    prefixes = [record.artifact_prefix] + [f"jobs/{job.id}" for job in jobs]
    engine_ids = session.scalars(select(EngineRecord.id).where(EngineRecord.model_id == model_id)).all()
    for job in jobs:
        session.delete(job)
    session.delete(record)
    session.commit()
    serving.forget(*engine_ids)
    for prefix in prefixes:
        store.delete(prefix)
    return Response(status_code=204)


@router.post(
    "/{model_id}/sensitivity",
    status_code=202,
    response_model=JobOut,
    summary="Start a pruning sensitivity analysis",
)
def start_sensitivity(
    model_id: str,
    body: SensitivityCreate,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
) -> JobOut:
    """Prune each Conv/Linear layer alone at each ratio and measure the drop; a job like any other.

    The result: `GET /v1/jobs/{id}/sensitivity` (JSON, or `?format=png` for the plot); a prune recipe
    can take its per-layer ratios with `{"ratios_from_sensitivity": {"job_id": …, "max_drop": 0.01}}`.
    """
    job = create_sensitivity_job(
        session,
        settings,
        model_id=model_id,
        dataset_id=body.dataset_id,
        method=body.method,
        ratios=body.ratios,
    )
    return job_out(session, job)


@router.post(
    "/{model_id}/optimize",
    status_code=202,
    response_model=JobOut,
    summary="Auto-optimize: the fastest engine within an accuracy budget",
)
def start_autotune(
    model_id: str,
    body: AutotuneCreate,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> JobOut:
    """Searches backend × precision × calibration × pruning, cheapest candidates first, each screened
    on a slice of the evaluation set and timed beside the original before a full evaluation; keeps
    the time budget (a time-out returns the best found so far). The job's `stage` shows the current
    best. The result: `GET /v1/jobs/{id}/autotune` (JSON, `?format=md` for the table, `?format=png`
    for the plot of cost against accuracy drop with the Pareto front); the chosen engine and the
    other front members are the job's engines, the chosen one first (with `alias` when given).
    """
    job = create_autotune_job(
        session,
        settings,
        store,
        model_id=model_id,
        request=body.to_config(),
        evaluation_dataset_id=body.evaluation_dataset_id,
        calibration_dataset_id=body.calibration_dataset_id,
        alias=body.alias,
    )
    return job_out(session, job)
