"""Receive an uploaded file into a private temp directory, hashing it and enforcing the size limit."""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile
from sqlalchemy.orm import Session

from app.core.errors import ApiError
from app.core.orm import Base
from app.core.store import ArtifactStore

_CHUNK = 1024 * 1024
#: Room for multipart framing and form fields around the file in a request body.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    filename: str
    sha256: str
    size_bytes: int


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload is over the limit of {limit} bytes")


def safe_filename(name: str | None, default: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or default).name)[:200]
    return default if base.strip(".") == "" else base


@contextmanager
def receive_upload(upload: UploadFile, limit: int, default_name: str) -> Iterator[ReceivedFile]:
    """Copy the upload to a temp dir that is removed afterwards, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="optiforge-upload-") as tmp:
        filename = safe_filename(upload.filename, default_name)
        target = Path(tmp) / "upload" / filename
        target.parent.mkdir()
        digest = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:
            while chunk := upload.file.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                digest.update(chunk)
                out.write(chunk)
        yield ReceivedFile(path=target, filename=filename, sha256=digest.hexdigest(), size_bytes=size)


def commit_upload(
    session: Session, store: ArtifactStore, prefix: str, source_dir: Path, record: Base
) -> None:
    """Store the files, then the row; if the row cannot be written the files go too."""
    store.put_dir(prefix, source_dir)
    try:
        session.add(record)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(prefix)
        raise
