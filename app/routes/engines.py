"""/v1/engines: built engines, their measurements, and inference."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import get_db, get_store_dep
from app.errors import ApiError, from_engine_error, not_found
from app.orm import EngineRecord
from app.schemas import EngineOut, InferRequest, InferResponse
from app.store import ArtifactStore
from engines.errors import EngineError
from engines.signature import validate_feeds
from engines.variants import LAYER_ERRORS_FILENAME

router = APIRouter(prefix="/v1/engines", tags=["engines"])


def engine_out(record: EngineRecord) -> EngineOut:
    return EngineOut.model_validate(record, from_attributes=True)


def get_engine_record(session: Session, engine_id: str) -> EngineRecord:
    record = session.get(EngineRecord, engine_id)
    if record is None:
        raise not_found("engine", engine_id)
    return record


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
    request: Request,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    record = get_engine_record(session, engine_id)
    session.delete(record)
    session.commit()
    request.app.state.engine_pool.evict(engine_id)
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


def _to_arrays(inputs: dict[str, object], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    feeds = {}
    for name, value in inputs.items():
        try:
            feeds[name] = np.asarray(value, dtype=dtypes.get(name))
        except (ValueError, TypeError) as exc:
            raise ApiError(
                422, "invalid_input", f"input '{name}' is not a rectangular array of numbers: {exc}"
            ) from exc
    return feeds


@router.post("/{engine_id}/infer", response_model=InferResponse, summary="Run inference (JSON tensors)")
def infer(
    engine_id: str,
    body: InferRequest,
    request: Request,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> InferResponse:
    """Inputs are nested lists, batch first; outputs come back the same way with the compute time.

    A plain `def` route: FastAPI runs it in its thread pool, so inference never blocks the event loop.
    """
    record = get_engine_record(session, engine_id)
    session.close()  # nothing more to read; don't hold a connection while computing
    try:
        runner = request.app.state.engine_pool.get(
            record.id, record.backend, store.local_path(f"{record.artifact_prefix}/{record.engine_file}")
        )
        specs = runner.input_metadata()
        feeds = _to_arrays(body.inputs, {spec.name: spec.dtype for spec in specs})
        validate_feeds(feeds, specs)
        started = time.perf_counter()
        outputs = runner.infer(feeds)
        compute_ms = (time.perf_counter() - started) * 1000.0
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    return InferResponse(
        engine_id=engine_id,
        outputs={name: array.tolist() for name, array in outputs.items()},
        compute_ms=compute_ms,
    )
