"""/v1/engines: built engines, their measurements, and inference."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api import json_infer
from app.api.body_reader import read_body
from app.api.deps import DefaultMaxBatchDep, PrincipalDep, ProjectDep, ServingDep, get_db, get_store_dep
from app.api.middleware.body_limit import json_tensor_limit
from app.api.pagination import PAGE_RESPONSES, PageDep, fetch_page, page_response
from app.api.schemas import AliasIn, BatchingIn, EngineOut, InferResponse
from app.api.views import engine_list, engine_out
from app.core.audit import audit
from app.core.errors import ApiError, from_engine_error, not_found
from app.core.orm import EngineRecord, ModelRecord, take_alias
from app.core.space import disk_reserve
from app.core.store import ArtifactStore
from app.services.records import delete_records, get_engine_record
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
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """Works on a full disk (app.services.records.delete_records)."""
    record = get_engine_record(session, engine_id, principal.project_id)
    reserve = disk_reserve(request.app.state.settings)
    forget = partial(serving.forget, engine_id)
    delete_records(session, store, reserve, [record], [record.artifact_prefix], after_commit=forget)
    audit(principal, "engine.delete", engine_id)
    return Response(status_code=204)


@router.get(
    "/{engine_id}/layer-errors", summary="Which layer lost accuracy: per-tensor INT8 error, worst first"
)
def get_layer_errors(
    engine_id: str,
    project: ProjectDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    """For INT8 engines: SQNR (dB, higher is better) of every quantized activation against the float
    model, `local_sqnr_db` for the error its own Q/DQ adds, `model_sqnr_db` for the error accumulated
    up to it; weights too. Measured on a few calibration samples when the engine was built."""
    record = get_engine_record(session, engine_id, project)
    path = store.local_path(record.artifact_prefix) / LAYER_ERRORS_FILENAME
    if not path.is_file():
        raise ApiError(
            404,
            "layer_errors_not_available",
            f"engine '{engine_id}' is {record.precision}; per-layer errors exist for int8 engines",
        )
    return Response(path.read_bytes(), media_type="application/json")


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
