"""Alembic environment: the URL comes from the caller's config or from optiforge's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from app.core.orm import Base
from app.core.settings import get_settings

#: The PostgreSQL advisory lock every `optiforge migrate` holds while it upgrades: API replicas and
#: a migrations Job starting together would otherwise each create the same tables (the losers
#: fail on a duplicate key). Any fixed 64-bit number works; this one spells "optiforg".
MIGRATION_LOCK_KEY = 0x6F70746966726F67

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Held until this transaction ends; a second upgrader waits, then finds the head.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
