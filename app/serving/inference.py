"""Serving: from an engine's row to outputs, shared by the /v1 and the /v2 (Open Inference Protocol) routes.

The route decodes tensors; this module finds the engine, loads it through the pool, checks the
inputs against its signature and the engine's largest batch, runs it (batched or not) in the
activation gate's turn, gives big calls' memory back, and records the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.artifacts.errors import ArtifactIntegrityError, ArtifactStoreError
from app.core.db import get_sessionmaker
from app.core.errors import ApiError
from app.core.invalidation import ENGINES, ChangeFeed
from app.core.metrics import Metrics
from app.core.orm import EngineRecord, ModelRecord
from app.core.outages import usable_during_outage
from app.core.settings import MIB, Settings
from app.core.store import ArtifactStore
from app.serving.admission import BodyBudget, ByteGate, GateTimeout, JsonGate
from app.serving.limits import activation_estimate, check_batch, engine_max_batch
from app.serving.memory import give_back_memory
from app.serving.pool import EnginePool, LoadedEngine
from engines.backends.base import STATED_AXES_KEY
from engines.backends.batching import BatchingConfig, InferResult
from engines.backends.registry import unavailable_reason
from engines.errors import BackendUnavailableError, EngineError
from engines.ingest.signature import feed_batch_size, validate_feeds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedEngine:
    """What serving needs from an engine's row, detached from the database session."""

    id: str
    model_id: str
    backend: str
    artifact_key: str  # the engine file in the artifact store
    batching: BatchingConfig | None
    max_batch: int  # the largest batch one request may carry (app.serving.limits)
    #: The batch axes a user stated for the model's inputs, as the engine was built and measured with
    #: them (its build_info): the runner is loaded with them, so requests batch along them.
    batch_axes: tuple[tuple[str, int | None], ...] = ()
    #: The engine file's sha256 as built (EngineRecord.sha256): a node pulling it checks it.
    sha256: str | None = None

    @classmethod
    def of(cls, record: EngineRecord, store: ArtifactStore, default_max_batch: int) -> ServedEngine:
        batching = (
            BatchingConfig(record.max_batch_size, record.max_queue_delay_ms or 0.0)
            if record.max_batch_size
            else None
        )
        key = f"{record.artifact_prefix}/{record.engine_file}"
        max_batch = engine_max_batch(record.metrics, record.build_info, default_max_batch)
        stated = (record.build_info or {}).get(STATED_AXES_KEY) or {}
        axes = tuple(sorted(stated.items())) if isinstance(stated, dict) else ()
        return cls(record.id, record.model_id, record.backend, key, batching, max_batch, axes, record.sha256)


def find_engine(session: Session, name: str, version: str | None = None, *, project_id: str) -> EngineRecord:
    """The engine a client of `project_id` names: an engine id, an alias, or a model id with an
    engine id as version; another project's engines and models are not found.

    A model id without a version means the model's newest engine.
    """
    record = session.get(EngineRecord, name)
    if record is None or record.project_id != project_id:
        record = session.scalar(
            select(EngineRecord).where(EngineRecord.project_id == project_id, EngineRecord.alias == name)
        )
    if record is not None:
        if version not in (None, "", record.id):
            raise ApiError(
                404, "version_not_found", f"'{name}' has one version, '{record.id}', not '{version}'"
            )
        return record
    model = session.get(ModelRecord, name)
    if model is not None and model.project_id == project_id:
        engines = model_engines(session, name)
        if not version and engines:
            return engines[-1]
        for engine in engines:
            if engine.id == version:
                return engine
        detail = (
            f"model '{name}' has no engine '{version}'" if version else f"model '{name}' has no engines yet"
        )
        raise ApiError(404, "version_not_found", detail)
    raise ApiError(404, "model_not_found", f"no engine, alias or model named '{name}'")


def model_engines(session: Session, model_id: str) -> list[EngineRecord]:
    """A model's engines, oldest first: the versions `/v2/models/{model_id}` serves."""
    query = select(EngineRecord).where(EngineRecord.model_id == model_id).order_by(EngineRecord.created_at)
    return list(session.scalars(query))


