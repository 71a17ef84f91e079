"""A manifest: what one published prefix holds, file by file, with each file's size and sha256.

A remote store writes it last, after every file of the prefix (app.core.artifacts.s3): a prefix
without one is invisible, so a reader never sees half an artifact. Its hashes are what the read
cache checks every downloaded file against (app.core.artifacts.cache), and what a record may keep
to name the content it points at.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

FORMAT = 1
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """`version` is unique per publication: a prefix published again (a retried job's output, a
    dataset whose .npz replaces its archive) gets a new one, and its files new object names."""

    prefix: str
    version: str
    files: dict[str, FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @classmethod
    def of_dir(cls, prefix: str, directory: Path) -> Manifest:
        """Hash every file under `directory`, reading each in 1 MiB chunks (a 2 GiB model never sits
        in memory). Symbolic links are refused: a published prefix holds files, not pointers."""
        files: dict[str, FileEntry] = {}
        for path in sorted(directory.rglob("*")):
            if path.is_symlink():
                raise ValueError(f"'{path.relative_to(directory)}' is a symbolic link")
            if path.is_file():
                relative = path.relative_to(directory).as_posix()
                files[relative] = FileEntry(path.stat().st_size, file_sha256(path))
        return cls(prefix, uuid.uuid4().hex, files)

    def to_json(self) -> bytes:
        files = {name: {"size": entry.size, "sha256": entry.sha256} for name, entry in self.files.items()}
        body = {"format": FORMAT, "prefix": self.prefix, "version": self.version, "files": files}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; ValueError for anything that is not one this code wrote (a file name
        that would leave its folder included)."""
        try:
            body: dict[str, Any] = json.loads(data)
            files = {
                _relative(name): FileEntry(int(entry["size"]), str(entry["sha256"]))
                for name, entry in body["files"].items()
            }
            return cls(str(body["prefix"]), str(body["version"]), files)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a manifest: {type(exc).__name__}") from exc


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return stream_sha256(stream)


def stream_sha256(stream: BinaryIO) -> str:
    """The sha256 of what is left to read in `stream`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _relative(name: str) -> str:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "." in parts:
        raise ValueError(f"a manifest names a file outside its prefix: {name!r}")
    return name
