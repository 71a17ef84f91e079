"""/v1/datasets: upload calibration and evaluation sets: `.npz` arrays, a `.zip` of images in
class folders turned into arrays by a stored preprocessing spec (engines.ingest.images), or a JSONL
of texts tokenized by its tokenizer.json and a stored tokenization spec (engines.ingest.texts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import PrincipalDep, ProjectDep, get_db, get_settings_dep, get_store_dep
from app.api.pagination import PAGE_RESPONSES, PageDep, fetch_page, page_response
from app.api.schemas import FORM_UNSET, NAME_PATTERN, DatasetOut, ForceQuery, Sha256Query, check_text
from app.api.uploads import commit_upload, receive_upload
from app.api.views import dataset_list, dataset_out
from app.core.audit import audit
from app.core.dataset_limits import dataset_limits, text_limits
from app.core.errors import ApiError, from_engine_error
from app.core.orm import DatasetRecord, DatasetStatus, JobKind, JobRecord, new_id
from app.core.settings import Settings
from app.core.space import disk_reserve
from app.core.store import ArtifactStore
from app.services import deletes
from app.services.datasets import (
    DatasetState,
    new_decode_job,
    processing_states,
    require_dataset_ready,
    state_of,
)
from app.services.jobs import publish_upload_job, stage_job
from app.services.records import get_dataset_record
from app.services.text_datasets import (
    TEXT_TOO_LARGE_CODES,
    TextUpload,
    receive_texts,
    save_tokenizer,
    text_model,
)
from app.services.uploads_dedup import dataset_key, existing_dataset, file_sha256
from engines.errors import InvalidDatasetError
from engines.ingest.datasets import inspect_npz
from engines.ingest.image_npz import write_image_npz
from engines.ingest.images import (
    ImageFolderPlan,
    ImagePreprocessing,
    header_pixels,
    is_image_folder_archive,
    plan_image_folder,
)
from engines.ingest.limits import TOO_LARGE_CODES, DatasetLimits
from engines.ingest.text_lines import looks_like_jsonl

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DATASET_FILENAME = "dataset.npz"


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        200: {
            "model": DatasetOut,
            "description": "the project already holds this file, uploaded with the same options: that "
            "dataset, with `deduplicated: true`; nothing new is stored",
        },
        202: {
            "model": DatasetOut,
            "description": "a large image folder, or a long JSONL of texts: stored, `processing` while "
            "its decode_images or tokenize_texts job (processing_job_id) makes its arrays; jobs can use "
            "it once it is ready",
        },
    },
    summary="Upload a dataset (.npz, images, or texts with their tokenizer)",
)
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(
            description="an .npz with one array per model input (keyed by input name) and optional "
            "'labels'; or a .zip of images, in class folders (cat/001.jpg: labelled) or not; or a JSONL "
            'of texts, one {"text": ..., "text_pair": ..., "label": ...} per line, with a tokenizer'
        ),
    ],
    principal: PrincipalDep,
    response: Response,
    name: Annotated[str | None, Form(examples=FORM_UNSET, max_length=255, pattern=NAME_PATTERN)] = None,
    preprocessing: Annotated[
        str | None,
        Form(
            examples=FORM_UNSET,
            max_length=4096,
            description="images only: JSON, any of size [h, w], resize, resize_size, interpolation, "
            "mean, std (0-1 scale), channel_order (RGB/BGR/GRAY), layout (NCHW/NHWC), dtype; "
            "default: torchvision's ImageNet evaluation transform",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        Form(
            examples=FORM_UNSET,
            max_length=1_000_000,
            description="images only: JSON list of class folder names in the model's output order "
            "(default: the folders, sorted)",
        ),
    ] = None,
    input_name: Annotated[
        str | None,
        Form(
            examples=FORM_UNSET,
            max_length=255,
            pattern=NAME_PATTERN,
            description="images only: the array's name",
        ),
    ] = None,
    tokenizer: Annotated[
        UploadFile | None,
        File(
            description="texts only: the tokenizer.json of a Hugging Face fast tokenizer (what "
            "save_pretrained writes), which tokenizes the JSONL"
        ),
    ] = None,
    tokenization: Annotated[
        str | None,
        Form(
            examples=FORM_UNSET,
            max_length=4096,
            description="texts only: JSON, any of max_length (default: the model's, else 128), "
            "truncation (true), padding (max_length or longest), padding_side (right or left), "
            "add_special_tokens (true), input_names (a list of input_ids, attention_mask, "
            "token_type_ids, or an object naming the model input of each), dtype (int64 or int32; "
            "default: the model's)",
        ),
    ] = None,
    model_id: Annotated[
        str | None,
        Form(
            examples=FORM_UNSET,
            max_length=64,
            description="texts only: the model the dataset is for: its arrays take the model's input "
            "names and dtypes, and the tokenizer's vocabulary is checked against its embedding table",
        ),
    ] = None,
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
    session: Session = Depends(get_db),
) -> DatasetOut:
    """Read every array without unpickling anything, check the number of arrays and samples,
    dtypes and labels, and store it as an `.npz`. A `.zip` of images is checked whole before a
    pixel is decoded (members, layout, images, the bytes its arrays will take, each image's pixels
    from its header); a small one is decoded now (201), a large one is stored and decoded by a
    `decode_images` job (202, `processing`). A JSONL of texts is checked whole, every line, with its
    tokenizer (and the model it is for); a short one is tokenized now (201), a long one by a
    `tokenize_texts` job (202).

    The same file uploaded again to the same project with the same options is not stored twice:
    the dataset it already is comes back (200, `deduplicated: true`), whatever its name
    (app.services.uploads_dedup). `GET /v1/datasets?sha256=` asks before uploading."""
    image_options = {"preprocessing": preprocessing, "classes": classes, "input_name": input_name}
    text_options = {"tokenization": tokenization, "model_id": model_id}
    limits = dataset_limits(settings)
    job: JobRecord | None = None
    tokenizer_sha256 = file_sha256(tokenizer.file) if tokenizer is not None else None
    with receive_upload(file, settings, DATASET_FILENAME) as received:
        key = dataset_key(
            received.sha256, form={**image_options, **text_options}, tokenizer_sha256=tokenizer_sha256
        )
        existing = existing_dataset(session, principal.project_id, key)
        if existing is not None:
            response.status_code = 200
            return dataset_out(existing, state_of(session, existing)).model_copy(
                update={"deduplicated": True}
            )
        dataset_id = new_id("ds")
        prefix = f"datasets/{dataset_id}"
        staged = received.subdir("stored")
        status = DatasetStatus.READY
        try:
            texts_only = sorted(option for option, value in text_options.items() if value is not None)
            if tokenizer is not None:
                texts = _text_dataset(
                    received.path,
                    tokenizer,
                    staged,
                    session,
                    store,
                    settings,
                    limits,
                    principal.project_id,
                    **image_options,
                    **text_options,
                )
                info = texts.info
                if texts.job_options is not None:
                    job = new_decode_job(
                        principal.project_id, dataset_id, texts.job_options, kind=JobKind.TOKENIZE_TEXTS
                    )
                    info["processing_job_id"] = job.id
                    status = DatasetStatus.PROCESSING
            elif texts_only:
                raise InvalidDatasetError(
                    f"{texts_only} apply to a JSONL of texts, uploaded with its tokenizer",
                    code="invalid_tokenization",
                )
            elif is_image_folder_archive(received.path):
                plan = _plan_image_folder(received.path, settings, limits, **image_options)
                if _decode_now(received.path, plan, settings, limits):
                    info = _decode_image_folder(received.path, plan, staged / DATASET_FILENAME, settings)
                else:
                    job = new_decode_job(principal.project_id, dataset_id, image_options)
                    info = {**plan.info().to_dict(), "image_folder": plan.describe()}
                    info["processing_job_id"] = job.id
                    source = staged / DatasetRecord.SOURCE_FILE
                    source.parent.mkdir(parents=True)
                    shutil.move(received.path, source)
                    status = DatasetStatus.PROCESSING
            else:
                given = sorted(option for option, value in image_options.items() if value is not None)
                if given:
                    raise InvalidDatasetError(
                        f"{given} apply to a .zip of images; an .npz holds its arrays as they are",
                        code="invalid_preprocessing",
                    )
                if looks_like_jsonl(received.path):
                    raise InvalidDatasetError(
                        "a JSONL of texts is tokenized by its tokenizer: send the tokenizer.json as the "
                        "form file `tokenizer` (with a `tokenization` spec: max_length, padding, …)",
                        code="tokenizer_required",
                    )
                info = inspect_npz(
                    received.path, max_unpacked_bytes=settings.max_unpacked_bytes, limits=limits
                ).to_dict()
                shutil.move(received.path, staged / DATASET_FILENAME)
        except InvalidDatasetError as exc:
            raise dataset_refusal(exc) from exc
        record = DatasetRecord(
            id=dataset_id,
            project_id=principal.project_id,
            name=name or Path(received.filename).stem,
            filename=received.filename,
            sha256=received.sha256,
            size_bytes=received.size_bytes,
            artifact_key=f"{prefix}/{DATASET_FILENAME}",
            info=info,
            status=status,
            dedup_key=key,
        )
        if job is not None:
            session.add(record)  # first: its job refers to it
            stage_job(session, settings, job)  # 429 past the project's jobs in flight: nothing stored yet
        commit_upload(session, store, received, prefix, staged, record)
    audit(principal, "dataset.create", record.id, name=record.name, size_bytes=record.size_bytes)
    if job is None:
        return dataset_out(record)
    audit(principal, "job.create", job.id, kind=job.kind, dataset_id=record.id)
    response.status_code = 202
    publish_upload_job(session, settings, job, record)
    return dataset_out(record, DatasetState(record.status, None, job.id))


def dataset_refusal(exc: InvalidDatasetError) -> ApiError:
    """413 for a dataset over a size bound (engines.ingest.limits.TOO_LARGE_CODES), else 422."""
    return from_engine_error(exc, 413 if exc.code in TOO_LARGE_CODES | TEXT_TOO_LARGE_CODES else 422)


#: An image folder decoded at upload makes arrays of at most this many bytes (the rest: a job).
INLINE_MAX_BYTES = 64 * 1024 * 1024


def _plan_image_folder(
    archive: Path,
    settings: Settings,
    limits: DatasetLimits,
    *,
    preprocessing: str | None,
    classes: str | None,
    input_name: str | None,
) -> ImageFolderPlan:
    """The upload's image folder checked whole, before a pixel is decoded (engines.ingest.images)."""
    spec = ImagePreprocessing.from_dict(_json_form(preprocessing, "preprocessing", dict) or {})
    return plan_image_folder(
        archive,
        spec,
        max_unpacked_bytes=settings.max_unpacked_bytes,
        max_images=settings.max_dataset_images,
        input_name=input_name or "input",
        classes=_json_form(classes, "classes", list),
        limits=limits,
    )


