"""engines.sha256: the engine file's content hash, recorded when the worker stores it

A node that pulls the engine from an object store checks the file it got against this, so a
manifest replaced or damaged in the store cannot hand serving a different file than was built and
measured. Engines stored before this revision have none (NULL): they are checked against their
manifest only.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.drop_column("sha256")
