"""Which store a process uses: picked by the scheme of OPTIFORGE_ARTIFACT_URL from a registry.

`file:///…` (the default, today's local directory) and `s3://bucket/prefix` are registered here; a
new kind of store registers its scheme with `register_scheme`. Remote stores are made once per
configuration and shared by the process (a worker asks for its store at every job; a boto3 client
takes tens of milliseconds to make and keeps a connection pool worth reusing).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from app.core.artifacts.base import ArtifactStore
from app.core.artifacts.errors import ArtifactBucketMissing, ArtifactStoreUnavailable
from app.core.artifacts.local import LocalArtifactStore
from app.core.settings import Settings

logger = logging.getLogger(__name__)

StoreFactory = Callable[[Settings], ArtifactStore]

_SCHEMES: dict[str, StoreFactory] = {}
_SHARED: dict[tuple[object, ...], ArtifactStore] = {}
_SHARED_LOCK = threading.Lock()


def register_scheme(scheme: str, factory: StoreFactory) -> None:
    _SCHEMES[scheme] = factory


def get_store(settings: Settings | Path) -> ArtifactStore:
    """The store OPTIFORGE_ARTIFACT_URL names. A Path (what callers passed before URLs) is a local
    directory. ValueError, naming the variable, for a scheme no store is registered for."""
    if isinstance(settings, Path):
        return LocalArtifactStore(settings)
    scheme = urlsplit(settings.resolved_artifact_url).scheme
    factory = _SCHEMES.get(scheme)
    if factory is None:
        raise ValueError(
            f"OPTIFORGE_ARTIFACT_URL: no artifact store for '{scheme}://' URLs; use one of "
            + ", ".join(f"{name}://" for name in sorted(_SCHEMES))
        )
    return factory(settings)


def check_at_startup(store: ArtifactStore) -> None:
    """Refuse to start on a bucket that does not exist (a typo would look like an empty store);
    start anyway, with a warning, while the store is only unreachable: readiness reports it and
    requests that need it get a 503 until it is back."""
    try:
        store.check()
    except ArtifactBucketMissing:
        raise
    except ArtifactStoreUnavailable as exc:
        logger.warning("the artifact store is not usable at start-up: %s", exc.detail)


def _local(settings: Settings) -> ArtifactStore:
    return LocalArtifactStore(settings.resolved_artifact_dir)


def _s3(settings: Settings) -> ArtifactStore:
    ca_bundle = str(settings.s3_ca_bundle) if settings.s3_ca_bundle else None
    identity = (
        settings.resolved_artifact_url,
        settings.s3_endpoint_url,
        ca_bundle,
        settings.resolved_cache_dir,
        settings.cache_max_bytes,
    )
    with _SHARED_LOCK:
        store = _SHARED.get(identity)
        if store is None:
            from app.core.artifacts.cache import ArtifactCache
            from app.core.artifacts.s3 import S3ArtifactStore
            from app.core.artifacts.s3_client import S3Location, make_client

            location = S3Location.parse(settings.resolved_artifact_url)
            client = make_client(settings.s3_endpoint_url, ca_bundle)
            cache = ArtifactCache(settings.resolved_cache_dir, settings.cache_max_bytes)
            store = _SHARED[identity] = S3ArtifactStore(location, client, cache)
        return store


register_scheme("file", _local)
register_scheme("s3", _s3)
