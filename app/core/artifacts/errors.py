"""What can go wrong with the artifact store, as the service's errors.

They are `ApiError`s (503 with `Retry-After`): the API answers them as they are, from any route
that reads or writes the store, and a job records `to_dict()` as its error. Each names what an
operator should check, by its variable (`OPTIFORGE_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`…), never
a secret, a host's file path or a traceback: the reason itself is logged where it happens.
"""

from __future__ import annotations

from typing import Any

from app.core.errors import ApiError

#: Seconds a client should wait before retrying while the store is unreachable.
STORE_RETRY_AFTER_S = 5


class ArtifactStoreError(ApiError):
    """A condition of the server's artifact store, not of the request: 503, retry later."""

    code = "artifact_store_unavailable"

    def __init__(self, detail: str):
        super().__init__(503, self.code, detail, headers={"Retry-After": str(STORE_RETRY_AFTER_S)})

    def to_dict(self) -> dict[str, Any]:
        """A job's `error`, as workers record an EngineError's."""
        return {"code": self.code, "detail": self.detail}


class ArtifactStoreUnavailable(ArtifactStoreError):
    """The store cannot be reached or refuses this server: endpoint down, wrong credentials, a
    certificate that is not trusted. `detail` names the variable to check."""


class ArtifactBucketMissing(ArtifactStoreUnavailable):
    """The bucket named in OPTIFORGE_ARTIFACT_URL does not exist: at start-up, the server refuses
    to start (a typo would otherwise look like an empty store)."""


class ArtifactIntegrityError(ArtifactStoreError):
    """A file downloaded from the store does not have the sha256 its manifest records, twice in a
    row: the stored copy is damaged (or was replaced behind the service's back)."""

    code = "artifact_integrity_error"
