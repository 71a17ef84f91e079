"""The artifact store's names where callers have always imported them; the store itself lives in
app.core.artifacts (an interface, a local directory, an S3-compatible store with a read cache)."""

from app.core.artifacts import (
    ArtifactIntegrityError,
    ArtifactStore,
    ArtifactStoreError,
    ArtifactStoreUnavailable,
    LocalArtifactStore,
    check_at_startup,
    get_store,
)

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactStore",
    "ArtifactStoreError",
    "ArtifactStoreUnavailable",
    "LocalArtifactStore",
    "check_at_startup",
    "get_store",
]
