"""Where the state that API replicas share lives: the Redis of the broker, when the broker is Redis.

Replicas already share PostgreSQL and the broker; what they must agree on beyond rows (rate-limit
buckets, upload slots, cache invalidations: app.core.shared_counters, app.core.invalidation) goes
to the broker's Redis, so a deployment needs nothing new. With the embedded broker (one machine,
`make serve`) there is no Redis and each of those stays in the process, as before.

Every key and channel starts with `OPTIFORGE_QUEUE_PREFIX` (as the queues do), so deployments or
test stacks sharing one Redis do not see each other's counters.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from app.core.settings import Settings

REDIS_SCHEMES = frozenset({"redis", "rediss"})
#: Seconds to wait for Redis to connect or answer: a hot path falls back rather than stall.
REDIS_TIMEOUT_S = 0.5


def shared_redis_url(settings: Settings) -> str | None:
    """The Redis URL replicas share state through (the broker's), or None for in-process state."""
    url = settings.broker_url
    if not url or urlsplit(url).scheme.lower() not in REDIS_SCHEMES:
        return None
    return url


def namespace(settings: Settings) -> str:
    """The prefix of this deployment's shared keys and channels."""
    return f"{settings.queue_prefix}optiforge:"
