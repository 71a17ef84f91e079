"""The artifact store: a local directory, or an S3-compatible object store read through a node-local
cache, chosen by OPTIFORGE_ARTIFACT_URL. One module per job: the interface (base), manifests of
published prefixes (manifest), the two stores (local, s3), talking to boto3 (s3_client), the read
cache (cache), the errors (errors), and picking a store from the settings (factory)."""

from app.core.artifacts.base import ArtifactStore, checked_key
from app.core.artifacts.errors import (
    ArtifactBucketMissing,
    ArtifactIntegrityError,
    ArtifactStoreError,
    ArtifactStoreUnavailable,
)
from app.core.artifacts.factory import check_at_startup, get_store, register_scheme
from app.core.artifacts.local import LocalArtifactStore
from app.core.artifacts.manifest import FileEntry, Manifest

__all__ = [
    "ArtifactBucketMissing",
    "ArtifactIntegrityError",
    "ArtifactStore",
    "ArtifactStoreError",
    "ArtifactStoreUnavailable",
    "FileEntry",
    "LocalArtifactStore",
    "Manifest",
    "check_at_startup",
    "checked_key",
    "get_store",
    "register_scheme",
]
