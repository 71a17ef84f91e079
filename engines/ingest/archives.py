"""Zip archives from users (model bundles, `.npz` datasets): recognised by magic, and size-checked
from what their central directory declares before anything is inflated."""

from __future__ import annotations

import zipfile
from pathlib import Path

from engines.errors import InvalidDatasetError

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


def open_dataset_zip(path: Path, max_unpacked_bytes: int, *, not_a_zip: str, remedy: str) -> zipfile.ZipFile:
    """A dataset archive (`.npz`, a zip of images), opened once it is known to be a readable zip that
    declares at most `max_unpacked_bytes` (nothing is inflated before): InvalidDatasetError with
    `empty_file`, `invalid_dataset` (`not_a_zip` says what was expected) or `upload_too_large`."""
    if path.stat().st_size == 0:
        raise InvalidDatasetError("the uploaded file is empty", code="empty_file")
    if not is_zip_archive(path):
        raise InvalidDatasetError(not_a_zip)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidDatasetError(f"the archive could not be read: {exc}") from exc
    problem = unpacked_size_problem(archive, max_unpacked_bytes, remedy=remedy)
    if problem:
        archive.close()
        raise InvalidDatasetError(problem, code="upload_too_large")
    return archive
