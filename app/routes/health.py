"""Liveness and readiness probes, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.db import get_engine
from app.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def readiness_checks(settings: Settings, include_broker: bool = True) -> dict[str, str]:
    """ "ok" or the error, per dependency: the database, the job broker, the artifact store."""
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.resolved_database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc}"
    if include_broker:
        try:
            from workers.celery_app import get_celery

            with get_celery(settings).connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"error: {exc}"
    store_root = settings.resolved_artifact_dir
    checks["artifact_store"] = "ok" if store_root.is_dir() else f"error: {store_root} is missing"
    return checks


@router.get("/readyz", summary="The database, job broker and artifact store are reachable")
def readyz(request: Request) -> JSONResponse:
    checks = readiness_checks(request.app.state.settings)
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
