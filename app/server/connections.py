"""Connection limits that uvicorn lacks: a header timeout, a cap per client, and a total cap.

uvicorn starts no timer on a connection until it has answered a request, so a client that opens a
connection and sends part of its headers (or nothing) holds it, and a descriptor, for as long as it
likes; a few thousand of them exhaust the process's descriptors and nobody else gets in, health
probes included. `GuardedHttpToolsProtocol` (uvicorn's httptools protocol, the one `uvicorn[standard]`
runs) adds:

- a header timeout: a request's line and headers must be complete `header_timeout_s` after the
  connection opened or after the request's first byte; otherwise the connection is closed;
- a cap per client (the socket peer's address; trusted proxies are exempt, they carry many
  clients) and a cap on all connections, kept below the descriptor limit
  (`app.server.descriptors`).

Over a cap, the connection closed is the *oldest one still waiting for its first request's
headers*, not the new one: an attacker's half-open connections are the old ones, and a health
probe or a real client from the same address, which sends its headers at once, gets in. Only when
there is none is the oldest idle keep-alive connection closed (a client that was served: it
reconnects; the chaos benchmark's probe on a kept-alive connection failed 4 times in 190 while
they went first), and only when every connection is busy in a request is the new one refused.

Everything here runs on the event loop's thread, between callbacks: no lock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)
#: The code of a request the HTTP parser cannot read (declared on every operation's 400).
MALFORMED = "malformed_request"
_MALFORMED_DETAIL = "the request is not valid HTTP (its request line or a header cannot be parsed)"


class TrustedProxies:
    """Addresses and networks from `trusted_proxies` (comma-separated), e.g. `10.0.0.0/8, ::1`."""

    def __init__(self, spec: str):
        self.entries = tuple(item.strip() for item in spec.split(",") if item.strip())
        self.networks = tuple(_network(item) for item in self.entries)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: object) -> bool:
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def _network(item: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError(
            f"OPTIFORGE_TRUSTED_PROXIES: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)"
        ) from None


class ConnectionRegistry:
    """The open connections of one server: all of them, per client, those waiting for their first
    request's headers and those idle between requests (oldest first: dicts keep insertion order,
    so the first key is the next to close)."""

    def __init__(self, max_total: int, max_per_client: int, exempt: TrustedProxies | None = None):
        self.max_total, self.max_per_client = max_total, max_per_client
        self.exempt = exempt or TrustedProxies("")
        self.open: dict[Any, str] = {}  # connection -> client host
        self.waiting: dict[Any, None] = {}
        self.idle: dict[Any, None] = {}
        self.client_open: dict[str, dict[Any, None]] = {}
        self.client_waiting: dict[str, dict[Any, None]] = {}
        self.client_idle: dict[str, dict[Any, None]] = {}
        self.evicted = self.refused = 0

    def admit(self, connection: Any, host: str) -> bool:
        """Count a new connection, closing an older waiting one to make room; False: refuse it."""
        crowded = host not in self.exempt and len(self.client_open.get(host, ())) >= self.max_per_client
        if crowded and not self._evict_oldest(
            self.client_waiting.get(host, {}), self.client_idle.get(host, {})
        ):
            self.refused += 1
            return False
        if len(self.open) >= self.max_total and not self._evict_oldest(self.waiting, self.idle):
            self.refused += 1
            return False
        self.open[connection] = host
        self.client_open.setdefault(host, {})[connection] = None
        return True

    def waiting_for_headers(self, connection: Any, *, idle: bool = False) -> None:
        """`idle`: between requests on a kept-alive connection (closed to make room only after
        every connection still waiting for a first request)."""
        host = self.open.get(connection)
        if host is None:
            return
        self._unmark(connection, host)  # re-marked as the newest of its kind
        if idle:
            self.idle[connection] = None
            self.client_idle.setdefault(host, {})[connection] = None
        else:
            self.waiting[connection] = None
            self.client_waiting.setdefault(host, {})[connection] = None

    def busy(self, connection: Any) -> None:
        """Its headers are in: it is serving a request and is not closed to make room."""
        host = self.open.get(connection)
        if host is not None:
            self._unmark(connection, host)

    def remove(self, connection: Any) -> None:
        host = self.open.pop(connection, None)
        if host is not None:
            self._unmark(connection, host)
            self._discard(self.client_open, host, connection)

    def _unmark(self, connection: Any, host: str) -> None:
        """Neither waiting nor idle (busy, or gone)."""
        self.waiting.pop(connection, None)
        self.idle.pop(connection, None)
        self._discard(self.client_waiting, host, connection)
        self._discard(self.client_idle, host, connection)

    def _evict_oldest(self, waiting: dict[Any, None], idle: dict[Any, None]) -> bool:
        """Close the oldest connection waiting for a first request, else the oldest idle one."""
        victim = next(iter(waiting), None) or next(iter(idle), None)
        if victim is None:
            return False
        self.remove(victim)
        victim.close_connection()
        self.evicted += 1
        return True

    @staticmethod
    def _discard(table: dict[str, dict[Any, None]], host: str, connection: Any) -> None:
        connections = table.get(host)
        if connections is not None:
            connections.pop(connection, None)
            if not connections:
                del table[host]


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header timeout and the caps above; a subclass per
    server (`guarded_protocol`) carries its registry and timeout."""

    registry: ClassVar[ConnectionRegistry]
    header_timeout_s: ClassVar[float]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        host = self.client[0] if self.client else ""
        if not self.registry.admit(self, host):
            transport.close()
            return
        self._await_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.registry.busy(self)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self.registry.waiting_for_headers(self, idle=True)  # uvicorn's keep-alive timer closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.registry.remove(self)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refuses (a malformed request line or header, e.g. a
        Content-Length that is not a number) gets the service's JSON error, not uvicorn's plain
        text: `code` and `detail` as under /v1, `error` as under /v2 (the path may not be known)."""
        body = json.dumps(
            {"code": MALFORMED, "detail": _MALFORMED_DETAIL, "error": _MALFORMED_DETAIL}
        ).encode()
        content = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()

    def close_connection(self) -> None:
        """Closed to make room for a newer connection."""
        if not self.transport.is_closing():
            self.transport.close()

    def _await_headers(self) -> None:
        self.registry.waiting_for_headers(self)
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.registry.remove(self)
        self.close_connection()


def guarded_protocol(registry: ConnectionRegistry, header_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class of one server (uvicorn's `http=`), bound to its registry and timeout."""
    attributes = {"registry": registry, "header_timeout_s": header_timeout_s}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attributes)
