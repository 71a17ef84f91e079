"""Fairness across projects (issue 19 item 9), on both stacks, over real HTTP.

Each stack runs one worker with two slots, at most one running job per project
(`max_running_jobs_per_project`), and a 60-minute ceiling on time budgets. Three projects, each
with its own key made through the admin API: A queues three jobs, B three, then C one. A FIFO
queue would run A1, A2 at once and C1 last; a fair one runs at most one job of A (and of B) at a
time, and C1 in the first slot that frees up (C has run nothing yet). Every job still succeeds.

The claim's limit is also raced directly (threads claiming one project's jobs at once) on SQLite
and PostgreSQL: a compare-and-swap on one job row alone would let two workers each start another
job of the same project.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from app.core.db import get_sessionmaker
from app.core.migrate import upgrade
from app.core.orm import JobRecord, JobStatus, ModelRecord, ProjectRecord
from app.core.settings import Settings
from app.core.store import LocalArtifactStore
from tests.conftest import (
    POSTGRES_URL,
    QUICK_MEASURE,
    DigitsArtifacts,
    LiveStack,
    make_settings,
    require_service,
    start_stack,
    wait_for_job,
)

BOOTSTRAP_KEY = "ofk_fairness_" + secrets.token_hex(20)
MAX_TIME_BUDGET_MINUTES = 60
FAIR_SETTINGS = {
    "OPTIFORGE_WORKER_CONCURRENCY": "2",
    "OPTIFORGE_MAX_RUNNING_JOBS_PER_PROJECT": "1",
    "OPTIFORGE_MAX_TIME_BUDGET_MINUTES": str(MAX_TIME_BUDGET_MINUTES),
    "OPTIFORGE_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY,
}
RECIPE = {"targets": ["onnxruntime-cpu"], "precision": "fp32", "batch_sizes": [1], "measure": QUICK_MEASURE}


def _postgres_database() -> tuple[str, str]:
    """A fresh PostgreSQL database: (its URL, the name to drop)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin_url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    name = f"optiforge_fair_{secrets.token_hex(4)}"
    with psycopg.connect(_conninfo(), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return admin_url.set(database=name).render_as_string(hide_password=False), name


def _drop_postgres_database(name: str) -> None:
    import psycopg

    with psycopg.connect(_conninfo(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _conninfo() -> str:
    from sqlalchemy.engine import make_url

    return make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="module", params=["embedded", "postgres-redis"])
def fair_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    """`optiforge serve` (embedded), or API + worker on PostgreSQL and Redis, with FAIR_SETTINGS."""
    with start_stack(
        request.param, tmp_path_factory.mktemp(f"fair-{request.param}"), **FAIR_SETTINGS
    ) as stack:
        yield stack


@dataclass(frozen=True)
class Project:
    name: str
    client: httpx.Client
    model_id: str
    dataset_id: str

    def queue_job(self) -> str:
        body = {"model_id": self.model_id, "evaluation_dataset_id": self.dataset_id, "recipe": RECIPE}
        response = self.client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]


def _project(stack: LiveStack, name: str, digits: DigitsArtifacts) -> Project:
    """A project made with the admin API, its own key, and its own copy of the digits model and set."""
    with httpx.Client(base_url=stack.base_url, timeout=60) as admin:
        admin.headers["Authorization"] = f"Bearer {BOOTSTRAP_KEY}"
        assert admin.post("/v1/admin/projects", json={"id": name}).status_code == 201
        created = admin.post(
            "/v1/admin/keys", json={"project": name, "name": f"{name}-key", "scopes": ["read", "write"]}
        )
        assert created.status_code == 201, created.text
    client = httpx.Client(
        base_url=stack.base_url, timeout=60, headers={"Authorization": f"Bearer {created.json()['key']}"}
    )
    ids = []
    for kind, path in (("models", digits.onnx_path), ("datasets", digits.eval_npz)):
        with path.open("rb") as handle:
            response = client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return Project(name, client, *ids)


@dataclass(frozen=True)
class Run:
    """What the scenario's jobs became: project name -> its jobs as the API shows them, in order."""

    jobs: dict[str, list[dict]]

    def started(self, project: str, index: int) -> datetime:
        return datetime.fromisoformat(self.jobs[project][index]["started_at"])


@pytest.fixture(scope="module")
def busy_run(fair_stack: LiveStack, digits: DigitsArtifacts) -> Run:
    """A queues three jobs, B three, then C one; all of them waited for."""
    projects = {name: _project(fair_stack, f"{name}-{fair_stack.name}", digits) for name in "abc"}
    queued = {name: [] for name in projects}
    for name, count in (("a", 3), ("b", 3), ("c", 1)):
        queued[name] += [projects[name].queue_job() for _ in range(count)]
    jobs = {
        name: [wait_for_job(projects[name].client, job_id) for job_id in ids] for name, ids in queued.items()
    }
    for project in projects.values():
        project.client.close()
    return Run(jobs)


def test_every_job_of_a_busy_queue_runs(busy_run: Run) -> None:
    """Deferred jobs are not lost: each one, over its project's limit at first, ran later."""
    for name, jobs in busy_run.jobs.items():
        assert [job["status"] for job in jobs] == ["succeeded"] * len(jobs), (name, jobs)
        assert all(job["attempts"] == 1 for job in jobs), jobs


def test_a_project_runs_at_most_its_limit_at_once(busy_run: Run) -> None:
    """At most one job of a project ran at a time, though the worker had two slots free."""
    for name, jobs in busy_run.jobs.items():
        spans = sorted(
            (datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["finished_at"]))
            for job in jobs
        )
        for (_, previous_end), (start, _) in pairwise(spans):
            assert start >= previous_end, f"project {name} ran two jobs at once: {spans}"


