"""Run one job: claim its row, run the recipe through engines/, record engines and results.

Celery may deliver a job more than once (a worker killed mid-job, a Redis visibility timeout),
sometimes while the first delivery is still running. So the row, not the message, decides:

- an attempt starts only by compare-and-swap on (status, attempts): of two deliveries at once,
  one wins and the other returns;
- the winning attempt holds a lease, a heartbeat refreshed by a background thread; a running job
  whose heartbeat is older than `job_lease_s` lost its worker, and the sweeper
  (`workers.recovery`) puts it back in the queue;
- every later write of the attempt is conditional on still owning the row (same attempt number,
  still running), so an attempt that was superseded or cancelled cannot overwrite the outcome;
- files go under `jobs/<job id>/engines/<engine id>/`, written atomically; an attempt that does
  not succeed removes the files it wrote, and a restarted job first removes its predecessors'.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.db import session_scope
from app.orm import (
    DatasetRecord,
    EngineRecord,
    JobRecord,
    JobStatus,
    ModelRecord,
    lease_cutoff,
    new_id,
    utcnow,
)
from app.settings import Settings
from app.store import ArtifactStore, get_store
from engines.datasets import Dataset, load_dataset
from engines.errors import Cancelled, EngineError, scrub_paths
from engines.ingest import MODEL_FILENAME
from engines.pipeline import PipelineResult, run_recipe
from engines.recipe import Recipe
from engines.sensitivity import SENSITIVITY_JSON, SENSITIVITY_KEY, SENSITIVITY_PNG, SensitivityConfig, analyse
from engines.sensitivity import plot as plot_sensitivity
from engines.signature import TensorSpec, specs_from_dicts

logger = logging.getLogger(__name__)
_CANCEL_POLL_SECONDS = 0.5


class Superseded(Cancelled):
    """This attempt no longer owns the job (another attempt took over, or it was cancelled as lost)."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owned(job_id: str, attempt: int) -> Any:
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
                    owned = session.execute(
                        update(JobRecord)
                        .where(_owned(self.job_id, self.number))
                        .values(heartbeat_at=utcnow())
                    ).rowcount
                if not owned:
                    self.lost = True
                    return
            except Exception:  # a database blip must not kill the job; the next beat retries
                logger.exception("heartbeat for job %s failed", self.job_id)

    def progress(self, fraction: float, stage: str) -> None:
        self.check_cancelled(force=True)
        with session_scope(self.db_url) as session:
            session.execute(
                update(JobRecord)
                .where(_owned(self.job_id, self.number))
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
                    .where(_owned(self.job_id, self.number))
                    .values(status=status, finished_at=utcnow(), **values)
                ).rowcount
            )


def claim(settings: Settings, store: ArtifactStore, job_id: str) -> int | None:
    """Start a new attempt at the job; its number, or None when there is nothing to do."""
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
            logger.info("job %s was claimed by another delivery", job_id)
            return None
        if job.attempts:  # what an earlier, lost attempt left behind
            session.execute(delete(EngineRecord).where(EngineRecord.job_id == job_id))
            store.delete(f"jobs/{job_id}")
        return attempt


def _load(
    settings: Settings, store: ArtifactStore, dataset: DatasetRecord | None, inputs: list[TensorSpec]
) -> Dataset | None:
    if dataset is None:
        return None
    return load_dataset(
        store.local_path(dataset.artifact_key), inputs, max_unpacked_bytes=settings.max_unpacked_bytes
    )


def engine_size(engine_path: Path) -> int:
    """The engine file and its external data, not the reports stored beside it."""
    return sum(
        path.stat().st_size for path in engine_path.parent.glob(engine_path.name + "*") if path.is_file()
    )


def _store_engines(
    session: Session, store: ArtifactStore, job: JobRecord, result: PipelineResult, written: list[str]
) -> None:
    """Store each engine's files and row; `written` collects the prefixes, for clean-up on failure."""
    for built in result.engines:
        engine_id = new_id("eng")
        prefix = f"jobs/{job.id}/engines/{engine_id}"
        written.append(prefix)
        store.put_dir(prefix, built.artifact.path.parent)
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
                size_bytes=engine_size(built.artifact.path),
                build_seconds=built.artifact.build_seconds,
                hardware=measurement.hardware,
                metrics={
                    "latency": measurement.latency,
                    "accuracy": measurement.accuracy,
                    "memory_mb": measurement.memory_mb,
                    "vs_baseline": built.comparison,
                },
                build_info=built.artifact.metadata,
            )
        )


