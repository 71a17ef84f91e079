"""projects and API keys: every model, dataset, job and engine belongs to a project

Existing records move to the project `default`, which this revision creates; an engine alias is
unique within its project instead of across the server.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 15:40:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DEFAULT_PROJECT = "default"
_OWNED_TABLES = ("models", "datasets", "jobs", "engines")


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(projects, [{"id": DEFAULT_PROJECT, "created_at": datetime.now(UTC)}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("infer_rps", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256"),
    )
    op.create_index(op.f("ix_api_keys_project_id"), "api_keys", ["project_id"], unique=False)
    op.create_index(op.f("ix_api_keys_revoked_at"), "api_keys", ["revoked_at"], unique=False)
    for table in _OWNED_TABLES:
        # The server default fills the existing rows; it is dropped after, so that a record made
        # without its project fails to insert instead of landing in `default`.
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("project_id", sa.String(length=64), nullable=False, server_default=DEFAULT_PROJECT)
            )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("project_id", server_default=None)
            batch_op.create_index(batch_op.f(f"ix_{table}_project_id"), ["project_id"], unique=False)
            batch_op.create_foreign_key(f"fk_{table}_project_id", "projects", ["project_id"], ["id"])
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.drop_constraint("uq_engines_alias", type_="unique")
        batch_op.create_unique_constraint("uq_engines_project_alias", ["project_id", "alias"])


def downgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.drop_constraint("uq_engines_project_alias", type_="unique")
        batch_op.create_unique_constraint("uq_engines_alias", ["alias"])
    for table in reversed(_OWNED_TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_project_id", type_="foreignkey")
            batch_op.drop_index(batch_op.f(f"ix_{table}_project_id"))
            batch_op.drop_column("project_id")
    op.drop_index(op.f("ix_api_keys_revoked_at"), table_name="api_keys")
    op.drop_index(op.f("ix_api_keys_project_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("projects")
