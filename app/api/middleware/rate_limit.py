"""Inference requests per second, per API key: a token bucket each, with a second's burst.

The buckets are the shared counters' (app.core.shared_counters): in Redis when the broker is Redis,
so a key's rate holds across every API replica; in this process with the embedded broker (one
machine, one replica). Redis out of reach: each replica counts on its own until it is back.
"""

from __future__ import annotations

import math

from app.core.shared_counters import SharedCounters


async def inference_wait(counters: SharedCounters, key_id: str, rps: float) -> float:
    """0.0 when the key may make one more inference request now; else the seconds to wait."""
    return await counters.take(f"infer:{key_id}", rps)


def retry_after(seconds: float) -> str:
    """`Retry-After` takes whole seconds: round up, never 0."""
    return str(max(1, math.ceil(seconds)))
