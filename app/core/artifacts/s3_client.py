"""Talking to an S3-compatible store with boto3: where (`s3://bucket/prefix`), how (the endpoint
override, a CA bundle, the standard `AWS_*` variables read by boto3 itself), and what its failures
mean to an operator.

Every boto3 call of the store runs inside `translated()`, which turns botocore's many exception
types into ArtifactStoreUnavailable / ArtifactBucketMissing with a sentence naming the variable to
check (OPTIFORGE_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, OPTIFORGE_S3_CA_BUNDLE…): never the
credentials, never a path. The reason botocore gave is logged.

The client is configured for third-party servers (MinIO, Ceph, moto, s3rver) as KServe's and
MLflow's are: path-style addressing when an endpoint is set (no bucket-name DNS), and request
checksums only where S3 requires them (servers that predate boto3 1.36's default CRC trailers
refuse them; the files' sha256 in the manifest is the end-to-end check).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.core.artifacts.errors import ArtifactBucketMissing, ArtifactStoreError, ArtifactStoreUnavailable
from app.core.errors import error_chain

logger = logging.getLogger(__name__)

_UNREACHABLE = (
    "the artifact store cannot be reached; check OPTIFORGE_S3_ENDPOINT_URL (and the host in "
    "OPTIFORGE_ARTIFACT_URL), and that the store is up"
)
_NO_CREDENTIALS = (
    "no credentials for the artifact store were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(or AWS_PROFILE, or give the node a role)"
)
_UNTRUSTED = (
    "the artifact store's TLS certificate is not trusted; set OPTIFORGE_S3_CA_BUNDLE to the CA bundle "
    "that signed it"
)
#: S3 error codes → what to check.
_REFUSALS = {
    "InvalidAccessKeyId": "the artifact store does not know this access key; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the artifact store refused the request signature; check AWS_SECRET_ACCESS_KEY",
    "ExpiredToken": "the artifact store's session token has expired; renew AWS_SESSION_TOKEN",
    "InvalidToken": "the artifact store refused the session token; check AWS_SESSION_TOKEN",
    "AccessDenied": "the artifact store denied access; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "and that they may read and write the bucket of OPTIFORGE_ARTIFACT_URL",
}
_REFUSALS["403"] = _REFUSALS["AccessDenied"]  # a HEAD request's error has no body, only its status
_REFUSALS["AllAccessDisabled"] = _REFUSALS["AccessDenied"]
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    base: str  # "" or "some/prefix/": prepended to every key

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket` or `s3://bucket/prefix`; ValueError naming OPTIFORGE_ARTIFACT_URL otherwise."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("OPTIFORGE_ARTIFACT_URL must look like s3://bucket or s3://bucket/prefix")
        base = parts.path.strip("/")
        return cls(parts.netloc, f"{base}/" if base else "")


def make_client(
    endpoint_url: str | None,
    ca_bundle: str | None,
    *,
    max_attempts: int | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
    max_pool_connections: int = 16,
) -> Any:
    """A boto3 S3 client of its own session (creating clients from the default session is not
    thread-safe); credentials, the region and retries come from the `AWS_*` variables, as boto3
    reads them (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE: "standard", 3 attempts, unless they say otherwise)."""
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {} if "AWS_RETRY_MODE" in os.environ else {"mode": "standard"}
    if max_attempts is not None:
        retries["max_attempts"] = max_attempts
    config = Config(
        retries=retries or None,
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": "path"} if endpoint_url else {},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    region = session.region_name or ("us-east-1" if endpoint_url else None)
    return session.client(
        "s3", endpoint_url=endpoint_url or None, verify=ca_bundle or None, region_name=region, config=config
    )


def error_code(error: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "404"…), None for anything else."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None
    return str(response.get("Error", {}).get("Code") or "") or None


@contextlib.contextmanager
def translated(action: str, bucket: str) -> Iterator[None]:
    """Run boto3 calls, raising what their failure means for the operator; other errors (a bug, a
    missing key the caller handles) pass unchanged. `action` says what was being done, for the log."""
    try:
        yield
    except ArtifactStoreError:
        raise
    except Exception as exc:
        fault = _fault(exc, bucket)
        if fault is None:
            raise
        logger.warning("artifact store: %s failed: %s: %s", action, type(exc).__name__, exc)
        raise fault from exc


def _fault(error: BaseException, bucket: str) -> ArtifactStoreUnavailable | None:
    from botocore import exceptions as bx

    for item in _chain(error):
        if isinstance(item, bx.NoCredentialsError | bx.PartialCredentialsError):
            return ArtifactStoreUnavailable(_NO_CREDENTIALS)
        if isinstance(item, bx.SSLError):
            return ArtifactStoreUnavailable(_UNTRUSTED)
        if isinstance(item, bx.ConnectionError | bx.HTTPClientError | bx.ConnectTimeoutError):
            return ArtifactStoreUnavailable(_UNREACHABLE)
        code = error_code(item)
        if code == "NoSuchBucket":
            return bucket_missing(bucket)
        if code in _REFUSALS:
            return ArtifactStoreUnavailable(_REFUSALS[code])
        if code in _BUSY:
            return ArtifactStoreUnavailable(
                "the artifact store answered with a server error; retry shortly (if it persists, check "
                "the store at OPTIFORGE_S3_ENDPOINT_URL)"
            )
    return None


def bucket_missing(bucket: str) -> ArtifactBucketMissing:
    return ArtifactBucketMissing(
        f"the bucket '{bucket}' named in OPTIFORGE_ARTIFACT_URL does not exist in the artifact store; "
        "create it, or correct the URL"
    )


def _chain(error: BaseException) -> Iterator[BaseException]:
    """boto3's transfer errors (S3UploadFailedError, RetriesExceededError) wrap the botocore error
    that says what happened."""
    return error_chain(error, "last_exception")
