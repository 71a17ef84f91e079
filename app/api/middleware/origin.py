"""State-changing requests from a foreign web page are refused (cross-site request forgery).

A browser attaches the `Origin` of the page that makes a request. A page on another site could
otherwise upload or delete through a visitor's browser on a server that trusts its network (one
with no key yet, on loopback). Requests with no `Origin` (curl, the SDK, tritonclient) pass; so
do those from the server's own origin and from `OPTIFORGE_CORS_ORIGINS`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from app.api.errors import send_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_same_origin(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port]) names the host the request was sent to. The scheme
    is not compared: behind a TLS-terminating proxy the server sees http for an https page."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.lower()


class OriginMiddleware:
    """ASGI middleware: 403 `foreign_origin` for a POST/PUT/PATCH/DELETE from another site."""

    def __init__(self, app: Any, allowed_origins: frozenset[str]):
        self.app, self.allowed_origins = app, allowed_origins

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin", b"").decode("latin-1")
            cross_site = headers.get(b"sec-fetch-site", b"").decode("latin-1") == "cross-site"
            host = headers.get(b"host", b"").decode("latin-1")
            if (origin and origin not in self.allowed_origins and not is_same_origin(origin, host)) or (
                not origin and cross_site
            ):
                source = origin or "another site"
                detail = (
                    f"requests that change something are refused from the web origin '{source}'; "
                    "an operator can allow it with OPTIFORGE_CORS_ORIGINS"
                )
                await send_error(send, scope["path"], 403, "foreign_origin", detail)
                return
        await self.app(scope, receive, send)
