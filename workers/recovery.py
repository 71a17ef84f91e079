"""Put jobs whose worker was lost back in the queue.

A worker killed mid-job (OOM, SIGKILL, a machine going away) leaves its job `running` with a
heartbeat that stops moving. With the filesystem broker the message is already gone, and with
Redis it only comes back after the visibility timeout, so every worker sweeps: a running job
whose lease expired goes back to `queued` (compare-and-swap, so two sweepers cannot both act)
and is sent to its queue again. The next attempt cleans up after the lost one.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.job_queue import enqueue_job
from app.core.orm import JobRecord, JobStatus, lease_cutoff
from app.core.settings import Settings
from engines.recipe import Recipe

logger = logging.getLogger(__name__)


def requeue_lost_jobs(settings: Settings) -> list[str]:
    """Re-queue running jobs whose heartbeat is older than the lease; returns their ids."""
    cutoff = lease_cutoff(settings.job_lease_s)
    requeued = []
    with session_scope(settings.resolved_database_url) as session:
        lost = session.execute(
            select(JobRecord.id, JobRecord.attempts, JobRecord.recipe).where(
                JobRecord.status == JobStatus.RUNNING, JobRecord.heartbeat_at < cutoff
            )
        ).all()
        for job_id, attempts, recipe in lost:
            moved = session.execute(
                update(JobRecord)
                .where(
                    JobRecord.id == job_id,
                    JobRecord.attempts == attempts,
                    JobRecord.status == JobStatus.RUNNING,
                    JobRecord.heartbeat_at < cutoff,
                )
                .values(status=JobStatus.QUEUED, stage="re-queued: its worker was lost")
            ).rowcount
            if moved:
                session.commit()  # enqueue only what is committed
                enqueue_job(settings, job_id, Recipe.from_dict(recipe))
                requeued.append(job_id)
                logger.warning("job %s lost its worker (attempt %d); re-queued", job_id, attempts)
    return requeued


def start_sweeper(settings: Settings) -> threading.Thread:
    """A daemon thread in the worker process that sweeps every `job_sweep_interval_s`."""
    stop = threading.Event()

    def sweep_forever() -> None:
        while True:
            try:
                requeue_lost_jobs(settings)
            except Exception:  # the database or broker may be briefly away; try again next round
                logger.exception("sweeping for lost jobs failed")
            if stop.wait(settings.job_sweep_interval_s):
                return

    thread = threading.Thread(target=sweep_forever, name="optiforge-sweeper", daemon=True)
    thread.start()
    return thread
