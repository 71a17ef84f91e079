"""Files sent as a zip that is built while it is sent.

A model of 2 GiB or more is stored as two files and downloaded as one zip. Building that zip in a
temporary file first costs its size again on disk and leaves it behind if the process is killed
while sending; built on the fly it costs a chunk of memory and leaves nothing. The members are
stored uncompressed (weights do not compress), with their sizes and CRC in data descriptors after
their bytes and in the central directory, as any zip reader takes them (unzip, Python's zipfile,
7-Zip; ZIP64 for members over 2 GiB).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from fastapi.responses import StreamingResponse

CHUNK_BYTES = 1024 * 1024


class _Sink:
    """A write-only file that zipfile writes into and `iter_zip` empties after each chunk. It has
    no `tell` or `seek`, so zipfile writes a streamable archive (sizes after each member)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def iter_zip(files: Sequence[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of a zip holding `files` (each by its name), about `chunk_bytes` at a time."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:  # type: ignore[arg-type]
        for path in files:
            info = zipfile.ZipInfo.from_file(path, arcname=path.name)
            info.compress_type = zipfile.ZIP_STORED
            with open(path, "rb") as source, archive.open(info, "w") as member:
                while chunk := source.read(chunk_bytes):
                    member.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def zip_response(files: Sequence[Path], filename: str) -> StreamingResponse:
    """`files` as a zip download named `filename` (a name without quotes or path separators)."""
    return StreamingResponse(
        iter_zip(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
