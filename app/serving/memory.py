"""Giving memory back to the system after a large inference request.

An engine call of a big batch allocates its activations, and the allocator keeps them when they
are freed: glibc's malloc keeps freed chunks in its heaps (each thread its own arena), so the
API's resident memory stays at its highest point long after the request. `malloc_trim(0)` hands
free heap pages back (all arenas, since glibc 2.8). It costs well under a millisecond on the
API's heaps, so it runs only after requests expected to have taken at least a threshold, on a
worker thread. Elsewhere than glibc it does nothing.

ONNX Runtime's own arena, which keeps its high-water mark until the session is dropped, is off
for served engines (app.serving.pool loads them with `memory_arena=False`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from functools import cache

_trimming = threading.Lock()


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def give_back_memory() -> bool:
    """Return the allocator's free memory to the system; False when unavailable or already under
    way on another thread (one trim covers everyone's frees)."""
    trim = _malloc_trim()
    if trim is None or not _trimming.acquire(blocking=False):
        return False
    try:
        trim(0)
        return True
    finally:
        _trimming.release()
