"""Run one job: claim its row (workers.attempts), run the handler of its kind (workers.handlers),
record the outcome while the attempt still owns the row.

Celery may deliver a job more than once (a worker killed mid-job, a Redis visibility timeout),
sometimes while the first delivery is still running. So the row, not the message, decides:

- an attempt starts only by compare-and-swap on (status, attempts): of two deliveries at once,
  one wins and the other returns;
- the winning attempt holds a lease, a heartbeat refreshed by a background thread; a running job
  whose heartbeat is older than `job_lease_s` lost its worker, and the sweeper
  (`workers.recovery`) puts it back in the queue;
- every later write of the attempt is conditional on still owning the row (same attempt number,
  still running), so an attempt that was superseded or cancelled cannot overwrite the outcome;
- a message is a wake-up for its queue: the job started is the fair choice across projects among
  the queue's queued jobs (workers.fairness), within `max_running_jobs_per_project`;
- files go under `jobs/<job id>/`, written atomically; an attempt that does not succeed removes the
  files it wrote, and a restarted job first removes its predecessors'.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import update

from app.core.artifacts.errors import ArtifactStoreUnavailable
from app.core.db import session_scope
from app.core.invalidation import announce
from app.core.job_queue import enqueue_wakeup, job_queue
from app.core.orm import DatasetRecord, JobKind, JobRecord, JobStatus, ModelRecord, utcnow
from app.core.settings import Settings
from app.core.store import ArtifactStore, ArtifactStoreError, get_store
from engines.errors import Cancelled, EngineError, scrub_paths
from engines.ingest.model import MODEL_FILENAME
from engines.ingest.signature import specs_from_dicts
from workers.attempts import Attempt, Superseded, claim, claim_next, owned
from workers.fairness import fair_candidates
from workers.handlers import ENDED_UNSUCCESSFULLY, HANDLERS, JobContext
from workers.recovery import remove_scratch

logger = logging.getLogger(__name__)
#: A job whose artifact store is out of reach (not a damaged file: that is not transient) is tried
#: again after these pauses, within its attempt, before it fails with `artifact_store_unavailable`.
STORE_RETRY_DELAYS_S: tuple[float, ...] = (5.0, 20.0)


@contextmanager
def temporary_files_in(folder: Path) -> Iterator[None]:
    """Send the temporary files of every library the job calls (ONNX Runtime's quantization
    pre-processing makes `pre.quant.*` folders with mkdtemp, and so on) into the job's scratch
    folder: a worker killed mid-job then leaves them where the next attempt and start-up clean up.
    Process-wide, which is right for a worker process that runs one job at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def run_from_message(settings: Settings, job_id: str | None, queue: str | None) -> None:
    """The Celery task's body. A message is a wake-up for its queue: the job started is the fair
    choice among the queue's queued jobs (workers.fairness), not necessarily the one it names.
    When the attempt ends, the queue is woken again if a job of it can now start."""
    queue = queue or _queue_of(settings, job_id)
    store = get_store(settings)
    chosen = claim_next(settings, store, queue, named=job_id)
    if chosen is None:
        return
    try:
        _run_claimed(settings, store, *chosen)
    finally:
        wake_if_waiting(settings, queue)


def run_job_by_id(settings: Settings, job_id: str) -> None:
    """Claim this very job and run it (tests and benchmarks run a job in process with it; the
    workers go through `run_from_message`, which chooses fairly)."""
    store = get_store(settings)
    number = claim(settings, store, job_id)
    if number is not None:
        _run_claimed(settings, store, job_id, number)


def wake_if_waiting(settings: Settings, queue: str) -> None:
    """Send the queue a wake-up when one of its queued jobs may start now (this attempt's end freed
    a slot, and one running job of its project): the message that named it may be long consumed."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            waiting = bool(fair_candidates(session, settings, queue))
        if waiting:
            enqueue_wakeup(settings, queue)
    except Exception:  # the sweeper re-sends what stays queued (`queue_republish_s`)
        logger.exception("could not wake the '%s' queue", queue)


def _queue_of(settings: Settings, job_id: str | None) -> str:
    """The queue of a message sent before messages named their queue: its job's."""
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(JobRecord, job_id) if job_id else None
        return job_queue(job.kind, job.recipe or {}) if job is not None else "cpu"


