"""The files that make an engine, as stored: what a download sends and an export copies.

An engine is its file (`engine_file`) and the files named like it (`engine.onnx.data`, OpenVINO's
`engine.bin`), as engines.backends.base.engine_size counts them; the settings and reports stored
beside it (`torch_engine.json`, `layer_errors.json`) are not part of it.
"""

from __future__ import annotations

from pathlib import Path

from app.core.errors import ApiError
from app.core.orm import EngineRecord
from app.core.store import ArtifactStore


def engine_files(store: ArtifactStore, record: EngineRecord) -> list[Path]:
    """The engine's files, its own file first; 503 `engine_file_missing` when the store lacks it."""
    missing = ApiError(
        503,
        "engine_file_missing",
        f"engine '{record.id}' has no file in the artifact store; build it again (its job's recipe)",
    )
    try:
        folder = store.local_path(record.artifact_prefix)
    except FileNotFoundError:
        raise missing from None
    main = folder / record.engine_file
    if not main.is_file():
        raise missing
    stem = record.engine_file.split(".")[0]
    companions = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path != main and path.name.split(".")[0] == stem
    )
    return [main, *companions]
