"""Every error response is JSON with a machine-readable `code` and a human `detail`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import ApiError, from_engine_error
from engines.errors import EngineError

#: Paths whose errors follow the Open Inference Protocol: `{"error": message}`, what its clients read.
PROTOCOL_PREFIX = "/v2"


def error_body(path: str, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The JSON of an error: `{"code", "detail"}`, or `{"error", "code"}` under the inference protocol."""
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return {"error": detail, "code": code, **extra}
    return {"code": code, "detail": detail, **extra}


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of the app takes at `path` (read from its OpenAPI document, which
    lists every route whatever router it is in), for a 405's `Allow` header."""
    table = getattr(app.state, "route_methods", None)
    if table is None:
        from starlette.routing import compile_path

        table = [
            (compile_path(template)[0], {method.upper() for method in operations})
            for template, operations in app.openapi()["paths"].items()
        ]
        app.state.route_methods = table
    methods: set[str] = set()
    for pattern, verbs in table:
        if pattern.match(path):
            methods |= verbs
    return sorted(methods)


async def send_error(
    send: Any, path: str, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    """An error answered from ASGI middleware, before any route (the same JSON as the handlers')."""
    body = json.dumps(error_body(path, code, detail)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(request.url.path, exc.code, exc.detail, **exc.extra),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        error = from_engine_error(exc)
        body = error_body(request.url.path, error.code, error.detail, **error.extra)
        return JSONResponse(body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
            for item in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        body = error_body(request.url.path, "validation_error", detail, errors=errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # the framework names the methods of the first route that matched
            allowed = allowed_methods(app, request.url.path)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed here; this path takes {', '.join(allowed)}"
        else:
            detail = str(exc.detail)
        body = error_body(request.url.path, code, detail)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with the request id; the caller gets JSON, never a traceback.
        logging.getLogger("optiforge.api").exception("unhandled error on %s", request.url.path)
        body = error_body(request.url.path, "internal_error", f"internal error: {type(exc).__name__}")
        return JSONResponse(body, status_code=500)
