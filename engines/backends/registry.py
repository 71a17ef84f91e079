"""Backends by name. Modules are imported on first use, so listing names never imports a runtime."""

from __future__ import annotations

import importlib
from functools import cache

from engines.backends.base import Backend
from engines.errors import BackendUnavailableError

#: name -> "module:Class". Registering a backend is one line here.
_BACKENDS: dict[str, str] = {
    "onnxruntime-cpu": "engines.backends.onnxruntime_cpu:OnnxRuntimeCpuBackend",
}


def backend_names() -> list[str]:
    return list(_BACKENDS)


@cache
def _backend_class(name: str) -> type[Backend]:
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_backend(name: str) -> Backend:
    """An instance of the named backend, or BackendUnavailableError if this node cannot run it."""
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"unknown backend '{name}'; known: {backend_names()}")
    backend_class = _backend_class(name)
    if not backend_class.available():
        raise BackendUnavailableError(f"backend '{name}' is not available on this node")
    return backend_class()


def backend_queue(name: str) -> str:
    """The worker queue that builds engines for `name`; cheap (imports only the backend module)."""
    return _backend_class(name).queue
