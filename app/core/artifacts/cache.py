"""A node-local read-through cache of published prefixes: bounded, least recently used out first,
kept across restarts, every file checked against its manifest's sha256.

A remote store (app.core.artifacts.s3) reads through it: `get(manifest, download)` answers the
local folder holding every file of that publication, downloading the prefix on a miss. The unit is
the whole prefix, not a file, because readers need what lies beside a file (an ONNX model's
external data, OpenVINO's .bin beside its .xml), and a folder key (a report's folder) is read too.

Layout under the cache's root, shared by every process of the node (API workers, job workers):

    entries/<unit>-<version>/    one publication: data/ (its files), manifest.json, seen.json
    .staging/fetch-…             downloads in progress, locked by their process (app.core.scratch):
                                 what a killed process left is removed at the next start
    .locks/<unit>.lock           held while a prefix is fetched: a second process waits, then reads
                                 what the first fetched, instead of downloading it again
    .lock                        held while room is made (entries evicted)

`<unit>` is a hash of the prefix and `<version>` the manifest's, so an entry is immutable: a prefix
published again is a new entry, installed by one rename, and the old one is removed. Recency is the
entry folder's mtime, touched on every use, so it survives a restart without an index file to keep
consistent between processes.

Checks: a download is hashed before the entry is installed; a file whose hash does not match is
downloaded once more, then the fetch fails with ArtifactIntegrityError (503). A use checks each
file's size, mtime and inode against what was seen when it was verified (a few stat calls), and
re-hashes a file that changed: a file corrupted or rewritten on the node is found and the prefix
fetched again. A bit flip that leaves the stat alone is not re-hashed on every use: that would
read a 2 GiB engine for each load.

Eviction makes room before a download, among entries not used for `eviction_grace_s` (a path just
handed to a caller is not pulled from under it). Entries in use stay readable after eviction on
Linux (an open file outlives its name). One prefix larger than the bound is still cached, alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from app.core.artifacts.errors import ArtifactIntegrityError
from app.core.artifacts.manifest import FileEntry, Manifest, file_sha256
from app.core.scratch import claim_folder, remove_abandoned

logger = logging.getLogger(__name__)

#: download(relative file name, local target path): writes that file of the publication.
Download = Callable[[str, Path], None]

DATA, MANIFEST_FILE, SEEN_FILE = "data", "manifest.json", "seen.json"


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int | None, *, eviction_grace_s: float = 60.0):
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.eviction_grace_s = eviction_grace_s
        self._entries = self.root / "entries"
        self._staging = self.root / ".staging"
        self._locks = self.root / ".locks"
        for folder in (self._entries, self._staging, self._locks):
            folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ reading

    def get(self, manifest: Manifest, download: Download) -> Path:
        """The local folder holding every file of `manifest`, verified; fetched first on a miss."""
        entry = self._entry(manifest)
        if self._usable(entry, manifest):
            return entry / DATA
        with self._lock(self._locks / f"{unit_id(manifest.prefix)}.lock"):
            if not self._usable(entry, manifest):  # another process may have fetched it meanwhile
                self._fetch(manifest, download, entry)
        return entry / DATA

    def newest(self, prefix: str) -> tuple[Path, Manifest] | None:
        """The most recently used intact copy of `prefix` in the cache, whatever its version: what
        a node serves while the store cannot tell it the current one."""
        for entry in sorted(self._versions(prefix), key=_mtime, reverse=True):
            manifest = _read_manifest(entry)
            if manifest is not None and self._usable(entry, manifest):
                return entry / DATA, manifest
        return None

    def _usable(self, entry: Path, manifest: Manifest) -> bool:
        """Whether `entry` holds `manifest`'s files unchanged since they were verified. Touches the
        entry first (its recency), so an eviction that runs meanwhile skips it; a changed file is
        re-hashed, and a damaged entry removed."""
        try:
            os.utime(entry)
            seen = json.loads((entry / SEEN_FILE).read_bytes())
            changed = [name for name in manifest.files if _stat_of(entry / DATA / name) != seen.get(name)]
        except (FileNotFoundError, NotADirectoryError, ValueError):
            if entry.exists():
                logger.warning("artifact cache: '%s' is incomplete; fetching it again", manifest.prefix)
                self._discard(entry)
            return False
        if not changed:
            return True
        for name in changed:
            if not _intact(entry / DATA / name, manifest.files[name]):
                logger.warning(
                    "artifact cache: '%s/%s' was modified on this node (its sha256 no longer matches); "
                    "fetching it again",
                    manifest.prefix,
                    name,
                )
                self._discard(entry)
                return False
            seen[name] = _stat_of(entry / DATA / name)  # touched, not changed: remember the new stat
        _write_atomically(entry / SEEN_FILE, json.dumps(seen).encode())
        return True

    # ------------------------------------------------------------------ filling

    def _fetch(self, manifest: Manifest, download: Download, entry: Path) -> None:
        """Download every file of `manifest` into a staging folder, verify it, then install it with
        one rename. Called with the prefix's lock held."""
        self._make_room(manifest.total_bytes, keep=manifest.prefix)
        with claim_folder(self._staging, "fetch", unit_id(manifest.prefix)) as staging:
            staged = staging.path / "entry"
            for name, expected in manifest.files.items():
                target = staged / DATA / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _download_verified(manifest.prefix, name, expected, target, download)
            (staged / DATA).mkdir(parents=True, exist_ok=True)  # a publication of no files
            self._install(manifest, staged, entry)

    def adopt(self, manifest: Manifest, source_dir: Path) -> bool:
        """Take `source_dir` (the files `manifest` was just computed from, given up by their owner)
        as the cached copy of that publication, by rename: the node that stored a prefix need not
        download it. False, and `source_dir` left alone, when it is on another file system."""
        with self._lock(self._locks / f"{unit_id(manifest.prefix)}.lock"):
            self._make_room(manifest.total_bytes, keep=manifest.prefix)
            with claim_folder(self._staging, "adopt", unit_id(manifest.prefix)) as staging:
                staged = staging.path / "entry"
                staged.mkdir()
                try:
                    os.rename(source_dir, staged / DATA)
                except OSError:
                    return False
                self._install(manifest, staged, self._entry(manifest))
        return True

    def _install(self, manifest: Manifest, staged: Path, entry: Path) -> None:
        seen = {name: _stat_of(staged / DATA / name) for name in manifest.files}
        (staged / MANIFEST_FILE).write_bytes(manifest.to_json())
        (staged / SEEN_FILE).write_bytes(json.dumps(seen).encode())
        if entry.exists():  # a damaged copy left by a process that died checking it
            self._discard(entry)
        os.rename(staged, entry)
        for other in self._versions(manifest.prefix):
            if other != entry:
                self._discard(other)  # an older publication of the prefix

    # ------------------------------------------------------------------ removing

    def drop(self, prefix: str) -> None:
        """Remove every cached copy of `prefix` (deleted from the store)."""
        for entry in self._versions(prefix):
            self._discard(entry)

    def _make_room(self, incoming: int, *, keep: str) -> None:
        """Evict the least recently used entries until `incoming` more bytes fit under the bound,
        sparing those used in the last `eviction_grace_s` (other copies of `keep` are replaced
        anyway, so they go first)."""
        if self.max_bytes is None:
            return
        with self._lock(self.root / ".lock"):
            now, entries = time.time(), []
            for entry in self._entries.iterdir():
                manifest = _read_manifest(entry)
                size = manifest.total_bytes if manifest is not None else 0
                replaced = entry.name.startswith(unit_id(keep) + "-")
                entries.append((not replaced, _mtime(entry), size, entry))
            total = sum(size for _, _, size, _ in entries)
            for kept, used_at, size, entry in sorted(entries):
                if total + incoming <= self.max_bytes:
                    break
                if kept and now - used_at < self.eviction_grace_s:
                    continue
                self._discard(entry)
                total -= size
            if total + incoming > self.max_bytes:
                logger.warning(
                    "artifact cache: %d bytes cached and %d coming, over OPTIFORGE_CACHE_MAX_BYTES=%d "
                    "(what is over was used in the last %.0f s, or one prefix is larger than the bound)",
                    total,
                    incoming,
                    self.max_bytes,
                    self.eviction_grace_s,
                )

    def _discard(self, entry: Path) -> None:
        """Remove an entry: renamed into a staging folder first (one step), so no reader ever sees
        half an entry, then deleted with that folder."""
        with claim_folder(self._staging, "drop", entry.name) as trash, contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash.path / "entry")

    def remove_abandoned(self) -> list[str]:
        """Remove what processes killed while fetching or evicting left in staging."""
        return remove_abandoned(self._staging)

    # ------------------------------------------------------------------ looking

    def total_bytes(self) -> int:
        manifests = (_read_manifest(entry) for entry in self._entries.iterdir())
        return sum(manifest.total_bytes for manifest in manifests if manifest is not None)

    def cached_prefixes(self) -> list[str]:
        manifests = (_read_manifest(entry) for entry in self._entries.iterdir())
        return sorted(manifest.prefix for manifest in manifests if manifest is not None)

    def _entry(self, manifest: Manifest) -> Path:
        return self._entries / f"{unit_id(manifest.prefix)}-{manifest.version}"

    def _versions(self, prefix: str) -> list[Path]:
        return list(self._entries.glob(f"{unit_id(prefix)}-*"))

    @staticmethod
    @contextlib.contextmanager
    def _lock(path: Path) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def unit_id(prefix: str) -> str:
    """A fixed-length, file-name-safe name for a prefix (prefixes nest and hold slashes)."""
    return hashlib.sha256(prefix.encode()).hexdigest()[:32]


def _download_verified(prefix: str, name: str, expected: FileEntry, target: Path, download: Download) -> None:
    """Download one file and check its sha256; a mismatch is downloaded once more, then refused."""
    for attempt in (1, 2):
        download(name, target)
        if _intact(target, expected):
            return
        logger.warning(
            "artifact cache: '%s/%s' downloaded with a sha256 other than its manifest's (attempt %d)",
            prefix,
            name,
            attempt,
        )
    raise ArtifactIntegrityError(
        f"'{prefix}/{name}' in the artifact store does not match the sha256 its manifest records "
        "(downloaded twice): the stored copy is damaged; delete it and upload or build it again"
    )


def _intact(path: Path, expected: FileEntry) -> bool:
    try:
        return path.stat().st_size == expected.size and file_sha256(path) == expected.sha256
    except FileNotFoundError:
        return False


def _stat_of(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _read_manifest(entry: Path) -> Manifest | None:
    try:
        return Manifest.from_json((entry / MANIFEST_FILE).read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)
