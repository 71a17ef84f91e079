"""The job queue every side shares: the Celery configuration, and publishing a job by task name.

Redis (or any broker URL) when one is configured; otherwise kombu's filesystem transport under
the data directory, so one machine needs no broker server at all. Jobs are long: acks late,
prefetch one, and a job whose worker dies is re-delivered (the task is idempotent and counts
attempts, so a job that keeps killing workers is failed rather than looping).

The API only ever sends a job id and its queue, never data, and refers to the worker's task by its
name: the workers import this module to build their Celery app; nothing here imports them. A
message is a wake-up, not an order: the worker that receives it starts the queued job that is
fairest across projects (workers.fairness), since the broker itself is first come, first served.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import Celery

from app.core.orm import JobKind
from app.core.settings import Settings, get_settings
from engines.backends.registry import backend_queue
from engines.recipe import Recipe

RUN_JOB_TASK = "optiforge.run_job"
#: Loaded by a worker when it starts (a module name, not an import: the API never loads worker code).
WORKER_TASKS_MODULE = "workers.tasks"


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,  # a job's state lives in SQL, not in a result backend
        "task_default_queue": settings.queue("cpu"),
        "worker_concurrency": settings.worker_concurrency,
        "broker_transport_options": {"visibility_timeout": settings.job_visibility_timeout_s},
    }
    if settings.embedded_broker:
        queue_dir, control_dir = settings.broker_dir / "queue", settings.broker_dir / "control"
        for folder in (queue_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),  # kombu's default is ./control, beside whatever cwd is
            "store_processed": False,
        }
        # Remote control needs broadcast; jobs are cancelled through the database instead.
        config["worker_enable_remote_control"] = False
    return config


@lru_cache(maxsize=4)
def _celery_for(settings_json: str) -> Celery:
    settings = Settings.model_validate_json(settings_json)
    app = Celery("optiforge", include=[WORKER_TASKS_MODULE])
    app.conf.update(celery_config(settings))
    return app


def get_celery(settings: Settings | None = None) -> Celery:
    """One Celery app per distinct settings (tests run several stacks in one process)."""
    return _celery_for((settings or get_settings()).model_dump_json())


def queue_for(recipe: Recipe) -> str:
    """A job goes to the GPU queue as soon as one of its targets needs a GPU to build."""
    return queue_for_targets(recipe.targets)


def queue_for_targets(targets: Sequence[str]) -> str:
    queues = {backend_queue(target) for target in targets}
    return "gpu" if "gpu" in queues else "cpu"


def job_queue(kind: str, recipe: dict[str, Any]) -> str:
    """The queue of a stored job, from its kind and its recipe column: an optimization job's targets,
    an autotune job's search space (its backends; the CPU ones when it names none)."""
    if kind == JobKind.AUTOTUNE:
        return queue_for_targets((recipe.get("space") or {}).get("backends") or ())
    if kind == JobKind.OPTIMIZE:
        return queue_for(Recipe.from_dict(recipe))
    return "cpu"


def enqueue_job(settings: Settings, job_id: str, queue: str) -> None:
    """Wake a worker of `queue` for a new or re-queued job. The message names the job, but the
    worker starts the fair choice among the queue's jobs (workers.fairness), which may be another."""
    get_celery(settings).send_task(
        RUN_JOB_TASK, args=[job_id], kwargs={"queue": queue}, queue=settings.queue(queue)
    )


def enqueue_wakeup(settings: Settings, queue: str) -> None:
    """Wake a worker of `queue` for whichever of its jobs may start now (a job ended)."""
    get_celery(settings).send_task(
        RUN_JOB_TASK, args=[None], kwargs={"queue": queue}, queue=settings.queue(queue)
    )
