"""Is this node ready: the database, the job broker and the artifact store, each "ok" or "error".

The probes answer without a key, so the reason (host names, user names of a failed login) is
logged, not returned."""

from __future__ import annotations

import logging

from sqlalchemy import text

from app.core.db import get_engine
from app.core.settings import Settings

logger = logging.getLogger(__name__)


def readiness_checks(settings: Settings, include_broker: bool = True) -> dict[str, str]:
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
    store_root = settings.resolved_artifact_dir
    if not store_root.is_dir():
        logger.warning("readiness: the artifact directory is missing")
    checks["artifact_store"] = "ok" if store_root.is_dir() else "error"
    return checks
