"""The ASGI middleware around every request, one module each, and the one place that says in
which order they wrap it (`install_middleware`).

Outermost first, and why each sits where it does:

1. `request_log.RequestLogMiddleware`: the request id and the access-log line; outermost so it
   sees every response, the refusals of the layers below included.
2. `security_headers.SecurityHeadersMiddleware`: CSP, framing, referrer and sniffing headers on
   every response, the refusals of the layers below included (an error page is a page too).
3. `host.SingleHostMiddleware`: two `Host` headers are a 400 before anything reads either (CORS,
   the open-mode check, routing), whoever sends them, key or not.
4. CORS (only with `OPTIFORGE_CORS_ORIGINS`): a browser's preflight carries no key, so it is
   answered before the key check.
5. `control_chars.ControlCharacterMiddleware`: a path or query string with a control character is
   a 400 before anything reads it (routing, the policy, the logs' route label).
6. `origin.OriginMiddleware`: a state-changing request from a foreign web page is a 403 before it
   can spend a key check or an upload slot.
7. `auth.AuthMiddleware`: who the caller is (unknown keys throttled per client address before any
   query), what the key's scopes allow, its inference rate.
8. `upload_slots.UploadSlotsMiddleware`: after the key check (a caller without a key takes no
   slot), before the body is read (a refused upload has cost its headers only).
9. `body_limit.BodySizeLimitMiddleware`: innermost, around the body as the route reads it: its
   size (413) and its pace (408 below a minimum rate, which frees the upload slot above).

Starlette wraps the last middleware added around the others, so `install_middleware` adds them
innermost first: the list in the code reads bottom-up against the list above.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from optiforge_client.tensors import HEADER_LENGTH

from app.api.access_policy import AccessPolicy
from app.api.middleware.auth import AuthMiddleware
from app.api.middleware.body_limit import BodyPace, BodySizeLimitMiddleware
from app.api.middleware.control_chars import ControlCharacterMiddleware
from app.api.middleware.failed_keys import FailedKeyThrottle
from app.api.middleware.host import SingleHostMiddleware
from app.api.middleware.origin import OriginMiddleware
from app.api.middleware.request_log import RequestLogMiddleware
from app.api.middleware.security_headers import SecurityHeadersMiddleware
from app.api.middleware.upload_slots import UploadSlotsMiddleware
from app.api.uploads import MULTIPART_SLACK_BYTES
from app.core.settings import Settings


def install_middleware(app: FastAPI, settings: Settings, upload_paths: tuple[str, ...]) -> None:
    """Wrap `app` in every middleware, in the order the module docstring gives (innermost added
    first). Needs `app.state.keys` (the key directory), `app.state.serving` (its metrics) and
    `app.state.counters` (the rate buckets and upload slots, shared across replicas with Redis)."""
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_request_bytes,
        upload_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        upload_paths=upload_paths,
        json_tensor_bytes=settings.max_json_tensor_bytes,
        pace=BodyPace(settings.body_min_rate_bytes_s, settings.body_rate_window_s),
    )
    app.add_middleware(
        UploadSlotsMiddleware,
        limit=settings.max_concurrent_uploads,
        upload_paths=upload_paths,
        counters=app.state.counters,
        spool_dir=settings.scratch_dir,
    )
    app.add_middleware(
        AuthMiddleware,
        keys=app.state.keys,
        policy=AccessPolicy(public_docs=settings.public_docs, public_metrics=settings.public_metrics),
        default_infer_rps=settings.infer_rate_limit_rps,
        failed_keys=FailedKeyThrottle(settings.auth_failures_per_client, settings.auth_failure_window_s),
        counters=app.state.counters,
        open_hosts=settings.extra_open_hosts,
        open_peers=settings.extra_open_peers,
    )
    app.add_middleware(OriginMiddleware, allowed_origins=settings.allowed_origins)
    app.add_middleware(ControlCharacterMiddleware)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", HEADER_LENGTH, "X-Request-ID"],
            expose_headers=["Retry-After", HEADER_LENGTH, "X-Request-ID", "Server-Timing"],
        )
    app.add_middleware(SingleHostMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestLogMiddleware, metrics=app.state.serving.metrics)
