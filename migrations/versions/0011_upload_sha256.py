"""models.dedup_key and datasets.dedup_key: uploads deduplicated by content within a project

An upload whose file (sha256, already recorded) and options (a model's batch_axis or opset, a
dataset's preprocessing, classes, tokenizer and tokenization) match a record of the same project
returns that record instead of storing a copy (app.services.uploads_dedup). Rows made before this
revision get NULL: their options were not recorded in one comparable form, so they are never
matched, and the next upload of the same file makes the record later uploads match.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("models", "datasets"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("dedup_key", sa.String(length=64), nullable=True))
            batch_op.create_index(batch_op.f(f"ix_{table}_dedup_key"), ["dedup_key"], unique=False)


def downgrade() -> None:
    for table in ("datasets", "models"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_dedup_key"))
            batch_op.drop_column("dedup_key")
