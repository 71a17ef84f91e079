"""The uvicorn server that `optiforge serve` runs, from the settings.

- Connections: the guarded protocol (`app.server.connections`), with its caps sized from the
  descriptor limit, which is raised to the hard limit first (`app.server.descriptors`).
- Idle keep-alive connections close after `keep_alive_timeout_s`.
- Forwarded headers: uvicorn believes `X-Forwarded-For` from 127.0.0.1 unless told otherwise, so
  any local process (or a request relayed by something on the host) could choose the client
  address the access log and the open-mode check see. Here they are believed only from
  `trusted_proxies`, and not at all by default: the client is the socket peer.
"""

from __future__ import annotations

import logging

import uvicorn

from app.core.settings import Settings
from app.server.connections import ConnectionRegistry, TrustedProxies, guarded_protocol
from app.server.descriptors import connection_cap, raise_descriptor_limit

logger = logging.getLogger(__name__)

APP = "app.main:create_app"


def server_config(settings: Settings, host: str, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for the API on `host`:`port`, with the connection limits."""
    descriptors = raise_descriptor_limit()
    max_connections = connection_cap(descriptors, settings.max_connections)
    proxies = TrustedProxies(settings.trusted_proxies)
    registry = ConnectionRegistry(max_connections, settings.max_connections_per_client, proxies)
    logger.info(
        "connections: at most %d (descriptor limit %d), %d per client, headers within %g s",
        max_connections,
        descriptors,
        settings.max_connections_per_client,
        settings.header_timeout_s,
    )
    return uvicorn.Config(
        APP,
        factory=True,
        host=host,
        port=port,
        http=guarded_protocol(registry, settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=list(proxies.entries) if proxies else None,
        log_level=log_level,
        log_config=None,  # keep the structured logging set up in app.cli.main()
        access_log=False,  # app.api.middleware.request_log writes one line per request, with its id
    )


def run_server(settings: Settings, host: str, port: int, log_level: str) -> bool:
    """Serve until stopped; False when the server could not start (the port taken, …)."""
    server = uvicorn.Server(server_config(settings, host, port, log_level))
    server.run()
    return server.started
