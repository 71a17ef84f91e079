"""Every error response is JSON with a machine-readable `code` and a human `detail`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.body_errors import bounded_issues, unreadable_body, validation_code, with_suggestions
from app.core.errors import ApiError, from_engine_error
from app.core.outages import as_storage_fault
from engines.errors import EngineError

#: Paths whose errors follow the Open Inference Protocol: `{"error": message}`, what its clients read.
PROTOCOL_PREFIX = "/v2"


def error_body(path: str, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The JSON of an error: `{"code", "detail"}`, or `{"error", "code"}` under the inference protocol."""
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return {"error": detail, "code": code, **extra}
    return {"code": code, "detail": detail, **extra}


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of the app takes at `path`, for a 405's `Allow` header: asked of
    the router itself (its routes' own matching, nested routers and the routes left out of the
    OpenAPI document, such as the console's pages, included). Mounts take any method: skipped."""
    from starlette.routing import Match, Mount

    methods = []
    for method in _METHODS:
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}
        routes = (route for route in app.router.routes if not isinstance(route, Mount))
        if any(route.matches(scope)[0] == Match.FULL for route in routes):
            methods.append(method)
    return methods


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


async def send_error(
    send: Any, path: str, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    """An error answered from ASGI middleware, before any route (the same JSON as the handlers')."""
    body = json.dumps(error_body(path, code, detail)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _storage_fault(request: Request, exc: Exception) -> JSONResponse | None:
    """A storage fault (database unreachable, disk full: app.core.outages) is the server's
    condition, answered 503 `database_unavailable` / 507 `insufficient_storage` on every route, the
    /v2 DirectRoutes included (they run inside the handlers' middleware); None for other errors."""
    fault = as_storage_fault(exc)
    if fault is None:
        return None
    logging.getLogger("optiforge.api").warning(
        "%s on %s: %s", fault.code, request.url.path, type(exc).__name__, exc_info=True
    )
    body = error_body(request.url.path, fault.code, fault.detail)
    return JSONResponse(body, status_code=fault.status, headers=fault.headers)


def _body_model(request: Request) -> type[BaseModel] | None:
    """The JSON body model of the route that refused the request (None: a form, or no body)."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


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
        issues = with_suggestions(list(exc.errors()), _body_model(request))  # "did you mean …?"
        errors, detail = bounded_issues(issues, len(issues))  # a few KB, however many problems
        body = error_body(request.url.path, validation_code(issues), detail, errors=errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        fault = _storage_fault(request, exc)  # a multipart body that could not be spooled: disk full
        if fault is not None:
            return fault
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 400:  # the framework could not parse the body
            code, detail = unreadable_body(request.headers.get("content-type", ""), str(exc.detail))
        elif exc.status_code == 405:  # the framework names the methods of the first route that matched
            allowed = allowed_methods(app, request.url.path)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed here; this path takes {', '.join(allowed)}"
        else:
            detail = str(exc.detail)
        body = error_body(request.url.path, code, detail)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(OSError)
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # SQLAlchemyError and OSError are registered by name so that storage faults are answered
        # here, inside the middleware stack, rather than by the outermost catch-all.
        fault = _storage_fault(request, exc)
        if fault is not None:
            return fault
        # Logged with the request id; the caller gets JSON, never a traceback.
        logging.getLogger("optiforge.api").exception("unhandled error on %s", request.url.path)
        body = error_body(request.url.path, "internal_error", f"internal error: {type(exc).__name__}")
        return JSONResponse(body, status_code=500)