def _decode_now(archive: Path, plan: ImageFolderPlan, settings: Settings, limits: DatasetLimits) -> bool:
    """Whether the folder is small enough to decode in the request: few images (their headers are
    read here, a few KB each), few pixels in all (decoding costs about its input pixels: 16 MP is
    well under a second), small arrays. Anything more would hold the API's CPU for its client: a
    job. Each image's pixels are checked against the limit on the way (413/422 now, not later)."""
    if plan.samples > settings.image_inline_max_images or plan.nbytes > INLINE_MAX_BYTES:
        return False
    return header_pixels(archive, plan, limits.max_image_pixels) <= settings.image_inline_max_pixels


def _decode_image_folder(
    archive: Path, plan: ImageFolderPlan, npz_path: Path, settings: Settings
) -> dict[str, Any]:
    """Decode the images with the plan's spec into the `.npz` every job reads, checked like any
    `.npz`; the spec and class names are kept in the dataset's description."""
    limits = dataset_limits(settings)
    write_image_npz(archive, plan, npz_path, max_pixels=limits.max_image_pixels)
    info = inspect_npz(npz_path, max_unpacked_bytes=settings.max_unpacked_bytes, limits=limits)
    return {**info.to_dict(), "image_folder": plan.describe()}


def _text_dataset(
    jsonl: Path,
    tokenizer: UploadFile,
    staged: Path,
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    limits: DatasetLimits,
    project_id: str,
    *,
    preprocessing: str | None,
    classes: str | None,
    input_name: str | None,
    tokenization: str | None,
    model_id: str | None,
) -> TextUpload:
    """A JSONL of texts checked whole and tokenized into the stored `.npz` now, or stored for a
    tokenize_texts job when long (app.services.text_datasets); the tokenizer is kept beside it."""
    if preprocessing is not None or input_name is not None:
        raise InvalidDatasetError(
            "preprocessing and input_name apply to images; texts take a `tokenization` spec (its "
            "input_names name the arrays)",
            code="invalid_tokenization",
        )
    spec = _json_form(tokenization, "tokenization", dict, code="invalid_tokenization")
    class_names = _json_form(classes, "classes", list, code="invalid_labels")
    model = text_model(session, store, project_id, model_id) if model_id is not None else None
    tokenizer_path = staged.parent / "tokenizer" / "tokenizer.json"
    sha256 = save_tokenizer(tokenizer.file, tokenizer_path, text_limits(settings))
    return receive_texts(
        jsonl,
        tokenizer_path,
        staged / DATASET_FILENAME,
        settings=settings,
        limits=limits,
        spec=spec,
        classes=class_names,
        model=model,
        tokenizer_sha256=sha256,
    )


