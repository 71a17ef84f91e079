"""Celery tasks and worker hooks. Thin on purpose: the work is in workers.job_runner and engines/."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from app.core.job_queue import RUN_JOB_TASK
from app.core.settings import get_settings
from app.core.store import check_at_startup, get_store
from workers.job_runner import run_from_message
from workers.recovery import node_hardware, remove_orphaned_scratch, start_sweeper


@shared_task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str | None = None, queue: str | None = None) -> None:
    """A wake-up for `queue`: it runs the fair choice among the queue's jobs (workers.fairness)."""
    run_from_message(get_settings(), job_id, queue)


@worker_ready.connect
def _start_sweeping(sender: Any = None, **_kwargs: Any) -> None:
    settings = get_settings()
    consumed = sender.app.amqp.queues.consume_from if sender is not None else {}
    queues = [name.removeprefix(settings.queue_prefix) for name in consumed] or ["cpu"]
    name = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}:{os.getpid()}"
    remove_orphaned_scratch(settings)  # what workers killed on this data dir left behind
    store = get_store(settings)
    check_at_startup(store)  # a bucket that does not exist: said at once, in the worker's log
    store.remove_abandoned_staging()  # and the store's staging
    start_sweeper(settings, name, queues, node_hardware())
