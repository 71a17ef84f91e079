"""Latency per batch size for any runner, timed side by side, and the memory a runner takes.

Jobs and benchmarks both use it, so the numbers a job stores and the numbers bench/ prints
come from the same code. Results are plain dicts, ready to store as JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.backends.base import Runner
from engines.errors import InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec


@dataclass(frozen=True)
class MeasureConfig:
    """How latency is measured: warm-up runs are discarded, timed runs give the percentiles.

    Timing goes on until both `timed_runs` runs and `min_seconds` are reached (sub-millisecond
    models need many runs for a stable p99), but never past `max_runs`.
    """

    warmup_runs: int = 10
    timed_runs: int = 50
    min_seconds: float = 1.0
    max_runs: int = 100_000
    threads: int | None = None  # None: all cores


#: Called between runs; raises to stop (e.g. engines.errors.Cancelled). It must be cheap: throttle inside.
StopCheck = Callable[[], None]


def resident_mb() -> float:
    """This process's resident memory (Linux /proc; elsewhere the peak, which only grows)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_of(
    load: Callable[[], Runner], batch: Callable[[Runner], dict[str, np.ndarray]]
) -> tuple[Runner, float]:
    """Load a runner and run one batch: the resident memory that took, in MiB.

    Approximate: the allocator may reuse memory freed earlier in the process, so read it as the
    engine's footprint on top of what is already loaded, not as an exact figure.
    """
    before = resident_mb()
    runner = load()
    runner.infer(batch(runner))
    return runner, max(0.0, resident_mb() - before)


def latency_stats(samples_ms: np.ndarray, batch_size: int) -> dict[str, float]:
    mean = float(samples_ms.mean())
    return {
        "batch_size": batch_size,
        "runs": len(samples_ms),
        "mean_ms": mean,
        "p50_ms": float(np.percentile(samples_ms, 50)),
        "p90_ms": float(np.percentile(samples_ms, 90)),
        "p99_ms": float(np.percentile(samples_ms, 99)),
        "min_ms": float(samples_ms.min()),
        "throughput_per_s": batch_size * 1000.0 / mean,
    }


def make_batch(
    specs: list[TensorSpec], batch_size: int, dataset: Dataset | None, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch for timing: real samples when a dataset is given (repeated if it is small), else random."""
    if dataset is not None:
        return {  # np.ascontiguousarray would turn a 0-d input (a sample rate) into shape [1]
            name: array if array.flags.c_contiguous else np.ascontiguousarray(array)
            for name, array in dataset.feeds(np.arange(batch_size) % dataset.samples).items()
        }
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    for spec in specs:
        dims = spec.shape_at(batch_size)
        if dims is None:
            raise InvalidRecipeError(
                f"input '{spec.name}' has dynamic dims besides the batch ({list(spec.shape)}); "
                "give a dataset so it can be measured"
            )
        if np.dtype(spec.dtype).kind == "f":
            feeds[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(dims, dtype=spec.dtype)
    return feeds


def measure_latency(
    runners: Mapping[str, Runner],
    batch_sizes: tuple[int, ...],
    config: MeasureConfig,
    dataset: Dataset | None = None,
    check_stop: StopCheck | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Latency stats per runner and batch size (batch keys are str, as JSON wants them).

    Runners are timed side by side: every round gives each runner a short slice of timed runs,
    so load from elsewhere on a noisy machine falls on all of them alike and their ratios hold.
    Each runner gets at least `timed_runs` runs and `min_seconds` of timing per batch size.
    """
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in runners}
    slice_runs = max(1, min(10, config.timed_runs))
    for batch_size in batch_sizes:
        feeds = {
            name: make_batch(runner.input_metadata(), batch_size, dataset) for name, runner in runners.items()
        }
        for name, runner in runners.items():
            for _ in range(config.warmup_runs):
                runner.infer(feeds[name])
                if check_stop is not None:
                    check_stop()
        timings: dict[str, list[float]] = {name: [] for name in runners}
        spent = dict.fromkeys(runners, 0.0)
        while any(
            len(timings[name]) < config.timed_runs or spent[name] < config.min_seconds * 1000
            for name in runners
        ) and all(len(values) < config.max_runs for values in timings.values()):
            for name, runner in runners.items():
                for _ in range(slice_runs):
                    started = time.perf_counter_ns()
                    runner.infer(feeds[name], check_inputs=False)  # checked once, in the warm-up
                    elapsed_ms = (time.perf_counter_ns() - started) / 1e6
                    timings[name].append(elapsed_ms)
                    spent[name] += elapsed_ms
                    if check_stop is not None:  # cheap: the check throttles itself
                        check_stop()
        for name, values in timings.items():
            results[name][str(batch_size)] = latency_stats(np.asarray(values), batch_size)
    return results
