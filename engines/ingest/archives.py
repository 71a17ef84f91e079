"""Zip archives from users (model bundles, `.npz` datasets): recognised by magic, and size-checked
from what their central directory declares before anything is inflated."""

from __future__ import annotations

import zipfile
from pathlib import Path

_LOCAL_FILE_HEADER = b"PK\x03\x04"


def is_zip_archive(path: Path) -> bool:
    """True when the file starts like a zip. (`zipfile.is_zipfile` also accepts any file that merely
    contains an end-of-archive record near its end, which an ONNX file's bytes can.)"""
    with open(path, "rb") as handle:
        return handle.read(4) == _LOCAL_FILE_HEADER


def declared_unpacked_bytes(archive: zipfile.ZipFile) -> int:
    """What the archive says it unpacks to. Reads never yield more than a member declares (a lie
    ends in a CRC error), so checking this bounds the disk and memory an archive can take."""
    return sum(info.file_size for info in archive.infolist())


def unpacked_size_problem(archive: zipfile.ZipFile, limit: int, *, remedy: str) -> str | None:
    """The sentence refusing an archive that declares more than `limit` bytes once unpacked (read
    from its central directory: nothing is inflated), or None when it is within the limit. `remedy`
    says what the uploader can do about it."""
    total = declared_unpacked_bytes(archive)
    if total <= limit:
        return None
    return f"the archive unpacks to {total} bytes, over the limit of {limit}: {remedy}"
