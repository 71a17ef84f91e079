"""Slow and hostile connections against `optiforge serve` itself, in a subprocess whose
file-descriptor limit is 1 024 (as on many hosts), over real sockets:

- a flood of connections that send part of their headers and then nothing, from many addresses,
  more than the process has descriptors for, does not stop `/healthz` from answering: the server
  keeps its connections below its descriptor limit by closing the oldest one still waiting for
  headers (app.server.connections);
- one address gets at most `max_connections_per_client` connections; a new one from it closes
  its oldest connection still waiting for headers, so a health probe from loopback still gets in;
- a connection whose headers are not complete within `header_timeout_s` is closed;
- uploads that go silent get 408 `body_too_slow` once a window passes below the minimum rate,
  and their upload slots are free again; an upload above the rate, however slow, passes;
- a multipart upload spools in the data directory's scratch, not the system temp directory;
- `X-Forwarded-For` is the logged client only when it comes from a configured trusted proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import api_process, free_port

FD_LIMIT = 1024
FLOOD = 1200  # partial-header connections (the probe used 3 000; see the note)
PER_CLIENT = 64
WINDOW_S = 2.0
MIN_RATE = 16 * 1024
TRUSTED_PROXY = "127.0.0.2"


@dataclass
class Server:
    port: int
    process: subprocess.Popen
    log: Path
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_lines(self) -> list[dict]:
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("logger") == "optiforge.access":
                    lines.append(entry)
        return lines


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def _serve(root: Path, data_dir: Path | None = None, **settings: str) -> Iterator[Server]:
    """`optiforge serve --no-worker` on loopback, with a descriptor limit of 1 024 (soft and hard),
    on `data_dir` (default: a new one under `root`; one already migrated starts faster)."""
    data_dir = data_dir or root / "data"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPTIFORGE_", "REDIS_URL"))}
    env |= {"OPTIFORGE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "OPTIFORGE_LOG_FORMAT": "json"}
    env |= {f"OPTIFORGE_{name.upper()}": value for name, value in settings.items()}
    port = free_port()
    log = root / "serve.log"
    with api_process(port, env, log, preexec_fn=_limit_descriptors) as process:
        yield Server(port, process, log, data_dir)


@pytest.fixture(scope="module", autouse=True)
def _enough_descriptors_here() -> Iterator[None]:
    """This process opens more sockets than the server may: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"this process may open only {hard} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serve(
        tmp_path_factory.mktemp("connections"),
        header_timeout_s="60",  # the flood is held by the caps below, not by the timeout
        max_connections_per_client=str(PER_CLIENT),
        body_rate_window_s=str(WINDOW_S),
        body_min_rate_bytes_s=str(MIN_RATE),
        trusted_proxies=TRUSTED_PROXY,
    ) as live:
        yield live


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _partial_headers(port: int, source: str) -> socket.socket:
    sock = _connect(port, source)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def _closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _healthz(server: Server) -> float:
    started = time.perf_counter()
    response = httpx.get(f"{server.url}/healthz", timeout=10)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_healthz_answers_with_more_partial_header_connections_than_descriptors(server: Server) -> None:
    """1 200 partial-header connections from 20 addresses (60 each, under the per-client cap) at a
    descriptor limit of 1 024: the total cap closes the oldest of them, and /healthz answers."""
    sources = [f"127.0.1.{index}" for index in range(1, 21)]
    flood: list[socket.socket] = []
    try:
        for index in range(FLOOD):
            flood.append(_partial_headers(server.port, sources[index % len(sources)]))
        time.sleep(0.5)  # the server has accepted what it will
        latencies = [_healthz(server) for _ in range(20)]
        print(f"\n/healthz with {FLOOD} partial-header connections: worst {max(latencies) * 1e3:.1f} ms")
        closed = sum(_closed_by_server(sock, 0.01) for sock in flood[:200])
        assert closed > 0  # the oldest were closed to make room
    finally:
        _close_all(flood)
    assert server.process.poll() is None
    _healthz(server)


def test_one_address_gets_at_most_its_cap_and_a_probe_still_gets_in(server: Server) -> None:
    sockets = [_partial_headers(server.port, "127.0.0.3") for _ in range(PER_CLIENT + 8)]
    try:
        time.sleep(0.3)
        assert all(_closed_by_server(sock, 2) for sock in sockets[:8])
        assert not any(_closed_by_server(sock, 0.01) for sock in sockets[8:])
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as client:
            assert client.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        _close_all(sockets)


def test_headers_must_be_complete_within_the_header_timeout(server: Server, tmp_path: Path) -> None:
    with _serve(tmp_path, server.data_dir, header_timeout_s="1") as live:
        silent = _connect(live.port)  # not a byte
        partial = _partial_headers(live.port, "127.0.0.1")
        opened = time.monotonic()
        assert _closed_by_server(silent, 5) and _closed_by_server(partial, 5)
        assert time.monotonic() - opened < 4
        _healthz(live)


# ---------------------------------------------------------------- upload bodies

_BOUNDARY = "optiforge-test-boundary"


