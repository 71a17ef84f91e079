"""Folders that say whose they are, so a process killed while using one leaves nothing for good.

Uploads work in `<data dir>/scratch/upload-<upload id>-…` and the artifact store stages in
`artifacts/.staging/<kind>-<prefix>-…`. Each such folder holds a lock file on which its owner
keeps an exclusive `flock` for as long as it uses the folder, and start-up removes every folder
whose lock it can take: its owner is gone.

Why a lock and not a pid or a heartbeat: the kernel drops an `flock` when the process holding it
dies, however it dies (SIGKILL, the OOM killer), so "I can take the lock" means "no live process
owns this", with no clock and no guess. A pid in the name could name a new, unrelated process
(pids are reused, and all of them are after a container restart); a heartbeat would need a
thread per folder and a timeout that is either too short for a slow upload or too long to clean
up soon. Several API processes (and workers) on one machine can share a data dir this way: each
takes only what nobody holds. On a data dir shared by several machines the lock must be seen by
all of them: NFS (v4, or v3 with its lock manager) carries `flock` across clients on Linux; a
file system whose locks are local to one machine does not, and there only one machine may clean.

The lock is taken on an open file description: a process that forks without exec keeps its
parent's folders alive in the child (the descriptors are close-on-exec, so `subprocess` does not).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

LOCK_FILE = ".owner.lock"
#: A folder without a lock file that is not empty was made before folders had owners (or by a
#: process killed while removing its own): it is removed only once this old, in case a process of
#: the earlier kind is still using it.
UNLOCKED_GRACE_S = 3600.0
#: The kinds of folder the API makes under the scratch dir, `<kind>-<owner id>-…` (an upload's, a
#: Triton export being built; workers make `job-<job id>-…` ones).
UPLOAD_KIND, EXPORT_KIND = "upload", "export"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.~]")


class OwnedFolder:
    """A folder this process holds until `release()`, which removes it (also on `with` exit)."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd: int | None = lock_fd

    def release(self) -> None:
        """Remove the folder, the lock file last, then drop the lock: a process killed half-way
        through leaves a folder that is still locked until it dies, and removable after."""
        if self._lock_fd is None:
            return
        try:
            _remove_contents(self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / LOCK_FILE)
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError:  # something could not be removed: the next start-up tries again
            logger.warning("could not remove all of %s", self.path.name, exc_info=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> OwnedFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def folder_prefix(kind: str, owner: str) -> str:
    """`<kind>-<owner>-`: the owner with anything but letters, digits, `_`, `.` and `~` replaced, so
    that the name splits back on `-`."""
    return f"{kind}-{_UNSAFE.sub('_', owner)[:120]}-"


def owner_of(folder: Path) -> str:
    """The owner named in a folder made by `claim_folder`."""
    return folder.name.split("-")[1]


def claim_folder(parent: Path, kind: str, owner: str) -> OwnedFolder:
    """Make `parent/<kind>-<owner>-<random>` and lock it for this process."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        path = Path(tempfile.mkdtemp(prefix=folder_prefix(kind, owner), dir=parent))
        try:
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # a clean-up removed the folder while it was still empty
            continue
        if _lock(fd) and _still_named(path, fd):
            return OwnedFolder(path, fd)
        # A clean-up took the lock between our making the folder and locking it, and removed it.
        os.close(fd)
    raise OSError(errno.EAGAIN, "could not claim a scratch folder", str(parent))


def remove_abandoned(
    parent: Path,
    kinds: tuple[str, ...] | None = None,
    before_removal: Callable[[Path], None] | None = None,
) -> list[str]:
    """Remove the folders of `parent` (those named `<kind>-…` for one of `kinds`, or all) whose owner
    is gone: their lock can be taken, or they have no lock file and are older than the grace.
    Returns the names removed. Folders held by a live process, here or in another, are kept.

    `before_removal(folder)` runs first, with the lock held, to undo what the dead owner did
    elsewhere; if it raises, the folder is kept (and tried again at the next start)."""
    if not parent.is_dir():
        return []
    removed = []
    for folder in sorted(parent.iterdir()):
        if kinds is not None and not folder.name.startswith(tuple(f"{kind}-" for kind in kinds)):
            continue
        if folder.is_dir() and not folder.is_symlink() and _remove_if_abandoned(folder, before_removal):
            removed.append(folder.name)
    return removed


def _remove_if_abandoned(folder: Path, before_removal: Callable[[Path], None] | None) -> bool:
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return _remove_unlocked(folder)
    try:
        if not _lock(fd):
            return False  # its owner is alive
        if before_removal is not None:
            try:
                before_removal(folder)
            except Exception:
                logger.exception(
                    "could not undo what the owner of %s left; kept for the next start", folder.name
                )
                return False
        _remove_contents(folder)  # the lock file last, as OwnedFolder.release does
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _remove_unlocked(folder: Path) -> bool:
    """A folder without a lock file: empty, it goes at once (`rmdir` removes only an empty folder,
    and an owner about to lock it starts again with a new one); else only after the grace."""
    try:
        os.rmdir(folder)
        return True
    except FileNotFoundError:
        return False  # removed meanwhile
    except OSError:  # not empty
        pass
    try:
        age = time.time() - folder.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < UNLOCKED_GRACE_S:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_named(path: Path, fd: int) -> bool:
    """Whether the file we locked is still `path`'s lock file (not one a clean-up removed)."""
    try:
        return os.stat(path / LOCK_FILE).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_contents(folder: Path) -> None:
    try:
        children = list(folder.iterdir())
    except FileNotFoundError:
        return
    for child in children:
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
