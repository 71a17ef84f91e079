"""The `Host` header: one per request (else a 400 for everyone, before anything reads it), and
the rules that say whether a host name, or the socket's peer, is this machine (open mode reads
them, app.api.middleware.auth).

Two `Host` headers are how a request smuggles a second name past one reader to another: a proxy
may route on the first while the application (or its access log, or the open-mode check) reads
the last. HTTP/1.1 says such a request is a 400 (RFC 9112, section 3.2).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from app.api.access_policy import route_path
from app.api.errors import send_error

#: `Host`: a name or IPv4 address, or an IPv6 address in brackets, then an optional port; nothing else.
_HOST = re.compile(r"^(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::[0-9]{1,5})?$")


def host_name(host_header: str) -> str | None:
    """The host a `Host` header names, without its port; None for anything that is not plainly a
    host (`localhost:80@evil`, `[::1]evil.com`)."""
    match = _HOST.match(host_header.strip().lower())
    if match is None:
        return None
    return match.group("ipv6") or match.group("name")


def is_loopback_address(address: str) -> bool:
    """Whether an IP address (the socket's peer) is this machine: 127.0.0.0/8, ::1, or an IPv4
    loopback address mapped into IPv6 (`::ffff:127.0.0.1`, what a dual-stack socket reports)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def is_loopback_host(host_header: str, extra_hosts: frozenset[str] = frozenset()) -> bool:
    """Whether `Host` names this machine: `localhost`, `*.localhost`, a loopback address (127.0.0.0/8,
    ::1), or one of `extra_hosts`. Checked as an address, not as text: `127.0.0.1.attacker.example`
    is a public name its owner can point at 127.0.0.1 (DNS rebinding)."""
    name = host_name(host_header)
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in extra_hosts:
        return True
    return is_loopback_address(name)


class SingleHostMiddleware:
    """ASGI middleware: a request with more than one `Host` header is a 400 `duplicate_host`."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(name == b"host" for name, _ in scope.get("headers") or ()) > 1:
            detail = "the request has more than one Host header; send exactly one"
            await send_error(send, route_path(scope), 400, "duplicate_host", detail)
            return
        await self.app(scope, receive, send)
