"""/v1/models: upload (ONNX, or a torch.export program converted to ONNX by a `convert` job), list,
inspect, download and delete models; start sensitivity analyses and auto-optimize on them."""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import PrincipalDep, ProjectDep, ServingDep, get_db, get_settings_dep, get_store_dep
from app.api.pagination import PAGE_RESPONSES, PageDep, fetch_page, page_response
from app.api.schemas import (
    FORM_UNSET,
    NAME_PATTERN,
    AutotuneCreate,
    ForceQuery,
    JobOut,
    ModelOut,
    SensitivityCreate,
    Sha256Query,
)
from app.api.uploads import ReceivedFile, commit_upload, receive_upload
from app.api.views import job_out, model_list, model_out
from app.api.zip_stream import zip_response
from app.core.audit import audit
from app.core.errors import ApiError, from_engine_error
from app.core.keys import Principal
from app.core.orm import ModelRecord, ModelStatus, new_id
from app.core.settings import Settings
from app.core.space import disk_reserve
from app.core.store import ArtifactStore
from app.services import deletes
from app.services.jobs import (
    ModelState,
    conversion_jobs,
    create_autotune_job,
    create_sensitivity_job,
    model_state,
    new_convert_job,
    publish_upload_job,
    require_ready,
    stage_job,
)
from app.services.records import get_model_record
from app.services.uploads_dedup import existing_model, model_key
from engines.convert.pt2_archive import (
    MAX_JSON_BYTES,
    PROGRAM_NAME,
    check_program_document,
    check_pt2_members,
    open_pt2,
)
from engines.convert.torch_export import MIN_OPSET, newest_opset
from engines.errors import EngineError, InvalidModelError
from engines.ingest.archives import is_zip_archive
from engines.ingest.model import inspect_model, unpack_upload, write_normalized

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses={
        200: {
            "model": ModelOut,
            "description": "the project already holds this file, uploaded with the same batch_axis and "
            "opset: that model, with `deduplicated: true`; nothing new is stored",
        }
    },
    summary="Upload an ONNX model or a PyTorch program",
)
def upload_model(
    file: Annotated[
        UploadFile,
        File(
            description="an .onnx file, a .zip of one .onnx plus its data files, or a torch.export "
            "program (.pt2, written by torch.export.save)"
        ),
    ],
    principal: PrincipalDep,
    response: Response,
    name: Annotated[str | None, Form(examples=FORM_UNSET, max_length=255, pattern=NAME_PATTERN)] = None,
    opset: Annotated[
        int | None,
        Form(
            examples=FORM_UNSET,
            ge=MIN_OPSET,
            description="a .pt2 only: the ONNX opset to convert to (default: the exporter's)",
        ),
    ] = None,
    batch_axis: Annotated[
        str | None,
        Form(
            examples=FORM_UNSET,
            min_length=2,
            max_length=65536,
            description='an ONNX model only: JSON {"input name": axis or null}, the dim each named input\'s '
            "samples stack along (null: none, every sample shares the input), where the inferred one "
            "(shown in `inputs`) is wrong; kept as stated",
        ),
    ] = None,
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
    session: Session = Depends(get_db),
) -> ModelOut:
    """Validate the model fully (ONNX checker, shape inference, external-data paths) and store it.

    A `.pt2` (told by its layout, whatever its name) is checked without running or unpickling
    anything in it (members, custom operators, shape expressions), stored, and converted to ONNX by
    a `convert` job: the model answers `converting` at once, then `ready` (with its signature) or
    `failed` (with `error`). Nothing is stored unless every check passes.

    The same file uploaded again to the same project, with the same batch_axis and opset, is not
    stored twice: the model it already is comes back (200, `deduplicated: true`), whatever its name
    (app.services.uploads_dedup). `GET /v1/models?sha256=` asks before uploading.
    """
    with receive_upload(file, settings, "model.onnx") as received:
        key = model_key(received.sha256, batch_axis=batch_axis, opset=opset)
        existing = existing_model(session, principal.project_id, key)
        if existing is not None:
            response.status_code = 200
            state = model_state(existing, conversion_jobs(session, [existing.id]).get(existing.id))
            return model_out(existing, state).model_copy(update={"deduplicated": True})
        kind = _upload_kind(received.path, received.filename)
        if kind == "pt2":
            if batch_axis is not None:
                raise ApiError(
                    422,
                    "invalid_batch_axis",
                    "batch_axis applies to ONNX models; a .pt2's batch dim comes from its export's dynamic "
                    "shapes: upload it without batch_axis",
                )
            return _upload_program(received, principal, name, opset, key, settings, store, session)
        if opset is not None:
            raise ApiError(
                422,
                "invalid_opset",
                "opset applies to PyTorch programs (.pt2), which are converted; an ONNX model keeps its own",
            )
        workdir = received.path.parent.parent
        try:
            if kind == "pickle":
                raise InvalidModelError(_PICKLE_REFUSED, code="pickle_refused")
            onnx_path = unpack_upload(
                received.path, workdir / "bundle", max_unpacked_bytes=settings.max_unpacked_bytes
            )
            info = inspect_model(onnx_path, scratch_dir=workdir)
            if batch_axis is not None:
                info = info.with_stated_batch_axes(batch_axis)
            normalized_dir = workdir / "normalized"
            write_normalized(onnx_path, normalized_dir)
        except InvalidModelError as exc:
            raise from_engine_error(exc) from exc
        record = _new_model_record(principal.project_id, received, name, info.to_dict(), ModelStatus.READY)
        record.dedup_key = key
        commit_upload(session, store, received, record.artifact_prefix, normalized_dir, record)
    audit(principal, "model.create", record.id, name=record.name, size_bytes=record.size_bytes)
    return model_out(record)


