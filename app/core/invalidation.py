"""Telling every API replica at once that something it caches has changed: an alias moved, an
engine or a model was deleted, batching changed, a key was created or revoked.

Each API process caches names → engines (app.serving.inference.EngineDirectory, with the loaded
runners of app.serving.pool) and keys → principals (app.services.access.KeyDirectory) for a couple
of seconds, so a hot request needs no query. A change made through one replica used to reach the
others only once their entries expired. Now the process that made it publishes it after its
commit: it applies the change to its own caches first, synchronously (its next request sees it,
with Redis or without), then sends it on a Redis channel; every other process's listener thread
drops what it cached, so its next request reads the row again. A process ignores its own messages.

Why pub/sub and not a version row read on every request: on the `/v2` hot path pub/sub costs
nothing (the listener thread sleeps on its socket; a cached request is the same dictionary look-up
as before), while reading a version costs every request a round trip: a Redis GET or a SQL query.
`bench/replica_sync.py` measures both on this machine, and how long a message takes to arrive
(README, "Deploying on several machines").

Redis out of reach: a publish that fails is logged, and the other replicas catch up within their
caches' TTL (`OPTIFORGE_ENGINE_CACHE_TTL_S`, `OPTIFORGE_AUTH_CACHE_TTL_S`), as before. A listener
that lost its connection reconnects every `reconnect_s` and, once subscribed again, drops everything
it cached: messages sent while it was away are lost. The TTLs bound what it may serve meanwhile.

Embedded (no Redis): `ChangeFeed`, the delivery to this process alone, which is all one process needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable

import redis
from redis.exceptions import RedisError

from app.core.settings import Settings
from app.core.shared_redis import REDIS_TIMEOUT_S, namespace, shared_redis_url

logger = logging.getLogger(__name__)

#: Engines changed or deleted (the ids: loaded runners to evict); every cached name is dropped.
ENGINES = "engines"
#: Keys or projects changed: every cached key is dropped.
KEYS = "keys"

#: Called with the ids a change names, or None when anything may have changed (drop everything).
Callback = Callable[[tuple[str, ...] | None], None]

#: Seconds between reconnection attempts of a listener that lost Redis.
RECONNECT_S = 1.0
#: Seconds a starting process waits for its listener to subscribe (it starts serving anyway).
SUBSCRIBE_WAIT_S = 2.0
#: A listener pings Redis after this many quiet seconds, to notice a connection that died silently.
HEALTH_CHECK_S = 15


class ChangeFeed:
    """Changes delivered to the callbacks of this process only (the embedded mode)."""

    shared = False

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[Callback]] = defaultdict(list)

    def subscribe(self, topic: str, callback: Callback) -> None:
        self._subscribers[topic].append(callback)

    def publish(self, topic: str, ids: Iterable[str] = ()) -> None:
        """Apply a committed change to this process's caches (and, shared, to the other replicas')."""
        self._deliver(topic, tuple(ids))

    def _deliver(self, topic: str, ids: tuple[str, ...] | None) -> None:
        for callback in self._subscribers.get(topic, ()):
            try:
                callback(ids)
            except Exception:  # one cache's failure must not keep the others stale
                logger.exception("dropping cached %s failed", topic)

    def _deliver_everything(self) -> None:
        for topic in list(self._subscribers):
            self._deliver(topic, None)

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None


class RedisChangeFeed(ChangeFeed):
    """Changes delivered here and, through a Redis channel, to every other process listening on it."""

    shared = True

    def __init__(self, url: str, prefix: str, *, reconnect_s: float = RECONNECT_S):
        super().__init__()
        self.url, self.reconnect_s = url, reconnect_s
        self.origin = uuid.uuid4().hex  # this process, to skip its own messages
        self._publisher = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        # Channels are not per database number: name it, so deployments on one Redis stay apart.
        database = self._publisher.connection_pool.connection_kwargs.get("db", 0)
        self.channel = f"{prefix}{database}:changes"
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = False

    def publish(self, topic: str, ids: Iterable[str] = ()) -> None:
        ids = tuple(ids)
        self._deliver(topic, ids)
        message = json.dumps({"origin": self.origin, "topic": topic, "ids": list(ids)})
        try:
            self._publisher.publish(self.channel, message)
        except (RedisError, OSError) as exc:
            logger.warning(
                "a %s change could not be sent to the other API replicas (%s: %s); they see it "
                "within their cache's TTL",
                topic,
                type(exc).__name__,
                exc,
            )

    def start(self, wait_s: float = SUBSCRIBE_WAIT_S) -> None:
        """Start the listener thread, and wait up to `wait_s` for it to subscribe (Redis down: the
        process serves anyway, with its caches' TTLs as the only bound until it connects)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._listen, name="optiforge-changes", daemon=True)
        self._thread.start()
        if not self.connected.wait(wait_s):
            logger.warning("not subscribed to cache changes yet: other replicas' changes wait for the TTL")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._publisher.close()

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                client = redis.Redis.from_url(
                    self.url,
                    socket_connect_timeout=REDIS_TIMEOUT_S,
                    socket_keepalive=True,
                    health_check_interval=HEALTH_CHECK_S,
                )
                pubsub = client.pubsub()
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._receive(message)
            except (RedisError, OSError) as exc:
                self.connected.clear()
                if not self._outage:
                    self._outage = True
                    logger.warning(
                        "cache changes from other API replicas are not received (%s: %s): until "
                        "Redis is back they show here within the caches' TTL",
                        type(exc).__name__,
                        exc,
                    )
                self._stop.wait(self.reconnect_s)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        pubsub.close()

    def _receive(self, message: dict) -> None:
        if message["type"] == "subscribe":
            # Subscribed (again): whatever was sent while this process was not listening is lost.
            self._deliver_everything()
            self.connected.set()
            if self._outage:
                self._outage = False
                logger.warning("receiving cache changes from other API replicas again")
            return
        if message["type"] != "message":
            return
        try:
            change = json.loads(message["data"])
            origin, topic, ids = change["origin"], change["topic"], change["ids"]
        except (ValueError, TypeError, KeyError):
            logger.warning("an unreadable cache change: dropping everything cached")
            self._deliver_everything()
            return
        if origin != self.origin:
            self._deliver(str(topic), tuple(str(item) for item in ids))


def change_feed(settings: Settings) -> ChangeFeed:
    """This process's feed: shared through Redis when the broker is Redis, else in the process."""
    url = shared_redis_url(settings)
    return RedisChangeFeed(url, namespace(settings)) if url else ChangeFeed()


def announce(settings: Settings, topic: str, ids: Iterable[str] = ()) -> None:
    """Tell the API replicas about a change made outside them (a worker moving an alias when a
    search finishes, `optiforge keys revoke`): a process that caches nothing publishes once and
    listens to nothing. Embedded mode has no other process to tell: the API's caches expire."""
    feed = change_feed(settings)
    try:
        feed.publish(topic, ids)
    finally:
        feed.close()