def run_job_by_id(settings: Settings, job_id: str) -> None:
    """The Celery task's body: claim the job, run it, record the outcome."""
    db_url = settings.resolved_database_url
    store = get_store(settings.resolved_artifact_dir)
    number = claim(settings, store, job_id)
    if number is None:
        return
    with session_scope(db_url) as session:
        job = session.get(JobRecord, job_id)
        assert job is not None
        model = session.get(ModelRecord, job.model_id)
        calibration = (
            session.get(DatasetRecord, job.calibration_dataset_id) if job.calibration_dataset_id else None
        )
        evaluation = (
            session.get(DatasetRecord, job.evaluation_dataset_id) if job.evaluation_dataset_id else None
        )
        messages = list(job.messages or [])
        raw_recipe = dict(job.recipe)
    written: list[str] = []
    with Attempt(db_url, job_id, number, heartbeat_s=max(1.0, settings.job_lease_s / 4)) as attempt:
        try:
            assert model is not None, "a model with active jobs cannot be deleted"
            inputs = specs_from_dicts(model.info["inputs"])
            model_path = store.local_path(f"{model.artifact_prefix}/{MODEL_FILENAME}")
            with tempfile.TemporaryDirectory(prefix=f"optiforge-{job_id}-") as workdir:
                if SENSITIVITY_KEY in raw_recipe:
                    data = _load(settings, store, evaluation or calibration, inputs)
                    assert data is not None, "a sensitivity job is created with a dataset"
                    outcome: dict[str, Any] = {}
                    written.append(
                        _sensitivity(
                            store, job_id, model_path, inputs, data, raw_recipe, Path(workdir), attempt
                        )
                    )
                else:
                    result = run_recipe(
                        model_path,
                        Recipe.from_dict(raw_recipe),
                        Path(workdir),
                        evaluation=_load(settings, store, evaluation, inputs),
                        calibration=_load(settings, store, calibration, inputs),
                        progress=attempt.progress,
                        check_cancelled=attempt.check_cancelled,
                    )
                    outcome = {"baseline": result.baseline.to_dict()}
                    messages += result.messages
                attempt.check_cancelled(force=True)
                with session_scope(db_url) as session:
                    job = session.get(JobRecord, job_id)
                    assert job is not None
                    if SENSITIVITY_KEY not in raw_recipe:
                        _store_engines(session, store, job, result, written)
                    succeeded = session.execute(
                        update(JobRecord)
                        .where(_owned(job_id, number) & JobRecord.cancel_requested.is_(False))
                        .values(
                            status=JobStatus.SUCCEEDED,
                            finished_at=utcnow(),
                            stage="done",
                            progress=1.0,
                            messages=[scrub_paths(message) for message in messages],
                            **outcome,
                        )
                    ).rowcount
                    if not succeeded:  # cancelled or superseded at the last moment: roll back
                        raise Cancelled(job_id)
        except Superseded:
            logger.warning("job %s: attempt %d was superseded; discarding its work", job_id, number)
            _remove(store, written)
        except Cancelled:
            _remove(store, written)
            attempt.finish(JobStatus.CANCELLED, stage="cancelled")
        except EngineError as exc:
            _remove(store, written)
            attempt.finish(JobStatus.FAILED, error={"code": exc.code, "detail": exc.detail})
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            _remove(store, written)
            attempt.finish(
                JobStatus.FAILED,
                error={"code": "internal_error", "detail": scrub_paths(f"{type(exc).__name__}: {exc}")},
            )


def _sensitivity(
    store: ArtifactStore,
    job_id: str,
    model_path: Path,
    inputs: list[TensorSpec],
    data: Dataset,
    recipe: dict[str, Any],
    workdir: Path,
    attempt: Attempt,
) -> str:
    """Run a sensitivity analysis; its table and plot go under jobs/<id>/sensitivity/."""
    options = recipe[SENSITIVITY_KEY]
    config = SensitivityConfig(method=options["method"], ratios=tuple(options["ratios"]))

    def progress(fraction: float, stage: str) -> None:
        attempt.progress(fraction, stage)

    report = analyse(model_path, inputs, data, config, progress=progress)
    out = workdir / "sensitivity"
    out.mkdir()
    (out / SENSITIVITY_JSON).write_text(json.dumps(report))
    plot_sensitivity(report, out / SENSITIVITY_PNG)
    prefix = f"jobs/{job_id}/sensitivity"
    store.put_dir(prefix, out)
    return prefix


def _remove(store: ArtifactStore, prefixes: list[str]) -> None:
    for prefix in prefixes:
        store.delete(prefix)