def _new_model_record(
    project_id: str, received: ReceivedFile, name: str | None, info: dict[str, Any], status: str
) -> ModelRecord:
    """The row of an uploaded model (its files go under `models/<id>`), named after the file unless
    the upload names it."""
    model_id = new_id("mdl")
    return ModelRecord(
        id=model_id,
        project_id=project_id,
        name=name or Path(received.filename).stem,
        filename=received.filename,
        sha256=received.sha256,
        size_bytes=received.size_bytes,
        artifact_prefix=f"models/{model_id}",
        info=info,
        status=status,
    )


#: What a torch.save or TorchScript file is, and what to upload instead.
_PICKLE_REFUSED = (
    "this is a torch.save or TorchScript (torch.jit.save) file: Python objects in pickle form, which "
    "this server never loads (unpickling runs whatever code the file names). Upload a torch.export "
    "program instead (torch.export.save(torch.export.export(model, example_inputs), 'model.pt2'), or "
    "optiforge_client's upload_model(module, example_inputs=...)), or an ONNX export"
)
#: The member torch.export.save writes first, under the archive's one top folder.
_PT2_MARKER = "archive_format"


def _upload_kind(path: Path, filename: str) -> str:
    """`pt2` for a torch.export program (a zip whose top folder holds `archive_format`, or a file
    named .pt2, whose checks then say what it lacks), `pickle` for a torch.save / TorchScript file
    (a zip with `data.pkl`, or a bare pickle), else `onnx` (a model or a .zip bundle)."""
    if filename.lower().endswith(".pt2"):
        return "pt2"
    with path.open("rb") as handle:
        head = handle.read(1)
    if head == b"\x80":  # a pickle's PROTO opcode: never the first byte of an ONNX protobuf
        return "pickle"
    if not is_zip_archive(path):
        return "onnx"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError):
        return "onnx"  # the bundle's own checks say what is wrong with it
    tails = {name.split("/", 1)[1] for name in names if name.count("/") == 1}
    if _PT2_MARKER in tails:
        return "pt2"
    if "data.pkl" in tails and not any(name.lower().endswith(".onnx") for name in names):
        return "pickle"
    return "onnx"


def _check_program(path: Path, max_unpacked_bytes: int) -> None:
    """The checks that need no torch, at upload: the archive's members (nothing leaving it, declared
    sizes within the limit, only what torch.export.save writes, nothing compiled), then its program:
    every node a PyTorch operator (custom ones named: `unsupported_op`), every shape expression plain
    arithmetic. The worker repeats them before it loads anything (engines.convert.pt2_archive)."""
    member = f"models/{PROGRAM_NAME}.json"
    with open_pt2(path) as archive:
        contents = check_pt2_members(archive, max_unpacked_bytes=max_unpacked_bytes)
        info = archive.getinfo(f"{contents.root}/{member}")
        if info.file_size > MAX_JSON_BYTES:
            raise InvalidModelError(
                f"archive member '{member}' is {info.file_size} bytes, over {MAX_JSON_BYTES}",
                code="invalid_torch_program",
            )
        try:
            document = json.loads(archive.read(info))
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise InvalidModelError(
                f"archive member '{member}' cannot be read: {exc}", code="invalid_torch_program"
            ) from exc
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidModelError(
                f"archive member '{member}' is not valid JSON: {exc}", code="invalid_torch_program"
            ) from exc
    if not isinstance(document, dict):
        raise InvalidModelError(
            f"archive member '{member}' is not a JSON object", code="invalid_torch_program"
        )
    check_program_document(document)


