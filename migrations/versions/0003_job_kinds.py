"""job kinds: an explicit `kind` column instead of a magic key in the recipe

Sensitivity analyses were optimization jobs whose recipe held {"sensitivity": {...}}; they become
jobs of kind `sensitivity` whose recipe is that inner object. Every other job is `optimize`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 11:30:00
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_LEGACY_SENSITIVITY_KEY = "sensitivity"
_jobs = sa.table(
    "jobs", sa.column("id", sa.String), sa.column("kind", sa.String), sa.column("recipe", sa.JSON)
)


def _recipes() -> list[tuple[str, dict]]:
    rows = op.get_bind().execute(sa.select(_jobs.c.id, _jobs.c.recipe)).all()
    return [(row.id, row.recipe if isinstance(row.recipe, dict) else json.loads(row.recipe)) for row in rows]


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="optimize")
        )
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)
    for job_id, recipe in _recipes():
        if _LEGACY_SENSITIVITY_KEY in recipe:
            op.get_bind().execute(
                _jobs.update()
                .where(_jobs.c.id == job_id)
                .values(kind="sensitivity", recipe=recipe[_LEGACY_SENSITIVITY_KEY])
            )


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(_jobs.c.id, _jobs.c.recipe).where(_jobs.c.kind == "sensitivity")).all()
    for row in rows:
        recipe = row.recipe if isinstance(row.recipe, dict) else json.loads(row.recipe)
        bind.execute(
            _jobs.update().where(_jobs.c.id == row.id).values(recipe={_LEGACY_SENSITIVITY_KEY: recipe})
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))
        batch_op.drop_column("kind")