def _multipart_head(size: int) -> tuple[bytes, bytes, int]:
    """The head and tail of a one-file multipart body whose file has `size` bytes, and the total."""
    head = (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{_BOUNDARY}--\r\n".encode()
    return head, tail, len(head) + size + len(tail)


def _start_upload(port: int, size: int) -> tuple[socket.socket, bytes]:
    """A POST /v1/models whose headers and multipart head are sent; returns the socket and the tail."""
    head, tail, total = _multipart_head(size)
    sock = _connect(port)
    request = (
        f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={_BOUNDARY}\r\nContent-Length: {total}\r\n\r\n"
    ).encode()
    sock.sendall(request + head)
    return sock, tail


def _response(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if body and b"content-length" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _small_upload(server: Server) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models", files={"file": ("m.onnx", b"not a model")}, timeout=30)


def test_silent_uploads_are_cut_and_free_their_slots(server: Server) -> None:
    silent = [_start_upload(server.port, 1024 * 1024)[0] for _ in range(4)]  # 4: every upload slot
    try:
        time.sleep(0.3)
        held = _small_upload(server)
        assert held.status_code == 503 and held.json()["code"] == "too_many_uploads"
        opened = time.monotonic()
        for sock in silent:
            status, body = _response(sock, WINDOW_S * 3 + 5)
            assert status == 408 and body["code"] == "body_too_slow", body
            assert "bytes per second" in body["detail"]
        assert time.monotonic() - opened <= WINDOW_S * 2 + 2
    finally:
        _close_all(silent)
    free = _small_upload(server)
    assert free.status_code == 422 and free.json()["code"] == "invalid_model", free.text


def test_an_upload_above_the_minimum_rate_passes_however_slow(server: Server) -> None:
    """40 KiB/s (the floor is 16 KiB/s) for three windows: no 408; the file reaches the route."""
    chunk, chunks = 10 * 1024, 24
    sock, tail = _start_upload(server.port, chunk * chunks)
    try:
        for _ in range(chunks):
            sock.sendall(b"\0" * chunk)
            time.sleep(0.25)
        sock.sendall(tail)
        status, body = _response(sock, 30)
        assert status == 422 and body["code"] == "invalid_model", body
    finally:
        sock.close()


def test_multipart_bodies_spool_in_the_data_directory_scratch(server: Server) -> None:
    """A 3 MiB upload half sent: the file Starlette spools it into is open under <data dir>/scratch."""
    sock, _ = _start_upload(server.port, 3 * 1024 * 1024)
    try:
        sock.sendall(b"\0" * (2 * 1024 * 1024))
        scratch = str(server.data_dir.resolve() / "scratch")
        deadline, spooled = time.monotonic() + 5, []
        while not spooled and time.monotonic() < deadline:
            time.sleep(0.1)
            spooled = [
                target
                for fd in Path(f"/proc/{server.process.pid}/fd").iterdir()
                if (target := _readlink(fd)) is not None and target.startswith(scratch)
            ]
        assert spooled, "no file open under the scratch directory"
    finally:
        sock.close()


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


# ---------------------------------------------------------------- the client in the access log


def _logged_client(server: Server, request_id: str) -> str | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for entry in server.access_lines():
            if entry.get("request_id") == request_id:
                return entry["client"]
        time.sleep(0.1)
    raise AssertionError(f"no access line for {request_id}")


@pytest.mark.parametrize(
    ("source", "logged"),
    [("127.0.0.1", "127.0.0.1"), (TRUSTED_PROXY, "203.0.113.7")],
    ids=["untrusted", "proxy"],
)
def test_x_forwarded_for_is_believed_only_from_a_proxy(server: Server, source: str, logged: str) -> None:
    request_id = f"xff-{source}"
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Request-ID": request_id}
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
        client.get(f"{server.url}/healthz", headers=headers, timeout=10)
    assert _logged_client(server, request_id) == logged


# ---------------------------------------------------------------- the registry's rules, in-process


class _Connection:
    def __init__(self) -> None:
        self.closed = False

    def close_connection(self) -> None:
        self.closed = True


def test_the_registry_closes_the_oldest_waiting_connection_and_spares_busy_ones() -> None:
    from app.server.connections import ConnectionRegistry, TrustedProxies

    registry = ConnectionRegistry(max_total=4, max_per_client=2, exempt=TrustedProxies("10.0.0.0/8"))
    first, second, third = _Connection(), _Connection(), _Connection()
    for connection in (first, second):
        assert registry.admit(connection, "192.0.2.1")
        registry.waiting_for_headers(connection)
    registry.busy(first)  # its headers are in: not closed to make room
    assert registry.admit(third, "192.0.2.1") and second.closed and not first.closed
    registry.busy(third)
    assert not registry.admit(_Connection(), "192.0.2.1")  # every connection of it is busy: refused
    proxied = [_Connection() for _ in range(3)]
    assert all(registry.admit(connection, "10.1.2.3") for connection in proxied[:2])  # exempt from 2
    assert registry.admit(proxied[2], "10.1.2.3") is False  # 4 open, none waiting: the total cap
    registry.remove(first)
    assert registry.admit(proxied[2], "10.1.2.3") and len(registry.open) == 4


def test_a_served_keep_alive_connection_is_closed_only_after_every_half_open_one() -> None:
    """The chaos benchmark's health probe kept its connection alive between probes; while it was
    as evictable as the flood's half-open connections, 4 of its 190 probes failed."""
    from app.server.connections import ConnectionRegistry

    registry = ConnectionRegistry(max_total=10, max_per_client=3)
    probe, flood = _Connection(), [_Connection() for _ in range(3)]
    assert registry.admit(probe, "192.0.2.1")
    registry.busy(probe)
    registry.waiting_for_headers(probe, idle=True)  # answered, kept alive: the oldest connection
    for connection in flood[:2]:
        assert registry.admit(connection, "192.0.2.1")
        registry.waiting_for_headers(connection)
    assert registry.admit(flood[2], "192.0.2.1")  # over the cap: a half-open one goes first
    assert flood[0].closed and not probe.closed
    registry.waiting_for_headers(flood[2])
    registry.remove(flood[1])
    registry.remove(flood[2])
    for _ in range(2):  # nothing half-open left: then the idle one
        newcomer = _Connection()
        assert registry.admit(newcomer, "192.0.2.1")
        registry.busy(newcomer)
    assert registry.admit(_Connection(), "192.0.2.1") and probe.closed
