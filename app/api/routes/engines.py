"""/v1/engines: built engines, their measurements, and inference."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.deps import ServingDep, get_db, get_store_dep
from app.api.schemas import AliasIn, BatchingIn, EngineOut, InferRequest, InferResponse
from app.api.views import engine_out
from app.core.errors import ApiError, from_engine_error, not_found
from app.core.orm import EngineRecord, ModelRecord, take_alias
from app.core.store import ArtifactStore
from app.services.records import get_engine_record
from engines.errors import EngineError
from engines.ingest.signature import assign_batch_axes, specs_from_dicts
from engines.variants import LAYER_ERRORS_FILENAME

router = APIRouter(prefix="/v1/engines", tags=["engines"])


@router.get("", response_model=list[EngineOut], summary="List engines")
def list_engines(
    model_id: str | None = None, job_id: str | None = None, session: Session = Depends(get_db)
) -> list[EngineOut]:
    query = select(EngineRecord).order_by(EngineRecord.created_at.desc())
    if model_id:
        query = query.where(EngineRecord.model_id == model_id)
    if job_id:
        query = query.where(EngineRecord.job_id == job_id)
    return [engine_out(record) for record in session.scalars(query)]


@router.get("/{engine_id}", response_model=EngineOut, summary="An engine with its hardware and metrics")
def get_engine(engine_id: str, session: Session = Depends(get_db)) -> EngineOut:
    return engine_out(get_engine_record(session, engine_id))


@router.delete("/{engine_id}", status_code=204, summary="Delete an engine")
def delete_engine(
    engine_id: str,
    serving: ServingDep,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    record = get_engine_record(session, engine_id)
    session.delete(record)
    session.commit()
    serving.forget(engine_id)
    store.delete(record.artifact_prefix)
    return Response(status_code=204)


@router.get(
    "/{engine_id}/layer-errors", summary="Which layer lost accuracy: per-tensor INT8 error, worst first"
)
def get_layer_errors(
    engine_id: str, session: Session = Depends(get_db), store: ArtifactStore = Depends(get_store_dep)
) -> Response:
    """For INT8 engines: SQNR (dB, higher is better) of every quantized activation against the float
    model, `local_sqnr_db` for the error its own Q/DQ adds, `model_sqnr_db` for the error accumulated
    up to it; weights too. Measured on a few calibration samples when the engine was built."""
    record = get_engine_record(session, engine_id)
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
    engine_id: str, body: AliasIn, serving: ServingDep, session: Session = Depends(get_db)
) -> EngineOut:
    """Clients that infer with `/v2/models/{alias}` switch to this engine on their next request,
    without a change on their side. An alias names one engine: setting it here takes it from the
    engine that had it."""
    record = get_engine_record(session, engine_id)
    take_alias(session, record, body.alias)
    try:
        session.commit()
    except IntegrityError as exc:  # another request took the alias between our two statements
        session.rollback()
        raise ApiError(409, "alias_conflict", f"alias '{body.alias}' was just set on another engine") from exc
    serving.forget()
    return engine_out(record)


@router.delete("/{engine_id}/alias", response_model=EngineOut, summary="Remove an engine's alias")
def delete_alias(engine_id: str, serving: ServingDep, session: Session = Depends(get_db)) -> EngineOut:
    record = get_engine_record(session, engine_id)
    record.alias = None
    session.commit()
    serving.forget()
    return engine_out(record)


@router.put("/{engine_id}/batching", response_model=EngineOut, summary="Turn on dynamic batching")
def set_batching(
    engine_id: str, body: BatchingIn, serving: ServingDep, session: Session = Depends(get_db)
) -> EngineOut:
    """Concurrent requests (of any batch size, with matching shapes) are stacked into one engine
    call of up to `max_batch_size` samples; the first waits at most `max_queue_delay_ms`. Higher
    throughput under concurrency, at the cost of that delay; no gain for one client at a time."""
    record = get_engine_record(session, engine_id)
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
    return engine_out(record)


@router.delete("/{engine_id}/batching", response_model=EngineOut, summary="Turn off dynamic batching")
def delete_batching(engine_id: str, serving: ServingDep, session: Session = Depends(get_db)) -> EngineOut:
    record = get_engine_record(session, engine_id)
    record.max_batch_size = record.max_queue_delay_ms = None
    session.commit()
    serving.forget()
    return engine_out(record)


def _to_arrays(inputs: dict[str, object], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    feeds = {}
    for name, value in inputs.items():
        try:
            feeds[name] = np.asarray(value, dtype=dtypes.get(name))
        except (ValueError, TypeError, OverflowError) as exc:
            raise ApiError(
                422, "invalid_input", f"input '{name}' is not a rectangular array of numbers: {exc}"
            ) from exc
    return feeds


@router.post("/{engine_id}/infer", response_model=InferResponse, summary="Run inference (JSON tensors)")
async def infer(engine_id: str, body: InferRequest, serving: ServingDep) -> InferResponse:
    """Inputs are nested lists, batch first; outputs come back the same way with the compute time.
    For speed, and for tools that speak it, use the Open Inference Protocol: `/v2/models/{id}/infer`.

    The same serving path as /v2: only the blocking parts (a look-up on a cache miss, a first
    load, the engine call) leave the event loop.
    """
    try:
        engine = await serving.lookup(engine_id)
    except ApiError as exc:
        raise not_found("engine", engine_id) from exc
    if engine.id != engine_id:  # /v1 takes engine ids only, not aliases or model ids
        raise not_found("engine", engine_id)
    try:
        with serving.inflight.slot():
            loaded = await serving.load(engine)
            specs = loaded.runner.input_metadata()
            feeds = _to_arrays(body.inputs, {spec.name: spec.dtype for spec in specs})
            result = await serving.run(engine, loaded, feeds, protocol="v1")
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    return InferResponse(
        engine_id=engine_id,
        outputs={name: array.tolist() for name, array in result.outputs.items()},
        compute_ms=result.compute_ms,
        queue_ms=result.queue_ms,
        batch_size=result.batch_size,
    )
