"""/v1/engines: built engines, their measurements, and inference."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api import json_infer
from app.api.body_reader import read_body
from app.api.deps import DefaultMaxBatchDep, PrincipalDep, ProjectDep, ServingDep, get_db, get_store_dep
from app.api.middleware.body_limit import json_tensor_limit
from app.api.pagination import PAGE_RESPONSES, PageDep, fetch_page, page_response
from app.api.schemas import AliasIn, BatchingIn, EngineOut, ForceQuery, InferResponse
from app.api.views import engine_list, engine_out
from app.api.zip_stream import zip_response
from app.core.audit import audit
from app.core.errors import ApiError, from_engine_error, not_found
from app.core.orm import EngineRecord, ModelRecord, take_alias
from app.core.space import disk_reserve
from app.core.store import ArtifactStore
from app.services import deletes
from app.services.engine_files import engine_files
from app.services.layer_report import layer_view
from app.services.records import get_engine_record
from app.serving.admission import json_text_bytes
from engines.errors import EngineError
from engines.ingest.signature import assign_batch_axes, specs_from_dicts
from engines.variants import LAYER_ERRORS_FILENAME

router = APIRouter(prefix="/v1/engines", tags=["engines"])


@router.get("", response_model=list[EngineOut], responses=PAGE_RESPONSES, summary="List engines")
def list_engines(
    request: Request,
    project: ProjectDep,
    page: PageDep,
    max_batch: DefaultMaxBatchDep,
    model_id: str | None = None,
    job_id: str | None = None,
    session: Session = Depends(get_db),
) -> Response:
    """Newest first, a page at a time (app.api.pagination)."""
    query = select(EngineRecord).where(EngineRecord.project_id == project)
    if model_id:
        query = query.where(EngineRecord.model_id == model_id)
    if job_id:
        query = query.where(EngineRecord.job_id == job_id)
    records, next_cursor = fetch_page(session, query, EngineRecord, page)
    return page_response(request, engine_list(records, max_batch), next_cursor)


@router.get("/{engine_id}", response_model=EngineOut, summary="An engine with its hardware and metrics")
def get_engine(
    engine_id: str, project: ProjectDep, max_batch: DefaultMaxBatchDep, session: Session = Depends(get_db)
) -> EngineOut:
    return engine_out(get_engine_record(session, engine_id, project), max_batch)


@router.delete("/{engine_id}", status_code=204, summary="Delete an engine")
def delete_engine(
    engine_id: str,
    serving: ServingDep,
    principal: PrincipalDep,
    request: Request,
    force: ForceQuery = False,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """An engine that holds an alias is a 409 `engine_holds_alias` (naming it) unless `force=true`,
    which deletes the alias with it. Works on a full disk (app.services.records.delete_records)."""
    record = get_engine_record(session, engine_id, principal.project_id)
    reserve = disk_reserve(request.app.state.settings)
    alias = deletes.delete_engine(session, store, reserve, serving.forget, record, force=force)
    audit(principal, "engine.delete", engine_id, alias=alias)
    return Response(status_code=204)


@router.get(
    "/{engine_id}/download",
    summary="Download the engine: its file, or a zip of its files (OpenVINO's IR, external data)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}, "application/zip": {}}}},
)
def download_engine(
    engine_id: str,
    project: ProjectDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """Every backend: an ONNX-based engine (ONNX Runtime, torch) as its `.onnx`, a TensorRT engine as
    its `.plan`; an engine of several files (OpenVINO's IR: `.xml` and `.bin`; ONNX with external
    data) as a zip of them. The name says the engine and its backend (`eng_…-openvino-cpu.zip`).
    The settings and reports stored beside the engine are not part of it."""
    record = get_engine_record(session, engine_id, project)
    files = engine_files(store, record)
    stem = f"{record.id}-{record.backend}"
    if len(files) == 1:
        suffix = Path(record.engine_file).suffix
        return FileResponse(files[0], media_type="application/octet-stream", filename=stem + suffix)
    return zip_response(files, f"{stem}.zip")  # built while sent


@router.get(
    "/{engine_id}/layer-errors",
    summary="Which layer lost accuracy: each node's own INT8 error, worst first, with a legend",
)
def get_layer_errors(
    engine_id: str,
    project: ProjectDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """For INT8 engines: every quantized activation (and weight) with `own_error`, the error its own
    quantizer adds with float inputs (relative RMS, 0.01 = 1 %), and `accumulated_error`, the INT8
    model's against the float model's at that tensor; sorted by `own_error`, highest first; `node`
    as named in the model; `legend` says what each column and "—" mean (app.services.layer_report).
    The SQNR figures (dB, higher is better) stay beside them. Measured on a few calibration samples
    when the engine was built. Nodes to keep in float go in a recipe's `quantize.nodes_to_exclude`."""
    record = get_engine_record(session, engine_id, project)
    path = store.local_path(record.artifact_prefix) / LAYER_ERRORS_FILENAME
    if not path.is_file():
        raise ApiError(
            404,
            "layer_errors_not_available",
            f"engine '{engine_id}' is {record.precision}; per-layer errors exist for int8 engines",
        )
    return JSONResponse(layer_view(json.loads(path.read_bytes())))


