"""Is this node ready: the database, the job broker, the artifact store and free disk space, each
"ok" or "error".

The probes answer without a key, so the reason (host names, user names of a failed login) is
logged, not returned."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from sqlalchemy import text

from app.core.artifacts.base import ArtifactStore
from app.core.artifacts.errors import ArtifactStoreError
from app.core.db import get_engine
from app.core.settings import MIB, Settings
from app.core.space import disk_reserve, free_bytes

logger = logging.getLogger(__name__)


def readiness_checks(settings: Settings, store: ArtifactStore, include_broker: bool = True) -> dict[str, str]:
    """ "ok" or "error", per dependency: the database, the job broker, the artifact store."""
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.resolved_database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:
        logger.warning("readiness: the database is unreachable", exc_info=True)
        checks["database"] = "error"
    if include_broker:
        try:
            from app.core.job_queue import get_celery

            with get_celery(settings).connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
            checks["broker"] = "ok"
        except Exception:
            logger.warning("readiness: the job broker is unreachable", exc_info=True)
            checks["broker"] = "error"
    checks["artifact_store"] = artifact_store_check(settings, store)
    checks["disk"] = disk_check(settings)
    return checks


def artifact_store_check(settings: Settings, store: ArtifactStore) -> str:
    """ "ok" or "error": a local store's folder exists; a remote one answers (a HEAD of its bucket,
    bounded by the client's connect timeout). The reason goes to the log, never to the response."""
    if urlsplit(settings.resolved_artifact_url).scheme == "file":
        if settings.resolved_artifact_dir.is_dir():
            return "ok"
        logger.warning("readiness: the artifact directory is missing")
        return "error"
    try:
        store.check()
    except ArtifactStoreError as exc:
        logger.warning("readiness: the artifact store: %s", exc.detail)
        return "error"
    return "ok"


def disk_check(settings: Settings) -> str:
    """ "error" while the data directory or the artifact directory has less than
    `min_free_disk_mb` free: a node that cannot store an upload or an engine should take no new
    work (a load balancer sends it elsewhere). Being liveness-neutral, /healthz does not read it.
    Also writes the disk reserve back (app.core.space) once there is room again."""
    threshold = settings.min_free_disk_mb * MIB
    status = "ok"
    for folder in dict.fromkeys((settings.data_dir, settings.resolved_artifact_dir)):
        try:
            free = free_bytes(folder)
        except OSError:
            continue  # a missing folder is reported by its own check
        if free < threshold:
            logger.warning(
                "readiness: %s has %.1f MiB free, under min_free_disk_mb=%d",
                folder,
                free / MIB,
                settings.min_free_disk_mb,
            )
            status = "error"
    disk_reserve(settings).ensure(keep_free_bytes=threshold)
    return status
