"""The Open Inference Protocol (KServe v2, REST), with Triton's binary tensor extension.

Triton, KServe and MLServer speak it, so their clients (tritonclient) and load tools
(perf_analyzer) work against optiforge unchanged. A model name is an engine id, an alias set
with `PUT /v1/engines/{id}/alias`, or a model id whose versions are its engines.

Errors follow the protocol: `{"error": "..."}` (plus optiforge's `code`), 400 for a bad request,
404 for an unknown name, 503 for an engine this node cannot run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from optiforge_client.tensors import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    ProtocolError,
    decode,
    encode,
    metadata_datatype,
    requested_outputs,
    split,
)

from app import __version__
from app.api.deps import serving_of
from app.api.direct_route import DirectRoute
from app.core.db import get_sessionmaker
from app.core.errors import ApiError
from app.core.orm import EngineRecord, ModelRecord
from app.services.health import readiness_checks
from app.serving import inference
from app.serving.inference import ServedEngine, Serving
from engines.backends.registry import unavailable_reason
from engines.errors import EngineError
from engines.export.triton import PLATFORMS
from engines.ingest.signature import specs_from_dicts

router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol)"])

#: Engine error codes that are the caller's fault (400); the rest mean this node can't serve (503).
_CLIENT_ERRORS = {"invalid_input", "inference_failed", "not_batchable"}


@router.get("/health/live", summary="The server is up")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="The server can serve: database and artifact store reachable")
def ready(request: Request) -> JSONResponse:
    checks = readiness_checks(request.app.state.settings, include_broker=False)
    is_ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"ready": is_ready, "checks": checks}, status_code=200 if is_ready else 503)


@router.get("", summary="Server metadata")
def server_metadata() -> dict[str, Any]:
    return {"name": "optiforge", "version": __version__, "extensions": ["binary_tensor_data"]}


def _engine_row(request: Request, name: str, version: str | None) -> tuple[EngineRecord, list[str], dict]:
    """The named engine, its model's engine ids (the versions) and the model's signature."""
    with get_sessionmaker(request.app.state.settings.resolved_database_url)() as session:
        record = inference.find_engine(session, name, version)
        if name in (record.id, record.alias):  # an engine's one version is itself
            versions = [record.id]
        else:  # a model's versions are its engines
            versions = [engine.id for engine in inference.model_engines(session, record.model_id)]
        model = session.get(ModelRecord, record.model_id)
        session.expunge(record)
        return record, versions, model.info if model else {"inputs": [], "outputs": []}


def _tensor_metadata(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "name": spec.name,
            "datatype": metadata_datatype(spec.dtype),
            "shape": [dim if isinstance(dim, int) else -1 for dim in spec.shape],
        }
        for spec in specs_from_dicts(items)
    ]


@router.get("/models/{name}", summary="Model metadata: inputs and outputs with datatype and shape")
@router.get("/models/{name}/versions/{version}", summary="Metadata of one version")
def model_metadata(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
    record, versions, model_info = _engine_row(request, name, version)
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORMS.get(
            record.backend, record.backend
        ),  # Triton's names, for tools that branch on them
        "inputs": _tensor_metadata(model_info["inputs"]),
        "outputs": _tensor_metadata(model_info["outputs"]),
    }


@router.get("/models/{name}/ready", summary="Whether this node can serve the model")
@router.get("/models/{name}/versions/{version}/ready", summary="Whether this node can serve that version")
def model_ready(name: str, request: Request, version: str | None = None) -> JSONResponse:
    record, _versions, _info = _engine_row(request, name, version)
    reason = unavailable_reason(record.backend)
    body: dict[str, Any] = {"name": name, "ready": reason is None}
    if reason is not None:
        body["error"] = f"engine '{record.id}' cannot run here: {reason}"
    return JSONResponse(body, status_code=200 if reason is None else 503)


#: The request body as Swagger shows it (the route reads raw bytes, so FastAPI cannot infer it).
_INFER_BODY = {
    "requestBody": {
        "content": {
            "application/json": {
                "example": {
                    "id": "1",
                    "inputs": [
                        {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.1, 0.2, 0.3]}
                    ],
                    "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
                }
            },
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """Send `Inference-Header-Content-Length: N` with binary tensors: the body is N bytes of JSON,
    then each input's raw little-endian bytes in order (`"parameters": {"binary_data_size": n}`).
    Ask for binary outputs with `"parameters": {"binary_data": true}` on an output, or
    `"binary_data_output": true` on the request. The response's `parameters` say where the time
    went on the server: `compute_ms`, `queue_ms` (dynamic batching) and `batch_size`.

    On the event loop for a loaded engine, through a DirectRoute (no dependency solving): only
    the engine call leaves it (and the parsing of JSON tensors, which can be large), so the
    protocol adds little to the engine's own time.
    """
    serving = serving_of(request)
    engine = await serving.lookup(name, version)  # an unknown name is a 404 whatever the body
    with serving.inflight.slot():
        return await _infer(request, serving, name, engine)


async def _infer(request: Request, serving: Serving, name: str, engine: ServedEngine) -> Response:
    settings = request.app.state.settings
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    if json_part_bytes(body, header_length) > settings.max_json_tensor_bytes:
        raise ApiError(
            413,
            "json_tensors_too_large",
            f"JSON tensors over {settings.max_json_tensor_bytes} bytes: send binary tensors "
            f"({HEADER_LENGTH}) for inputs this large",
        )
    try:
        if header_length is None:
            message, feeds = await run_in_threadpool(_parse, body, header_length)
        else:
            message, feeds = _parse(body, header_length)
        loaded = await serving.load(engine)
        available = [spec.name for spec in loaded.runner.output_metadata()]
        outputs = requested_outputs(message, available, default_binary=False)
        result = await serving.run(engine, loaded, feeds, protocol="v2")
    except ProtocolError as exc:
        serving.metrics.inference_errors.labels(engine.id, "invalid_request").inc()
        raise ApiError(400, "invalid_request", str(exc)) from exc
    except EngineError as exc:
        status = 400 if exc.code in _CLIENT_ERRORS else 503
        raise ApiError(status, exc.code, exc.detail) from exc
    header: dict[str, Any] = {"model_name": name, "model_version": engine.id}
    if "id" in message:
        header["id"] = message["id"]
    header["parameters"] = {
        "compute_ms": round(result.compute_ms, 4),
        "queue_ms": round(result.queue_ms, 4),
        "batch_size": result.batch_size,
    }
    chosen = {output: result.outputs[output] for output in outputs}
    binary = [output for output, as_bytes in outputs.items() if as_bytes]
    if len(binary) < len(chosen):  # JSON outputs: serializing them can take a while
        payload, json_length = await run_in_threadpool(encode, header, "outputs", chosen, binary)
    else:
        payload, json_length = encode(header, "outputs", chosen, binary)
    headers = {"Server-Timing": f"queue;dur={result.queue_ms:.3f}, compute;dur={result.compute_ms:.3f}"}
    if json_length is None:
        return Response(payload, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(json_length)
    return Response(payload, media_type=BINARY_CONTENT_TYPE, headers=headers)


#: The two infer routes, served ahead of every other route (`app.main` puts them first in the
#: app's own route list: FastAPI tries the routes of included routers one router at a time, which
#: costs a fast model about a tenth of a millisecond) and without dependency solving (DirectRoute).
hot_routes = [
    DirectRoute(
        router.prefix + path,
        infer,
        methods=["POST"],
        summary=summary,
        tags=router.tags,
        openapi_extra=_INFER_BODY,
    )
    for path, summary in (
        ("/models/{name}/infer", "Inference: JSON tensors, or binary tensors after a JSON header"),
        ("/models/{name}/versions/{version}/infer", "Inference on one version"),
    )
]


def json_part_bytes(body: bytes, header_length: str | None) -> int:
    """How much of the body is JSON: all of it, or the header the client declares. The cap on JSON
    tensors applies to that part whatever the headers say (a header as long as the whole body is
    a JSON body; a header that is not a number is left to the parser's 400)."""
    if header_length is None:
        return len(body)
    try:
        return int(header_length)
    except ValueError:
        return 0


def _parse(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    message, tail = split(body, header_length)
    return message, decode(message.get("inputs"), tail, what="input")
