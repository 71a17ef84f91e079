"""The Alembic migrations build exactly the schema the ORM describes, and upgrade is repeatable."""

from __future__ import annotations

from pathlib import Path

from alembic import command

from app.migrate import alembic_config, upgrade


def test_migrations_match_the_orm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    upgrade(url)
    upgrade(url)  # a second run at head is a no-op
    command.check(alembic_config(url))  # raises if autogenerate finds a difference
