"""API keys on every request: who the caller is (`Principal`), whether its scopes allow the
request (app.api.access_policy), and whether its inference rate does.

A key comes as `Authorization: Bearer <key>` (what tritonclient and most HTTP tools send) or
`X-API-Key: <key>`. The principal goes into the request's scope (`request.state.principal`), where
routes read their project from (app.api.deps).

A server that has never had a key is open, to loopback clients only: `optiforge serve` refuses
any other address until a key exists, and here a request is refused unless both its socket peer
is a loopback address (a server bound to 0.0.0.0 is not opened to a remote client that writes
`Host: localhost`) and its `Host` is a loopback name (a web page cannot reach such a server by
rebinding its own domain name to 127.0.0.1). The first key closes the server for good
(app.services.access.keys_required).

Unknown keys are counted per client address (app.api.middleware.failed_keys): past the limit, the
client's next unknown key is a 429 answered without a database query.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.concurrency import run_in_threadpool

from app.api.access_policy import ANY_KEY, AccessPolicy, route_path
from app.api.errors import send_error
from app.api.middleware.failed_keys import FailedKeyThrottle
from app.api.middleware.host import is_loopback_address, is_loopback_host
from app.api.middleware.rate_limit import inference_wait, retry_after
from app.core.errors import ApiError
from app.core.keys import INFER, Principal
from app.core.outages import database_unavailable, is_database_unavailable
from app.core.shared_counters import SharedCounters
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
        failed_keys: FailedKeyThrottle,
        counters: SharedCounters,
        open_hosts: frozenset[str] = frozenset(),
        open_peers: frozenset[str] = frozenset(),
    ):
        self.app, self.keys, self.policy = app, keys, policy
        self.default_infer_rps, self.open_hosts, self.open_peers = default_infer_rps, open_hosts, open_peers
        self.counters = counters  # the inference rate's buckets (app.api.middleware.rate_limit)
        self.failed_keys = failed_keys

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
        peer = (scope.get("client") or ("", 0))[0] or ""
        hit, principal = self.keys.cached(key)
        if principal is None and key is not None and not self.keys.known(key):
            wait = self.failed_keys.wait(peer)
            if wait > 0:  # before any query: a guesser costs a dictionary look-up
                await _too_many_failures(send, path, wait)
                return
        try:
            if not hit:
                principal = await run_in_threadpool(self.keys.resolve, key)
            if principal is None and key is not None:
                principal = await self._principal(None)  # a key sent to a server that has none yet
        except Exception as exc:  # the database is down or not migrated: nobody can be let in
            logger.exception("API key look-up failed")
            # An outage answers as every route answers one (one code for clients to retry on);
            # anything else (a database that was never migrated) says the keys cannot be checked.
            refusal = (
                database_unavailable()
                if is_database_unavailable(exc)
                else ApiError(
                    503,
                    "auth_unavailable",
                    "API keys cannot be checked now (the database is not usable); retry shortly",
                    headers={"Retry-After": "5"},
                )
            )
            status, code, detail = refusal.status, refusal.code, refusal.detail
            await send_error(send, path, status, code, detail, headers=refusal.headers)
            return
        if principal is None:
            if key is not None:
                self.failed_keys.failed(peer)
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
        if principal.key_id is None and not (is_loopback_address(peer) or peer in self.open_peers):
            detail = (
                "this server has no API key yet and answers only clients on this machine "
                "(a loopback address); create a key with `optiforge keys create`"
            )
            await send_error(send, path, 403, "client_not_allowed", detail)
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
            wait = await inference_wait(self.counters, principal.key_id, rps) if rps else 0.0
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


async def _too_many_failures(send: Any, path: str, wait: float) -> None:
    seconds = retry_after(wait)
    detail = f"too many unknown API keys from this address; retry in {seconds} s with a valid key"
    await send_error(send, path, 429, "too_many_failed_keys", detail, headers={"Retry-After": seconds})
