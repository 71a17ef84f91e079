"""Loaded engines kept in the API process, least recently used evicted first.

Loading a session costs far more than one inference, so runners are reused across requests.
The pool is bounded by a count and by bytes (the engine files' size on disk, which is what a
loaded session mostly holds: its weights). What it evicts it deactivates, once the requests
running on it are done. The pool's lock guards only the cache, never a load or an inference.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from engines.backends.base import Runner, engine_size
from engines.backends.batching import BatchingConfig, DynamicBatcher, InferResult, run_unbatched
from engines.backends.registry import get_backend
from engines.ingest.signature import StatedAxes


@dataclass
class LoadedEngine:
    """An active runner in the pool. Requests count as its users: an evicted engine is deactivated
    when its last request has finished, never under one; at most `runner.max_concurrency` requests
    run on it at once (a GPU execution context is not thread-safe)."""

    engine_id: str
    runner: Runner
    footprint_bytes: int
    batcher: DynamicBatcher | None = None
    _users: int = 0
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slots: threading.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.runner.max_concurrency is not None:
            self._slots = threading.BoundedSemaphore(self.runner.max_concurrency)

    @property
    def batching(self) -> BatchingConfig | None:
        return self.batcher.config if self.batcher else None

    @contextmanager
    def _used(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                last = self._closed and self._users == 0
            if last:
                self.runner.deactivate()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> InferResult:
        """Run one request, through the dynamic batcher when the engine has one. Blocking."""
        batcher = self.batcher  # read once: batching may be turned off meanwhile
        with self._used():
            if batcher is not None:  # the batcher's one thread is the runner's only caller
                return batcher.submit(feeds).result()
            if self._slots is None:
                return run_unbatched(self.runner, feeds)
            with self._slots:
                return run_unbatched(self.runner, feeds)

    async def infer_async(self, feeds: Mapping[str, np.ndarray]) -> InferResult:
        """`infer` on the event loop's terms: only the engine call leaves the loop (a worker
        thread, or the batcher's thread when batching)."""
        batcher = self.batcher
        if batcher is None:
            return await run_in_threadpool(self.infer, feeds)
        with self._used():
            return await asyncio.wrap_future(batcher.submit(feeds))

    def close(self) -> None:
        """Stop batching, then deactivate the runner once no request uses it."""
        if self.batcher is not None:
            self.batcher.close()
        with self._lock:
            self._closed = True
            idle = self._users == 0
        if idle:
            self.runner.deactivate()


class EnginePool:
    def __init__(
        self,
        max_engines: int,
        max_bytes: int | None = None,
        threads: int | None = None,
        spin_wait: bool = False,
    ):
        self.max_engines = max(1, max_engines)
        self.max_bytes = max_bytes
        self.threads, self.spin_wait = threads, spin_wait
        self.loads = self.evictions = 0
        self._engines: OrderedDict[str, LoadedEngine] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(
        self,
        engine_id: str,
        backend_name: str,
        engine_path: Path,
        batching: BatchingConfig | None = None,
        batch_axes: StatedAxes | None = None,
    ) -> LoadedEngine:
        """The loaded engine, loading it on first use (BackendUnavailableError if this node can't).

        Loading happens outside the pool's lock, so requests to loaded engines never wait for a
        load; concurrent first requests to one engine load it once. A changed batching config
        takes effect here: the engine gets a new batcher, and the old one finishes its queue.
        `batch_axes`: the axes a user stated for the model's inputs (its record's build_info), which
        the runner's signature, the batcher and the request checks go by.
        """
        with self._lock:
            engine = self._cached(engine_id)
            if engine is None:
                loading = self._loading.setdefault(engine_id, threading.Lock())
        if engine is None:
            with loading:
                with self._lock:
                    engine = self._cached(engine_id)
                if engine is None:
                    engine = self._load(engine_id, backend_name, engine_path, batch_axes or {})
        if engine.batching != batching:
            self._rebatch(engine, batching)
        return engine

    def ready(self, engine_id: str, batching: BatchingConfig | None) -> LoadedEngine | None:
        """The engine if it is loaded with this batching config: the fast path that never blocks."""
        with self._lock:
            engine = self._cached(engine_id)
        return engine if engine is not None and engine.batching == batching else None

    def _load(
        self, engine_id: str, backend_name: str, engine_path: Path, batch_axes: StatedAxes
    ) -> LoadedEngine:
        backend = get_backend(backend_name)
        # No memory arena: an arena keeps its largest batch's activations for the session's life
        # (app.serving.memory); backends without one ignore the knob.
        options = backend.options(
            threads=self.threads, spin_wait=self.spin_wait, memory_arena=False, batch_axes=batch_axes
        )
        runner = backend.load(engine_path, options)
        engine = LoadedEngine(engine_id, runner, engine_size(engine_path))
        with self._lock:
            self._engines[engine_id] = engine
            self._loading.pop(engine_id, None)
            self.loads += 1
            evicted = self._evict_over_limits(keep=engine_id)
        for old in evicted:
            old.close()
        return engine

    def _rebatch(self, engine: LoadedEngine, batching: BatchingConfig | None) -> None:
        with self._lock:
            if engine.batching == batching or self._engines.get(engine.engine_id) is not engine:
                return  # nothing to change, or evicted meanwhile: no batcher nobody would close
            old = engine.batcher
            engine.batcher = DynamicBatcher(engine.runner, batching, engine.engine_id) if batching else None
        if old is not None:
            old.close()

    def _evict_over_limits(self, keep: str) -> list[LoadedEngine]:
        evicted = []
        while len(self._engines) > 1 and (
            len(self._engines) > self.max_engines
            or (self.max_bytes is not None and self._footprint() > self.max_bytes)
        ):
            oldest = next(iter(self._engines))
            if oldest == keep:  # the engine just loaded stays, even when it alone is over the limit
                break
            evicted.append(self._engines.pop(oldest))
            self.evictions += 1
        return evicted

    def _cached(self, engine_id: str) -> LoadedEngine | None:
        engine = self._engines.get(engine_id)
        if engine is not None:
            self._engines.move_to_end(engine_id)
        return engine

    def evict(self, *engine_ids: str) -> None:
        with self._lock:
            evicted = [self._engines.pop(engine_id) for engine_id in engine_ids if engine_id in self._engines]
        for engine in evicted:
            engine.close()

    def close(self) -> None:
        self.evict(*list(self._engines))

    @property
    def footprint_bytes(self) -> int:
        with self._lock:
            return self._footprint()

    def _footprint(self) -> int:  # with the lock held
        return sum(engine.footprint_bytes for engine in self._engines.values())

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)
