"""Structured logs: one JSON line per request, and a request id on every log line it causes.

The id comes from the caller's `X-Request-ID` header (so a trace can cross services) or is made
here, and is echoed in the response. A contextvar carries it into the thread-pool code that runs
the route, so a warning logged deep inside inference still names the request.

The logged `client` is the request's `scope["client"]`: the socket peer, unless the peer is one of
`OPTIFORGE_TRUSTED_PROXIES`, whose `X-Forwarded-For` the server (app.server.config) believes. From
anyone else that header is ignored, so a client cannot choose the address it is logged under.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from app.core.metrics import Metrics

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

access_log = logging.getLogger("optiforge.access")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record logged while a request is being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _key_id(scope: dict[str, Any]) -> str | None:
    """The id of the API key the request was made with (app.api.middleware.auth), never the key."""
    principal = scope.get("state", {}).get("principal")
    return getattr(principal, "key_id", None)


class RequestLogMiddleware:
    """ASGI middleware: request id in and out, an access-log line, and the HTTP metrics."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _VALID_ID.match(supplied) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.http_seconds.labels(scope["method"], route).observe(seconds)
            if access_log.isEnabledFor(logging.INFO):  # no line to build when nobody reads it
                self._log(scope, route, status, seconds)
            REQUEST_ID.reset(token)

    @staticmethod
    def _log(scope: dict[str, Any], route: str, status: int, seconds: float) -> None:
        access_log.info(
            "%s %s %s",
            scope["method"],
            scope["path"],
            status,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000.0, 3),
                "client": (scope.get("client") or [None])[0],
                "key_id": _key_id(scope),
            },
        )
