"""An inference request's body, read whole before the request takes an inference slot.

The framework reads a body whenever a route asks for it, as slowly as the client sends it. An
inference route that took its in-flight slot first and read its body second could be locked out
by clients that send their headers and ten bytes and then nothing: each holds a slot for as long
as its connection stays open. So the inference routes read their body first, through here, and
take a slot only once it is complete. While it arrives, a body is bounded three ways:

- in time: `body_read_timeout_s` for the whole body, then 408 `body_timeout` and the connection
  is closed (a client that stalls, or is gone without a FIN, costs a socket for that long);
- in size: the route's limit (the JSON-tensor cap for JSON, the request limit for binary tensors),
  checked against `Content-Length` before anything is read and against the bytes as they arrive:
  413 with the limit's code;
- in memory: the process's `BodyBudget`, reserved as bytes arrive (so idle connections hold
  nothing) and given back when the request is done: 503 `server_busy` with `Retry-After` when
  bodies in memory are at the budget.

There is no per-client limit on body reads: idle slow clients cost no slot and no budget, and a
limit per address would also block well-behaved clients behind the same address (a NAT, a proxy,
a load generator on one machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Request

from app.api.middleware.body_limit import SizeLimit
from app.core.errors import ApiError
from app.serving.admission import BodyBudget

#: Seconds a client refused for a full budget is asked to wait before it retries.
RETRY_AFTER_S = 1


@asynccontextmanager
async def read_body(
    request: Request, budget: BodyBudget, limit: SizeLimit, timeout_s: float
) -> AsyncIterator[bytes | bytearray]:
    """The whole body, held against `budget` until the `async with` ends (ApiError 408, 413 or 503
    as the module says; 400 `body_incomplete` when the client disconnects first)."""
    declared = _content_length(request)
    if declared is not None and declared > limit.max_bytes:
        raise limit.refusal()
    if declared is not None and not budget.fits(declared):
        raise _budget_full(budget)
    held = 0
    try:
        body: bytes | bytearray = b""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ApiError(400, "body_incomplete", "the client closed before its body was complete")
                chunk = message.get("body", b"")
                if chunk:
                    if len(body) + len(chunk) > limit.max_bytes:
                        raise limit.refusal()
                    if not budget.take(len(chunk)):
                        raise _budget_full(budget)
                    held += len(chunk)
                    if not body and not message.get("more_body", False):
                        body = chunk  # the usual small body: one message, no copy
                    else:
                        if not isinstance(body, bytearray):
                            body = bytearray(body)
                        body += chunk  # grown in place (mremap for big buffers), not copied per chunk
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        budget.give_back(held)
        raise ApiError(
            408,
            "body_timeout",
            f"the request body did not arrive within {timeout_s:g} s",
            headers={"Connection": "close"},
        ) from None
    except BaseException:
        budget.give_back(held)
        raise
    try:
        yield body
    finally:
        budget.give_back(held)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _budget_full(budget: BodyBudget) -> ApiError:
    return ApiError(
        503,
        "server_busy",
        f"request bodies in memory are at this server's limit of {budget.capacity} bytes; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
