"""API keys on every request: who the caller is (`Principal`), whether its scopes allow the
request (app.api.access_policy), and whether its inference rate does.

A key comes as `Authorization: Bearer <key>` (what tritonclient and most HTTP tools send) or
`X-API-Key: <key>`. The principal goes into the request's scope (`request.state.principal`), where
routes read their project from (app.api.deps). A server with no key yet is open, to loopback
clients only: `optiforge serve` refuses any other address until a key exists, and here a request
whose `Host` is not a loopback name is refused (a web page cannot reach such a server by
rebinding its own domain name to 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

from fastapi.concurrency import run_in_threadpool

from app.api.access_policy import ANY_KEY, AccessPolicy, route_path
from app.api.errors import send_error
from app.api.middleware.rate_limit import RateLimiter, retry_after
from app.core.keys import INFER, Principal
from app.services.access import KeyDirectory

logger = logging.getLogger(__name__)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="optiforge"'}


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key a request carries, if any."""
    authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


#: `Host`: a name or IPv4 address, or an IPv6 address in brackets, then an optional port; nothing else.
_HOST = re.compile(r"^(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::[0-9]{1,5})?$")


def host_name(host_header: str) -> str | None:
    """The host a `Host` header names, without its port; None for anything that is not plainly a
    host (`localhost:80@evil`, `[::1]evil.com`)."""
    match = _HOST.match(host_header.strip().lower())
    if match is None:
        return None
    return match.group("ipv6") or match.group("name")


def is_loopback_host(host_header: str, extra_hosts: frozenset[str] = frozenset()) -> bool:
    """Whether `Host` names this machine: `localhost`, `*.localhost`, a loopback address (127.0.0.0/8,
    ::1), or one of `extra_hosts`. Checked as an address, not as text: `127.0.0.1.attacker.example`
    is a public name its owner can point at 127.0.0.1 (DNS rebinding)."""
    name = host_name(host_header)
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in extra_hosts:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AuthMiddleware:
    """ASGI middleware: 401 without a valid key, 403 without the scope, 429 over the key's rate.

    A known key costs a dictionary look-up (KeyDirectory caches for `auth_cache_ttl_s`); the
    database is asked, off the event loop, only on a miss.
    """

    def __init__(
        self,
        app: Any,
        keys: KeyDirectory,
        policy: AccessPolicy,
        default_infer_rps: float | None,
        open_hosts: frozenset[str] = frozenset(),
    ):
        self.app, self.keys, self.policy = app, keys, policy
        self.default_infer_rps, self.open_hosts = default_infer_rps, open_hosts
        self.limiter = RateLimiter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        needed = self.policy.required_scope(scope["method"], path)
        if needed is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = presented_key(headers)
        try:
            principal = await self._principal(key)
            if principal is None and key is not None:
                principal = await self._principal(None)  # a key sent to a server that has none yet
        except Exception:  # the database is down or not migrated: nobody can be let in
            logger.exception("API key look-up failed")
            detail = "API keys cannot be checked now (the database is unreachable); retry shortly"
            await send_error(send, path, 503, "auth_unavailable", detail, headers={"Retry-After": "5"})
            return
        if principal is None:
            code, detail = (
                ("invalid_api_key", "the API key is unknown or revoked")
                if key is not None
                else (
                    "api_key_required",
                    "send an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                )
            )
            await send_error(send, path, 401, code, detail, headers=_CHALLENGE)
            return
        if principal.key_id is None and not is_loopback_host(
            headers.get(b"host", b"").decode("latin-1"), self.open_hosts
        ):
            detail = (
                "this server has no API key yet and answers only requests to a loopback name "
                "(localhost, 127.0.0.1); create a key with `optiforge keys create`"
            )
            await send_error(send, path, 403, "host_not_allowed", detail)
            return
        if needed != ANY_KEY and not principal.allows(needed):
            detail = (
                f"this API key's scopes ({', '.join(sorted(principal.scopes))}) do not include '{needed}'"
            )
            await send_error(send, path, 403, "insufficient_scope", detail)
            return
        if needed == INFER and principal.key_id is not None:
            rps = principal.infer_rps or self.default_infer_rps
            wait = self.limiter.take(principal.key_id, rps) if rps else 0.0
            if wait > 0:
                detail = f"this API key may make {rps:g} inference requests per second"
                await send_error(
                    send, path, 429, "rate_limited", detail, headers={"Retry-After": retry_after(wait)}
                )
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _principal(self, key: str | None) -> Principal | None:
        hit, principal = self.keys.cached(key)
        if hit:
            return principal
        return await run_in_threadpool(self.keys.resolve, key)