class EngineDirectory:
    """Names to engines, remembered for `ttl_s` so a request to a hot engine needs no database query.

    Changes (alias, batching, delete) clear it at once, made through this process or, with Redis,
    through another replica (app.core.invalidation); without the feed, within `ttl_s`. A look-up
    that read the database before a change is not remembered after it (`_generation`).
    """

    def __init__(
        self,
        database_url: str,
        store: ArtifactStore,
        ttl_s: float,
        outage_grace_s: float = 0.0,
        *,
        default_max_batch: int,
    ):
        self.database_url, self.store, self.ttl_s = database_url, store, ttl_s
        self.outage_grace_s = outage_grace_s
        self.default_max_batch = default_max_batch
        self._entries: dict[tuple[str, str, str | None], tuple[float, ServedEngine]] = {}
        self._generation = 0  # bumped by every invalidation

    def cached(self, project_id: str, name: str, version: str | None) -> ServedEngine | None:
        entry = self._entries.get((project_id, name, version))
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def lookup(self, project_id: str, name: str, version: str | None) -> ServedEngine:
        """The engine `name` means now in `project_id` (ApiError 404 if none); queries the database
        on a miss. While the database is unreachable, a name looked up within `outage_grace_s`
        keeps its engine: a short outage does not stop a hot model (README, Reliability)."""
        engine = self.cached(project_id, name, version)
        if engine is None:
            generation = self._generation
            try:
                with get_sessionmaker(self.database_url)() as session:
                    record = find_engine(session, name, version, project_id=project_id)
                    engine = ServedEngine.of(record, self.store, self.default_max_batch)
            except Exception as exc:
                stamp, last = self._entries.get((project_id, name, version), (None, None))
                if last is None or not usable_during_outage(exc, stamp, self.outage_grace_s):
                    raise
                return last
            if generation == self._generation:  # else it may have read the row before the change
                self._entries[(project_id, name, version)] = (time.monotonic(), engine)
        return engine

    def invalidate(self) -> None:
        """Forget every name (called from request threads and the change listener's thread)."""
        self._generation += 1
        self._entries.clear()


