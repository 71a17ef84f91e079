"""Backends by name. Modules are imported on first use, so listing names never imports a runtime."""

from __future__ import annotations

import importlib
from functools import cache

from engines.backends.base import Backend
from engines.errors import BackendUnavailableError

#: name -> "module:Class". Registering a backend is one line here.
_BACKENDS: dict[str, str] = {
    "onnxruntime-cpu": "engines.backends.onnxruntime_cpu:OnnxRuntimeCpuBackend",
    "openvino-cpu": "engines.backends.openvino_cpu:OpenVinoCpuBackend",
    "torch-cpu": "engines.backends.torch_runtime:TorchCpuBackend",
    "torch-cuda": "engines.backends.torch_runtime:TorchCudaBackend",
    "tensorrt": "engines.backends.tensorrt:TensorRtBackend",
}


#: What each backend needs, for messages on nodes that lack it (TensorRT engines come from GPU workers).
_REQUIREMENTS: dict[str, str] = {
    "onnxruntime-cpu": "onnxruntime with its CPU execution provider",
    "openvino-cpu": "the openvino package (optiforge's openvino extra)",
    "torch-cpu": "torch and onnx2torch",
    "torch-cuda": "an NVIDIA GPU, and torch built with CUDA, and onnx2torch",
    "tensorrt": "an NVIDIA GPU with TensorRT 10 or 11 and torch built with CUDA",
}


def backend_names() -> list[str]:
    return list(_BACKENDS)


@cache
def backend_class(name: str) -> type[Backend]:
    """The backend's class, for what it declares (queue, precisions); imports its module only, never
    its runtime."""
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_backend(name: str) -> Backend:
    """An instance of the named backend, or BackendUnavailableError if this node cannot run it."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return backend_class(name)()


def unavailable_reason(name: str) -> str | None:
    """Why this node cannot run backend `name`, or None when it can."""
    if name in _BACKENDS and backend_class(name).available():
        return None
    needs = f" ({_REQUIREMENTS[name]})" if name in _REQUIREMENTS else ""
    runnable = [known for known in _BACKENDS if backend_class(known).available()]
    return f"backend '{name}'{needs} is not available on this node; this node runs {runnable}"


def backend_queue(name: str) -> str:
    """The worker queue that builds engines for `name`; cheap (imports only the backend module)."""
    return backend_class(name).queue


def check_precision(targets: tuple[str, ...] | list[str], precision: str) -> None:
    """InvalidRecipeError unless every target builds engines at `precision`, naming those that do."""
    from engines.errors import InvalidRecipeError

    refusing = [name for name in targets if precision not in backend_class(name).precisions]
    if refusing:
        able = [name for name in _BACKENDS if precision in backend_class(name).precisions]
        raise InvalidRecipeError(
            f"{', '.join(refusing)} cannot build {precision} engines; backends that can: {able}"
        )
