"""The Alembic migrations build exactly the schema the ORM describes, and upgrade is repeatable."""

from __future__ import annotations

from pathlib import Path

from alembic import command

from app.core.migrate import alembic_config, upgrade


def test_migrations_match_the_orm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    upgrade(url)
    upgrade(url)  # a second run at head is a no-op
    command.check(alembic_config(url))  # raises if autogenerate finds a difference


def test_job_kinds_migration_converts_legacy_sensitivity_jobs(tmp_path: Path) -> None:
    """Before 0003 a sensitivity analysis was a job whose recipe held {"sensitivity": {...}}."""
    import json

    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    command.upgrade(alembic_config(url), "0002")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO models (id, name, filename, sha256, size_bytes, artifact_prefix, info, "
                "created_at) VALUES ('mdl_1', 'm', 'm.onnx', 'x', 1, 'models/mdl_1', '{}', '2026-01-01')"
            )
        )
        for job_id, recipe in (
            ("job_s", {"sensitivity": {"method": "l1", "ratios": [0.5]}}),
            ("job_o", {"precision": "int8"}),
        ):
            connection.execute(
                sa.text(
                    "INSERT INTO jobs (id, model_id, recipe, status, stage, progress, messages, "
                    "cancel_requested, attempts, created_at) VALUES (:id, 'mdl_1', :recipe, 'succeeded', "
                    "'done', 1, '[]', 0, 1, '2026-01-01')"
                ),
                {"id": job_id, "recipe": json.dumps(recipe)},
            )
    upgrade(url)
    with engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(sa.text("SELECT id, kind, recipe FROM jobs"))}
    assert rows["job_s"].kind == "sensitivity"
    assert json.loads(rows["job_s"].recipe) == {"method": "l1", "ratios": [0.5]}
    assert rows["job_o"].kind == "optimize" and json.loads(rows["job_o"].recipe) == {"precision": "int8"}
    command.downgrade(alembic_config(url), "0002")
    with engine.connect() as connection:
        recipe = connection.execute(sa.text("SELECT recipe FROM jobs WHERE id = 'job_s'")).scalar_one()
    assert json.loads(recipe) == {"sensitivity": {"method": "l1", "ratios": [0.5]}}


def test_replicas_migrating_one_postgresql_database_at_once_all_succeed() -> None:
    """API replicas and a migrations Job start together on Kubernetes; each runs `optiforge migrate`.
    Without migrations/env.py's advisory lock, all but one failed on a duplicate key (measured: 3 of
    4). With it, the others wait and find the head."""
    import subprocess
    import sys

    from sqlalchemy.engine import make_url

    from bench.processes import fresh_postgres_database
    from tests.conftest import POSTGRES_URL, REPO_ROOT, require_service

    admin_url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    with fresh_postgres_database(POSTGRES_URL, "optiforge_race") as url:
        code = f"from app.core.migrate import upgrade; upgrade({url!r})"
        racers = [
            subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        failures = [process.communicate(timeout=120)[1] for process in racers if process.wait(timeout=120)]
        assert not failures, failures[0][-2000:]
        command.check(alembic_config(url))
