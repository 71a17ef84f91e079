"""Uploading a file once: its sha256, computed here, finds the record the server already holds.

The server deduplicates uploads by content too (the same record comes back, `deduplicated`), but
only after the bytes have crossed the network; asking first (`GET /v1/models?sha256=`) costs
one small request. Only uploads whose record depends on the bytes alone are looked up: an ONNX
model, an .npz dataset. A .pt2 converted at an opset, or images and texts decoded with a spec,
go up and the server decides (it compares the options too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optiforge_client.models import Dataset, Model

#: Bytes read at a time while hashing (a model can be gigabytes).
CHUNK_BYTES = 1 << 20
#: Records asked for by hash: one page (a project rarely holds the same bytes twice).
LOOKUP_LIMIT = 100
#: Model files whose record is their bytes alone.
MODEL_SUFFIXES = (".onnx", ".zip")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, as the server stores it for an upload."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_lookup(path: Any, opset: int | None) -> bool:
    """Whether an upload of `path` may be answered by a stored model of the same bytes."""
    return isinstance(path, (str, Path)) and Path(path).suffix.lower() in MODEL_SUFFIXES and opset is None


def dataset_lookup(path: str | Path, options: Mapping[str, Any]) -> bool:
    """Whether an upload of `path` may be answered by a stored dataset of the same bytes: an .npz
    sent without decoding options."""
    return Path(path).suffix.lower() == ".npz" and not any(value is not None for value in options.values())


def reusable_model(models: Sequence[Model], sha256: str) -> Model | None:
    """The newest usable model of these bytes (a server that ignores the filter sends them all:
    the hash is checked here too)."""
    for model in models:
        if model.sha256 == sha256 and model.status != "failed":
            return model.model_copy(update={"deduplicated": True})
    return None


def reusable_dataset(datasets: Sequence[Dataset], sha256: str) -> Dataset | None:
    """The newest usable .npz dataset of these bytes (not one decoded from images or texts)."""
    for dataset in datasets:
        decoded = dataset.image_folder is not None or dataset.text is not None
        if dataset.sha256 == sha256 and dataset.status != "failed" and not decoded:
            return dataset.model_copy(update={"deduplicated": True})
    return None
