"""Entry point for the `celery` command and `optiforge worker`: `celery -A workers.main worker`."""

from __future__ import annotations

from workers.celery_app import get_celery

celery_app = get_celery()
