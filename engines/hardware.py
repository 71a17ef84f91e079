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
    features = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "cpu_features": [name for name in features if name in flags],
    }
