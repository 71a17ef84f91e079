"""Inference requests per second, per API key: a token bucket each, in this API process.

Each API replica counts on its own (a key spread over N replicas gets up to N times its rate); a
limit that must hold across replicas belongs in the load balancer in front of them.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

#: Buckets unused this long are dropped, so that many short-lived keys do not grow the table.
IDLE_SECONDS = 300.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`take(key_id, rps)` spends one token of the key's bucket (a second's worth of burst), or
    says how many seconds until it could."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._last_prune = time.monotonic()

    def take(self, key_id: str, rps: float) -> float:
        """0.0 when the request may go; else the seconds to wait (for `Retry-After`)."""
        now = time.monotonic()
        capacity = max(1.0, rps)
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(capacity, now)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rps)
            bucket.updated = now
            if now - self._last_prune > IDLE_SECONDS:
                self._prune(now)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rps

    def _prune(self, now: float) -> None:
        self._buckets = {key: b for key, b in self._buckets.items() if now - b.updated < IDLE_SECONDS}
        self._last_prune = now


def retry_after(seconds: float) -> str:
    """`Retry-After` takes whole seconds: round up, never 0."""
    return str(max(1, math.ceil(seconds)))
