"""Hand a committed job to the workers. The API only ever sends a job id, never data."""

from __future__ import annotations

from app.settings import Settings
from engines.backends.registry import backend_queue
from engines.recipe import Recipe


def queue_for(recipe: Recipe) -> str:
    """A job goes to the GPU queue as soon as one of its targets needs a GPU to build."""
    queues = {backend_queue(target) for target in recipe.targets}
    return "gpu" if "gpu" in queues else "cpu"


def enqueue_job(settings: Settings, job_id: str, recipe: Recipe) -> None:
    from workers.celery_app import RUN_JOB_TASK, get_celery

    get_celery(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=settings.queue(queue_for(recipe)))
