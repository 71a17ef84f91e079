"""Counters the API replicas share: token buckets (the inference rate per key) and leased slots
(uploads in progress).

One interface (`SharedCounters`), two strategies, chosen once per process by `shared_counters`:
- `LocalCounters`: in this process. The embedded mode (no Redis): a replica counts alone.
- `RedisCounters`: in the broker's Redis (app.core.shared_redis), so a limit holds across
  replicas. Each operation is one Lua script: atomic, one round trip, on Redis's clock (the
  replicas' clocks need not agree).

A bucket holds `max(1, rate)` tokens (a second's burst) and refills at `rate` a second. A slot is
a member of a sorted set scored by its lease's expiry; its holder renews the lease every third of
`lease_s`, so the slots of a replica killed mid-upload free themselves within `lease_s`. (A counter
with INCR/DECR and a TTL cannot do that: it cannot tell a dead replica's increments from a live
one's, and its TTL never runs out while the other replicas keep using it.)

Redis out of reach: neither open nor closed, but each operation falls back to this process's own
counters (what every replica did before Redis was used) for `retry_s`, with one warning per outage:
- the inference rate: serving must not stop because Redis did (`/v2` also outlives a database
  outage), and a per-replica bucket still holds each replica to the key's rate, so N replicas let N
  times through until Redis is back. Failing closed would turn a cache outage into an outage of
  the product; failing open would let one key take every replica.
- upload slots: they protect each replica's CPU, memory and disk, which a per-process count still
  does; slots taken in Redis before it went away expire with their lease.
Never a 500: a caller sees at worst the per-replica limits it saw before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.settings import Settings
from app.core.shared_redis import REDIS_TIMEOUT_S, namespace, shared_redis_url

logger = logging.getLogger(__name__)

#: Local buckets unused this long are dropped, so that many short-lived keys do not grow the table.
IDLE_SECONDS = 300.0
#: Seconds a slot's lease lasts without a renewal: how long a killed replica's uploads count.
LEASE_S = 30.0
#: Seconds the counters stay local after Redis failed, before Redis is tried again.
RETRY_S = 5.0

# KEYS[1] the bucket (a hash: tokens, at); ARGV rate, capacity. Returns the seconds to wait ("0" = go).
_TAKE_LUA = """
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil or at == nil then tokens, at = capacity, now end
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""

# KEYS[1] the slots (a sorted set: member -> lease expiry, ms); ARGV limit, lease ms, member. 1: taken.
_ACQUIRE_LUA = """
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
"""

# KEYS[1] the slots; ARGV lease ms, member. Renews (or puts back, after a Redis restart) a held slot.
_RENEW_LUA = """
local lease = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
"""


class Slot(Protocol):
    """One slot of a pool, held until `release` (idempotent)."""

    async def release(self) -> None: ...


