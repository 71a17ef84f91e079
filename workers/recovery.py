"""Put jobs whose worker was lost back in the queue; fail jobs that no live worker can take.

A worker killed mid-job (OOM, SIGKILL, a machine going away) leaves its job `running` with a
heartbeat that stops moving. With the filesystem broker the message is already gone, and with
Redis it only comes back after the visibility timeout, so every worker sweeps: a running job
whose lease expired goes back to `queued` (compare-and-swap, so two sweepers cannot both act)
and is sent to its queue again. The next attempt cleans up after the lost one.

The sweeper also keeps this worker's row in the `workers` table (app.core.presence), and fails a
job that has waited `queue_wait_s` in a queue no live worker takes (a GPU job on a cluster with
no GPU worker) with `no_worker_for_queue`, instead of leaving it queued forever.
"""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.job_queue import enqueue_job, job_queue
from app.core.orm import JobRecord, JobStatus, lease_cutoff, utcnow
from app.core.presence import beat, live_workers_by_queue
from app.core.scratch import owner_of
from app.core.settings import Settings

logger = logging.getLogger(__name__)


def requeue_lost_jobs(settings: Settings) -> list[str]:
    """Re-queue running jobs whose heartbeat is older than the lease; returns their ids."""
    cutoff = lease_cutoff(settings.job_lease_s)
    requeued = []
    with session_scope(settings.resolved_database_url) as session:
        lost = session.execute(
            select(JobRecord.id, JobRecord.attempts, JobRecord.kind, JobRecord.recipe).where(
                JobRecord.status == JobStatus.RUNNING, JobRecord.heartbeat_at < cutoff
            )
        ).all()
        for job_id, attempts, kind, recipe in lost:
            moved = session.execute(
                update(JobRecord)
                .where(
                    JobRecord.id == job_id,
                    JobRecord.attempts == attempts,
                    JobRecord.status == JobStatus.RUNNING,
                    JobRecord.heartbeat_at < cutoff,
                )
                .values(
                    status=JobStatus.QUEUED, stage="re-queued: its worker was lost", published_at=utcnow()
                )
            ).rowcount
            if moved:
                session.commit()  # enqueue only what is committed
                enqueue_job(settings, job_id, job_queue(kind, recipe))
                requeued.append(job_id)
                logger.warning("job %s lost its worker (attempt %d); re-queued", job_id, attempts)
    return requeued


def republish_queued_jobs(settings: Settings) -> list[str]:
    """Send again the message of each job queued longer than `queue_republish_s` since it was last
    sent, on a queue some live worker takes: its message may be gone (a broker restarted without
    persistence), or the wake-up a job's end sends (workers.fairness) may have died with its worker.
    Compare-and-swap on `published_at`, so two sweepers send it once; a message is a wake-up, and
    one that finds nothing to start is a no-op (the rows decide)."""
    cutoff = utcnow() - timedelta(seconds=settings.queue_republish_s)
    sent = []
    with session_scope(settings.resolved_database_url) as session:
        live = live_workers_by_queue(session, settings)
        stale = session.execute(
            select(JobRecord.id, JobRecord.kind, JobRecord.recipe, JobRecord.published_at).where(
                JobRecord.status == JobStatus.QUEUED,
                (JobRecord.published_at < cutoff) | (JobRecord.published_at.is_(None)),
                JobRecord.created_at < cutoff,
            )
        ).all()
        for job_id, kind, recipe, published_at in stale:
            queue = job_queue(kind, recipe or {})
            if not live.get(queue):
                continue  # nobody would take it: fail_jobs_without_workers says so in time
            same = (
                JobRecord.published_at.is_(None)
                if published_at is None
                else JobRecord.published_at == published_at
            )
            moved = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.status == JobStatus.QUEUED, same)
                .values(published_at=utcnow())
            ).rowcount
            if moved:
                session.commit()
                enqueue_job(settings, job_id, queue)
                sent.append(job_id)
                logger.warning("job %s was still queued after %d s: its message was sent again", job_id,
                               settings.queue_republish_s)  # fmt: skip
    return sent


