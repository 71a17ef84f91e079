"""What machine a measurement ran on: numbers without it mean nothing."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import Any


@cache
def cpu_info() -> dict[str, Any]:
    """CPU model, core count and the SIMD features that decide INT8 speed and accuracy."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "cpu_features": [name for name in CPU_FEATURES if name in flags],
    }


#: The /proc/cpuinfo flags that decide which precisions a CPU computes natively and how fast: AVX2 and
#: AVX-512 (float), VNNI and AMX-INT8 (int8 dot products without saturation), AVX512_BF16 and AMX-BF16
#: (bfloat16 arithmetic), AVX512_FP16 and AMX-FP16 (float16 arithmetic); AMX_TILE is AMX itself.
CPU_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
#: Flags of CPUs that compute in bfloat16 (rather than emulating it through float32).
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def bf16_unsupported(cpu_features: list[str]) -> str | None:
    """Why a CPU with these features has no bfloat16 arithmetic, or None when it has: on such a CPU a
    "bf16" engine computes in float32 (OpenVINO) or emulates bfloat16 slower than float32 (PyTorch),
    so it is no engine worth building."""
    if any(name in cpu_features for name in BF16_FEATURES):
        return None
    return (
        f"this CPU has no bfloat16 arithmetic (none of {', '.join(BF16_FEATURES)} among its flags: "
        f"{', '.join(cpu_features) or 'none of note'}): a bf16 engine would compute in float32 or emulate "
        "bfloat16 more slowly; bf16 needs an Intel Xeon of the Cooper Lake or Sapphire Rapids "
        "generations or later, an AMD Zen 4 or later, or a GPU target"
    )


def cpu_hardware(threads: int | None, **versions: Any) -> dict[str, Any]:
    """What a CPU engine is measured on: the CPU, the threads it used, its runtime's versions."""
    info = cpu_info()
    return {**info, "threads": threads or info["logical_cores"], **versions}


@cache
def cuda_usable() -> bool:
    """Whether torch sees a CUDA device (imports torch: ask nvidia_device_present() first)."""
    import torch

    return bool(torch.cuda.is_available())


def nvidia_device_present() -> bool:
    """Whether this node has an NVIDIA GPU, from the driver's files: no CUDA library is loaded to ask,
    so a CPU node (and the API process) never imports torch or TensorRT just to say no."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


@cache
def gpu_info(device_index: int = 0) -> dict[str, Any]:
    """The GPU an engine is tied to and measured on: name, compute capability, memory, driver and
    CUDA versions (what a plan file or a measurement means nothing without)."""
    import torch

    properties = torch.cuda.get_device_properties(device_index)
    return {
        "gpu_model": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "gpu_memory_gb": round(properties.total_memory / 2**30, 1),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nvidia_driver": _driver_version(),
    }


def _driver_version() -> str | None:
    """The NVIDIA driver's version from the kernel module (no NVML binding needed)."""
    version_file = Path("/proc/driver/nvidia/version")
    if version_file.exists():
        for word in version_file.read_text(errors="replace").split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    return None
