"""The artifact store: uploads, intermediate ONNX files, engines, reports.

A small interface so an S3-compatible store can replace the local directory on several nodes.
Writes are atomic: a directory of files is assembled under a temporary name and renamed into
place, so a reader (or a crashed job's retry) never sees half an artifact.
"""

from __future__ import annotations

import abc
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath


class ArtifactStore(abc.ABC):
    """Artifacts are grouped under prefixes such as `models/mdl_…/`; a prefix is written at once."""

    @abc.abstractmethod
    def put_dir(self, prefix: str, source_dir: Path) -> None:
        """Store every file of `source_dir` under `prefix`, atomically, replacing what was there."""

    @abc.abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file path to read `key` from (a remote store downloads it to a cache first)."""

    @abc.abstractmethod
    def size(self, prefix: str) -> int:
        """Bytes stored under `prefix`."""

    @abc.abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove everything under `prefix`; a missing prefix is not an error."""


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

    def put_dir(self, prefix: str, source_dir: Path) -> None:
        target = self._path(prefix)
        staged = self._staging / uuid.uuid4().hex
        shutil.copytree(source_dir, staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a retried job replaces its own earlier output
            trash = self._staging / uuid.uuid4().hex
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
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
            trash = self._staging / uuid.uuid4().hex
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif path.exists():
            path.unlink()

    def files(self) -> list[str]:
        """Every stored key (staging excluded): what tests use to prove nothing was left behind."""
        return sorted(
            str(path.relative_to(self.root))
            for path in self.root.rglob("*")
            if path.is_file() and self._staging not in path.parents
        )


def get_store(root: Path) -> ArtifactStore:
    return LocalArtifactStore(root)
