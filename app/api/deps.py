"""Request-scoped dependencies: settings, a DB session, the artifact store and serving, from
app.state; the caller's principal and project, from what app.api.middleware.auth put in the request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.db import get_sessionmaker
from app.core.errors import ApiError
from app.core.keys import Principal
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.serving.inference import Serving


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_store_dep(request: Request) -> ArtifactStore:
    return request.app.state.store


def serving_of(request: Request) -> Serving:
    """The app's one Serving (for routes that take no dependencies: `app.api.direct_route`)."""
    return request.app.state.serving


async def get_serving(request: Request) -> Serving:
    """`async`: FastAPI runs a plain `def` dependency in its thread pool, a cost on the inference hot path."""
    return serving_of(request)


ServingDep = Annotated[Serving, Depends(get_serving)]


def get_db(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


def principal_of(request: Request) -> Principal:
    """Who the request acts as (set by app.api.middleware.auth); a route reached without it refuses
    (fail closed)."""
    principal = request.scope.get("state", {}).get("principal")
    if principal is None:
        raise ApiError(401, "api_key_required", "this route needs an API key")
    return principal


def project_of(request: Request) -> str:
    """The caller's project: every record a route reads or makes is this project's."""
    return principal_of(request).project_id


PrincipalDep = Annotated[Principal, Depends(principal_of)]
ProjectDep = Annotated[str, Depends(project_of)]


async def default_max_batch(request: Request) -> int:
    """The server's default batch limit, which an engine's own `max_batch` starts from
    (app.serving.limits.engine_max_batch): engine descriptions state the limit serving applies."""
    return request.app.state.settings.max_inference_batch


DefaultMaxBatchDep = Annotated[int, Depends(default_max_batch)]
