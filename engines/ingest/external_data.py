"""Weights kept outside the ONNX file: how much they weigh, and gathering them into one file
without reading them into memory.

One protobuf message cannot exceed 2 GiB, so a model of 2 GiB or more exists only as an `.onnx`
file plus external-data files, and must stay so: loading its weights into the proto and
serializing it fails (`EncodeError`), and would take their size in memory besides. Here the
tensors' external-data entries are rewritten to point into one file and the bytes are linked or
copied file to file (zeros left as holes), never parsed.

Locations must already be checked to lie inside `base_dir` (engines.ingest.model.check_external_data).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from engines.errors import InvalidModelError
from engines.ingest.sparse import copy_sparse

#: Where each source file starts in the gathered file: runtimes map aligned offsets straight in.
ALIGNMENT = 64 * 1024


def _entries(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _int_entry(tensor: Any, entries: dict[str, str], key: str) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidModelError(
            f"tensor '{tensor.name}' has an external-data {key} of '{entries[key]}', not a byte count",
            code="invalid_model",
        )
    return value


def _span(tensor: Any, base_dir: Path) -> tuple[Path, int, int]:
    """The file a tensor reads, where it starts and how many bytes it reads (checked against the file)."""
    entries = _entries(tensor)
    source = (base_dir / entries["location"]).resolve()
    size = source.stat().st_size
    offset = _int_entry(tensor, entries, "offset") or 0
    length = _int_entry(tensor, entries, "length")
    length = size - offset if length is None else length
    if offset + length > size:
        raise InvalidModelError(
            f"tensor '{tensor.name}' reads bytes {offset}–{offset + length} of "
            f"'{entries['location']}', which holds {size}",
            code="invalid_model",
        )
    return source, offset, length


def external_bytes(tensors: Iterable[Any], base_dir: Path) -> int:
    """What the external tensors would add to the proto if their data were loaded into it."""
    return sum(_span(tensor, base_dir)[2] for tensor in tensors)


def gather_external_data(tensors: Sequence[Any], base_dir: Path, data_path: Path) -> None:
    """Put the bytes of every external tensor into `data_path` and point the tensors there.

    One source file is hard-linked (no copy: the caller's unpacked upload and the stored model
    share its blocks); several, or a link across file systems, are copied one after the other,
    each at an aligned offset, zeros as holes. Tensors keep their offsets within their source.
    """
    spans = {id(tensor): _span(tensor, base_dir) for tensor in tensors}
    sources = sorted({source for source, _, _ in spans.values()})
    bases = _place(sources, data_path)
    for tensor in tensors:
        source, offset, length = spans[id(tensor)]
        entries = _entries(tensor) | {
            "location": data_path.name,
            "offset": str(bases[source] + offset),
            "length": str(length),
        }
        del tensor.external_data[:]
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)


def _place(sources: list[Path], data_path: Path) -> dict[Path, int]:
    """Write the sources into `data_path`; returns where each one starts."""
    if len(sources) == 1:
        try:
            os.link(sources[0], data_path)
            return {sources[0]: 0}
        except OSError:  # another file system, or one without hard links: copy instead
            pass
    bases: dict[Path, int] = {}
    with open(data_path, "wb") as target:
        for source in sources:
            base = -(-target.tell() // ALIGNMENT) * ALIGNMENT
            target.truncate(base)
            target.seek(base)
            bases[source] = base
            with open(source, "rb") as data:
                copy_sparse(data, target)
    return bases
