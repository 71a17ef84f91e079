"""How big one inference request may be, and how much memory it is expected to take.

A request's body is bounded in bytes (app.api.body_reader), but the memory an engine call takes
grows with the batch, not with the body: the digits CNN takes about 84 KB of activations per
sample for 4 KB of input, so a 58.6 MiB body of 15 000 samples made the engine call peak at
1.3 GB. Two bounds follow, both stated here once:

- `engine_max_batch`: the largest batch an engine takes. An engine with a fixed optimization
  profile (TensorRT) cannot run past the profile's maximum, so that is its limit; any other engine
  takes up to the server's default (`max_inference_batch`), or up to the largest batch it was
  measured at when building it, if that is larger (it has been seen to run there).
- `activation_estimate`: the bytes an engine call of these feeds is expected to hold, which the
  activation gate (app.serving.admission) admits against the process's budget. It is a
  conservative multiple of the input and output bytes (`inference_activation_factor`): ONNX
  shape inference cannot see through the fused operators an optimized engine file holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.core.errors import ApiError
from engines.ingest.signature import TensorSpec
from engines.measure.latency import measured_batch_sizes

BATCH_TOO_LARGE = "batch_too_large"


def engine_max_batch(
    metrics: Mapping[str, Any] | None, build_info: Mapping[str, Any] | None, default: int
) -> int:
    """The largest batch an engine serves, from its record's measurements and build info."""
    measured = measured_batch_sizes((metrics or {}).get("latency"))
    profile = (build_info or {}).get("optimization_profile")
    if isinstance(profile, Mapping) and profile:
        return _profile_max_batch(profile) or max(measured, default=default)
    return max([default, *measured])


def _profile_max_batch(profile: Mapping[str, Any]) -> int | None:
    """The largest value of a dynamic dim in a TensorRT optimization profile ({input: [min, opt,
    max]}); None when every dim is fixed (then the measured batch is the only one)."""
    largest = None
    for shapes in profile.values():
        try:
            low, _opt, high = shapes
        except (TypeError, ValueError):
            continue
        for low_dim, high_dim in zip(low, high, strict=False):
            if low_dim != high_dim:
                largest = max(largest or 0, int(high_dim))
    return largest


def check_batch(batch: int, max_batch: int, engine_id: str) -> None:
    """ApiError 413 `batch_too_large` (with the limit, as `max_batch`) when `batch` is over it."""
    if batch > max_batch:
        raise ApiError(
            413,
            BATCH_TOO_LARGE,
            f"a batch of {batch} samples is over engine '{engine_id}''s limit of {max_batch}: "
            f"split the request into batches of at most {max_batch}",
            max_batch=max_batch,
            batch=batch,
        )


def activation_estimate(
    feeds: Mapping[str, np.ndarray], outputs: Sequence[TensorSpec], batch: int, factor: float
) -> int:
    """Bytes an engine call of `feeds` is expected to hold at its peak: `factor` times its input
    bytes and its outputs' bytes (outputs whose sample shape is not static count as nothing)."""
    input_bytes = sum(int(array.nbytes) for array in feeds.values())
    output_bytes = 0
    for spec in outputs:
        shape = spec.shape_at(batch)
        if shape is not None:
            output_bytes += int(np.prod(shape, dtype=np.int64)) * _itemsize(spec.dtype)
    return int(factor * (input_bytes + output_bytes))


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a type numpy does not name (a string tensor): count it as a pointer
        return 8
