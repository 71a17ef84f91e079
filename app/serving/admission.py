"""What inference requests may hold in memory besides their engine: buffered bodies and JSON.

A request costs memory twice around its engine call: its body, buffered as it arrives, and, for
JSON tensors, the conversion (Python lists of floats take about 11× their text while a body is
parsed into arrays, or outputs are written as JSON). The in-flight limit (`InflightLimit`) counts
requests, not bytes, and is only taken once a body is complete, so that a client that sends slowly
holds no inference slot. These two bound the bytes, for the whole process:

- `BodyBudget`: bytes of request bodies held at once. Bytes are reserved as they arrive (never from
  the `Content-Length` a client declares, which would let idle connections that promise big
  bodies hold the budget while sending nothing); a request that would go over it is refused at
  once (503 with Retry-After), since waiting would keep its connection's bytes in memory anyway.
- `JsonGate`: bytes of JSON tensors being parsed or written at once. A conversion waits its turn
  instead of failing: it holds the GIL, so conversions side by side are no faster than in turn,
  only bigger. Small ones run on the event loop, without a turn.

And one bounds what engine calls hold, which grows with the batch rather than the body:

- the activation gate (a `ByteGate` of `inference_activation_budget_mb`): an engine call waits
  until its estimated activation bytes (app.serving.limits.activation_estimate) fit beside those
  running; one over the whole budget runs alone. A call that waits longer than
  `inference_queue_timeout_s` gets 503 `server_busy` with Retry-After.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
#: JSON up to this size is converted on the event loop: a hop to a worker thread costs more than
#: parsing or writing a few thousand numbers, which blocks the loop for well under a millisecond.
INLINE_JSON_BYTES = 64 * 1024
#: About how many bytes of JSON text one number takes (a float32 as Python writes it: up to 19
#: characters and a comma): the weight of arrays about to be written.
JSON_BYTES_PER_VALUE = 20


def json_text_bytes(arrays: Iterable[Any]) -> int:
    """About how long these arrays are once written as JSON (their weight in the JSON gate)."""
    return JSON_BYTES_PER_VALUE * sum(int(np.size(array)) for array in arrays)


class BodyBudget:
    """Request-body bytes this process holds at once, reserved as they arrive and given back when
    the request is done. Thread-safe: every event loop of the process shares it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes reserved now (for metrics and tests)."""
        return self._held

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes would fit now (a hint for refusing a declared length early;
        only `take` reserves)."""
        return self._held + size <= self.capacity

    def take(self, size: int) -> bool:
        """Reserve `size` bytes; False (nothing reserved) when they do not fit."""
        with self._lock:
            if self._held + size > self.capacity:
                return False
            self._held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._held -= size


class GateTimeout(TimeoutError):
    """A turn of a `ByteGate` did not come in time (nothing is held)."""


class ByteGate:
    """At most `capacity` bytes of some work in memory at once across the process; the rest wait
    in order.

    A turn weighs its bytes, capped at `capacity` so that the largest one still runs (alone).
    Waiters are served first come, first served, so a big turn is not starved by a stream of small
    ones. Works across event loops and threads (a waiter is woken on its own loop), as the budget
    does.
    """

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._in_use = 0
        self._waiters: deque[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Bytes held now (for metrics and tests)."""
        return self._in_use

    @asynccontextmanager
    async def turn(self, size: int, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Hold `size` bytes of the gate while the body of the `async with` runs; GateTimeout
        when the turn does not come within `timeout_s` (nothing held then)."""
        weight = min(max(size, 0), self.capacity)
        try:
            async with asyncio.timeout(timeout_s):
                await self._acquire(weight)
        except TimeoutError:
            raise GateTimeout(f"no turn for {weight} bytes within {timeout_s} s") from None
        try:
            yield
        finally:
            self._release(weight)

    async def _acquire(self, weight: int) -> None:
        with self._lock:
            if not self._waiters and self._in_use + weight <= self.capacity:
                self._in_use += weight
                return
            loop = asyncio.get_running_loop()
            entry = (weight, loop, loop.create_future())
            self._waiters.append(entry)
        try:
            await entry[2]
        except asyncio.CancelledError:  # the client went away while waiting
            with self._lock:
                granted = entry not in self._waiters
                if not granted:
                    self._waiters.remove(entry)
            if granted:
                self._release(weight)
            else:
                self._wake()  # it may have been first in line, holding back smaller ones behind it
            raise

    def _release(self, weight: int) -> None:
        with self._lock:
            self._in_use -= weight
        self._wake()

    def _wake(self) -> None:
        granted = []
        with self._lock:
            while self._waiters and self._in_use + self._waiters[0][0] <= self.capacity:
                weight, loop, future = self._waiters.popleft()
                self._in_use += weight
                granted.append((weight, loop, future))
        for weight, loop, future in granted:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # its loop is closed: nobody will use the turn, give it back
                self._release(weight)


class JsonGate(ByteGate):
    """At most `capacity` bytes of JSON parsed or written at once across the process (a conversion
    weighs its JSON's length); small conversions run on the event loop without a turn."""

    async def run(self, size: int, convert: Callable[..., T], *args: Any) -> T:
        """`convert(*args)`, which parses or writes about `size` bytes of JSON: on the event loop
        when small, else on a worker thread once the gate has room for it (so the event loop never
        converts big JSON)."""
        if size <= INLINE_JSON_BYTES:
            return convert(*args)
        async with self.turn(size):
            return await run_in_threadpool(convert, *args)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled waiter gives its turn back itself
        future.set_result(None)
