"""Entry point for the `celery` command: `celery -A workers.main worker` (`optiforge worker` starts the
same app from app.core.job_queue, which loads workers.tasks by name)."""

from __future__ import annotations

from app.core.job_queue import get_celery

celery_app = get_celery()
