"""engine serving: alias and dynamic batching

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 03:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alias", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("max_batch_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_queue_delay_ms", sa.Float(), nullable=True))
        batch_op.create_unique_constraint("uq_engines_alias", ["alias"])


def downgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.drop_constraint("uq_engines_alias", type_="unique")
        batch_op.drop_column("max_queue_delay_ms")
        batch_op.drop_column("max_batch_size")
        batch_op.drop_column("alias")
