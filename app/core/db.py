"""Database engine and sessions. SQLite (embedded default) and PostgreSQL are both first-class."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

#: Seconds a SQLite write waits for another process's write lock (the URL's `?timeout=` overrides
#: it); past it the request is a 503 `database_unavailable` (app.core.outages).
SQLITE_BUSY_TIMEOUT_S = 30.0
#: Seconds to wait for a PostgreSQL connection to open: an unreachable host fails the request with
#: a 503 in this time instead of the operating system's minutes.
CONNECT_TIMEOUT_S = 5


def _sqlite_pragmas(busy_timeout_s: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the API read while the worker writes; the busy timeout rides out short write locks.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


_engines: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine (connection pool) per URL and process.

    PostgreSQL connections are pinged when taken from the pool (`pool_pre_ping`): after an outage
    the pool holds connections the server has closed, and without the ping each would fail one
    more request before being replaced; with it the first request after the outage succeeds."""
    engine = _engines.get(url)
    if engine is None:
        if url.startswith("sqlite"):
            busy_timeout_s = float(make_url(url).query.get("timeout", SQLITE_BUSY_TIMEOUT_S))
            connect_args = {"check_same_thread": False, "timeout": busy_timeout_s}
            engine = create_engine(url, connect_args=connect_args)
            event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_s))
        else:
            connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        engine = _engines.setdefault(url, engine)
    return engine


def _forget_inherited_connections() -> None:
    # A forked child (Celery's prefork pool) must not reuse its parent's open connections: two
    # processes on one PostgreSQL connection corrupt each other's state (prepared statements).
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
