"""API keys as material: how one is made, hashed and recognised, what its scopes allow, and who a
request acts as (`Principal`). No database here (app.services.access stores keys; app.api.middleware.auth
checks them on every request).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

#: Every key starts with this, so a leaked one is recognisable (secret scanners match on prefixes).
KEY_PREFIX = "ofk_"
#: How many characters of a key are kept in clear, for a person to tell keys apart in a listing.
SHOWN_CHARACTERS = 10
#: A key given from outside (OPTIFORGE_BOOTSTRAP_API_KEY) must be at least this long.
MIN_KEY_LENGTH = 32

ADMIN, WRITE, READ, INFER = "admin", "write", "read", "infer"
#: What each scope grants: `admin` manages projects and keys and can do everything in its own
#: project; `write` creates and deletes (and reads); `read` lists and downloads; `infer` runs
#: inference, on /v1 and /v2, and nothing else (the key to give a serving client).
GRANTS: dict[str, frozenset[str]] = {
    ADMIN: frozenset({ADMIN, WRITE, READ, INFER}),
    WRITE: frozenset({WRITE, READ}),
    READ: frozenset({READ}),
    INFER: frozenset({INFER}),
}
SCOPES = tuple(GRANTS)

#: Project names: what a person types and what records show, safe in URLs and logs.
PROJECT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def generate_key() -> str:
    """A new key: the prefix and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What is stored and looked up: keys are random, so a plain SHA-256 cannot be reversed by
    guessing (a slow password hash would only slow every request down)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def shown_part(key: str) -> str:
    return key[:SHOWN_CHARACTERS]


def granted(scopes: list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """Every scope that a key holding `scopes` has (`admin` implies the rest; `write` implies `read`)."""
    result: set[str] = set()
    for scope in scopes:
        result |= GRANTS.get(scope, frozenset())
    return frozenset(result)


def check_scopes(scopes: list[str]) -> list[str]:
    """The scopes, validated and in a stable order (ValueError naming the unknown ones)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}; unknown: {unknown}")
    return [scope for scope in SCOPES if scope in scopes]


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key (its id, never the key) of a project, with its scopes.

    `key_id` is None on a server that has never had a key (loopback peers only), where every
    request acts in the default project with every scope.
    """

    key_id: str | None
    project_id: str
    scopes: frozenset[str]
    infer_rps: float | None = None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes
