"""Refuse oversized request bodies before they are read into temp files.

FastAPI parses a multipart upload completely before the route runs, so a size check in the
route comes after the disk was already filled. This ASGI middleware answers 413 from the
Content-Length header when there is one, and otherwise stops reading once the limit is passed.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from app.api.errors import send_error

Scope = dict[str, Any]
Message = dict[str, Any]


class _BodyTooLarge(Exception):
    pass


#: `/v1/engines/{id}/infer`: a JSON body of tensors (parsed whole before the route runs).
JSON_TENSOR_PATH = re.compile(r"^/v1/engines/[^/]+/infer/?$")


class BodySizeLimitMiddleware:
    """`max_body_bytes` for every request, `upload_bytes` for POSTs to the `upload_paths`, and
    `json_tensor_bytes` for `/v1` inference, whose JSON tensors take many times their size in
    memory once parsed (the `/v2` route applies the same cap to its JSON part)."""

    def __init__(
        self,
        app: Any,
        max_body_bytes: int,
        upload_bytes: int,
        upload_paths: tuple[str, ...],
        json_tensor_bytes: int | None = None,
    ):
        self.app = app
        self.max_body_bytes, self.upload_bytes, self.upload_paths = max_body_bytes, upload_bytes, upload_paths
        self.json_tensor_bytes = json_tensor_bytes or max_body_bytes

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        """The request's limit, and the error code that says which one it broke."""
        if scope["method"] != "POST":
            return self.max_body_bytes, "upload_too_large"
        if scope["path"].rstrip("/") in self.upload_paths:
            return self.upload_bytes, "upload_too_large"
        if JSON_TENSOR_PATH.match(scope["path"]) and self.json_tensor_bytes < self.max_body_bytes:
            return self.json_tensor_bytes, "json_tensors_too_large"
        return self.max_body_bytes, "upload_too_large"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, code = self.limit_for(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(send, scope["path"], limit, code)
            return
        received = 0
        response_started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now: the framework would turn any error raised while it parses the
                    # body into a generic 400, and its own response is dropped below.
                    if not response_started and not refused:
                        refused = True
                        await self._refuse(send, scope["path"], limit, code)
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

    async def _refuse(self, send: Any, path: str, limit: int, code: str) -> None:
        detail = f"the request body is over the limit of {limit} bytes"
        if code == "json_tensors_too_large":
            detail += ": send tensors this large as binary tensors to /v2/models/{id}/infer"
        await send_error(send, path, 413, code, detail)
