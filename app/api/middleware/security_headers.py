"""Security headers on every response: a page of this server cannot be framed (clickjacking),
run script it did not load from here (XSS through anything a page shows), leak its URL to
another site, or have a response sniffed into another content type.

On every response rather than on the console's pages only: an error page, a JSON body or a
downloaded report opened in a browser are pages too, and one rule in one place cannot miss a
route added later. The API itself is unaffected (browsers apply these; HTTP clients ignore them).

One exception, the API documentation: Swagger UI's and ReDoc's pages (fastapi-offline) start
from an inline script and inject styles, so there script and style may be inline; they show only
this server's OpenAPI document, and they may still not be framed nor load from anywhere else.
"""

from __future__ import annotations

from typing import Any

from app.api.access_policy import route_path

#: Everything from this server only; no inline script or style, no plugins, no <base>, no framing.
#: `data:` and `blob:` images: the console's favicon and the report plot it downloads.
STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Swagger UI and ReDoc: their inline start-up script and styles; ReDoc's search runs in a blob: worker.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_PAGES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})

_COMMON = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeadersMiddleware:
    """ASGI middleware: adds the headers above to every HTTP response that does not set its own."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = (DOCS_CSP if route_path(scope) in DOCS_PAGES else STRICT_CSP).encode()
        added = [*_COMMON, (b"content-security-policy", csp)]

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers") or ()}
                extra = [(name, value) for name, value in added if name not in present]
                message = {**message, "headers": [*(message.get("headers") or ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
