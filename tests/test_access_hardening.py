"""Issue 19, items 1, 3 (HEAD /ui) and 4: open mode decided once, the peer checked, one Host,
failed key checks throttled per client, security headers, and markdown that cannot be injected.

In process (TestClient on SQLite), and over real HTTP against `optiforge serve` on SQLite and on
PostgreSQL. The live servers here are this module's own: the suite's shared `live_stack`s run
open (no key) for every other test, and a server that has had a key stays closed for good.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

from app.core.db import get_sessionmaker
from app.core.migrate import alembic_config, upgrade
from app.core.orm import ApiKeyRecord
from app.main import create_app
from app.services import access
from tests.conftest import (
    POSTGRES_URL,
    LiveStack,
    _base_env,
    _optiforge,
    _start,
    _stop,
    _wait_ready,
    free_port,
    make_settings,
    require_service,
)

LOOPBACK_BASE = "http://127.0.0.1:8000"


def _app(tmp_path: Path, **overrides: object):
    settings = make_settings(tmp_path / "data", open_hosts="", **overrides)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    return create_app(settings), settings.resolved_database_url


def _loopback_client(app, **kwargs: object) -> TestClient:
    return TestClient(app, base_url=LOOPBACK_BASE, client=("127.0.0.1", 50000), **kwargs)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- open mode is decided once


def test_revoking_the_last_admin_key_is_refused_and_the_server_stays_closed(tmp_path: Path) -> None:
    app, url = _app(tmp_path)
    with _loopback_client(app) as client:
        first = client.post(
            "/v1/admin/keys", json={"project": "default", "name": "first", "scopes": ["admin"]}
        )
        assert first.status_code == 201, first.text
        admin, admin_id = _bearer(first.json()["key"]), first.json()["id"]
        refused = client.delete(f"/v1/admin/keys/{admin_id}", headers=admin)
        assert refused.status_code == 409 and refused.json()["code"] == "last_admin_key"
        assert "create another admin key" in refused.json()["detail"]
        assert client.get("/v1/auth/me", headers=admin).status_code == 200  # not revoked
        # With a second admin key, the first can go; the second is then the last.
        second = client.post(
            "/v1/admin/keys",
            json={"project": "default", "name": "second", "scopes": ["admin"]},
            headers=admin,
        ).json()
        assert client.delete(f"/v1/admin/keys/{admin_id}", headers=_bearer(second["key"])).status_code == 200
        last = client.delete(f"/v1/admin/keys/{second['id']}", headers=_bearer(second["key"]))
        assert last.status_code == 409 and last.json()["code"] == "last_admin_key"
        # A project whose keys hold the last admin key cannot be deleted either.
        headers = _bearer(second["key"])
        assert client.post("/v1/admin/projects", json={"id": "ops"}, headers=headers).status_code == 201
        ops = client.post(
            "/v1/admin/keys", json={"project": "ops", "name": "ops", "scopes": ["admin"]}, headers=headers
        ).json()
        assert client.delete(f"/v1/admin/keys/{second['id']}", headers=headers).status_code == 200
        gone = client.delete("/v1/admin/projects/ops", headers=_bearer(ops["key"]))
        assert gone.status_code == 409 and gone.json()["code"] == "last_admin_key"

        # Every key row gone (as an operator deleting rows, or projects, would leave it): still closed.
        with get_sessionmaker(url)() as session:
            session.execute(sa.delete(ApiKeyRecord))
            session.commit()
        app.state.keys.invalidate()
        assert client.get("/v1/auth/me").status_code == 401
        minted = client.post("/v1/admin/keys", json={"project": "default", "name": "x", "scopes": ["admin"]})
        assert minted.status_code == 401
    with _loopback_client(create_app(make_settings(tmp_path / "data", open_hosts=""))) as restarted:
        assert restarted.get("/v1/auth/me").status_code == 401  # a new process reads the same decision


def test_cli_revoke_goes_through_the_same_rule(tmp_path: Path) -> None:
    from tests.test_auth import _optiforge as cli

    data = tmp_path / "data"
    assert cli(["keys", "create", "--name", "only"], data).returncode == 0
    key_id = cli(["keys", "list"], data).stdout.split()[0]
    refused = cli(["keys", "revoke", key_id], data)
    assert refused.returncode == 1 and "last_admin_key" in refused.stderr


def test_migration_closes_a_server_that_already_has_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0007")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO api_keys (id, project_id, name, prefix, sha256, scopes, created_at, revoked_at) "
                "VALUES ('key_1', 'default', 'k', 'ofk_', 'ab', '[\"admin\"]', '2026-01-01', '2026-01-02')"
            )
        )
    upgrade(url)
    with get_sessionmaker(url)() as session:
        assert access.keys_required(session)
    command.downgrade(alembic_config(url), "0007")
    upgrade(url)
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(fresh)
    with get_sessionmaker(fresh)() as session:
        assert not access.keys_required(session)


# ---------------------------------------------------------------- open mode checks the peer


def test_open_mode_checks_the_peer_address_not_only_the_host(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    with TestClient(app, base_url="http://localhost:8000", client=("203.0.113.7", 40000)) as remote:
        refused = remote.get("/v1/auth/me")
        assert refused.status_code == 403 and refused.json()["code"] == "client_not_allowed"
        assert (
            remote.post(
                "/v1/admin/keys", json={"project": "default", "name": "x", "scopes": ["admin"]}
            ).status_code
            == 403
        )
    for peer in ("127.0.0.1", "127.5.0.1", "::1", "::ffff:127.0.0.1"):
        with TestClient(app, base_url="http://localhost:8000", client=(peer, 40000)) as local:
            assert local.get("/v1/auth/me").status_code == 200, peer


# ---------------------------------------------------------------- one Host header


async def _asgi_status(app, headers: list[tuple[bytes, bytes]], path: str = "/healthz") -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)
    return next(m for m in sent if m["type"] == "http.response.start")["status"]


def test_two_host_headers_are_a_400_for_everyone(tmp_path: Path) -> None:
    import asyncio

    app, _ = _app(tmp_path)
    with _loopback_client(app):  # starts the app (lifespan)
        one = [(b"host", b"127.0.0.1:8000")]
        two = [(b"host", b"127.0.0.1:8000"), (b"host", b"attacker.example")]
        assert asyncio.run(_asgi_status(app, one)) == 200
        assert asyncio.run(_asgi_status(app, two)) == 400
        assert asyncio.run(_asgi_status(app, two, "/v1/models")) == 400


def _raw_get(base_url: str, host_lines: list[str], path: str = "/healthz") -> bytes:
    address = httpx.URL(base_url)
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        request = f"GET {path} HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in host_lines)
        sock.sendall((request + "Connection: close\r\n\r\n").encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- failed key checks throttled


def test_failed_key_checks_are_throttled_per_client_without_the_database(tmp_path: Path) -> None:
    app, _ = _app(tmp_path, auth_failures_per_client=5, auth_failure_window_s=30)
    with _loopback_client(app) as local:
        key = local.post(
            "/v1/admin/keys", json={"project": "default", "name": "k", "scopes": ["read"]}
        ).json()
    lookups = []
    resolve = app.state.keys.resolve
    app.state.keys.resolve = lambda k: lookups.append(k) or resolve(k)  # counts database look-ups
    with TestClient(app, client=("198.51.100.9", 1)) as sprayer:
        statuses = [
            sprayer.get("/v1/models", headers=_bearer(f"ofk_guess{i}")).status_code for i in range(12)
        ]
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429] * 7, statuses
        assert len([k for k in lookups if k]) == 5  # the throttled ones never reached the database
        throttled = sprayer.get("/v1/models", headers=_bearer("ofk_another"))
        assert throttled.json()["code"] == "too_many_failed_keys"
        assert 1 <= int(throttled.headers["retry-after"]) <= 30
        assert "retry in" in throttled.json()["detail"]
        # A key this process already knows still works from the throttled address (no query)...
    with TestClient(app, client=("198.51.100.10", 1)) as other:  # ...and another client is not slowed
        assert other.get("/v1/models", headers=_bearer(key["key"])).status_code == 200
        assert other.get("/v1/models", headers=_bearer("ofk_wrong")).status_code == 401


def test_the_throttle_table_is_bounded() -> None:
    from app.api.middleware.failed_keys import FailedKeyThrottle

    throttle = FailedKeyThrottle(limit=2, window_s=60, max_clients=100)
    for i in range(10_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) <= 100
    throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")
    assert throttle.wait("192.0.2.1") > 0 and throttle.wait("192.0.2.2") == 0
    # IPv6 clients are counted per /64: a host picks any address in its own.
    throttle.failed("2001:db8::1")
    throttle.failed("2001:db8::2")
    assert throttle.wait("2001:db8::ffff") > 0


# ---------------------------------------------------------------- both stacks, over HTTP


@pytest.fixture(params=["sqlite", "postgresql"])
def keyed_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveStack]:
    """`optiforge serve --no-worker` of this test's own, on SQLite or on a fresh PostgreSQL database."""
    data_dir = tmp_path / "data"
    env = _base_env(data_dir)
    env["OPTIFORGE_AUTH_FAILURES_PER_CLIENT"] = "4"
    drop = None
    if request.param == "postgresql":
        import psycopg
        from sqlalchemy.engine import make_url

        admin_url = make_url(POSTGRES_URL)
        require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
        name = f"optiforge_auth_{secrets.token_hex(4)}"
        conninfo = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        env["OPTIFORGE_DATABASE_URL"] = admin_url.set(database=name).render_as_string(hide_password=False)

        def drop() -> None:
            with psycopg.connect(conninfo, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    port = free_port()
    log = tmp_path / "serve.log"
    process = _start([*_optiforge(), "serve", "--no-worker", "--port", str(port)], env, log)
    stack = LiveStack(request.param, f"http://127.0.0.1:{port}", env, data_dir, [process], [log])
    try:
        _wait_ready(stack)
        yield stack
    finally:
        _stop(stack)
        if drop is not None:
            drop()


def test_revocation_and_throttling_over_http(keyed_server: LiveStack) -> None:
    with keyed_server.client() as client:
        assert client.get("/v1/auth/me").status_code == 200  # open, to loopback
        first = client.post("/v1/admin/keys", json={"project": "default", "name": "a", "scopes": ["admin"]})
        admin, admin_id = _bearer(first.json()["key"]), first.json()["id"]
        assert client.get("/v1/auth/me").status_code == 401  # the first key closes it
        reader = client.post(
            "/v1/admin/keys", json={"project": "default", "name": "r", "scopes": ["read"]}, headers=admin
        ).json()
        assert client.get("/v1/models", headers=_bearer(reader["key"])).status_code == 200
        assert client.delete(f"/v1/admin/keys/{reader['id']}", headers=admin).status_code == 200
        assert client.get("/v1/models", headers=_bearer(reader["key"])).status_code == 401
        refused = client.delete(f"/v1/admin/keys/{admin_id}", headers=admin)
        assert refused.status_code == 409 and refused.json()["code"] == "last_admin_key"
        assert client.get("/v1/auth/me", headers=admin).json()["scopes"] == [
            "admin",
            "infer",
            "read",
            "write",
        ]
        statuses = [client.get("/v1/models", headers=_bearer(f"ofk_x{i}")).status_code for i in range(6)]
        assert 429 in statuses and statuses.index(429) <= 4, statuses
        throttled = client.get("/v1/models", headers=_bearer("ofk_y"))
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
        # A key this process has seen still passes from the throttled address.
        assert client.get("/v1/models", headers=admin).status_code == 200

    assert _raw_get(keyed_server.base_url, ["127.0.0.1"]).startswith(b"HTTP/1.1 200")
    doubled = _raw_get(keyed_server.base_url, ["127.0.0.1", "evil.example"])
    assert doubled.startswith(b"HTTP/1.1 400") and b"duplicate_host" in doubled, doubled[:300]
    # a header the HTTP parser cannot read: the service's JSON error, not the server's plain text
    address = httpx.URL(keyed_server.base_url)
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/admin/keys HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: lj>*z\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
    assert json.loads(body)["code"] == "malformed_request"


# ---------------------------------------------------------------- security headers, HEAD /ui


def test_console_and_api_send_security_headers(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    with _loopback_client(app) as client:
        for path in ("/ui", "/ui/jobs", "/v1/models", "/healthz", "/nope"):
            response = client.get(path)
            csp = response.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp, path
            assert "script-src 'self'" in csp and "object-src 'none'" in csp
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
        docs = client.get("/docs")
        assert docs.status_code == 200 and "frame-ancestors 'none'" in docs.headers["content-security-policy"]
        assert docs.headers["x-frame-options"] == "DENY"


def test_console_templates_hold_no_inline_script() -> None:
    import re

    templates = Path(__file__).resolve().parent.parent / "app" / "ui" / "templates"
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), template.name
        assert not re.search(r"\son[a-z]+\s*=", text), template.name
        assert not re.search(r"\sstyle\s*=|<style", text), template.name


def test_head_on_console_pages_answers_like_get(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    with _loopback_client(app) as client:
        for path in ("/ui", "/ui/jobs"):
            head = client.head(path)
            assert head.status_code == 200 and head.headers["content-type"].startswith("text/html"), path
            assert head.content == b""
        posted = client.post("/ui")
        assert posted.status_code == 405 and "GET" in posted.headers["allow"].split(", ")


# ---------------------------------------------------------------- markdown report


def test_markdown_report_escapes_model_names() -> None:
    from engines.measure.report import markdown_text, render_markdown

    hostile = "evil|name\n| injected | row |\n<img src=x onerror=alert(1)> *bold* [link](http://x) `code`"
    row = {
        "network": hostile,
        "engine": "original",
        "precision": "fp32",
        "backend": "onnxruntime-cpu",
        "latency": {"1": {"mean_ms": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "throughput_per_s": 1.0}},
        "top1": None,
        "top5": None,
        "top1_agreement": None,
        "size_mb": None,
        "params": None,
        "macs": None,
        "speedup": None,
        "top1_delta": None,
    }
    table = render_markdown([row])
    lines = table.strip().splitlines()
    assert len(lines) == 3  # header, rule, one row: no injected row
    assert lines[2].count("|") - lines[2].count("\\|") == lines[0].count("|")
    assert "<img" not in table and "&lt;img" in table
    assert "\\*bold\\*" in table and "\\[link\\]" in table and "\\`code\\`" in table
    assert markdown_text("resnet50") == "resnet50"
