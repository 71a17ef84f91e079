"""Is this node ready: the database, the job broker and the artifact store, each "ok" or the error."""

from __future__ import annotations

from sqlalchemy import text

from app.core.db import get_engine
from app.core.settings import Settings
from engines.errors import scrub_paths


def readiness_checks(settings: Settings, include_broker: bool = True) -> dict[str, str]:
    """ "ok" or the error, per dependency: the database, the job broker, the artifact store."""
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.resolved_database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = scrub_paths(f"error: {exc}")
    if include_broker:
        try:
            from app.core.job_queue import get_celery

            with get_celery(settings).connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = scrub_paths(f"error: {exc}")
    store_root = settings.resolved_artifact_dir
    checks["artifact_store"] = "ok" if store_root.is_dir() else "error: the artifact directory is missing"
    return checks