def fail_jobs_without_workers(settings: Settings) -> list[str]:
    """Fail queued jobs older than `queue_wait_s` whose queue no live worker takes; returns their ids."""
    waited_since = utcnow() - timedelta(seconds=settings.queue_wait_s)
    failed = []
    with session_scope(settings.resolved_database_url) as session:
        live = live_workers_by_queue(session, settings)
        waiting = session.execute(
            select(JobRecord.id, JobRecord.kind, JobRecord.recipe).where(
                JobRecord.status == JobStatus.QUEUED, JobRecord.created_at < waited_since
            )
        ).all()
        for job_id, kind, recipe in waiting:
            queue = job_queue(kind, recipe or {})
            if live.get(queue):
                continue
            detail = (
                f"no worker took jobs from the '{queue}' queue for {settings.queue_wait_s} s: start one "
                f"(`optiforge worker --queues {queue}`"
                + (" on a node with an NVIDIA GPU" if queue == "gpu" else "")
                + "), then submit the job again"
            )
            moved = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.FAILED,
                    stage="failed",
                    finished_at=utcnow(),
                    error={"code": "no_worker_for_queue", "detail": detail},
                )
            ).rowcount
            if moved:
                session.commit()
                failed.append(job_id)
                logger.warning("job %s failed: %s", job_id, detail)
    return failed


def start_sweeper(
    settings: Settings, worker_name: str, queues: list[str], hardware: dict[str, Any]
) -> threading.Thread:
    """A daemon thread in the worker process that, every `job_sweep_interval_s`, says this worker is
    alive (with its queues), re-queues lost jobs and fails jobs that no worker can take."""
    stop = threading.Event()

    def sweep_forever() -> None:
        while True:
            try:
                beat(settings, worker_name, queues, hardware)
                requeue_lost_jobs(settings)
                republish_queued_jobs(settings)
                fail_jobs_without_workers(settings)
            except Exception:  # the database or broker may be briefly away; try again next round
                logger.exception("sweeping for lost jobs failed")
            if stop.wait(settings.job_sweep_interval_s):
                return

    thread = threading.Thread(target=sweep_forever, name="optiforge-sweeper", daemon=True)
    thread.start()
    return thread


def node_hardware() -> dict[str, Any]:
    """What this worker runs on, for the `workers` table: the CPU, and the GPU when there is one."""
    from engines.hardware import cpu_info, gpu_info, nvidia_device_present

    hardware: dict[str, Any] = dict(cpu_info())
    if nvidia_device_present():
        try:
            hardware.update(gpu_info())
        except Exception as exc:  # a driver without a usable CUDA torch: say so, do not fail the worker
            hardware["gpu_error"] = f"{type(exc).__name__}: {exc}"
    return hardware


def remove_scratch(settings: Settings, job_id: str) -> None:
    """Remove every scratch folder of `job_id` (attempts that were killed left theirs behind)."""
    for folder in settings.scratch_dir.glob(f"job-{job_id}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_scratch(settings: Settings) -> list[str]:
    """At start-up: remove the scratch folders of jobs that no live attempt runs (finished, gone,
    or running with an expired lease: its worker was killed). Returns the job ids cleaned."""
    if not settings.scratch_dir.is_dir():
        return []
    owners = {owner_of(folder) for folder in settings.scratch_dir.glob("job-*-*")}
    cutoff = lease_cutoff(settings.job_lease_s)
    with session_scope(settings.resolved_database_url) as session:
        alive = set(
            session.scalars(
                select(JobRecord.id).where(
                    JobRecord.id.in_(owners),
                    JobRecord.status == JobStatus.RUNNING,
                    JobRecord.heartbeat_at >= cutoff,
                )
            )
        )
    orphans = sorted(owners - alive)
    for job_id in orphans:
        remove_scratch(settings, job_id)
    return orphans
