"""Receive an uploaded file into its own scratch folder, hashing it and enforcing the size limit.

An upload works in `<data dir>/scratch/upload-<upload id>-…` (beside the workers' `job-<id>-…`
folders), which it holds locked until it is done (app.core.scratch): an API process killed while
receiving, checking or storing an upload leaves a folder that the next start-up removes, with what
the artifact store had staged for it.

Before that, while the framework parses the multipart body, the file part spools (past 1 MiB) to
a temporary file: in the scratch dir too (`spooling_in`), on the data volume sized for uploads,
not in the system temp directory (often a small tmpfs: a 1 GiB upload would fill it, or RAM).
The file is unnamed (O_TMPFILE, or unlinked at once), so a killed process leaves nothing there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

import starlette.formparsers
from fastapi import UploadFile
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import ApiError
from app.core.orm import Base, new_id
from app.core.scratch import EXPORT_KIND, UPLOAD_KIND, claim_folder, remove_abandoned
from app.core.settings import Settings
from app.core.store import ArtifactStore

logger = logging.getLogger(__name__)
#: Written into an upload's scratch folder before its files go to the store: a start-up that finds
#: the folder abandoned learns what may have been stored without its row.
STORING_FILE = "storing.json"

_CHUNK = 1024 * 1024
#: Room for multipart framing and form fields around the file in a request body.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReceivedFile:
    path: Path  # <workdir>/upload/<filename>
    filename: str
    sha256: str
    size_bytes: int
    upload_id: str
    workdir: Path  # the upload's scratch folder, for what checking and storing it write

    def subdir(self, name: str) -> Path:
        """A new folder in the upload's scratch folder."""
        path = self.workdir / name
        path.mkdir()
        return path


#: Where the multipart parser of the request being handled spools its files; None: the system's.
_SPOOL_DIR: ContextVar[str | None] = ContextVar("spool_dir", default=None)


def _spooled_file(max_size: int = 0, **options: object) -> tempfile.SpooledTemporaryFile[bytes]:
    """Starlette's multipart parser makes its files with this (`install_spooling`)."""
    return tempfile.SpooledTemporaryFile(max_size=max_size, dir=_SPOOL_DIR.get(), **options)  # type: ignore[call-overload]


def install_spooling() -> None:
    """Make Starlette's multipart parser spool where `spooling_in` says. It names
    `SpooledTemporaryFile` as a module global and takes no directory, hence the substitution."""
    starlette.formparsers.SpooledTemporaryFile = _spooled_file  # type: ignore[attr-defined, misc]


@contextmanager
def spooling_in(folder: Path) -> Iterator[None]:
    """Multipart files parsed in this context (this request's task) spool under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    token = _SPOOL_DIR.set(str(folder))
    try:
        yield
    finally:
        _SPOOL_DIR.reset(token)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload is over the limit of {limit} bytes")


def safe_filename(name: str | None, default: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or default).name)[:200]
    return default if base.strip(".") == "" else base


@contextmanager
def receive_upload(upload: UploadFile, settings: Settings, default_name: str) -> Iterator[ReceivedFile]:
    """Copy the upload into a scratch folder of its own, removed afterwards whatever happens (and,
    when the process is killed, at its next start: `remove_abandoned_uploads`)."""
    limit = settings.max_upload_bytes
    upload_id = new_id("upl")
    with claim_folder(settings.scratch_dir, UPLOAD_KIND, upload_id) as folder:
        filename = safe_filename(upload.filename, default_name)
        target = folder.path / "upload" / filename
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
        yield ReceivedFile(
            path=target,
            filename=filename,
            sha256=digest.hexdigest(),
            size_bytes=size,
            upload_id=upload_id,
            workdir=folder.path,
        )


@dataclass(frozen=True)
class StoringIntent:
    """What an upload is storing: the files under `prefix`, then the row `record_id` of `table`."""

    prefix: str
    table: str
    record_id: str

    @classmethod
    def of(cls, prefix: str, record: Base) -> StoringIntent:
        column = inspect(type(record)).primary_key[0]
        return cls(prefix, record.__tablename__, str(getattr(record, column.key)))


def commit_upload(
    session: Session,
    store: ArtifactStore,
    received: ReceivedFile,
    prefix: str,
    source_dir: Path,
    record: Base,
) -> None:
    """Store the files (moved in: `source_dir` is in the upload's scratch), then the row; if the
    row cannot be written the files go too, and if the process is killed in between, the next
    start-up removes them (`remove_abandoned_uploads`, from the intent written first)."""
    intent = StoringIntent.of(prefix, record)
    (received.workdir / STORING_FILE).write_text(json.dumps(asdict(intent)))
    store.put_dir(prefix, source_dir, move=True)
    try:
        session.add(record)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(prefix)
        raise


def remove_abandoned_uploads(settings: Settings, store: ArtifactStore) -> list[str]:
    """At API start-up: remove the scratch folders of uploads whose process is gone, files an upload
    stored without its row, and what the store staged for a killed process. Uploads that other live
    API processes on this data dir are receiving hold their folders locked and are left alone.
    Returns the folders removed."""

    def unstore(folder: Path) -> None:
        intent_file = folder / STORING_FILE
        if not intent_file.is_file():
            return
        intent = StoringIntent(**json.loads(intent_file.read_text()))
        if not _row_exists(settings, intent):
            store.delete(intent.prefix)

    removed = remove_abandoned(settings.scratch_dir, (UPLOAD_KIND, EXPORT_KIND), unstore)
    removed += store.remove_abandoned_staging()
    if removed:
        logger.warning("removed %d folders left by killed processes: %s", len(removed), removed)
    return removed


def _row_exists(settings: Settings, intent: StoringIntent) -> bool:
    table = Base.metadata.tables[intent.table]
    key = next(iter(table.primary_key.columns))
    with session_scope(settings.resolved_database_url) as session:
        return session.execute(select(key).where(key == intent.record_id)).first() is not None
