"""What a storage fault is, whichever layer raised it: the database out of reach, or the disk full.

A fault reaches the API as many types: an OSError with ENOSPC or EDQUOT from an artifact write,
SQLAlchemy's OperationalError wrapping SQLite's "database or disk is full" or PostgreSQL's
DiskFull, a connection refused or dropped mid-query, a pool that timed out. Each is a condition
of the server, not a bug and not the caller's fault, so it is answered as one: 503
`database_unavailable` (with Retry-After: it passes) or 507 `insufficient_storage` (it needs
space freed). This module is the one place that tells them apart, for the API's error handlers,
the delete paths (which release the disk reserve on a full disk) and the caches that may outlive
a short outage.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

from app.core.errors import ApiError, error_chain

#: Seconds a client should wait before retrying while the database is unreachable.
DATABASE_RETRY_AFTER_S = 5

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
#: SQLite's SQLITE_FULL, and PostgreSQL's SQLSTATE class 53 "insufficient resources" for disk full.
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


def _chain(error: BaseException) -> Iterator[BaseException]:
    """A SQLAlchemy error wraps the driver's (`orig`), which says what happened."""
    return error_chain(error, "orig")


def is_storage_full(error: BaseException) -> bool:
    """Whether the disk (or the quota) ran out: ENOSPC/EDQUOT, SQLite's SQLITE_FULL, PostgreSQL's
    DiskFull."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in _FULL_ERRNOS:
            return True
        if getattr(item, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(item, "sqlstate", None) == _PG_DISK_FULL:
            return True
        if "database or disk is full" in str(item):
            return True
    return False


def is_database_unavailable(error: BaseException) -> bool:
    """Whether the database could not be reached or used for a while (refused, dropped, locked
    past the busy timeout, pool exhausted), as opposed to a query that is wrong (a bug)."""
    for item in _chain(error):
        if isinstance(
            item,
            sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DisconnectionError | sa_exc.TimeoutError,
        ):
            return True
        if isinstance(item, sa_exc.DBAPIError) and item.connection_invalidated:
            return True
    return False


def database_unavailable() -> ApiError:
    return ApiError(
        503,
        "database_unavailable",
        "the database cannot be reached right now; nothing was changed, retry shortly",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def insufficient_storage() -> ApiError:
    return ApiError(
        507,
        "insufficient_storage",
        "the server's disk is full; nothing was stored. Delete models, datasets or engines you no "
        "longer need (deletes work on a full disk), or ask the operator for space, then retry",
    )


def as_storage_fault(error: BaseException) -> ApiError | None:
    """The answer for a storage fault (disk full first: SQLite reports it as an OperationalError),
    or None for any other error."""
    if is_storage_full(error):
        return insufficient_storage()
    if is_database_unavailable(error):
        return database_unavailable()
    return None


def usable_during_outage(error: BaseException, looked_up_at: float | None, grace_s: float) -> bool:
    """Whether a cache may answer with what it looked up at `looked_up_at` (time.monotonic())
    because the database it would ask is unreachable: at most `grace_s` ago. Only outages qualify;
    any other error is raised as it is."""
    if looked_up_at is None or not is_database_unavailable(error):
        return False
    return time.monotonic() - looked_up_at <= grace_s
