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
from app.api.body_reader import read_body
from app.api.deps import project_of, serving_of
from app.api.direct_route import DirectRoute
from app.api.middleware.body_limit import SizeLimit, json_tensor_limit, request_limit
from app.core.db import get_sessionmaker
from app.core.errors import ApiError
from app.core.orm import EngineRecord, ModelRecord
from app.core.settings import Settings
from app.services.health import readiness_checks
from app.serving import inference
from app.serving.admission import json_text_bytes
from app.serving.inference import ServedEngine, Serving
from app.serving.limits import engine_max_batch
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
    checks = readiness_checks(request.app.state.settings, request.app.state.store, include_broker=False)
    is_ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"ready": is_ready, "checks": checks}, status_code=200 if is_ready else 503)


@router.get("", summary="Server metadata")
def server_metadata() -> dict[str, Any]:
    return {"name": "optiforge", "version": __version__, "extensions": ["binary_tensor_data"]}


def _engine_row(request: Request, name: str, version: str | None) -> tuple[EngineRecord, list[str], dict]:
    """The named engine of the caller's project, its model's engine ids (the versions) and the
    model's signature."""
    with get_sessionmaker(request.app.state.settings.resolved_database_url)() as session:
        record = inference.find_engine(session, name, version, project_id=project_of(request))
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
    """`parameters.max_batch_size` is the largest batch one request may carry (as in a Triton
    model's configuration); a larger one is a 413 `batch_too_large`."""
    record, versions, model_info = _engine_row(request, name, version)
    max_batch = engine_max_batch(
        record.metrics, record.build_info, request.app.state.settings.max_inference_batch
    )
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORMS.get(
            record.backend, record.backend
        ),  # Triton's names, for tools that branch on them
        "inputs": _tensor_metadata(model_info["inputs"]),
        "outputs": _tensor_metadata(model_info["outputs"]),
        "parameters": {"max_batch_size": max_batch},
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
    the engine call leaves it (and JSON tensors of more than a few KiB, parsed and written on a
    worker thread in the JSON gate's turn), so the protocol adds little to the engine's own time.
    The body is read whole (app.api.body_reader: a time limit, the JSON-tensor cap, the process's
    body budget) before the request takes an in-flight slot: a slow client holds none. A batch over
    the model's `max_batch_size` (its metadata's parameters) is a 413 `batch_too_large`; the engine
    call waits for the process's activation budget (503 `server_busy` after a while).
    """
    serving = serving_of(request)
    # An unknown name is a 404 whatever the body.
    engine = await serving.lookup(name, version, project_id=project_of(request))
    settings = request.app.state.settings
    header_length = request.headers.get(HEADER_LENGTH)
    limit = body_limit(settings, header_length)
    async with read_body(request, serving.bodies, limit, settings.body_read_timeout_s) as body:
        with serving.inflight.slot():
            return await _infer(serving, name, engine, body, header_length)


async def _infer(
    serving: Serving, name: str, engine: ServedEngine, body: bytes | bytearray, header_length: str | None
) -> Response:
    try:
        json_bytes = json_part_bytes(body, header_length)
        message, feeds = await serving.json_gate.run(json_bytes, _parse, body, header_length)
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
    json_bytes = json_text_bytes(array for output, array in chosen.items() if output not in binary)
    payload, json_length = await serving.json_gate.run(json_bytes, encode, header, "outputs", chosen, binary)
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


def body_limit(settings: Settings, header_length: str | None) -> SizeLimit:
    """The most bytes a request's body may have. The cap on JSON tensors applies to the JSON part
    whatever the headers say: without a header length the whole body is JSON; with one, the JSON
    it declares is refused here, before a byte is read, when over the cap (a header as long as the
    body is a JSON body), and the body may then be as long as any request (binary tensors). A header
    that is not a number is left to the parser's 400."""
    json_cap = json_tensor_limit(settings.max_json_tensor_bytes)
    if header_length is None:
        return json_cap
    if header_length.strip().isdigit() and int(header_length) > json_cap.max_bytes:
        raise json_cap.refusal()
    return request_limit(settings.max_request_bytes)


def json_part_bytes(body: bytes | bytearray, header_length: str | None) -> int:
    """How much of the body is JSON: all of it, or the header the client declares (0 when that is
    not a number: the parser answers it)."""
    if header_length is None:
        return len(body)
    try:
        return min(int(header_length), len(body))
    except ValueError:
        return 0


def _parse(
    body: bytes | bytearray, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The request's message and its inputs as arrays. The message keeps no `data` lists: they
    would hold about 11× their text in memory until the response, and be freed on the event loop."""
    message, tail = split(body, header_length)
    feeds = decode(message.get("inputs"), tail, what="input")
    for entry in message.get("inputs") or ():
        if isinstance(entry, dict):
            entry.pop("data", None)
    return message, feeds
