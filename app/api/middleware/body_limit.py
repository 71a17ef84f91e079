"""Refuse oversized request bodies before they are read into temp files or memory.

FastAPI parses a multipart upload completely before the route runs, so a size check in the
route comes after the disk was already filled. This ASGI middleware answers 413 from the
Content-Length header when there is one, and otherwise stops reading once the limit is passed.

The inference routes read their bodies themselves (app.api.body_reader) and apply the same limits
(`SizeLimit`, made here so a limit reads the same wherever it is enforced): the JSON-tensor cap to
all of a JSON body and to the JSON part a binary request declares, whatever its headers say.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from optiforge_client.tensors import HEADER_LENGTH

from app.api.access_policy import route_path
from app.api.errors import send_error
from app.core.errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class SizeLimit:
    """The most bytes a body may have, and the code and sentence of the 413 over it."""

    max_bytes: int
    code: str
    detail: str

    def refusal(self) -> ApiError:
        return ApiError(413, self.code, self.detail)


def request_limit(max_bytes: int) -> SizeLimit:
    """`max_request_bytes`: any body."""
    detail = f"the request body is over the limit of {max_bytes} bytes"
    return SizeLimit(max_bytes, "upload_too_large", detail)


def json_tensor_limit(max_bytes: int) -> SizeLimit:
    """`max_json_tensor_bytes`: JSON tensors, which take about 11× their text in memory once parsed."""
    return SizeLimit(
        max_bytes,
        "json_tensors_too_large",
        f"JSON tensors over {max_bytes} bytes: send tensors this large as binary tensors "
        f"({HEADER_LENGTH}) to /v2/models/{{name}}/infer",
    )


class _BodyTooLarge(Exception):
    pass


#: `/v1/engines/{id}/infer`: a JSON body of tensors (its route applies the same cap as it reads).
JSON_TENSOR_PATH = re.compile(r"^/v1/engines/[^/]+/infer/?$")


class BodySizeLimitMiddleware:
    """`max_body_bytes` for every request, `upload_bytes` for POSTs to the `upload_paths`, and
    `json_tensor_bytes` for `/v1` inference, whose JSON tensors take many times their size in
    memory once parsed (the `/v2` route applies the same cap to its JSON part as it reads)."""

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
        if route_path(scope).rstrip("/") in self.upload_paths:
            return self.upload_bytes, "upload_too_large"
        if JSON_TENSOR_PATH.match(route_path(scope)) and self.json_tensor_bytes < self.max_body_bytes:
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
        size_limit = json_tensor_limit(limit) if code == "json_tensors_too_large" else request_limit(limit)
        await send_error(send, path, 413, code, size_limit.detail)