def _json_form(value: str | None, field: str, kind: type, *, code: str = "invalid_preprocessing") -> Any:
    """The form field read as JSON of `kind`. Its escapes (`"\\ud800"`, `"\\u0000"`) are text that
    multipart decoding never saw: the rule of a JSON body (`check_text`) holds for it too."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise InvalidDatasetError(f"{field} is not valid JSON: {exc}", code=code) from exc
    try:
        check_text(parsed)
    except ValueError as exc:
        raise InvalidDatasetError(f"{field}: {exc}", code=code) from exc
    if not isinstance(parsed, kind):
        raise InvalidDatasetError(f"{field} must be a JSON {kind.__name__}", code=code)
    return parsed


@router.get("", response_model=list[DatasetOut], responses=PAGE_RESPONSES, summary="List datasets")
def list_datasets(
    request: Request,
    project: ProjectDep,
    page: PageDep,
    sha256: Sha256Query = None,
    session: Session = Depends(get_db),
) -> Response:
    """Newest first, a page at a time (app.api.pagination). `sha256`: only datasets uploaded from a
    file with that hash (ask before uploading)."""
    query = select(DatasetRecord).where(DatasetRecord.project_id == project)
    if sha256:
        query = query.where(DatasetRecord.sha256 == sha256.lower())
    records, next_cursor = fetch_page(session, query, DatasetRecord, page)
    return page_response(request, dataset_list(records, processing_states(session, records)), next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Describe a dataset")
def get_dataset(dataset_id: str, project: ProjectDep, session: Session = Depends(get_db)) -> DatasetOut:
    record = get_dataset_record(session, dataset_id, project)
    return dataset_out(record, state_of(session, record))


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
    require_dataset_ready(session, record)  # no arrays before its images are decoded
    return FileResponse(
        store.local_path(record.artifact_key),
        media_type="application/octet-stream",
        filename=f"{Path(record.filename).stem}.npz",
    )


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset")
def delete_dataset(
    dataset_id: str,
    principal: PrincipalDep,
    force: ForceQuery = False,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    """Finished jobs keep their results; a dataset that a queued or running job reads is a 409
    `dataset_in_use` unless `force=true`, which cancels those jobs first. Works on a full disk
    (app.services.records.delete_records)."""
    record = get_dataset_record(session, dataset_id, principal.project_id)
    reserve = disk_reserve(settings)
    cancelled = deletes.delete_dataset(session, settings, store, reserve, record, force=force)
    audit(principal, "dataset.delete", dataset_id, cancelled_jobs=cancelled)
    return Response(status_code=204)
