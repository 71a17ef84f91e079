"""Dynamic batching: concurrent small requests to one engine run as one larger engine call.

A batch-1 call leaves most of a CPU's (or GPU's) throughput unused; stacking the samples of
requests that arrive within `max_queue_delay_ms` of each other, up to `max_batch_size`, buys
throughput at the cost of that delay, as Triton's dynamic batcher does. One thread per engine
runs the batches, so the engine sees one call at a time and its own threads stay busy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from engines.backends.base import Runner
from engines.errors import EngineError
from engines.ingest.signature import feed_batch_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int
    max_queue_delay_ms: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_delay_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_delay_ms >= 0")


@dataclass(frozen=True)
class InferResult:
    """Outputs of one request, with where its time went on the server."""

    outputs: dict[str, np.ndarray]
    compute_ms: float  # the engine call that served it (shared by the whole batch)
    queue_ms: float  # from submission until that call started
    batch_size: int  # samples in that call, this request's and others'


@dataclass
class _Pending:
    feeds: Mapping[str, np.ndarray]
    samples: int
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future[InferResult] = field(default_factory=Future)

    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        # Requests stack only when everything but the batch dimension agrees.
        return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(self.feeds.items()))


def run_unbatched(runner: Runner, feeds: Mapping[str, np.ndarray]) -> InferResult:
    """One request, one engine call: the path without a batcher, timed the same way."""
    started = time.perf_counter()
    outputs = runner.infer(feeds, check_inputs=False)  # the caller validated them
    samples = feed_batch_size(feeds, runner.input_metadata())
    return InferResult(outputs, (time.perf_counter() - started) * 1000.0, 0.0, samples)


class DynamicBatcher:
    """Groups submissions to one runner; `submit` is thread-safe and returns a Future."""

    _STOP = object()

    def __init__(self, runner: Runner, config: BatchingConfig, name: str = "engine"):
        self.runner, self.config = runner, config
        self._queue: queue.Queue[_Pending | object] = queue.Queue()
        self._carry: _Pending | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, feeds: Mapping[str, np.ndarray]) -> Future[InferResult]:
        samples = {len(array) for array in feeds.values() if array.ndim > 0}
        pending = _Pending(feeds, samples.pop() if len(samples) == 1 else 1)
        with self._lock:
            if not self._closed:
                self._queue.put(pending)
                return pending.future
        # Closed under us (the engine was evicted or its batching changed after the caller got
        # this batcher): still answer, alone, on a thread of its own.
        threading.Thread(target=self._run, args=([pending],), daemon=True).start()
        return pending.future

    def close(self) -> None:
        """Finish what is queued, then stop the thread; later submissions run unbatched."""
        with self._lock:
            self._closed = True
            self._queue.put(self._STOP)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._carry or self._queue.get()
            self._carry = None
            if first is self._STOP:
                return
            assert isinstance(first, _Pending)
            batch, stop = self._gather(first)
            try:
                self._run(batch)
            except Exception:  # never let the thread die: later submissions would wait forever
                log.exception("dynamic batcher: a batch failed outside the engine call")
            if stop:
                return

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """`first` plus whatever fits and arrives before its deadline; a misfit waits for the next."""
        batch, samples = [first], first.samples
        deadline = first.enqueued + self.config.max_queue_delay_ms / 1000.0
        signature = first.signature()
        while samples < self.config.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is self._STOP:
                return batch, True
            assert isinstance(item, _Pending)
            if samples + item.samples > self.config.max_batch_size or item.signature() != signature:
                self._carry = item
                break
            batch.append(item)
            samples += item.samples
        return batch, False

    def _run(self, batch: list[_Pending]) -> None:
        # Requests whose caller gave up (a cancelled future) are dropped before the engine call.
        batch = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                outputs_per_request = [self.runner.infer(batch[0].feeds, check_inputs=False)]
            else:
                outputs_per_request = self._run_stacked(batch)
        except Exception as exc:
            for pending in batch:
                pending.future.set_exception(exc)
            return
        compute_ms = (time.perf_counter() - started) * 1000.0
        total = sum(pending.samples for pending in batch)
        for pending, outputs in zip(batch, outputs_per_request, strict=True):
            queue_ms = (started - pending.enqueued) * 1000.0
            pending.future.set_result(InferResult(outputs, compute_ms, queue_ms, total))

    def _run_stacked(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        names = list(batch[0].feeds)
        try:
            stacked = {name: np.concatenate([pending.feeds[name] for pending in batch]) for name in names}
        except ValueError as exc:  # e.g. a scalar input, which has no batch dimension to stack
            raise EngineError(
                f"these inputs cannot be stacked into one batch: {exc}", code="not_batchable"
            ) from exc
        outputs = self.runner.infer(stacked, check_inputs=False)  # stacked from validated requests
        total = sum(pending.samples for pending in batch)
        bounds = np.cumsum([0] + [pending.samples for pending in batch])
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise EngineError(
                    f"output '{name}' has shape {list(array.shape)}, not batch-first over {total} "
                    "samples: this engine cannot be batched dynamically",
                    code="not_batchable",
                )
        return [
            {name: array[bounds[i] : bounds[i + 1]] for name, array in outputs.items()}
            for i in range(len(batch))
        ]
