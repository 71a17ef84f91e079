"""Request-scoped dependencies: settings, a DB session, the artifact store and serving, from app.state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.db import get_sessionmaker
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
