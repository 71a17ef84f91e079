"""Refuse oversized request bodies before they are read into temp files.

FastAPI parses a multipart upload completely before the route runs, so a size check in the
route comes after the disk was already filled. This ASGI middleware answers 413 from the
Content-Length header when there is one, and otherwise stops reading once the limit is passed.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send)
            return
        received = 0
        response_started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Answer now: the framework would turn any error raised while it parses the
                    # body into a generic 400, and its own response is dropped below.
                    if not response_started and not refused:
                        refused = True
                        await self._refuse(send)
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):  # already answered with 413
            await self.app(scope, counting_receive, tracking_send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {
                "code": "upload_too_large",
                "detail": f"the request body is over the limit of {self.max_body_bytes} bytes",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