class Serving:
    """Everything serving holds, as one object the routes receive (`app.api.deps.ServingDep`):
    the name directory, the engine pool, the in-flight limit, what request bodies, JSON tensors
    and engine calls may hold in memory (app.serving.admission), and the metrics it records to.

    One path for /v1 and /v2: find the engine, load it through the pool, validate the feeds against
    its signature, run it (batched or not), record the metrics. Only the blocking parts leave the
    event loop (a database look-up on a cache miss, a first load, the engine call).
    """

    def __init__(self, settings: Settings, store: ArtifactStore, changes: ChangeFeed | None = None):
        max_pool_bytes = settings.engine_pool_max_mb * MIB if settings.engine_pool_max_mb else None
        self.store = store
        threads, spin_wait = settings.inference_threads, settings.inference_spin_wait
        self.pool = EnginePool(settings.engine_pool_size, max_pool_bytes, threads, spin_wait)
        self.directory = EngineDirectory(
            settings.resolved_database_url,
            store,
            settings.engine_cache_ttl_s,
            settings.database_outage_grace_s,
            default_max_batch=settings.max_inference_batch,
        )
        self.inflight = InflightLimit(settings.max_inflight_requests)
        self.bodies = BodyBudget(settings.max_buffered_body_bytes)
        self.json_gate = JsonGate(settings.max_json_in_flight_bytes)
        self.activations = ByteGate(settings.inference_activation_budget_mb * MIB)
        self.activation_factor = settings.inference_activation_factor
        self.queue_timeout_s = settings.inference_queue_timeout_s
        self.trim_bytes = settings.inference_trim_mb * MIB
        self.metrics = Metrics(self.pool, settings.resolved_database_url)
        self.changes = changes or ChangeFeed()
        self.changes.subscribe(ENGINES, self._forget_here)

    async def lookup(self, name: str, version: str | None = None, *, project_id: str) -> ServedEngine:
        """The engine `name` means now in the caller's project (ApiError 404 if none); the database
        only on a cache miss."""
        return self.directory.cached(project_id, name, version) or await run_in_threadpool(
            self.directory.lookup, project_id, name, version
        )

    async def load(self, engine: ServedEngine) -> LoadedEngine:
        """The engine loaded in this process (a loaded one without leaving the event loop);
        BackendUnavailableError on a node that cannot run it, `engine_file_missing` when the store
        lost its file."""
        loaded = self.pool.ready(engine.id, engine.batching)
        return loaded or await run_in_threadpool(self._load, engine)

    def _load(self, engine: ServedEngine) -> LoadedEngine:
        with self._counting_errors(engine):
            reason = unavailable_reason(engine.backend)
            if reason is not None:
                raise BackendUnavailableError(f"engine '{engine.id}' cannot run here: {reason}")
            try:
                path = self.store.local_path(engine.artifact_key, sha256=engine.sha256)
            except FileNotFoundError:
                raise EngineError(
                    f"engine '{engine.id}': its file '{engine.artifact_key}' is not in the artifact store",
                    code="engine_file_missing",
                ) from None
            return self.pool.get(engine.id, engine.backend, path, engine.batching, dict(engine.batch_axes))

    async def run(
        self, engine: ServedEngine, loaded: LoadedEngine, feeds: Mapping[str, np.ndarray], protocol: str
    ) -> InferResult:
        """Validate `feeds` against the engine's inputs and its largest batch (ApiError 413
        `batch_too_large`), and run them (batched when it batches) once their estimated activations
        fit in the process's budget (ApiError 503 `server_busy` after waiting too long); engine
        errors are EngineErrors with a code, counted against the engine. Memory a big call took is
        given back to the system after it."""
        with self._counting_errors(engine):
            validate_feeds(feeds, loaded.runner.input_metadata())
            batch = feed_batch_size(feeds, loaded.runner.input_metadata())
            check_batch(batch, engine.max_batch, engine.id)
            estimate = activation_estimate(
                feeds, loaded.runner.output_metadata(), batch, self.activation_factor
            )
            try:
                async with self.activations.turn(estimate, self.queue_timeout_s):
                    result = await loaded.infer_async(feeds)
            except GateTimeout:
                raise ApiError(
                    503,
                    "server_busy",
                    f"inference memory is at this server's budget of {self.activations.capacity} bytes "
                    "of activations; retry shortly",
                    headers={"Retry-After": "1"},
                ) from None
        if self.trim_bytes and estimate >= self.trim_bytes:
            await run_in_threadpool(give_back_memory)
        self.metrics.observe_inference(engine.id, protocol, result)
        return result

    def forget(self, *engine_ids: str) -> None:
        """After an engine changed (alias, batching) or went (deleted), once committed: here and on
        every other replica (app.core.invalidation), evict what is loaded and drop the name cache,
        so the next request reads the row again."""
        self.changes.publish(ENGINES, engine_ids)

    def _forget_here(self, engine_ids: tuple[str, ...] | None) -> None:
        """This process's part of `forget`. None (the feed reconnected, the ids are unknown): the
        names only. Loaded engines stay: an engine's file never changes under its id, a batching
        change is applied on the next request (EnginePool.get), and a deleted engine is no longer
        found, so it only waits for the pool to evict it (reloading every hot engine after a blip
        of Redis would cost more)."""
        if engine_ids:
            self.pool.evict(*engine_ids)
        self.directory.invalidate()

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _counting_errors(self, engine: ServedEngine) -> Iterator[None]:
        """Count an EngineError against the engine (by its code) on its way out, and a store error
        too: `artifact_integrity_error` flags the engine (its stored file failed its sha256 twice:
        an operator should rebuild it) in the metrics and the log."""
        try:
            yield
        except EngineError as exc:
            self.metrics.inference_errors.labels(engine.id, exc.code).inc()
            raise
        except ArtifactStoreError as exc:
            self.metrics.inference_errors.labels(engine.id, exc.code).inc()
            if isinstance(exc, ArtifactIntegrityError):
                logger.error("engine %s flagged: %s", engine.id, exc.detail)
            raise


class InflightLimit:
    """At most `limit` inference requests in this process at once; the rest get a 503 at once.

    Each request holds its tensors in memory (JSON ones many times their size), so this bounds
    the memory a burst can take, as Triton's max_queue_size does. A request takes its slot once its
    body has arrived (app.api.body_reader): a client that sends slowly holds none.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise ApiError(
                503,
                "server_busy",
                f"{self.limit} inference requests are in progress; retry shortly",
                headers={"Retry-After": "1"},
            )
        try:
            yield
        finally:
            self._slots.release()
