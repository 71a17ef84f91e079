"""jobs.published_at: when the job's message was last sent to the broker

A queued job whose message was lost (a broker restarted without persistence) is sent again by the
sweeper once it has waited `queue_republish_s` since this time.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 14:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("published_at")
