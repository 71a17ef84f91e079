"""Run one job: re-read its row, run the recipe through engines/, record engines and results.

Idempotent under re-delivery: a finished job is left alone, and a job found `running` (its
worker died) starts over after removing what the earlier attempt stored. Every output goes
under `jobs/<job id>/` in the store, written atomically, and is removed again if the job fails.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.orm import DatasetRecord, EngineRecord, JobRecord, JobStatus, ModelRecord, new_id, utcnow
from app.settings import Settings
from app.store import ArtifactStore, get_store
from engines.datasets import Dataset, load_dataset
from engines.errors import Cancelled, EngineError
from engines.ingest import MODEL_FILENAME
from engines.pipeline import PipelineResult, run_recipe
from engines.recipe import Recipe
from engines.signature import TensorSpec, specs_from_dicts

logger = logging.getLogger(__name__)
_CANCEL_POLL_SECONDS = 0.5


class JobReporter:
    """Writes progress to the job row and turns a cancel request into `Cancelled`."""

    def __init__(self, db_url: str, job_id: str):
        self.db_url, self.job_id = db_url, job_id
        self._last_poll = 0.0

    def progress(self, fraction: float, stage: str) -> None:
        self.check_cancelled(force=True)
        with session_scope(self.db_url) as session:
            job = session.get(JobRecord, self.job_id)
            if job is not None:
                job.progress, job.stage = round(max(0.0, min(1.0, fraction)), 4), stage
        logger.info("job %s: %.0f%% %s", self.job_id, fraction * 100, stage)

    def check_cancelled(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < _CANCEL_POLL_SECONDS:
            return
        self._last_poll = now
        with session_scope(self.db_url) as session:
            requested = session.scalar(select(JobRecord.cancel_requested).where(JobRecord.id == self.job_id))
        if requested:
            raise Cancelled(self.job_id)


def _finish(db_url: str, job_id: str, status: str, **values: Any) -> None:
    with session_scope(db_url) as session:
        job = session.get(JobRecord, job_id)
        if job is not None:
            job.status, job.finished_at = status, utcnow()
            for key, value in values.items():
                setattr(job, key, value)


def _claim(session: Session, job: JobRecord, settings: Settings, store: ArtifactStore) -> bool:
    """Mark the job running; False when there is nothing (more) to do."""
    if job.status in JobStatus.FINISHED:
        logger.info("job %s is already %s; ignoring re-delivery", job.id, job.status)
        return False
    if job.cancel_requested:
        job.status, job.stage, job.finished_at = JobStatus.CANCELLED, "cancelled", utcnow()
        return False
    job.attempts += 1
    if job.attempts > settings.job_max_attempts:
        job.status, job.finished_at = JobStatus.FAILED, utcnow()
        job.error = {
            "code": "worker_lost",
            "detail": f"the worker died {job.attempts - 1} times running this job "
            "(out of memory?); giving up",
        }
        return False
    if job.status == JobStatus.RUNNING:  # re-delivered after a crash: start clean
        session.execute(delete(EngineRecord).where(EngineRecord.job_id == job.id))
        store.delete(f"jobs/{job.id}")
        job.messages = [
            *(job.messages or []),
            f"restarted (attempt {job.attempts}) after the worker was lost",
        ]
    job.status, job.stage, job.progress = JobStatus.RUNNING, "starting", 0.0
    job.started_at, job.error, job.baseline = utcnow(), None, None
    return True


def _load(
    settings: Settings, store: ArtifactStore, dataset: DatasetRecord | None, inputs: list[TensorSpec]
) -> Dataset | None:
    if dataset is None:
        return None
    return load_dataset(
        store.local_path(dataset.artifact_key), inputs, max_unpacked_bytes=settings.max_unpacked_bytes
    )


def _record(session: Session, store: ArtifactStore, job: JobRecord, result: PipelineResult) -> list[str]:
    """Store each engine's files and row; returns the stored prefixes."""
    prefixes = []
    for built in result.engines:
        engine_id = new_id("eng")
        prefix = f"jobs/{job.id}/engines/{engine_id}"
        store.put_dir(prefix, built.artifact.path.parent)
        prefixes.append(prefix)
        measurement = built.measurement
        session.add(
            EngineRecord(
                id=engine_id,
                job_id=job.id,
                model_id=job.model_id,
                backend=built.artifact.backend,
                precision=built.artifact.precision,
                artifact_prefix=prefix,
                engine_file=built.artifact.path.name,
                size_bytes=store.size(prefix),
                build_seconds=built.artifact.build_seconds,
                hardware=measurement.hardware,
                metrics={
                    "latency": measurement.latency,
                    "accuracy": measurement.accuracy,
                    "vs_baseline": built.comparison,
                },
                build_info=built.artifact.metadata,
            )
        )
    return prefixes


def run_job_by_id(settings: Settings, job_id: str) -> None:
    db_url = settings.resolved_database_url
    store = get_store(settings.resolved_artifact_dir)
    with session_scope(db_url) as session:
        job = session.get(JobRecord, job_id)
        if job is None:
            logger.warning("job %s does not exist (deleted?); dropping it", job_id)
            return
        if not _claim(session, job, settings, store):
            return
        model = session.get(ModelRecord, job.model_id)
        calibration = (
            session.get(DatasetRecord, job.calibration_dataset_id) if job.calibration_dataset_id else None
        )
        evaluation = (
            session.get(DatasetRecord, job.evaluation_dataset_id) if job.evaluation_dataset_id else None
        )
        recipe = Recipe.from_dict(job.recipe)
    reporter = JobReporter(db_url, job_id)
    try:
        assert model is not None, "a job's model cannot vanish: deleting a model with active jobs is refused"
        inputs = specs_from_dicts(model.info["inputs"])
        model_path = store.local_path(f"{model.artifact_prefix}/{MODEL_FILENAME}")
        with tempfile.TemporaryDirectory(prefix=f"optiforge-{job_id}-") as workdir:
            result = run_recipe(
                model_path,
                recipe,
                Path(workdir),
                evaluation=_load(settings, store, evaluation, inputs),
                calibration=_load(settings, store, calibration, inputs),
                progress=reporter.progress,
                check_cancelled=reporter.check_cancelled,
            )
            reporter.check_cancelled(force=True)
            with session_scope(db_url) as session:
                job = session.get(JobRecord, job_id)
                assert job is not None
                _record(session, store, job, result)
                job.status, job.finished_at, job.stage, job.progress = (
                    JobStatus.SUCCEEDED,
                    utcnow(),
                    "done",
                    1.0,
                )
                job.baseline = result.baseline.to_dict()
                job.messages = [*(job.messages or []), *result.messages]
    except Cancelled:
        store.delete(f"jobs/{job_id}")
        _finish(db_url, job_id, JobStatus.CANCELLED, stage="cancelled")
    except EngineError as exc:
        store.delete(f"jobs/{job_id}")
        _finish(db_url, job_id, JobStatus.FAILED, error={"code": exc.code, "detail": exc.detail})
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        store.delete(f"jobs/{job_id}")
        _finish(
            db_url,
            job_id,
            JobStatus.FAILED,
            error={"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"},
        )
