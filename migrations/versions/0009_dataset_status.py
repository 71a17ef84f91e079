"""datasets.status and datasets.error, and jobs without a model: a large image folder is decoded by
a `decode_images` job (no model) while its dataset is `processing`, then `ready` or `failed`

Existing datasets were checked and stored whole at upload: they are `ready`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-21 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=16), nullable=False, server_default="ready"))
        batch_op.add_column(sa.Column("error", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("model_id", existing_type=sa.String(length=32), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE model_id IS NULL")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("model_id", existing_type=sa.String(length=32), nullable=False)
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("error")
        batch_op.drop_column("status")
