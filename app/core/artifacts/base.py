"""The artifact store's interface: uploads, intermediate ONNX files, engines, reports.

Artifacts are grouped under prefixes such as `models/mdl_…` or `jobs/job_…/engines/eng_…`; a
prefix is written at once (`put_dir`) and read by key (`local_path`), a key being the prefix or a
file or folder under it. Two implementations: a local directory (app.core.artifacts.local, the
single-machine default) and an S3-compatible object store read through a node-local cache
(app.core.artifacts.s3), picked by the URL scheme of OPTIFORGE_ARTIFACT_URL
(app.core.artifacts.factory).
"""

from __future__ import annotations

import abc
from pathlib import Path, PurePosixPath

from app.core.artifacts.manifest import Manifest


class ArtifactStore(abc.ABC):
    """Artifacts are grouped under prefixes such as `models/mdl_…/`; a prefix is written at once."""

    @abc.abstractmethod
    def put_dir(self, prefix: str, source_dir: Path, *, move: bool = False) -> Manifest | None:
        """Store every file of `source_dir` under `prefix`, atomically, replacing what was there.
        `move`: the caller gives `source_dir` up (scratch it would delete next), so a store on the
        same file system may rename it in instead of copying: no second copy of a 2 GiB model.
        Returns the manifest (each file's size and sha256) where the store records one."""

    @abc.abstractmethod
    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        """A local path to read `key` from: a file, or a folder for a prefix (a remote store
        downloads the whole prefix to its cache first, so files beside it, an ONNX model's external
        data, are there too). FileNotFoundError when nothing is published there.

        `sha256`: the content hash a record holds for the file `key` (an engine's row). A store that
        downloads raises ArtifactIntegrityError when what it publishes under `key` is not that
        content; a local directory, which nothing downloads from, does not hash on every read."""

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

    def check(self) -> None:  # noqa: B027 - optional: a local directory has nothing to check
        """Raise an ArtifactStoreError when the store cannot be used now (unreachable, refused, no
        such bucket): what start-up and readiness ask. A local directory is always there."""


def checked_key(key: str) -> PurePosixPath:
    """`key` as a relative path that stays inside the store; ValueError otherwise (an id from a
    request never becomes `../`)."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"invalid artifact key {key!r}")
    return path
