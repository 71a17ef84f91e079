"""Request-scoped dependencies: settings, a DB session and the artifact store, from app.state."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from app.core.db import get_sessionmaker
from app.core.settings import Settings
from app.core.store import ArtifactStore


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_store_dep(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_db(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()
