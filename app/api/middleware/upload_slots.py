"""At most N uploads received or checked at once; more are refused at once.

An upload costs a request's worth of disk while its body is received, then CPU and memory while
it is checked (unpacking a bundle, ONNX's checker, reading every array of a dataset). Unbounded,
a burst of uploads takes the machine from the inference it serves. This ASGI middleware counts the
uploads in progress and answers 503 `too_many_uploads` with `Retry-After` beyond the limit,
before the body is read: a refused client has sent its headers and nothing else is spent on it.
A slot is held until the response is sent (or the client goes away), so the count is exact.
While it is held, the multipart parser spools the upload under `spool_dir` (app.api.uploads).

The slots are the shared counters' (app.core.shared_counters): with Redis, N counts across every
API replica, and the slots of a replica killed mid-upload expire with their lease; with the
embedded broker (or while Redis is out of reach), N counts in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.api.access_policy import route_path
from app.api.errors import send_error
from app.api.uploads import install_spooling, spooling_in
from app.core.shared_counters import SharedCounters

#: Seconds a refused client is told to wait: about what checking a large upload takes.
RETRY_AFTER_S = 5
#: The pool of slots uploads take (a name among the shared counters').
UPLOADS = "uploads"


class UploadSlotsMiddleware:
    """POSTs to `upload_paths` take one of `limit` slots for as long as they are handled."""

    def __init__(
        self,
        app: Any,
        limit: int,
        upload_paths: tuple[str, ...],
        counters: SharedCounters,
        spool_dir: Path | None = None,
    ):
        self.app, self.limit, self.upload_paths, self.spool_dir = app, limit, upload_paths, spool_dir
        self.counters = counters
        if spool_dir is not None:
            install_spooling()

    def is_upload(self, scope: dict[str, Any]) -> bool:
        return (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and route_path(scope).rstrip("/") in self.upload_paths
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.is_upload(scope):
            await self.app(scope, receive, send)
            return
        slot = await self.counters.acquire(UPLOADS, self.limit)
        if slot is None:
            servers = "these servers are" if self.counters.shared else "this server is"
            detail = (
                f"{servers} already receiving {self.limit} uploads, the limit; "
                f"send this one again in {RETRY_AFTER_S} s"
            )
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await send_error(send, scope["path"], 503, "too_many_uploads", detail, headers)
            return
        try:
            if self.spool_dir is None:
                await self.app(scope, receive, send)
            else:
                with spooling_in(self.spool_dir):
                    await self.app(scope, receive, send)
        finally:
            await slot.release()
