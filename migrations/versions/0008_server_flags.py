"""server_flags: facts about the whole server that, once true, stay true; `keys_required` is the
first one (open mode, keyless loopback access, is decided once: never again after any key existed)

A database that already holds an API key row, revoked or not, gets the flag: its server has had
a key. (Keys deleted with their project before this migration leave no trace; nothing can tell.)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-20 10:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: The same name as app.services.access.KEYS_REQUIRED (a migration does not import the app).
KEYS_REQUIRED = "keys_required"


def upgrade() -> None:
    flags = op.create_table(
        "server_flags",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    had_keys = op.get_bind().execute(sa.text("SELECT id FROM api_keys LIMIT 1")).first() is not None
    if had_keys:
        op.bulk_insert(flags, [{"name": KEYS_REQUIRED, "set_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("server_flags")
