"""Refuse oversized or stalled request bodies before they are read into temp files or memory.

FastAPI parses a multipart upload completely before the route runs, so a size check in the
route comes after the disk was already filled. This ASGI middleware answers 413 from the
Content-Length header when there is one, and otherwise stops reading once the limit is passed.

It also holds every body to a minimum transfer rate (`BodyPace`): a client that stops sending
half-way would otherwise hold its upload slot, and its connection, for as long as it likes. Below
`min_rate` bytes per second over a whole `window_s` the request gets 408 `body_too_slow` and the
connection is closed. A rate and not a deadline, so a big upload on a slow link still passes.

The inference routes read their bodies themselves (app.api.body_reader) and apply the same limits
(`SizeLimit`, made here so a limit reads the same wherever it is enforced): the JSON-tensor cap to
all of a JSON body and to the JSON part a binary request declares, whatever its headers say.
"""

from __future__ import annotations

import asyncio
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


class _TooSlow(Exception):
    """A window of the body passed below the minimum rate."""


class _Refused(Exception):
    """The body was refused (413, 408) and the answer already sent: stop the app below."""


@dataclass(frozen=True)
class BodyPace:
    """A body must arrive at `min_rate` bytes per second at least, counted over windows of
    `window_s` seconds (so a pause shorter than a window costs nothing if the rest is fast)."""

    min_rate: int
    window_s: float

    @property
    def bytes_per_window(self) -> float:
        return self.min_rate * self.window_s

    def refusal_detail(self) -> str:
        return (
            f"the request body arrived at under {self.min_rate} bytes per second for {self.window_s:g} s; "
            "send it again over a faster or steadier connection"
        )


def _size_limit(limit: int, code: str) -> SizeLimit:
    return json_tensor_limit(limit) if code == "json_tensors_too_large" else request_limit(limit)


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
        pace: BodyPace | None = None,
    ):
        self.app = app
        self.max_body_bytes, self.upload_bytes, self.upload_paths = max_body_bytes, upload_bytes, upload_paths
        self.json_tensor_bytes = json_tensor_bytes or max_body_bytes
        self.pace = pace

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
            await send_error(send, scope["path"], 413, code, _size_limit(limit, code).detail)
            return
        received = 0
        response_started = refused = False
        has_body = declared not in (b"", b"0") or b"transfer-encoding" in headers
        receive_paced = self._paced(receive) if self.pace is not None and has_body else receive

        async def refuse(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
            # Answer now: the framework would turn any error raised while it parses the body into
            # a generic 400, and its own response is dropped below.
            nonlocal refused
            if not response_started and not refused:
                refused = True
                await send_error(send, scope["path"], status, code, detail, headers)
            raise _Refused

        async def counting_receive() -> Message:
            nonlocal received
            try:
                message = await receive_paced()
            except _TooSlow:
                assert self.pace is not None
                await refuse(408, "body_too_slow", self.pace.refusal_detail(), {"Connection": "close"})
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await refuse(413, code, _size_limit(limit, code).detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_Refused):  # already answered
            await self.app(scope, counting_receive, tracking_send)

    def _paced(self, receive: Any) -> Any:
        """`receive`, held to the pace while the body is incomplete (raises `_TooSlow`); once the
        last part is in, a later call (waiting for the client to go away) waits as long as it must."""
        assert self.pace is not None
        pace, loop = self.pace, asyncio.get_running_loop()
        window_end, in_window, complete = loop.time() + pace.window_s, 0, False

        async def paced_receive() -> Message:
            nonlocal window_end, in_window, complete
            if complete:
                return await receive()
            while True:
                now = loop.time()
                if now >= window_end:
                    if in_window < pace.bytes_per_window:
                        raise _TooSlow
                    window_end, in_window = now + pace.window_s, 0
                try:
                    async with asyncio.timeout_at(window_end):
                        message = await receive()
                except TimeoutError:
                    continue  # the window is over: judged at the top
                in_window += len(message.get("body", b""))
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                return message

        return paced_receive
