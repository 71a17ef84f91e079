"""Which scope a request needs, from its method and path: the one table of who may do what.

Kept apart from the middleware that enforces it (app.api.middleware.auth) so that it can be read at a glance
and tested against every route of the OpenAPI document (tests/test_auth.py walks them all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.core.keys import ADMIN, INFER, READ, WRITE

#: Any valid key, whatever its scopes (asking who one is).
ANY_KEY = "any"

#: Probes: a load balancer or orchestrator holds no key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
#: The API's description and Swagger UI: open unless `public_docs` is off.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: Swagger UI's and ReDoc's scripts and styles, served from the package (no CDN): open with the docs.
DOCS_ASSETS_PATH = "/docs-assets"
METRICS_PATH = "/metrics"
WHOAMI_PATH = "/v1/auth/me"
UI_PREFIX = "/ui"
_V1_INFER = re.compile(r"^/v1/engines/[^/]+/infer/?$")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def route_path(scope: dict[str, Any]) -> str:
    """The path routing sees: without the `root_path` a proxy mounts the app under (`--root-path
    /optiforge`). Deciding on the raw path would read `/optiforge/v1/admin/keys` as an unknown path."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


@dataclass(frozen=True)
class AccessPolicy:
    public_docs: bool = True
    public_metrics: bool = False

    def required_scope(self, method: str, path: str) -> str | None:
        """The scope a request needs; None: no key needed. Unknown paths need `read`, so that
        only a key holder learns which paths exist."""
        if path in OPEN_PATHS:
            return None
        if path in DOC_PATHS or path.startswith(DOCS_ASSETS_PATH + "/"):
            return None if self.public_docs else READ
        if path == METRICS_PATH:  # server-wide: every project's engine ids are in its labels
            return None if self.public_metrics else ADMIN
        if path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
            return None  # the console's pages and assets hold no data; the API calls they make need a key
        if path == WHOAMI_PATH:
            return ANY_KEY
        if path == "/v1/admin" or path.startswith("/v1/admin/"):
            return ADMIN
        if path == "/v2" or path.startswith("/v2/"):
            return INFER  # metadata too: a serving client reads it before it infers
        if method == "POST" and _V1_INFER.match(path):
            return INFER
        return READ if method in _SAFE_METHODS else WRITE