def _run_claimed(settings: Settings, store: ArtifactStore, job_id: str, number: int) -> None:
    """Run the handler of the job's kind under attempt `number`, and record the outcome."""
    db_url = settings.resolved_database_url
    with session_scope(db_url) as session:
        job = session.get(JobRecord, job_id)
        assert job is not None
        kind, recipe, messages = job.kind, dict(job.recipe), list(job.messages or [])
        model = session.get(ModelRecord, job.model_id) if job.model_id else None  # none: decode_images
        calibration = (
            session.get(DatasetRecord, job.calibration_dataset_id) if job.calibration_dataset_id else None
        )
        evaluation = (
            session.get(DatasetRecord, job.evaluation_dataset_id) if job.evaluation_dataset_id else None
        )
    written: list[str] = []
    with Attempt(db_url, job_id, number, heartbeat_s=max(1.0, settings.job_lease_s / 4)) as attempt:
        try:
            handler = HANDLERS.get(kind)
            if handler is None:
                raise EngineError(
                    f"this worker has no handler for jobs of kind '{kind}' (it runs {sorted(HANDLERS)}); "
                    "run a worker of the same version as the API",
                    code="job_kind_unsupported",
                )
            assert model is not None or kind in JobKind.WITHOUT_MODEL, "a model with jobs cannot be deleted"

            def run_once() -> None:
                """One try at the job's work, in a scratch folder of its own."""
                remove_scratch(settings, job_id)  # a lost attempt's folder: this attempt owns the job now
                settings.scratch_dir.mkdir(parents=True, exist_ok=True)
                with (
                    tempfile.TemporaryDirectory(prefix=f"job-{job_id}-", dir=settings.scratch_dir) as workdir,
                    temporary_files_in(Path(workdir) / "tmp"),
                ):
                    context = JobContext(
                        settings=settings,
                        store=store,
                        job_id=job_id,
                        recipe=recipe,
                        inputs=specs_from_dicts(model.info.get("inputs", []) if model else []),  # none yet
                        model_path=Path(workdir) / "no-model"
                        if model is None
                        else store.local_path(
                            f"{model.artifact_prefix}/"
                            + (ModelRecord.SOURCE_FILE if kind == JobKind.CONVERT else MODEL_FILENAME)
                        ),
                        calibration=calibration,
                        evaluation=evaluation,
                        workdir=Path(workdir),
                        attempt=attempt,
                        written=written,
                    )
                    outcome = handler(context)
                    messages.extend(outcome.messages)
                    attempt.check_cancelled(force=True)
                    with session_scope(db_url) as session:
                        job = session.get(JobRecord, job_id)
                        assert job is not None
                        outcome.record(session, job)
                        succeeded = session.execute(
                            update(JobRecord)
                            .where(owned(job_id, number) & JobRecord.cancel_requested.is_(False))
                            .values(
                                status=JobStatus.SUCCEEDED,
                                finished_at=utcnow(),
                                stage="done",
                                progress=1.0,
                                messages=[scrub_paths(message) for message in messages],
                                **outcome.columns,
                            )
                        ).rowcount
                        if not succeeded:  # cancelled or superseded at the last moment: roll back
                            raise Cancelled(job_id)
                    for topic in outcome.changes:
                        announce(settings, topic)

            for retry in range(len(STORE_RETRY_DELAYS_S) + 1):
                try:
                    run_once()
                    break
                except ArtifactStoreUnavailable as exc:
                    if retry == len(STORE_RETRY_DELAYS_S):
                        raise
                    _remove(store, written)
                    written.clear()
                    delay = STORE_RETRY_DELAYS_S[retry]
                    logger.warning("job %s: %s; trying again in %.0f s", job_id, exc.detail, delay)
                    attempt.progress(
                        0.0, f"the artifact store is out of reach: trying again in {delay:.0f} s"
                    )
                    _wait(attempt, delay)
        except Superseded:
            logger.warning("job %s: attempt %d was superseded; discarding its work", job_id, number)
            _remove(store, written)
        except Cancelled:
            _remove(store, written)
            _ended(db_url, job_id, kind, attempt.finish(JobStatus.CANCELLED, stage="cancelled"))
        except (EngineError, ArtifactStoreError) as exc:  # ArtifactStoreError: the store out of reach
            _remove(store, written)
            error = exc.to_dict()  # with what the code names (`operators`, `mismatches`, …)
            _ended(db_url, job_id, kind, attempt.finish(JobStatus.FAILED, error=error))
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            _remove(store, written)
            error = {"code": "internal_error", "detail": scrub_paths(f"{type(exc).__name__}: {exc}")}
            _ended(db_url, job_id, kind, attempt.finish(JobStatus.FAILED, error=error))


def _wait(attempt: Attempt, seconds: float) -> None:
    """Sleep `seconds`, answering a cancellation within half a second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempt.check_cancelled(force=True)
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _ended(db_url: str, job_id: str, kind: str, recorded: bool) -> None:
    """What a kind records elsewhere once this attempt has recorded its job failed or cancelled
    (workers.handlers.ENDED_UNSUCCESSFULLY: a failed conversion fails its model)."""
    hook = ENDED_UNSUCCESSFULLY.get(kind)
    if not recorded or hook is None:
        return
    with session_scope(db_url) as session:
        job = session.get(JobRecord, job_id)
        if job is not None:
            hook(session, job, job.status, job.error)


def _remove(store: ArtifactStore, prefixes: list[str]) -> None:
    for prefix in prefixes:
        try:
            store.delete(prefix)
        except ArtifactStoreError:  # the outcome is still recorded; the files stay behind, logged
            logger.warning("job output '%s' could not be removed: the artifact store is unavailable", prefix)
