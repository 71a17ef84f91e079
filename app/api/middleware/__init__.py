"""The ASGI middleware around every request, one module each, and the one place that says in
which order they wrap it (`install_middleware`).

Outermost first, and why each sits where it does:

1. `request_log.RequestLogMiddleware`: the request id and the access-log line; outermost so it
   sees every response, the refusals of the layers below included.
2. CORS (only with `OPTIFORGE_CORS_ORIGINS`): a browser's preflight carries no key, so it is
   answered before the key check.
3. `control_chars.ControlCharacterMiddleware`: a path or query string with a control character is
   a 400 before anything reads it (routing, the policy, the logs' route label).
4. `origin.OriginMiddleware`: a state-changing request from a foreign web page is a 403 before it
   can spend a key check or an upload slot.
5. `auth.AuthMiddleware`: who the caller is, what the key's scopes allow, its inference rate.
6. `upload_slots.UploadSlotsMiddleware`: after the key check (a caller without a key takes no
   slot), before the body is read (a refused upload has cost its headers only).
7. `body_limit.BodySizeLimitMiddleware`: innermost, around the body as the route reads it.

Starlette wraps the last middleware added around the others, so `install_middleware` adds them
innermost first: the list in the code reads bottom-up against the list above.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from optiforge_client.tensors import HEADER_LENGTH

from app.api.access_policy import AccessPolicy
from app.api.middleware.auth import AuthMiddleware
from app.api.middleware.body_limit import BodySizeLimitMiddleware
from app.api.middleware.control_chars import ControlCharacterMiddleware
from app.api.middleware.origin import OriginMiddleware
from app.api.middleware.request_log import RequestLogMiddleware
from app.api.middleware.upload_slots import UploadSlotsMiddleware
from app.api.uploads import MULTIPART_SLACK_BYTES
from app.core.settings import Settings


def install_middleware(app: FastAPI, settings: Settings, upload_paths: tuple[str, ...]) -> None:
    """Wrap `app` in every middleware, in the order the module docstring gives (innermost added
    first). Needs `app.state.keys` (the key directory) and `app.state.serving` (its metrics)."""
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_request_bytes,
        upload_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        upload_paths=upload_paths,
        json_tensor_bytes=settings.max_json_tensor_bytes,
    )
    app.add_middleware(
        UploadSlotsMiddleware, limit=settings.max_concurrent_uploads, upload_paths=upload_paths
    )
    app.add_middleware(
        AuthMiddleware,
        keys=app.state.keys,
        policy=AccessPolicy(public_docs=settings.public_docs, public_metrics=settings.public_metrics),
        default_infer_rps=settings.infer_rate_limit_rps,
        open_hosts=settings.extra_open_hosts,
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
    app.add_middleware(RequestLogMiddleware, metrics=app.state.serving.metrics)