def test_a_waiting_project_goes_before_a_busy_projects_backlog(busy_run: Run) -> None:
    """B's first job started before A's remaining ones, and C's job, queued last, took the first slot
    that freed up: before the third job of A and of B (FIFO would have run it last)."""
    assert busy_run.started("b", 0) < busy_run.started("a", 1)
    assert busy_run.started("c", 0) < busy_run.started("a", 2)
    assert busy_run.started("c", 0) < busy_run.started("b", 2)


def test_a_time_budget_over_the_servers_limit_is_a_422(
    fair_stack: LiveStack, digits: DigitsArtifacts
) -> None:
    """A search holds a slot for its whole budget: over `max_time_budget_minutes` it is refused,
    naming the limit, and nothing is stored."""
    project = _project(fair_stack, f"d-{fair_stack.name}", digits)
    client = project.client
    try:
        body = {
            "evaluation_dataset_id": project.dataset_id,
            "time_budget_minutes": MAX_TIME_BUDGET_MINUTES + 1,
        }
        response = client.post(f"/v1/models/{project.model_id}/optimize", json=body)
        assert response.status_code == 422, response.text
        error = response.json()
        assert error["code"] == "time_budget_too_long"
        assert f"limit of {MAX_TIME_BUDGET_MINUTES} minutes" in error["detail"]
        assert error["max_time_budget_minutes"] == MAX_TIME_BUDGET_MINUTES
        assert _listed(client.get("/v1/jobs").json()) == []
        body["time_budget_minutes"] = MAX_TIME_BUDGET_MINUTES  # at the limit: accepted
        response = client.post(f"/v1/models/{project.model_id}/optimize", json=body)
        assert response.status_code == 202, response.text
        assert client.post(f"/v1/jobs/{response.json()['id']}/cancel").status_code == 200
    finally:
        client.close()


def _listed(body: dict | list) -> list[dict]:
    """A job listing, whether a plain list or a page of items."""
    return body if isinstance(body, list) else body["items"]


# ---------------------------------------------------------------- the claim's limit, raced


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = make_settings(tmp_path).resolved_database_url
        tmp_path.mkdir(parents=True, exist_ok=True)
        upgrade(url)
        yield url
        return
    url, name = _postgres_database()
    try:
        upgrade(url)
        yield url
    finally:
        _drop_postgres_database(name)


def _one_projects_jobs(database_url: str, count: int) -> list[str]:
    """`count` queued jobs of project `p` (on a model row with no file: nothing runs them)."""
    with get_sessionmaker(database_url)() as session:
        session.add(ProjectRecord(id="p"))
        session.flush()
        model = ModelRecord(
            project_id="p", name="m", filename="m.onnx", sha256="0" * 64, size_bytes=1,
            artifact_prefix="models/m", info={},
        )  # fmt: skip
        session.add(model)
        session.flush()
        jobs = [
            JobRecord(project_id="p", model_id=model.id, recipe=RECIPE, messages=[]) for _ in range(count)
        ]
        session.add_all(jobs)
        session.commit()
        return [job.id for job in jobs]


def _limited(database_url: str, tmp_path: Path, limit: int) -> Settings:
    return Settings(
        data_dir=tmp_path, broker_url=None, database_url=database_url, max_running_jobs_per_project=limit
    )


def _running(database_url: str) -> int:
    with get_sessionmaker(database_url)() as session:
        return session.query(JobRecord).filter(JobRecord.status == JobStatus.RUNNING).count()


def test_racing_claims_start_no_more_than_the_projects_limit(database_url: str, tmp_path: Path) -> None:
    """Eight workers claim at once from a queue holding eight jobs of one project, limit 2: two run."""
    from workers.attempts import claim_next

    settings = _limited(database_url, tmp_path, 2)
    _one_projects_jobs(database_url, 8)
    store = LocalArtifactStore(tmp_path / "artifacts")
    barrier = threading.Barrier(8)
    claimed: list[str] = []

    def one_worker() -> None:
        barrier.wait()
        chosen = claim_next(settings, store, "cpu")
        if chosen is not None:
            claimed.append(chosen[0])

    threads = [threading.Thread(target=one_worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _running(database_url) == 2 and len(claimed) == 2, claimed


def test_a_claim_waits_for_another_claim_of_its_project(database_url: str, tmp_path: Path) -> None:
    """The race the compare-and-swap on one row misses, made deterministic: a claim of job 1 has
    counted and written but not committed; a claim of job 2 of the same project (limit 1) must wait
    for it and then refuse, not count job 1 as still queued."""
    from sqlalchemy import update

    from workers.attempts import claim
    from workers.fairness import hold_project, under_running_limit

    settings = _limited(database_url, tmp_path, 1)
    first, second = _one_projects_jobs(database_url, 2)
    store = LocalArtifactStore(tmp_path / "artifacts")
    with get_sessionmaker(database_url)() as session:
        hold_project(session, "p")
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == first, under_running_limit(settings, "p"))
            .values(status=JobStatus.RUNNING)
        )
        outcome: list[int | None] = []
        other = threading.Thread(target=lambda: outcome.append(claim(settings, store, second)))
        other.start()
        other.join(timeout=1.0)
        session.commit()
    other.join()
    assert outcome == [None] and _running(database_url) == 1
