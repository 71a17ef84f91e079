"""Arrays as long as a dataset, kept off the heap: a job's memory holds a batch, not the dataset.

Outputs over a whole evaluation set (samples × classes, or × a feature map) grow with the set; past
`SPILL_BYTES` they go to an unlinked temporary `.npy` file, memory-mapped (a worker points
`tempfile` at its job's scratch folder: workers.job_runner), and metrics read them a block of rows
at a time (`row_blocks`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator

import numpy as np

#: Outputs up to this size stay in memory; larger ones are written to a temporary file.
SPILL_BYTES = 64 * 1024 * 1024
#: What one block of rows read by a metric may take (before its float64 copy).
BLOCK_BYTES = 16 * 1024 * 1024


def rows_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty array of `shape`: in memory when small or not numeric, else disk-backed."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes <= SPILL_BYTES or dtype.kind not in "biufc":
        return np.empty(shape, dtype=dtype)
    handle, name = tempfile.mkstemp(suffix=".npy", prefix="outputs-")
    os.close(handle)
    try:
        return np.lib.format.open_memmap(name, mode="w+", dtype=dtype, shape=shape)
    finally:
        os.unlink(name)  # the mapping keeps the data until the array is gone; nothing is left behind


def row_blocks(array: np.ndarray, block_bytes: int = BLOCK_BYTES) -> Iterator[slice]:
    """Slices of consecutive rows (axis 0) of at most `block_bytes` each, covering the array."""
    row_bytes = max(1, math.prod(array.shape[1:]) * array.dtype.itemsize)
    step = max(1, block_bytes // row_bytes)
    for start in range(0, len(array), step):
        yield slice(start, min(start + step, len(array)))
