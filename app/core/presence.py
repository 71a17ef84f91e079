"""Which workers are alive and which queues they take jobs from.

Each worker's sweeper writes its row every `job_sweep_interval_s`; a row older than `job_lease_s`
is a worker that is gone. This is how a GPU job learns that no GPU worker exists (instead of
waiting in its queue forever), and how `/v1/capabilities` tells a user which queues are served.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.orm import WorkerRecord, lease_cutoff, utcnow
from app.core.settings import Settings


def beat(settings: Settings, name: str, queues: list[str], hardware: dict[str, Any]) -> None:
    """Record that worker `name` is alive and takes jobs from `queues` (logical names: cpu, gpu)."""
    with session_scope(settings.resolved_database_url) as session:
        record = session.get(WorkerRecord, name)
        if record is None:
            session.add(WorkerRecord(name=name, queues=queues, hardware=hardware))
        else:
            record.queues, record.hardware, record.heartbeat_at = queues, hardware, utcnow()
        # rows of workers gone for ten leases are history, not presence
        session.execute(
            delete(WorkerRecord).where(WorkerRecord.heartbeat_at < lease_cutoff(10 * settings.job_lease_s))
        )
        session.commit()


def live_workers_by_queue(session: Session, settings: Settings) -> dict[str, int]:
    """Live workers per logical queue."""
    rows = session.scalars(
        select(WorkerRecord.queues).where(WorkerRecord.heartbeat_at >= lease_cutoff(settings.job_lease_s))
    )
    return dict(Counter(queue for queues in rows for queue in queues))


def largest_worker_cores(session: Session, settings: Settings, queue: str) -> int | None:
    """The most logical cores of a live worker on `queue` (None when none is alive to ask)."""
    rows = session.scalars(
        select(WorkerRecord).where(WorkerRecord.heartbeat_at >= lease_cutoff(settings.job_lease_s))
    )
    cores = [int(row.hardware.get("logical_cores") or 0) for row in rows if queue in row.queues]
    return max(cores) if cores and max(cores) > 0 else None