def _upload_program(
    received: ReceivedFile,
    principal: Principal,
    name: str | None,
    opset: int | None,
    key: str,
    settings: Settings,
    store: ArtifactStore,
    session: Session,
) -> ModelOut:
    """A torch.export program: checked, stored as the model's source, converted by a `convert` job.
    The model and its job are committed together; the upload answers `converting`."""
    try:
        _check_program(received.path, settings.max_unpacked_bytes)
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    if opset is not None and opset > (newest := newest_opset()):
        raise ApiError(
            422, "invalid_opset", f"opset {opset} cannot be written: choose one from {MIN_OPSET} to {newest}"
        )
    stored = received.subdir("stored")
    source = stored / ModelRecord.SOURCE_FILE
    source.parent.mkdir(parents=True)
    os.replace(received.path, source)
    record = _new_model_record(principal.project_id, received, name, {}, ModelStatus.CONVERTING)
    record.dedup_key = key
    model_id, prefix = record.id, record.artifact_prefix
    session.add(record)  # first: its job refers to it
    job = new_convert_job(principal.project_id, model_id, opset)
    stage_job(session, settings, job)  # 429 past the project's jobs in flight: nothing stored yet
    commit_upload(session, store, received, prefix, stored, record)  # the files, then both rows
    audit(principal, "model.create", model_id, name=record.name, size_bytes=record.size_bytes, source="pt2")
    audit(principal, "job.create", job.id, kind=job.kind, model_id=model_id)
    publish_upload_job(session, settings, job, record)
    return model_out(record, ModelState(record.status, None, job.id))


@router.get("", response_model=list[ModelOut], responses=PAGE_RESPONSES, summary="List models")
def list_models(
    request: Request,
    project: ProjectDep,
    page: PageDep,
    sha256: Sha256Query = None,
    session: Session = Depends(get_db),
) -> Response:
    """Newest first, a page at a time (app.api.pagination). `sha256`: only models uploaded from a
    file with that hash (ask before uploading)."""
    query = select(ModelRecord).where(ModelRecord.project_id == project)
    if sha256:
        query = query.where(ModelRecord.sha256 == sha256.lower())
    records, next_cursor = fetch_page(session, query, ModelRecord, page)
    return page_response(request, model_list(session, records), next_cursor)


@router.get("/{model_id}", response_model=ModelOut, summary="Describe a model")
def get_model(model_id: str, project: ProjectDep, session: Session = Depends(get_db)) -> ModelOut:
    record = get_model_record(session, model_id, project)
    return model_out(record, model_state(record, conversion_jobs(session, [record.id]).get(record.id)))


@router.get(
    "/{model_id}/download",
    summary="Download the stored model",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}, "application/zip": {}}}},
)
def download_model(
    model_id: str,
    project: ProjectDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """The model as stored (`.onnx`), or a `.zip` with its external-data file for models over 2 GiB.
    A model converted from a PyTorch program downloads as the ONNX it became (409 until then)."""
    record = get_model_record(session, model_id, project)
    require_ready(session, record)
    model_dir = store.local_path(record.artifact_prefix)
    files = sorted(path for path in model_dir.iterdir() if path.is_file())
    stem = Path(record.filename).stem
    if len(files) == 1:
        return FileResponse(files[0], media_type="application/octet-stream", filename=f"{stem}.onnx")
    return zip_response(files, f"{stem}.zip")  # built while sent: no temporary copy on disk


@router.delete("/{model_id}", status_code=204, summary="Delete a model, its jobs and engines")
def delete_model(
    model_id: str,
    serving: ServingDep,
    principal: PrincipalDep,
    force: ForceQuery = False,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    """A job on the model still queued or running is a 409 `model_in_use` (cancel it first); an
    engine of the model that holds an alias is a 409 `model_serving` unless `force=true`.
    Works on a full disk (app.services.records.delete_records)."""
    record = get_model_record(session, model_id, principal.project_id)
    reserve = disk_reserve(settings)
    jobs, engines = deletes.delete_model(session, store, reserve, serving.forget, record, force=force)
    audit(principal, "model.delete", model_id, jobs=jobs, engines=engines)
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
    principal: PrincipalDep,
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
        project_id=principal.project_id,
        model_id=model_id,
        dataset_id=body.dataset_id,
        method=body.method,
        ratios=body.ratios,
    )
    audit(principal, "job.create", job.id, kind=job.kind, model_id=model_id)
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
    principal: PrincipalDep,
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
        project_id=principal.project_id,
        model_id=model_id,
        request=body.to_config(),
        evaluation_dataset_id=body.evaluation_dataset_id,
        calibration_dataset_id=body.calibration_dataset_id,
        alias=body.alias,
        budget_metric_stated=body.accuracy_budget.metric_stated,
    )
    audit(principal, "job.create", job.id, kind=job.kind, model_id=model_id, alias=body.alias)
    return job_out(session, job)
