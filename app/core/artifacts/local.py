"""The artifact store in a local directory: one machine, or several sharing one file system.

Writes are atomic: a directory of files is assembled under a temporary name and renamed into
place, so a reader (or a crashed job's retry) never sees half an artifact. The local store
assembles in `.staging/<kind>-<prefix>-…` folders that their process holds locked while it uses
them (app.core.scratch), so what a killed process left there is found and removed at start-up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.core.artifacts.base import ArtifactStore, checked_key
from app.core.artifacts.manifest import Manifest
from app.core.scratch import claim_folder, remove_abandoned


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / ".staging"
        self._staging.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / checked_key(key)

    def put_dir(self, prefix: str, source_dir: Path, *, move: bool = False) -> Manifest | None:
        target = self._path(prefix)
        with claim_folder(self._staging, "put", prefix.replace("/", "~")) as staging:
            staged = staging.path / "data"
            if not (move and renamed(source_dir, staged)):
                shutil.copytree(source_dir, staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # a retried job replaces its own earlier output
                os.replace(target, staging.path / "replaced")
            os.replace(staged, target)
        return None  # no hashes: nothing downloads what a local directory holds

    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
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


def renamed(source: Path, target: Path) -> bool:
    """Rename `source` to `target` when both are on one file system; False when they are not."""
    try:
        os.rename(source, target)
    except OSError:
        return False
    return True
