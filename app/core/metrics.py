"""Prometheus metrics of one API process, served at `/metrics`.

Each app gets its own registry (several apps in one test process must not collide). Request
counters and histograms are updated as requests happen; the engine pool and the jobs table are
read when Prometheus scrapes, so the numbers are current without a background thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.core.db import get_sessionmaker
from app.core.orm import JobRecord, JobStatus

if TYPE_CHECKING:
    from engines.backends.batching import InferResult


class PoolGauges(Protocol):
    """What the metrics read of an engine pool (app.serving.pool.EnginePool has it)."""

    loads: int
    evictions: int

    def __len__(self) -> int: ...

    @property
    def footprint_bytes(self) -> int: ...

    from engines.backends.batching import InferResult


_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, pool: PoolGauges, database_url: str):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "optiforge_http_requests", "HTTP requests by route and status",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.http_seconds = Histogram(
            "optiforge_http_request_duration_seconds", "Time from request to response, by route",
            ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inferences = Counter(
            "optiforge_inference_requests", "Inference requests served, by engine and protocol",
            ["engine", "protocol"], registry=self.registry,
        )  # fmt: skip
        self.inference_errors = Counter(
            "optiforge_inference_errors", "Inference requests refused or failed, by engine and error code",
            ["engine", "code"], registry=self.registry,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "optiforge_inference_queue_seconds", "Time a request waited for its engine call (batching delay)",
            ["engine"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "optiforge_inference_compute_seconds", "Time of the engine call that served a request",
            ["engine"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "optiforge_inference_batch_size", "Samples in the engine call that served a request",
            ["engine"], buckets=_BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_PoolCollector(pool))
        self.registry.register(_JobsCollector(database_url))

    def observe_inference(self, engine_id: str, protocol: str, result: InferResult) -> None:
        self.inferences.labels(engine_id, protocol).inc()
        self.queue_seconds.labels(engine_id).observe(result.queue_ms / 1000.0)
        self.compute_seconds.labels(engine_id).observe(result.compute_ms / 1000.0)
        self.batch_size.labels(engine_id).observe(result.batch_size)


class _PoolCollector(Collector):
    def __init__(self, pool: PoolGauges):
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "optiforge_engine_pool_engines", "Engines loaded in this process", len(self.pool)
        )
        yield GaugeMetricFamily(
            "optiforge_engine_pool_bytes", "Size of the loaded engines' files", self.pool.footprint_bytes
        )
        yield CounterMetricFamily("optiforge_engine_pool_loads", "Engines loaded", self.pool.loads)
        yield CounterMetricFamily("optiforge_engine_pool_evictions", "Engines evicted", self.pool.evictions)


class _JobsCollector(Collector):
    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("optiforge_jobs", "Jobs by state", labels=["state"])
        try:
            with get_sessionmaker(self.database_url)() as session:
                counts = dict(
                    session.execute(select(JobRecord.status, func.count()).group_by(JobRecord.status)).all()
                )
        except Exception:  # a scrape must not fail because the database blinked; /readyz reports that
            return
        for state in (*JobStatus.ACTIVE, *JobStatus.FINISHED):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
