"""Which queued job a free worker slot runs next: fair across projects, not first come first served.

Celery's brokers (Redis, kombu's filesystem transport) deliver messages in the order they were
sent, so one project that queues a day of work ahead of everyone else would hold every worker
that long. Fairness therefore comes from the claim, not from the broker: a job's message is only
a wake-up that says "a job is waiting in queue Q". The slot that receives it claims, among all
queued jobs of Q, the one of the project that

1. has the fewest jobs running now (across all workers), and is under
   `max_running_jobs_per_project` (a project at its limit is skipped: its jobs stay queued);
2. among those, started a job least recently (round-robin: a project that just got a slot goes to
   the back);
3. among those, has waited longest (its oldest queued job);

and within a project, its oldest job. The message's own job may wait: the message of the job that
was claimed instead is still in the broker and wakes a slot later, or finds nothing to do.

Nothing starves and nothing is lost, because a wake-up goes out whenever a slot may have become
useful: every created or re-queued job sends one, and every attempt that ends sends one when
some job of its queue could now run (its project has a running slot fewer). A wake-up that finds
only jobs over their project's limit does nothing: each of those projects has a running job,
whose end wakes the queue again. The sweeper's republishing (`queue_republish_s`) covers a
wake-up lost with a killed worker or a broker restart. A message delivered twice is one more
wake-up: the claim is a compare-and-swap on the row, so at most one delivery starts a job.

The limit holds across workers because the claim counts the project's running jobs inside its
compare-and-swap, while holding the project's row (`SELECT … FOR UPDATE` on PostgreSQL; SQLite
takes its single write lock before the statement reads anything).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from app.core.job_queue import job_queue
from app.core.orm import JobRecord, JobStatus, ProjectRecord
from app.core.settings import Settings

_NEVER = datetime.min.replace(tzinfo=UTC)


def under_running_limit(settings: Settings, project_id: str) -> Any:
    """WHERE clause for the claim's compare-and-swap: the project runs fewer jobs than its limit
    (always true without a limit). Evaluated in the same statement that starts the job."""
    limit = settings.max_running_jobs_per_project
    if limit is None:
        return True
    others = aliased(JobRecord)
    running = (
        select(func.count())
        .select_from(others)
        .where(others.project_id == project_id, others.status == JobStatus.RUNNING)
        .scalar_subquery()
    )
    return running < limit


def hold_project(session: Session, project_id: str) -> None:
    """Serialize claims of one project's jobs until the session commits: on PostgreSQL, two claims
    of different jobs of one project would otherwise each count the other's job as not running
    yet. (SQLite ignores FOR UPDATE; its write lock already serializes the claim statement.)"""
    session.execute(select(ProjectRecord.id).where(ProjectRecord.id == project_id).with_for_update())


def fair_candidates(session: Session, settings: Settings, queue: str) -> list[str]:
    """The queued jobs of `queue` that may start now, in the order a free slot should try them
    (see the module's docstring); empty when there are none."""
    queued = session.execute(
        select(JobRecord.id, JobRecord.project_id, JobRecord.kind, JobRecord.recipe)
        .where(JobRecord.status == JobStatus.QUEUED)
        .order_by(JobRecord.created_at, JobRecord.id)
    ).all()
    by_project: dict[str, list[str]] = {}
    for job_id, project_id, kind, recipe in queued:
        if job_queue(kind, recipe or {}) == queue:
            by_project.setdefault(project_id, []).append(job_id)
    if not by_project:
        return []
    projects = list(by_project)
    running = dict(
        session.execute(
            select(JobRecord.project_id, func.count())
            .where(JobRecord.project_id.in_(projects), JobRecord.status == JobStatus.RUNNING)
            .group_by(JobRecord.project_id)
        ).all()
    )
    last_started = dict(
        session.execute(
            select(JobRecord.project_id, func.max(JobRecord.started_at))
            .where(JobRecord.project_id.in_(projects))
            .group_by(JobRecord.project_id)
        ).all()
    )
    limit = settings.max_running_jobs_per_project
    eligible = [project for project in projects if limit is None or running.get(project, 0) < limit]
    # `projects` is in order of each one's oldest queued job, and sorted() is stable: the third key.
    eligible.sort(key=lambda project: (running.get(project, 0), last_started.get(project) or _NEVER))
    return [job_id for project in eligible for job_id in by_project[project]]
