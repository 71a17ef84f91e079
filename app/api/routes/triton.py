"""Engines as a Triton Inference Server model repository: a zip to unpack and serve with
`tritonserver --model-repository=…` (layout and rules: `engines.export.triton`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from app.api.deps import ProjectDep, get_db, get_settings_dep, get_store_dep
from app.core.errors import ApiError
from app.core.orm import new_id
from app.core.scratch import EXPORT_KIND, OwnedFolder, claim_folder
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.services.triton import export_triton_zip

router = APIRouter(tags=["export"])

_ZIP = "application/zip"
_RESPONSES = {200: {"content": {_ZIP: {"schema": {"type": "string", "format": "binary"}}}}}


class TemporaryFileResponse(FileResponse):
    """A file response that removes the folder holding its file once sent, or once sending stopped:
    a client that hangs up mid-download raises out of FileResponse before a background task would
    run, which would leave a repository's worth of disk behind."""

    def __init__(self, path: Path, folder: OwnedFolder, media_type: str, filename: str):
        super().__init__(path, media_type=media_type, filename=filename)
        self.folder = folder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_in_threadpool(self.folder.release)


def _zip_response(
    session: Session, settings: Settings, store: ArtifactStore, names: Sequence[str], project_id: str
) -> TemporaryFileResponse:
    """Build the repository in a scratch folder this process owns (on disk: engines can be
    gigabytes; an API killed mid-export leaves it to the next start-up's clean-up) and stream it."""
    folder = claim_folder(settings.scratch_dir, EXPORT_KIND, new_id("exp"))
    try:
        export = export_triton_zip(session, store, names, folder.path, project_id=project_id)
    except BaseException:
        folder.release()
        raise
    models = export.model_names
    filename = f"{models[0]}.triton.zip" if len(models) == 1 else "triton-model-repository.zip"
    return TemporaryFileResponse(export.path, folder, media_type=_ZIP, filename=filename)


@router.get(
    "/v1/engines/{engine_id}/triton",
    response_class=FileResponse,
    responses=_RESPONSES,
    summary="One engine as a Triton model repository (zip)",
)
def engine_repository(
    engine_id: str,
    project: ProjectDep,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> TemporaryFileResponse:
    """`engine_id` is an engine id or alias; the model is named by the alias when the engine has one.
    The zip holds `<name>/config.pbtxt` and `<name>/1/model.onnx` (ONNX Runtime engines, with any
    external-data files) or `<name>/1/model.plan` (TensorRT, for the GPU it was built on). Engines of
    other backends cannot be exported (422 `not_exportable`)."""
    return _zip_response(session, settings, store, [engine_id], project)


@router.get(
    "/v1/triton",
    response_class=FileResponse,
    responses=_RESPONSES,
    summary="Several engines as one Triton model repository (zip)",
)
def repository(
    project: ProjectDep,
    engine: list[str] = Query(default=[], description="an engine id or alias; repeat for more"),
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> TemporaryFileResponse:
    """`/v1/triton?engine=a&engine=b`: each engine becomes a model named by its alias, else its id;
    two engines with the same name are refused (422 `duplicate_model_name`)."""
    if not engine:
        raise ApiError(
            422, "no_engines", "name the engines to export: /v1/triton?engine=ID_OR_ALIAS&engine=ID_OR_ALIAS"
        )
    return _zip_response(session, settings, store, engine, project)
