"""What keeping API replicas in agreement costs on the `/v2` hot path (issue 22, item 3).

An alias moved or an engine deleted through one replica must be seen by the others at once. Two
ways, measured here on this machine against the PostgreSQL and Redis the tests use:

- pub/sub (what app.core.invalidation does): the replica that made the change publishes it; a
  listener thread in every other process drops its cached names. A cached `/v2` request does what
  it did before: one dictionary look-up (`EngineDirectory.cached`). Its costs are off the hot path:
  the PUBLISH in the request that made the change, and the time until the others have it.
- a version row checked cheaply: every request reads a version (bumped by each change) and drops
  its cache when it moved. The read is on every request: a Redis GET on the event loop (asyncio
  client), or a SQL query off the loop the way the API queries (a session from the pool, which
  pings its connection, in the thread pool).

Also the shared token bucket (app.core.shared_counters), which a key with `infer_rps` pays on
every request, against the in-process bucket.

    .venv/bin/python -m bench.replica_sync [--rounds 5 --per-round 600] [--json PATH]

Rounds interleave the variants so that drift on a shared machine hits each alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool

from app.core.db import get_sessionmaker
from app.core.invalidation import ENGINES, RedisChangeFeed
from app.core.shared_counters import LocalCounters, RedisCounters
from app.serving.inference import EngineDirectory, ServedEngine

POSTGRES_URL = os.environ.get(
    "OPTIFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("OPTIFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _summary(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "n": len(ordered),
        "mean_us": statistics.fmean(ordered) * 1e6,
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


async def _time(step: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await step()
        samples.append(time.perf_counter() - started)
    return samples


def _directory() -> EngineDirectory:
    """An engine directory with one cached name, as a hot `/v2` model has (its entry put in by
    hand: a cached look-up reads neither the database nor the store, so it has neither)."""
    directory = EngineDirectory("sqlite://", None, ttl_s=3600.0, default_max_batch=1024)  # type: ignore[arg-type]
    engine = ServedEngine("eng_bench", "mdl_bench", "onnxruntime-cpu", "jobs/x/model.onnx", None, 1024)
    directory._entries[("default", "hot", None)] = (time.monotonic(), engine)
    return directory


def _postgres_database() -> tuple[str, str]:
    import psycopg

    admin = make_url(POSTGRES_URL)
    name = f"optiforge_bench_{secrets.token_hex(4)}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    with get_sessionmaker(url)() as session:
        session.execute(text("CREATE TABLE versions (name text PRIMARY KEY, value bigint NOT NULL)"))
        session.execute(text("INSERT INTO versions VALUES ('engines', 1)"))
        session.commit()
    return url, conninfo


def _drop_postgres(name_url: str, conninfo: str) -> None:
    import psycopg

    name = make_url(name_url).database
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def hot_path(rounds: int, per_round: int, database_url: str) -> dict[str, dict]:
    """Per-request cost of each way to learn of a change (and of each rate bucket), in µs."""
    directory = _directory()
    version_key = f"bench-{secrets.token_hex(4)}:engines:version"
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.set(version_key, 1)
    sync_client = redis.Redis.from_url(REDIS_URL)
    sessions = get_sessionmaker(database_url)
    local, shared = LocalCounters(), RedisCounters(REDIS_URL, f"bench-{secrets.token_hex(4)}:")

    def sql_version() -> int:
        with sessions() as session:
            return session.scalar(text("SELECT value FROM versions WHERE name = 'engines'"))

    async def cached() -> object:
        return directory.cached("default", "hot", None)

    async def redis_async() -> object:
        await client.get(version_key)
        return directory.cached("default", "hot", None)

    async def redis_blocking() -> object:
        sync_client.get(version_key)
        return directory.cached("default", "hot", None)

    async def postgres() -> object:
        await run_in_threadpool(sql_version)
        return directory.cached("default", "hot", None)

    async def bucket_local() -> object:
        return await local.take("infer:bench", 1e9)

    async def bucket_redis() -> object:
        return await shared.take("infer:bench", 1e9)

    variants = {
        "pub/sub: cached look-up only (today's hot path)": cached,
        "version in Redis, asyncio GET per request": redis_async,
        "version in Redis, blocking GET on the loop": redis_blocking,
        "version row in PostgreSQL, pooled session in the thread pool": postgres,
        "rate bucket in the process": bucket_local,
        "rate bucket in Redis (Lua, one round trip)": bucket_redis,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for step in variants.values():  # warm connections, pools and scripts
        await _time(step, 50)
    for _ in range(rounds):
        for name, step in variants.items():
            samples[name] += await _time(step, per_round)
    await client.delete(version_key, f"{shared.prefix}rate:infer:bench")
    await client.aclose()
    await shared.close()
    sync_client.close()
    return {name: _summary(values) for name, values in samples.items()}


def propagation(count: int) -> dict[str, dict]:
    """Pub/sub off the hot path: the PUBLISH a change's request pays, and the time until another
    process's listener has dropped its cache (here a second feed in this process, its own thread
    and connection: the same path through Redis)."""
    prefix = f"bench-{secrets.token_hex(4)}:"
    sender, receiver = RedisChangeFeed(REDIS_URL, prefix), RedisChangeFeed(REDIS_URL, prefix)
    arrived = threading.Event()
    stamps: list[float] = []

    def dropped(ids: tuple[str, ...] | None) -> None:
        if ids:  # None: the subscription's own "drop everything"
            stamps.append(time.perf_counter())
            arrived.set()

    receiver.subscribe(ENGINES, dropped)
    receiver.start()
    publish, delivery = [], []
    try:
        for index in range(count):
            arrived.clear()
            started = time.perf_counter()
            sender.publish(ENGINES, [f"eng_{index}"])
            publish.append(time.perf_counter() - started)
            if not arrived.wait(5):
                raise RuntimeError("a published change did not arrive within 5 s")
            delivery.append(stamps[-1] - started)
            time.sleep(0.002)
    finally:
        receiver.close()
        sender.close()
    return {
        "PUBLISH in the request that made the change": _summary(publish),
        "change published -> other process's cache dropped": _summary(delivery),
    }


def _print(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}\n")
    print("| Variant | mean µs | p50 µs | p99 µs | n |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['mean_us']:.1f} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {row['n']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=600)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    database_url, conninfo = _postgres_database()
    try:
        hot = asyncio.run(hot_path(args.rounds, args.per_round, database_url))
    finally:
        _drop_postgres(database_url, conninfo)
    sync = propagation(args.messages)
    _print("Per /v2 request (the cost every request pays):", hot)
    _print("Per change (pub/sub, off the hot path):", sync)
    print(f"\nCPU: {os.cpu_count()} logical cores; PostgreSQL and Redis on this machine (loopback).")
    if args.json:
        args.json.write_text(json.dumps({"hot_path": hot, "per_change": sync}, indent=2) + "\n")


if __name__ == "__main__":
    main()
