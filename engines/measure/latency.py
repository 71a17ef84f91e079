"""Latency per batch size (and sequence length) for any runner, timed side by side, and the memory
a runner takes.

Jobs and benchmarks both use it, so the numbers a job stores and the numbers bench/ prints
come from the same code. Results are plain dicts, ready to store as JSON, keyed by `latency_key`:
`"8"` for batch 8, `"8x128"` for batch 8 at sequence length 128 (a model with a sequence axis
measured at the recipe's `sequence_lengths`); each entry also says its `batch_size` (and
`sequence_length`), so a reader need not parse keys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.backends.base import Runner
from engines.errors import InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.ingest.sequence import SequenceProfile
from engines.ingest.signature import TensorSpec
from engines.measure.tokens import MAX_PADDING, fit_to_length, sequence_feeds


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
    #: Generated token inputs (a model measured at sequence lengths, without a dataset): the average
    #: share of pad tokens per row (engines.measure.tokens); 0: every row full.
    padding: float = 0.0


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


def latency_key(batch_size: int, sequence_length: int | None = None) -> str:
    """The key of one measured shape: `"8"` (batch 8), `"8x128"` (batch 8, sequence length 128)."""
    return str(batch_size) if sequence_length is None else f"{batch_size}x{sequence_length}"


def parse_latency_key(key: str) -> tuple[int, int | None]:
    """(batch size, sequence length or None) of a `latency_key`."""
    batch, _, length = str(key).partition("x")
    return int(batch), int(length) if length else None


def latency_label(key: str) -> str:
    """A key as people read it in tables and messages: `b=8`, `b=8 s=128`."""
    batch, length = parse_latency_key(key)
    return f"b={batch}" if length is None else f"b={batch} s={length}"


def measured_batch_sizes(latency: Mapping[str, object] | None) -> list[int]:
    """The batch sizes a stored latency table was measured at, whatever its keys (`"8"`, `"8x128"`);
    keys that are neither (a record from elsewhere) are skipped."""
    sizes = set()
    for key in latency or {}:
        batch, _, length = str(key).partition("x")
        if batch.isdigit() and (not length or length.isdigit()):
            sizes.add(int(batch))
    return sorted(sizes)


def sorted_latency_keys(keys: Iterable[str]) -> list[str]:
    """Keys by batch size, then sequence length (plain batch keys first)."""
    return sorted(set(keys), key=lambda key: (parse_latency_key(key)[0], parse_latency_key(key)[1] or 0))


def measured_shapes(
    batch_sizes: Sequence[int], sequence_lengths: Sequence[int] = ()
) -> list[tuple[int, int | None]]:
    """Every (batch, sequence length) a recipe measures: each batch at each length, or each batch
    alone when the recipe names no lengths."""
    if not sequence_lengths:
        return [(batch, None) for batch in batch_sizes]
    return [(batch, length) for batch in batch_sizes for length in sequence_lengths]


def latency_stats(
    samples_ms: np.ndarray, batch_size: int, sequence_length: int | None = None
) -> dict[str, float]:
    mean = float(samples_ms.mean())
    stats = {
        "batch_size": batch_size,
        "runs": len(samples_ms),
        "mean_ms": mean,
        "p50_ms": float(np.percentile(samples_ms, 50)),
        "p90_ms": float(np.percentile(samples_ms, 90)),
        "p99_ms": float(np.percentile(samples_ms, 99)),
        "min_ms": float(samples_ms.min()),
        "throughput_per_s": batch_size * 1000.0 / mean,
    }
    if sequence_length is not None:
        stats["sequence_length"] = sequence_length
        stats["tokens_per_s"] = batch_size * sequence_length * 1000.0 / mean
    return stats


def make_batch(
    specs: list[TensorSpec],
    batch_size: int,
    dataset: Dataset | None,
    seed: int = 0,
    *,
    sequence_length: int | None = None,
    sequence: SequenceProfile | None = None,
    padding: float = 0.0,
) -> dict[str, np.ndarray]:
    """A batch for timing: real samples when a dataset is given (repeated if it is small), else random.

    At a `sequence_length` (a model whose `sequence` profile has axes): the dataset's rows cut or
    padded to that length, else token inputs generated by role (engines.measure.tokens)."""
    profile = sequence if sequence_length is not None and sequence is not None and sequence.has_axis else None
    if dataset is not None:
        feeds = {  # np.ascontiguousarray would turn a 0-d input (a sample rate) into shape [1]
            name: array if array.flags.c_contiguous else np.ascontiguousarray(array)
            for name, array in dataset.feeds(np.arange(batch_size) % dataset.samples).items()
        }
        if profile is not None and sequence_length is not None:
            return fit_to_length(feeds, specs, sequence_length, profile)
        return feeds
    if profile is not None and sequence_length is not None:
        padding = min(padding, MAX_PADDING)
        return sequence_feeds(specs, batch_size, sequence_length, profile, padding=padding, seed=seed)
    feeds = {}
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
    *,
    sequence_lengths: tuple[int, ...] = (),
    sequence: SequenceProfile | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Latency stats per runner and shape (keys by `latency_key`, str as JSON wants them): per
    batch size, or per (batch size, sequence length) when `sequence_lengths` are given for a model
    with a sequence axis (`sequence`, engines.ingest.sequence).

    Runners are timed side by side: every round gives each runner a short slice of timed runs,
    so load from elsewhere on a noisy machine falls on all of them alike and their ratios hold.
    Each runner gets at least `timed_runs` runs and `min_seconds` of timing per shape.
    """
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in runners}
    slice_runs = max(1, min(10, config.timed_runs))
    lengths = sequence_lengths if sequence is not None and sequence.has_axis else ()
    for batch_size, length in measured_shapes(batch_sizes, lengths):
        feeds = {
            name: make_batch(
                runner.input_metadata(),
                batch_size,
                dataset,
                sequence_length=length,
                sequence=sequence,
                padding=config.padding,
            )
            for name, runner in runners.items()
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
            results[name][latency_key(batch_size, length)] = latency_stats(
                np.asarray(values), batch_size, length
            )
    return results
