"""Attempts at a job: the claim (compare-and-swap on status and attempt number), the lease a
heartbeat thread keeps alive, progress reports and cancellation checks; every write is
conditional on the attempt still owning the row. Why: see workers.job_runner."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import delete, select, update

from app.core.db import session_scope
from app.core.orm import EngineRecord, JobRecord, JobStatus, lease_cutoff, utcnow
from app.core.settings import Settings
from app.core.store import ArtifactStore
from engines.errors import Cancelled
from workers.fairness import fair_candidates, hold_project, under_running_limit

logger = logging.getLogger(__name__)
_CANCEL_POLL_SECONDS = 0.5


class Superseded(Cancelled):
    """This attempt no longer owns the job (another attempt took over, or it was cancelled as lost)."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owned(job_id: str, attempt: int) -> Any:
    """WHERE clause: the row is still running under this attempt."""
    return (
        (JobRecord.id == job_id) & (JobRecord.attempts == attempt) & (JobRecord.status == JobStatus.RUNNING)
    )


class Attempt:
    """One attempt at a job: its heartbeat, progress reports and cancellation checks."""

    def __init__(self, db_url: str, job_id: str, number: int, heartbeat_s: float):
        self.db_url, self.job_id, self.number = db_url, job_id, number
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        self._last_poll = 0.0
        self.lost = False

    def __enter__(self) -> Attempt:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                with session_scope(self.db_url) as session:
                    still_ours = session.execute(
                        update(JobRecord).where(owned(self.job_id, self.number)).values(heartbeat_at=utcnow())
                    ).rowcount
                if not still_ours:
                    self.lost = True
                    return
            except Exception:  # a database blip must not kill the job; the next beat retries
                logger.exception("heartbeat for job %s failed", self.job_id)

    def progress(self, fraction: float, stage: str) -> None:
        self.check_cancelled(force=True)
        with session_scope(self.db_url) as session:
            session.execute(
                update(JobRecord)
                .where(owned(self.job_id, self.number))
                .values(progress=round(max(0.0, min(1.0, fraction)), 4), stage=stage)
            )
        logger.info("job %s: %.0f%% %s", self.job_id, fraction * 100, stage)

    def check_cancelled(self, force: bool = False) -> None:
        """Raise Cancelled on a cancel request, Superseded when the row is no longer ours."""
        now = time.monotonic()
        if not force and now - self._last_poll < _CANCEL_POLL_SECONDS:
            return
        self._last_poll = now
        if self.lost:
            raise Superseded(self.job_id)
        with session_scope(self.db_url) as session:
            row = session.execute(
                select(JobRecord.cancel_requested, JobRecord.attempts, JobRecord.status).where(
                    JobRecord.id == self.job_id
                )
            ).one_or_none()
        if row is None or row.attempts != self.number or row.status != JobStatus.RUNNING:
            raise Superseded(self.job_id)
        if row.cancel_requested:
            raise Cancelled(self.job_id)

    def finish(self, status: str, **values: Any) -> bool:
        """Record the outcome if the row is still ours; False when it was not."""
        with session_scope(self.db_url) as session:
            return bool(
                session.execute(
                    update(JobRecord)
                    .where(owned(self.job_id, self.number))
                    .values(status=status, finished_at=utcnow(), **values)
                ).rowcount
            )


def claim_next(
    settings: Settings, store: ArtifactStore, queue: str, named: str | None = None
) -> tuple[str, int] | None:
    """What a delivered message starts: (job id, attempt number), or None when nothing can start.

    The message's own job (`named`) is taken over at once only when it is running with an expired
    lease (its worker was lost and the broker re-delivered it); otherwise the message is a wake-up,
    and the job to start is the fair choice among the queue's (workers.fairness)."""
    if named is not None:
        with session_scope(settings.resolved_database_url) as session:
            status = session.scalar(select(JobRecord.status).where(JobRecord.id == named))
        if status == JobStatus.RUNNING:
            number = claim(settings, store, named)
            if number is not None:
                return named, number
    with session_scope(settings.resolved_database_url) as session:
        candidates = fair_candidates(session, settings, queue)
    for job_id in candidates:
        number = claim(settings, store, job_id)
        if number is not None:
            return job_id, number
    return None


def claim(settings: Settings, store: ArtifactStore, job_id: str) -> int | None:
    """Start a new attempt at the job; its number, or None when there is nothing to do (it ended,
    runs elsewhere, was cancelled, or its project runs `max_running_jobs_per_project` jobs)."""
    db_url = settings.resolved_database_url
    with session_scope(db_url) as session:
        job = session.get(JobRecord, job_id)
        if job is None:
            logger.warning("job %s does not exist (deleted?); dropping it", job_id)
            return None
        if job.status in JobStatus.FINISHED:
            logger.info("job %s is already %s; ignoring this delivery", job_id, job.status)
            return None
        current = (
            (JobRecord.id == job_id) & (JobRecord.attempts == job.attempts) & (JobRecord.status == job.status)
        )
        alive = job.heartbeat_at is not None and job.heartbeat_at > lease_cutoff(settings.job_lease_s)
        if job.status == JobStatus.RUNNING and alive:
            logger.info("job %s is running on %s; ignoring this delivery", job_id, job.worker)
            return None
        if job.cancel_requested:
            session.execute(
                update(JobRecord)
                .where(current)
                .values(status=JobStatus.CANCELLED, stage="cancelled", finished_at=utcnow())
            )
            return None
        if job.attempts >= settings.job_max_attempts:
            failed = session.execute(
                update(JobRecord)
                .where(current)
                .values(
                    status=JobStatus.FAILED,
                    finished_at=utcnow(),
                    error={
                        "code": "worker_lost",
                        "detail": f"the worker running this job was lost {job.attempts} times "
                        "(killed, out of memory?); giving up",
                    },
                )
            ).rowcount
            if failed:
                session.execute(delete(EngineRecord).where(EngineRecord.job_id == job_id))
                store.delete(f"jobs/{job_id}")
            return None
        if job.status == JobStatus.QUEUED:  # a new start: one more running job of its project
            hold_project(session, job.project_id)
            current = current & under_running_limit(settings, job.project_id)
        attempt = job.attempts + 1
        messages = list(job.messages or [])
        if job.attempts:
            messages.append(
                f"attempt {attempt}: the worker of attempt {job.attempts} was lost; starting over"
            )
        now = utcnow()
        claimed = session.execute(
            update(JobRecord)
            .where(current)
            .values(
                status=JobStatus.RUNNING,
                attempts=attempt,
                worker=worker_name(),
                heartbeat_at=now,
                started_at=now,
                stage="starting",
                progress=0.0,
                error=None,
                baseline=None,
                messages=messages,
            )
        ).rowcount
        if not claimed:
            logger.info("job %s was claimed by another delivery, or its project is at its limit", job_id)
            return None
        if job.attempts:  # what an earlier, lost attempt left behind
            session.execute(delete(EngineRecord).where(EngineRecord.job_id == job_id))
            store.delete(f"jobs/{job_id}")
        return attempt
