"""Loaded engines kept in the API process, least recently used evicted first.

Loading a session costs far more than one inference, so runners are reused across requests.
Runners are thread-safe; the pool's lock guards only the cache itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from engines.backends.base import Runner
from engines.backends.registry import get_backend


class EnginePool:
    def __init__(self, capacity: int, threads: int | None = None):
        self.capacity = max(1, capacity)
        self.threads = threads
        self._runners: OrderedDict[str, Runner] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, engine_id: str, backend_name: str, engine_path: Path) -> Runner:
        """The runner for an engine, loading it on first use (BackendUnavailableError if this node can't).

        Loading happens outside the pool's lock, so requests to loaded engines never wait for a
        load; concurrent first requests to one engine load it once.
        """
        with self._lock:
            runner = self._cached(engine_id)
            if runner is not None:
                return runner
            loading = self._loading.setdefault(engine_id, threading.Lock())
        with loading:
            with self._lock:
                runner = self._cached(engine_id)
            if runner is not None:
                return runner
            runner = get_backend(backend_name).load(engine_path, self.threads)
            with self._lock:
                self._runners[engine_id] = runner
                self._loading.pop(engine_id, None)
                while len(self._runners) > self.capacity:
                    self._runners.popitem(last=False)
            return runner

    def _cached(self, engine_id: str) -> Runner | None:
        runner = self._runners.get(engine_id)
        if runner is not None:
            self._runners.move_to_end(engine_id)
        return runner

    def evict(self, *engine_ids: str) -> None:
        with self._lock:
            for engine_id in engine_ids:
                self._runners.pop(engine_id, None)

    def __len__(self) -> int:
        return len(self._runners)
