"""The artifact store in an S3-compatible object store (AWS S3, MinIO, Ceph…), read through a
node-local cache: nodes that share no file system share artifacts.

Objects of a prefix, under `s3://bucket/<base>`:

    <prefix>/.v/<version>/<file>    the files of one publication, uploaded first
    <prefix>/.manifest.json         written last: every file with its size and sha256 (app.core.
                                    artifacts.manifest), and the version whose objects hold them

A prefix is visible only through its manifest: an upload killed half-way (a process, a node or
the store restarted) leaves objects no manifest names, which readers never see and
`remove_abandoned_staging` removes once older than a grace period. Publishing a prefix again
writes a new version beside the old, switches the manifest (one PUT, atomic in S3), then removes
the old version's objects; a reader that read the old manifest just before finds its objects gone,
reads the manifest again and fetches the new version.

Transfers stream: boto3's upload_file / download_file in parts of `part_size` bytes, a few at a
time, so a 2 GiB bundle never sits in memory. `local_path` asks the store for the prefix's
manifest (one small GET: a delete or a new version on another node is seen at once), then answers
the cached copy (app.core.artifacts.cache), downloading it on a miss. While the store cannot be
reached, a copy already cached is served as it is, with a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from app.core.artifacts.base import ArtifactStore, checked_key
from app.core.artifacts.cache import ArtifactCache
from app.core.artifacts.errors import ArtifactBucketMissing, ArtifactIntegrityError, ArtifactStoreUnavailable
from app.core.artifacts.manifest import Manifest
from app.core.artifacts.s3_client import S3Location, bucket_missing, error_code, translated

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".manifest.json"
VERSIONS = ".v"
#: Objects of an unpublished version (no manifest names it) younger than this may still be an
#: upload in progress on another node, and are left alone.
STAGING_GRACE_S = 3600.0
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes


class VersionGone(Exception):
    """An object a manifest names is not in the store: replaced or deleted meanwhile."""


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        location: S3Location,
        client: Any,
        cache: ArtifactCache,
        *,
        part_size: int = 8 * 1024 * 1024,
        max_concurrency: int = 4,
        staging_grace_s: float = STAGING_GRACE_S,
    ):
        from boto3.s3.transfer import TransferConfig

        self.location, self.client, self.cache = location, client, cache
        self.bucket = location.bucket
        self.staging_grace_s = staging_grace_s
        self.transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        self._units: set[str] = set()  # prefixes known to be published: looked up first

    # ------------------------------------------------------------------ names

    def _object(self, key: str) -> str:
        return f"{self.location.base}{key}"

    def _manifest_object(self, prefix: str) -> str:
        return self._object(f"{prefix}/{MANIFEST_NAME}")

    def _file_object(self, manifest: Manifest, name: str) -> str:
        return self._object(f"{manifest.prefix}/{VERSIONS}/{manifest.version}/{name}")

    # ------------------------------------------------------------------ writing

    def put_dir(self, prefix: str, source_dir: Path, *, move: bool = False) -> Manifest:
        prefix = checked_key(prefix).as_posix()
        manifest = Manifest.of_dir(prefix, source_dir)
        try:
            previous = self._read_manifest(prefix)
        except ArtifactIntegrityError:  # a damaged manifest is replaced; its objects wait for clean-up
            previous = None
        uploaded: list[str] = []
        try:
            with translated(f"storing '{prefix}'", self.bucket):
                for name in manifest.files:
                    key = self._file_object(manifest, name)
                    uploaded.append(key)
                    self.client.upload_file(str(source_dir / name), self.bucket, key, Config=self.transfer)
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._manifest_object(prefix),
                    Body=manifest.to_json(),
                    ContentType="application/json",
                )
        except BaseException:
            self._remove_quietly(uploaded, f"the unpublished objects of '{prefix}'")
            raise
        self._units.add(prefix)
        if previous is not None and previous.version != manifest.version:
            old = [self._file_object(previous, name) for name in previous.files]
            self._remove_quietly(old, f"the replaced version of '{prefix}'")
        if move:
            self.cache.adopt(manifest, source_dir)
        return manifest

    def delete(self, prefix: str) -> None:
        """Remove every publication at or under `prefix`: manifests first (each disappears at once),
        then their objects, then the node's cached copies (other nodes drop theirs when they next
        look the prefix up and find no manifest)."""
        prefix = checked_key(prefix).as_posix()
        with translated(f"deleting '{prefix}'", self.bucket):
            keys = [item["Key"] for item in self._list(f"{prefix}/")]
            manifests = [key for key in keys if key.endswith(f"/{MANIFEST_NAME}")]
            self._delete_objects(manifests)
            self._delete_objects([key for key in keys if not key.endswith(f"/{MANIFEST_NAME}")])
        base = len(self.location.base)
        for unit in [prefix, *(key[base : -len(MANIFEST_NAME) - 1] for key in manifests)]:
            self._units.discard(unit)
            self.cache.drop(unit)

    # ------------------------------------------------------------------ reading

    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        key = checked_key(key).as_posix()
        for _ in range(2):  # once more if the version read was replaced meanwhile
            try:
                manifest = self._find(key)
            except ArtifactBucketMissing:
                raise
            except ArtifactStoreUnavailable as exc:
                return self._during_outage(key, exc, sha256)
            if manifest is None:
                raise FileNotFoundError(key)
            name = _name_in(manifest, key)
            _check_recorded_hash(manifest, name, sha256)
            try:
                folder = self.cache.get(manifest, partial(self._download, manifest))
            except VersionGone:
                continue
            return folder / name if name else folder
        raise ArtifactIntegrityError(
            f"'{key}': the artifact store lost files its manifest names; delete it and upload or build "
            "it again"
        )

    def size(self, prefix: str) -> int:
        prefix = checked_key(prefix).as_posix()
        with translated(f"sizing '{prefix}'", self.bucket):
            keys = [item["Key"] for item in self._list(f"{prefix}/")]
        units = [key for key in keys if key.endswith(f"/{MANIFEST_NAME}")]
        if units:
            base = len(self.location.base)
            manifests = (self._read_manifest(key[base : -len(MANIFEST_NAME) - 1]) for key in units)
            return sum(manifest.total_bytes for manifest in manifests if manifest is not None)
        manifest = self._find(prefix)  # a file of a publication
        name = _name_in(manifest, prefix) if manifest is not None else ""
        return manifest.files[name].size if manifest is not None and name in manifest.files else 0

    def check(self) -> None:
        with translated("checking the bucket", self.bucket):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                if error_code(exc) in ("404", "NoSuchBucket"):
                    raise bucket_missing(self.bucket) from exc
                raise

    def files(self) -> list[str]:
        """Every published file's key (what tests use to prove nothing half-written is visible)."""
        with translated("listing", self.bucket):
            keys = [item["Key"] for item in self._list("")]
        base = len(self.location.base)
        published = []
        for key in keys:
            if key.endswith(f"/{MANIFEST_NAME}"):
                manifest = self._read_manifest(key[base : -len(MANIFEST_NAME) - 1])
                published += [f"{manifest.prefix}/{name}" for name in manifest.files] if manifest else []
        return sorted(published)

    def _find(self, key: str) -> Manifest | None:
        """The manifest of the publication `key` is or lies in: the longest published prefix of it
        (those this process has seen published asked first, as they nearly always are)."""
        parts = key.split("/")
        candidates = ["/".join(parts[:length]) for length in range(len(parts), 0, -1)]
        for candidate in sorted(candidates, key=lambda prefix: prefix not in self._units):
            manifest = self._read_manifest(candidate)
            if manifest is not None:
                self._units.add(candidate)
                return manifest
            if candidate in self._units:  # deleted on another node: drop this node's copy
                self._units.discard(candidate)
                self.cache.drop(candidate)
        return None

    def _read_manifest(self, prefix: str) -> Manifest | None:
        with translated(f"reading the manifest of '{prefix}'", self.bucket):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._manifest_object(prefix))
                data = response["Body"].read()
            except Exception as exc:
                if error_code(exc) in _MISSING:
                    return None
                raise
        try:
            manifest = Manifest.from_json(data)
        except ValueError:
            manifest = None
        if manifest is None or manifest.prefix != prefix:
            raise ArtifactIntegrityError(
                f"'{prefix}': its manifest in the artifact store is damaged; delete it and upload or "
                "build it again"
            )
        return manifest

    def _download(self, manifest: Manifest, name: str, target: Path) -> None:
        with translated(f"downloading '{manifest.prefix}/{name}'", self.bucket):
            try:
                self.client.download_file(
                    self.bucket, self._file_object(manifest, name), str(target), Config=self.transfer
                )
            except Exception as exc:
                if error_code(exc) in _MISSING:
                    raise VersionGone(manifest.prefix) from exc
                raise

    def _during_outage(self, key: str, error: ArtifactStoreUnavailable, sha256: str | None) -> Path:
        """The cached copy of the publication `key` lies in, while the store cannot say whether it
        is still current; the store's error when none is cached."""
        parts = key.split("/")
        for length in range(len(parts), 0, -1):
            found = self.cache.newest("/".join(parts[:length]))
            if found is not None:
                folder, manifest = found
                logger.warning("artifact store unreachable: serving '%s' from this node's cache", key)
                name = _name_in(manifest, key)
                _check_recorded_hash(manifest, name, sha256)
                return folder / name if name else folder
        raise error

    # ------------------------------------------------------------------ cleaning

    def remove_abandoned_staging(self) -> list[str]:
        """Remove the node cache's abandoned downloads, and from the store the objects of versions
        no manifest names (killed uploads, a replaced version whose removal failed) and multipart
        uploads, once older than `staging_grace_s`. Logs and returns what it could when the store
        is unreachable: start-up goes on (readiness reports the store)."""
        removed = self.cache.remove_abandoned()
        try:
            with translated("removing abandoned uploads", self.bucket):
                removed += self._remove_unpublished()
                removed += self._abort_stale_multipart_uploads()
        except ArtifactStoreUnavailable:
            logger.warning("artifact store unreachable at start-up: abandoned uploads stay until the next")
        return removed

    def _remove_unpublished(self) -> list[str]:
        cutoff = time.time() - self.staging_grace_s
        base = len(self.location.base)
        published: set[str] = set()
        versions: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for item in self._list(""):
            key = item["Key"][base:]
            if key.endswith(f"/{MANIFEST_NAME}"):
                published.add(key[: -len(MANIFEST_NAME) - 1])
            elif f"/{VERSIONS}/" in key:
                prefix, rest = key.split(f"/{VERSIONS}/", 1)
                versions.setdefault((prefix, rest.split("/", 1)[0]), []).append(item)
        per_prefix: dict[str, int] = {}
        for prefix, _ in versions:
            per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
        removed = []
        for (prefix, version), items in versions.items():
            if max(_timestamp(item) for item in items) > cutoff:
                continue  # may be an upload still in progress
            if prefix in published:
                if per_prefix[prefix] == 1:
                    continue  # the only version of a published prefix: its manifest's
                current = self._read_manifest(prefix)
                if current is not None and current.version == version:
                    continue
            self._delete_objects([item["Key"] for item in items])
            removed.append(f"{prefix}@{version}")
        return removed

    def _abort_stale_multipart_uploads(self) -> list[str]:
        """Abort multipart uploads older than the grace (their parts take space, invisibly). A
        server without ListMultipartUploads (s3rver) has nothing to abort this way: skipped."""
        cutoff = time.time() - self.staging_grace_s
        paginator = self.client.get_paginator("list_multipart_uploads")
        aborted: list[str] = []
        try:
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=self.location.base))
        except Exception as exc:
            if error_code(exc) != "NotImplemented":
                raise
            logger.info("the artifact store cannot list multipart uploads; none are aborted")
            return aborted
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() <= cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted.append(f"multipart:{upload['Key'][len(self.location.base) :]}")
        return aborted

    # ------------------------------------------------------------------ helpers

    def _list(self, key_prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._object(key_prefix)):
            yield from page.get("Contents", [])

    def _delete_objects(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise RuntimeError(
                    f"the artifact store kept {len(response['Errors'])} objects: {first.get('Code')}"
                )

    def _remove_quietly(self, keys: list[str], what: str) -> None:
        """Best effort: what stays is found by `remove_abandoned_staging` later."""
        try:
            with translated(f"removing {what}", self.bucket):
                self._delete_objects(keys)
        except Exception:
            logger.warning("could not remove %s now; a later start-up will", what, exc_info=True)


def _check_recorded_hash(manifest: Manifest, name: str, sha256: str | None) -> None:
    """The store publishes under `name` the content a record says it should (the cache then checks
    each downloaded byte against the manifest): a manifest replaced in the bucket cannot hand a node
    a file other than the one built and measured."""
    entry = manifest.files.get(name)
    if sha256 is not None and (entry is None or entry.sha256 != sha256):
        raise ArtifactIntegrityError(
            f"'{manifest.prefix}/{name}': the artifact store holds a different file than the one "
            "recorded when it was built; delete it and build it again"
        )


def _name_in(manifest: Manifest, key: str) -> str:
    """`key` relative to the publication (empty for the prefix itself); FileNotFoundError when the
    publication holds no such file or folder."""
    name = key[len(manifest.prefix) + 1 :] if key != manifest.prefix else ""
    if (
        name
        and name not in manifest.files
        and not any(file.startswith(f"{name}/") for file in manifest.files)
    ):
        raise FileNotFoundError(key)
    return name


def _timestamp(item: dict[str, Any]) -> float:
    modified = item.get("LastModified")
    return modified.timestamp() if isinstance(modified, datetime) else datetime.now(UTC).timestamp()