class SharedCounters(Protocol):
    #: Whether the counts are shared with other replicas (what an error message may say).
    shared: bool

    async def take(self, bucket: str, rate: float) -> float:
        """Spend a token of `bucket` (refilled at `rate` a second): 0.0 when the caller may go, else
        the seconds until it could (for `Retry-After`)."""
        ...

    async def acquire(self, pool: str, limit: int) -> Slot | None:
        """One of `limit` slots of `pool`, or None when all are held."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Bucket:
    tokens: float
    updated: float


class LocalCounters:
    """The counters of this process alone (the embedded mode, and Redis's fallback)."""

    shared = False

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last_prune = time.monotonic()

    async def take(self, bucket: str, rate: float) -> float:
        return self.take_now(bucket, rate)

    def take_now(self, bucket: str, rate: float) -> float:
        """`take` without the event loop (it never blocks on anything but a short lock)."""
        now = time.monotonic()
        capacity = max(1.0, rate)
        with self._lock:
            state = self._buckets.get(bucket)
            if state is None:
                state = self._buckets[bucket] = _Bucket(capacity, now)
            state.tokens = min(capacity, state.tokens + (now - state.updated) * rate)
            state.updated = now
            if now - self._last_prune > IDLE_SECONDS:
                self._prune(now)
            if state.tokens >= 1.0:
                state.tokens -= 1.0
                return 0.0
            return (1.0 - state.tokens) / rate

    def _prune(self, now: float) -> None:  # with the lock held
        self._buckets = {key: b for key, b in self._buckets.items() if now - b.updated < IDLE_SECONDS}
        self._last_prune = now

    async def acquire(self, pool: str, limit: int) -> Slot | None:
        with self._lock:
            if self._held.get(pool, 0) >= limit:
                return None
            self._held[pool] = self._held.get(pool, 0) + 1
        return _LocalSlot(self, pool)

    def held(self, pool: str) -> int:
        return self._held.get(pool, 0)

    def _release(self, pool: str) -> None:
        with self._lock:
            self._held[pool] -= 1

    async def close(self) -> None:
        return None


class _LocalSlot:
    def __init__(self, counters: LocalCounters, pool: str):
        self._counters, self._pool, self._held = counters, pool, True

    async def release(self) -> None:
        if self._held:
            self._held = False
            self._counters._release(self._pool)


class RedisCounters:
    """The counters in Redis under `prefix`, with `LocalCounters` to fall back on (module docstring)."""

    shared = True

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        lease_s: float = LEASE_S,
        retry_s: float = RETRY_S,
        timeout_s: float = REDIS_TIMEOUT_S,
    ):
        self.url, self.prefix = url, prefix
        self.lease_ms = max(1, int(lease_s * 1000))
        self.retry_s, self.timeout_s = retry_s, timeout_s
        self.local = LocalCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._down_until = 0.0
        self._outage = False

    def _redis(self) -> aioredis.Redis:
        """A client of the running event loop (an asyncio client belongs to the loop that made it;
        a server has one loop, a test may start several)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            self._loop = loop
            self._scripts = {
                name: self._client.register_script(source)
                for name, source in (("take", _TAKE_LUA), ("acquire", _ACQUIRE_LUA), ("renew", _RENEW_LUA))
            }
        return self._client

    def _script(self, name: str) -> Any:
        self._redis()
        return self._scripts[name]

    async def take(self, bucket: str, rate: float) -> float:
        if time.monotonic() >= self._down_until:
            try:
                wait = await self._script("take")(
                    keys=[f"{self.prefix}rate:{bucket}"], args=[rate, max(1.0, rate)]
                )
            except (RedisError, OSError) as exc:
                self._went_down(exc)
            else:
                self._came_back()
                return float(wait)
        return self.local.take_now(bucket, rate)

    async def acquire(self, pool: str, limit: int) -> Slot | None:
        if time.monotonic() >= self._down_until:
            key, member = f"{self.prefix}slots:{pool}", uuid.uuid4().hex
            try:
                taken = await self._script("acquire")(keys=[key], args=[limit, self.lease_ms, member])
            except (RedisError, OSError) as exc:
                self._went_down(exc)
            else:
                self._came_back()
                return _RedisSlot(self, key, member) if int(taken) else None
        return await self.local.acquire(pool, limit)

    async def held(self, pool: str) -> int:
        """Slots of `pool` held now across the replicas (leases not yet expired): for tests and probes."""
        key = f"{self.prefix}slots:{pool}"
        return int(await self._redis().zcount(key, f"({int(time.time() * 1000)}", "+inf"))

    async def renew(self, key: str, member: str) -> None:
        await self._script("renew")(keys=[key], args=[self.lease_ms, member])

    async def forget(self, key: str, member: str) -> None:
        await self._redis().zrem(key, member)

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_s
        if not self._outage:
            self._outage = True
            logger.warning(
                "Redis is out of reach (%s: %s): rate limits and upload slots are counted per API "
                "replica until it is back (tried again every %g s)",
                type(exc).__name__,
                exc,
                self.retry_s,
            )

    def _came_back(self) -> None:
        if self._outage:
            self._outage = False
            logger.warning("Redis is back: rate limits and upload slots are shared across replicas again")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


class _RedisSlot:
    """A slot in Redis, its lease renewed by a task on the event loop until released."""

    def __init__(self, counters: RedisCounters, key: str, member: str):
        self._counters, self._key, self._member = counters, key, member
        self._renewal: asyncio.Task | None = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        period = self._counters.lease_ms / 3000
        while True:
            await asyncio.sleep(period)
            try:
                await self._counters.renew(self._key, self._member)
            except (RedisError, OSError):
                logger.debug("an upload slot's lease could not be renewed", exc_info=True)

    async def release(self) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is None:
            return
        renewal.cancel()
        with contextlib.suppress(RedisError, OSError):  # the lease expires on its own
            await self._counters.forget(self._key, self._member)


def shared_counters(settings: Settings) -> SharedCounters:
    """The counters this process uses: in Redis when the broker is Redis, else in the process."""
    url = shared_redis_url(settings)
    return RedisCounters(url, namespace(settings)) if url else LocalCounters()
