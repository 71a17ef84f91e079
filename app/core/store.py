"""The artifact store: uploads, intermediate ONNX files, engines, reports.

A small interface so an S3-compatible store can replace the local directory on several nodes.
Writes are atomic: a directory of files is assembled under a temporary name and renamed into
place, so a reader (or a crashed job's retry) never sees half an artifact. The local store
assembles in `.staging/<kind>-<prefix>-…` folders that their process holds locked while it uses
them (app.core.scratch), so what a killed process left there is found and removed at start-up.
"""

from __future__ import annotations

import abc
import os
import shutil
from pathlib import Path, PurePosixPath

from app.core.scratch import claim_folder, remove_abandoned


class ArtifactStore(abc.ABC):
    """Artifacts are grouped under prefixes such as `models/mdl_…/`; a prefix is written at once."""

    @abc.abstractmethod
    def put_dir(self, prefix: str, source_dir: Path, *, move: bool = False) -> None:
        """Store every file of `source_dir` under `prefix`, atomically, replacing what was there.
        `move`: the caller gives `source_dir` up (scratch it would delete next), so a store on the
        same file system may rename it in instead of copying: no second copy of a 2 GiB model."""

    @abc.abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file path to read `key` from (a remote store downloads it to a cache first)."""

    @abc.abstractmethod
    def size(self, prefix: str) -> int:
        """Bytes stored under `prefix`."""

    @abc.abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove everything under `prefix`; a missing prefix is not an error."""

    def remove_abandoned_staging(self) -> list[str]:
        """Remove what processes killed while writing or deleting left half-done; returns what was
        removed. Called at start-up; safe while other processes use the store."""
        return []


def _checked(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"invalid artifact key {key!r}")
    return path


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / ".staging"
        self._staging.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _checked(key)

    def put_dir(self, prefix: str, source_dir: Path, *, move: bool = False) -> None:
        target = self._path(prefix)
        with claim_folder(self._staging, "put", prefix.replace("/", "~")) as staging:
            staged = staging.path / "data"
            if not (move and _renamed(source_dir, staged)):
                shutil.copytree(source_dir, staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # a retried job replaces its own earlier output
                os.replace(target, staging.path / "replaced")
            os.replace(staged, target)

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.exists():
            raise FileNotFoundError(key)
        return path

    def size(self, prefix: str) -> int:
        path = self._path(prefix)
        if path.is_file():
            return path.stat().st_size
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())

    def delete(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            with claim_folder(self._staging, "delete", prefix.replace("/", "~")) as trash:
                os.replace(path, trash.path / "deleted")
        elif path.exists():
            path.unlink()

    def remove_abandoned_staging(self) -> list[str]:
        return remove_abandoned(self._staging)

    def files(self) -> list[str]:
        """Every stored key (staging excluded): what tests use to prove nothing was left behind."""
        return sorted(
            str(path.relative_to(self.root))
            for path in self.root.rglob("*")
            if path.is_file() and self._staging not in path.parents
        )


def _renamed(source: Path, target: Path) -> bool:
    """Rename `source` to `target` when both are on one file system; False when they are not."""
    try:
        os.rename(source, target)
    except OSError:
        return False
    return True


def get_store(root: Path) -> ArtifactStore:
    return LocalArtifactStore(root)
