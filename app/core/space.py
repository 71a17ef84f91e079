"""Disk space in the data directory: how much is free, and a reserve given up when it runs out.

Deletes are how a full disk is won back, yet SQLite needs a little space to delete a row (it
writes the change to its write-ahead log first), so on a truly full disk even `DELETE` failed.
Freeing the artifacts before the row would work only when the record has files, and would leave a
row pointing at nothing when the row then cannot go. Instead the data directory keeps a reserve
file (`disk_reserve_mb`, as ext4 keeps blocks for root): a delete that meets a full disk removes
the reserve and tries again, and the reserve is written back once the delete has freed space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from app.core.settings import MIB, Settings

logger = logging.getLogger(__name__)

RESERVE_NAME = ".disk-reserve"
_CHUNK = 1024 * 1024


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class DiskReserve:
    """A file of `size_bytes` at `folder/.disk-reserve`. Stateless beyond the file, so the API
    processes and workers on one data directory share it."""

    def __init__(self, folder: Path, size_bytes: int):
        self.path, self.size_bytes = folder / RESERVE_NAME, size_bytes

    def ensure(self, keep_free_bytes: int = 0) -> bool:
        """Write the reserve if it is missing or short, unless that would leave less than
        `keep_free_bytes` free (the reserve must not take the space an upload is using); False when
        it is not there (it is tried again after the next delete and readiness probe)."""
        if self.size_bytes <= 0:
            return True
        try:
            if self.path.stat().st_size >= self.size_bytes:
                return True
        except FileNotFoundError:
            pass
        if not self.path.parent.is_dir() or free_bytes(self.path.parent) < self.size_bytes + keep_free_bytes:
            return False
        partial = self.path.with_name(RESERVE_NAME + ".tmp")
        try:
            with open(partial, "wb") as out:  # real blocks: a sparse file would reserve nothing
                block = bytes(_CHUNK)
                for start in range(0, self.size_bytes, _CHUNK):
                    out.write(block[: min(_CHUNK, self.size_bytes - start)])
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            logger.warning("the disk reserve could not be written (%s): deletes on a full disk may fail", exc)
            return False
        return True

    def release(self) -> bool:
        """Give the reserve's space back; False when there was none to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        logger.warning("the disk is full: released the %d-byte disk reserve for a delete", self.size_bytes)
        return True


def disk_reserve(settings: Settings) -> DiskReserve:
    """The data directory's reserve, as `disk_reserve_mb` sizes it."""
    return DiskReserve(settings.data_dir, settings.disk_reserve_mb * MIB)