@router.put("/{engine_id}/alias", response_model=EngineOut, summary="Name an engine (moves the name here)")
def set_alias(
    engine_id: str,
    body: AliasIn,
    serving: ServingDep,
    principal: PrincipalDep,
    max_batch: DefaultMaxBatchDep,
    session: Session = Depends(get_db),
) -> EngineOut:
    """Clients that infer with `/v2/models/{alias}` switch to this engine on their next request,
    without a change on their side. An alias names one engine: setting it here takes it from the
    engine that had it."""
    record = get_engine_record(session, engine_id, principal.project_id)
    take_alias(session, record, body.alias)
    try:
        session.commit()
    except IntegrityError as exc:  # another request took the alias between our two statements
        session.rollback()
        raise ApiError(409, "alias_conflict", f"alias '{body.alias}' was just set on another engine") from exc
    serving.forget()
    audit(principal, "alias.set", engine_id, alias=body.alias)
    return engine_out(record, max_batch)


@router.delete("/{engine_id}/alias", response_model=EngineOut, summary="Remove an engine's alias")
def delete_alias(
    engine_id: str,
    serving: ServingDep,
    principal: PrincipalDep,
    max_batch: DefaultMaxBatchDep,
    session: Session = Depends(get_db),
) -> EngineOut:
    record = get_engine_record(session, engine_id, principal.project_id)
    alias, record.alias = record.alias, None
    session.commit()
    serving.forget()
    audit(principal, "alias.delete", engine_id, alias=alias)
    return engine_out(record, max_batch)


@router.put("/{engine_id}/batching", response_model=EngineOut, summary="Turn on dynamic batching")
def set_batching(
    engine_id: str,
    body: BatchingIn,
    serving: ServingDep,
    principal: PrincipalDep,
    max_batch: DefaultMaxBatchDep,
    session: Session = Depends(get_db),
) -> EngineOut:
    """Concurrent requests (of any batch size, with matching shapes) are stacked into one engine
    call of up to `max_batch_size` samples; the first waits at most `max_queue_delay_ms`. Higher
    throughput under concurrency, at the cost of that delay; no gain for one client at a time."""
    record = get_engine_record(session, engine_id, principal.project_id)
    model = session.get(ModelRecord, record.model_id)
    inputs = specs_from_dicts(model.info["inputs"])
    tensors = inputs + assign_batch_axes(inputs, specs_from_dicts(model.info["outputs"]))
    unbatchable = [spec.name for spec in tensors if spec.batch_axis != 0 or spec.has_static_batch()]
    if unbatchable:
        raise ApiError(
            422,
            "not_batchable",
            f"tensor(s) {unbatchable} have a static batch dimension, none, or one that is not dim 0; "
            "the batcher stacks samples along a dynamic dim 0",
        )
    record.max_batch_size, record.max_queue_delay_ms = body.max_batch_size, body.max_queue_delay_ms
    session.commit()
    serving.forget()
    audit(principal, "batching.set", engine_id, max_batch_size=body.max_batch_size)
    return engine_out(record, max_batch)


@router.delete("/{engine_id}/batching", response_model=EngineOut, summary="Turn off dynamic batching")
def delete_batching(
    engine_id: str,
    serving: ServingDep,
    principal: PrincipalDep,
    max_batch: DefaultMaxBatchDep,
    session: Session = Depends(get_db),
) -> EngineOut:
    record = get_engine_record(session, engine_id, principal.project_id)
    record.max_batch_size = record.max_queue_delay_ms = None
    session.commit()
    serving.forget()
    audit(principal, "batching.delete", engine_id)
    return engine_out(record, max_batch)


@router.post(
    "/{engine_id}/infer",
    response_model=InferResponse,
    summary="Run inference (JSON tensors)",
    openapi_extra=json_infer.OPENAPI_EXTRA,
)
async def infer(engine_id: str, request: Request, serving: ServingDep, project: ProjectDep) -> Response:
    """Inputs are nested lists, batch first; outputs come back the same way with the compute time
    (NaN and ±infinity as the strings "NaN", "Infinity" and "-Infinity": JSON has no such numbers).
    For speed, and for tools that speak it, use the Open Inference Protocol: `/v2/models/{id}/infer`.

    The same serving path as /v2: the body is read whole before the request takes an in-flight
    slot (app.api.body_reader), JSON is parsed and written on a worker thread in the JSON gate's
    turn (app.api.json_infer), and only the blocking parts leave the event loop. A batch over the
    engine's `max_batch` is a 413 `batch_too_large` (app.serving.limits).
    """
    settings = request.app.state.settings
    limit = json_tensor_limit(settings.max_json_tensor_bytes)
    async with read_body(request, serving.bodies, limit, settings.body_read_timeout_s) as body:
        with serving.inflight.slot():
            arrays = await serving.json_gate.run(len(body), json_infer.parse_request, body)
            try:
                engine = await serving.lookup(engine_id, project_id=project)
            except ApiError as exc:
                raise not_found("engine", engine_id) from exc
            if engine.id != engine_id:  # /v1 takes engine ids only, not aliases or model ids
                raise not_found("engine", engine_id)
            try:
                loaded = await serving.load(engine)
                dtypes = {spec.name: spec.dtype for spec in loaded.runner.input_metadata()}
                feeds = await serving.json_gate.run(len(body), json_infer.cast_inputs, arrays, dtypes)
                del arrays
                result = await serving.run(engine, loaded, feeds, protocol="v1")
            except EngineError as exc:
                raise from_engine_error(exc) from exc
            size = json_text_bytes(result.outputs.values())
            payload = await serving.json_gate.run(size, json_infer.write_response, engine_id, result)
    return Response(payload, media_type="application/json")
