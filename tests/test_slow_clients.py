"""Hostile request bodies against a real server over real sockets: slow and half-open clients, bodies
far over the JSON-tensor cap, big JSON under it, and more bytes than the process may buffer.

The server is uvicorn in a subprocess (its own GIL and event loop, as in production) with an
engine built by the worker's own entry point. What must hold:

- clients that send headers and ten bytes, then nothing, hold no inference slot: a well-behaved
  client on the same address is served as fast as without them, and they get 408 `body_timeout`
  once the body-read timeout passes;
- JSON bodies over the cap, with or without Content-Length, and on /v2 whatever
  `Inference-Header-Content-Length` claims, are refused with 413 `json_tensors_too_large` without
  the server's memory growing, and `/healthz` answers fast while they stream in;
- JSON bodies under the cap are parsed and written off the event loop: `/healthz` still answers;
- bodies beyond the process's body budget get 503 `server_busy` with Retry-After.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper, save_model
from optiforge_client import tensors

from app.core.migrate import upgrade
from app.core.settings import MIB, Settings
from app.main import create_app
from app.serving.admission import JsonGate
from tests.conftest import QUICK_MEASURE, REPO_ROOT, free_port, make_settings
from workers.job_runner import run_job_by_id

FEATURES, CLASSES = 64, 16
BODY_READ_TIMEOUT_S = 4.0
JSON_CAP = 16 * MIB  # the default OPTIFORGE_MAX_JSON_TENSOR_BYTES
BIG = 60 * 1000 * 1000  # the 60 MB JSON bodies


@dataclass
class Live:
    host: str
    port: int
    pid: int
    engine_id: str
    settings: Settings  # of the data directory the server serves

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def peak_rss_bytes(self) -> int:
        """The server's peak resident memory since it started (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


def _model(path: Path) -> Path:
    weights = np.random.default_rng(0).standard_normal((FEATURES, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(weights, "w")],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("slow_clients")
    settings = make_settings(root / "data")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:  # the engine, built as a worker builds it
        with _model(root / "dense.onnx").open("rb") as handle:
            model = client.post("/v1/models", files={"file": ("dense.onnx", handle)}).json()
        job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"measure": QUICK_MEASURE}})
        run_job_by_id(settings, job.json()["id"])
        engine_id = client.get(f"/v1/jobs/{job.json()['id']}").json()["engine_ids"][0]
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTIFORGE_")}
    env |= {
        "OPTIFORGE_DATA_DIR": str(settings.data_dir),
        "OPTIFORGE_BODY_READ_TIMEOUT_S": str(BODY_READ_TIMEOUT_S),
        "OPTIFORGE_INFERENCE_THREADS": "1",
        # The JSON test sends tens of thousands of rows in one request: over the default batch limit.
        "OPTIFORGE_MAX_INFERENCE_BATCH": str(1_000_000),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = root / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        yield Live("127.0.0.1", port, server.pid, engine_id, settings)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# ---------------------------------------------------------------- clients


def _binary_request(rows: int = 1) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(rows).standard_normal((rows, FEATURES)).astype(np.float32)
    body, length = tensors.encode({}, "inputs", {"x": x}, binary=True)
    return body, {tensors.HEADER_LENGTH: str(length), "Content-Type": tensors.BINARY_CONTENT_TYPE}


def _timed_requests(live: Live, count: int) -> list[float]:
    """Latencies of `count` sequential single-sample binary /v2 requests on one keep-alive connection;
    every one must succeed."""
    body, headers = _binary_request()
    connection, latencies = live.connection(), []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", f"/v2/models/{live.engine_id}/infer", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            latencies.append(time.perf_counter() - started)
            assert response.status == 200, payload[:300]
    finally:
        connection.close()
    return latencies


def _open_slow_client(live: Live, path: str, extra_headers: str = "") -> socket.socket:
    """Headers that promise 1000 bytes, then 10 of them, then nothing."""
    sock = socket.create_connection((live.host, live.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {live.host}:{live.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: 1000\r\n{extra_headers}\r\n"
    )
    sock.sendall(head.encode() + b'{"inputs":')
    return sock


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    """The status and JSON body of the one response on `sock`, which the server then closes."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post_raw(live: Live, path: str, body: bytes, headers: dict[str, str], chunked: bool) -> tuple[int, dict]:
    """POST `body` over a raw socket, with Content-Length or chunked; the server may answer before it
    has it all (then it discards the rest). Returns the status and the JSON of the response."""
    sock = socket.create_connection((live.host, live.port), timeout=60)
    lines = [f"POST {path} HTTP/1.1", f"Host: {live.host}:{live.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        view, step = memoryview(body), 1024 * 1024
        for start in range(0, len(body), step):
            part = view[start : start + step]
            if chunked:
                sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            else:
                sock.sendall(part)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the end: the answer is still there to read
    data = b""
    try:
        while chunk := sock.recv(1024 * 1024):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _unchunk(payload)
    return int(head.split()[1]), json.loads(payload)


def _unchunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


#: Polls /healthz every 20 ms until its stop file appears, then prints the latencies (or errors).
_PROBE = """
import http.client, json, os, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
connection, results = http.client.HTTPConnection(host, port, timeout=30), []
while not os.path.exists(stop):
    started = time.perf_counter()
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        results.append(time.perf_counter() - started if response.status == 200 else str(response.status))
    except (OSError, http.client.HTTPException) as exc:
        results.append(repr(exc))
        connection.close()
        connection = http.client.HTTPConnection(host, port, timeout=30)
    time.sleep(0.02)
print(json.dumps(results))
"""


class HealthProbe:
    """/healthz polled from a process of its own, so the test's own threads (sending bodies,
    reading answers) cannot delay it: what it measures is the server."""

    def __init__(self, live: Live, folder: Path):
        self.live, self.stop_file = live, folder / "stop-probe"
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def __enter__(self) -> HealthProbe:
        self.stop_file.unlink(missing_ok=True)
        command = [sys.executable, "-c", _PROBE, self.live.host, str(self.live.port), str(self.stop_file)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE)
        time.sleep(0.3)  # polling before the load starts
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_file.touch()
        output, _ = self._process.communicate(timeout=60)
        for result in json.loads(output):
            (self.latencies if isinstance(result, float) else self.failures).append(result)


def _concurrently(calls: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as exc:  # reported by the caller's assertion
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


# ---------------------------------------------------------------- the tests


def test_slow_clients_hold_no_inference_slot(live: Live) -> None:
    """64 clients that send headers and ten bytes (the in-flight limit is 64) do not stop one that
    sends whole requests from the same address, nor slow it down; they get 408 after the timeout."""
    _timed_requests(live, 50)  # warm: the engine loaded, the name cached
    paths = [f"/v2/models/{live.engine_id}/infer", f"/v1/engines/{live.engine_id}/infer"]
    unloaded, loaded = [], []
    for _ in range(3):  # interleaved rounds: drift on a shared machine hits both sides alike
        unloaded += _timed_requests(live, 100)
        slow = [_open_slow_client(live, paths[index % 4 == 3]) for index in range(64)]
        try:
            time.sleep(0.2)  # every one of them is in the server, reading its body
            loaded += _timed_requests(live, 100)
        finally:
            for sock in slow:
                sock.close()
    unloaded_p99, loaded_p99 = np.percentile(unloaded, 99), np.percentile(loaded, 99)
    print(f"\n/v2 p99 unloaded {unloaded_p99 * 1e3:.2f} ms, with 64 slow clients {loaded_p99 * 1e3:.2f} ms")
    # the target is 2× p99; a few ms of slack for a CI machine whose p99 is a millisecond or two
    assert loaded_p99 <= max(2 * unloaded_p99, unloaded_p99 + 0.005)

    slow = [_open_slow_client(live, path) for path in paths]
    slow.append(_open_slow_client(live, paths[0], f"{tensors.HEADER_LENGTH}: 5\r\n"))
    opened = time.monotonic()
    for sock in slow:
        status, body = _read_response(sock, timeout=BODY_READ_TIMEOUT_S + 10)
        assert status == 408 and body["code"] == "body_timeout", body
        sock.close()
    waited = time.monotonic() - opened
    assert BODY_READ_TIMEOUT_S - 0.5 <= waited <= BODY_READ_TIMEOUT_S + 5


def test_bodies_over_the_json_cap_are_refused_and_healthz_keeps_answering(live: Live, tmp_path: Path) -> None:
    """Five 60 MB JSON bodies at once: /v1 and /v2, with Content-Length and chunked, and /v2 with a
    header length as long as the body. All refused with 413 while /healthz answers within 0.5 s;
    the server's peak memory stays far from what parsing them would take (GBs)."""
    head = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ['
    body = head + b"0.5," * (BIG // 4) + b"0]}]}"
    v1, v2 = f"/v1/engines/{live.engine_id}/infer", f"/v2/models/{live.engine_id}/infer"
    json_type = {"Content-Type": "application/json"}
    cases = {
        "v1 with length": (v1, json_type, False),
        "v1 chunked": (v1, json_type, True),
        "v2 with length": (v2, json_type, False),
        "v2 chunked": (v2, json_type, True),
        "v2 header length = body": (v2, {tensors.HEADER_LENGTH: str(len(body))}, False),
    }
    with HealthProbe(live, tmp_path) as probe:
        results = _concurrently(
            [lambda case=case: _post_raw(live, case[0], body, case[1], case[2]) for case in cases.values()]
        )
    for name, result in zip(cases, results, strict=True):
        assert not isinstance(result, Exception), (name, result)
        status, answer = result
        assert status == 413 and answer["code"] == "json_tensors_too_large", (name, answer)
        assert "binary" in answer.get("error", answer.get("detail")), (name, answer)
    assert probe.failures == [] and probe.latencies
    print(
        f"\n/healthz worst {max(probe.latencies) * 1e3:.1f} ms; peak RSS {live.peak_rss_bytes() / 1e6:.0f} MB"
    )
    assert max(probe.latencies) < 0.5
    assert live.peak_rss_bytes() < 1.5e9


def test_json_under_the_cap_is_parsed_and_written_off_the_event_loop(live: Live, tmp_path: Path) -> None:
    """Four JSON bodies just under the cap (/v1 and /v2) are served while /healthz answers within
    0.5 s: their parsing and the JSON of their outputs happen on worker threads, in turn. (Each
    parse still holds the GIL for about 0.1 s; parsed on the event loop, as /v1's framework parse
    was, /healthz waited about 1.4 s here.) The answers are read after the probe stops, so the
    test's own JSON parsing does not take the CPU from the server meanwhile."""
    rows = int(JSON_CAP * 0.8) // (FEATURES * 20)  # a float32 as JSON: about 19 characters and a comma
    x = np.random.default_rng(1).standard_normal((rows, FEATURES)).astype(np.float32)
    v2_body, _ = tensors.encode({}, "inputs", {"x": x}, binary=False)
    v1_body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    assert JSON_CAP // 2 < len(v2_body) < JSON_CAP and JSON_CAP // 2 < len(v1_body) < JSON_CAP
    v1_path, v2_path = f"/v1/engines/{live.engine_id}/infer", f"/v2/models/{live.engine_id}/infer"

    def post(path: str, body: bytes) -> httpx.Response:
        with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=120) as client:
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            response.read()
            return response

    with HealthProbe(live, tmp_path) as probe:
        v1_a, v2_a, v1_b, v2_b = _concurrently(
            [lambda: post(v1_path, v1_body), lambda: post(v2_path, v2_body)] * 2
        )
    for response in (v1_a, v2_a, v1_b, v2_b):
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert len(v1_a.json()["outputs"]["y"]) == len(v1_b.json()["outputs"]["y"]) == rows
    assert v2_a.json()["outputs"][0]["shape"] == v2_b.json()["outputs"][0]["shape"] == [rows, CLASSES]
    assert probe.failures == []
    worst = max(probe.latencies)
    print(f"\n/healthz worst {worst * 1e3:.1f} ms while 4 × {len(v2_body) / 1e6:.1f} MB parsed")
    assert worst < 0.5
    assert live.peak_rss_bytes() < 1.5e9


def test_bodies_beyond_the_budget_get_503_with_retry_after(live: Live) -> None:
    """A server whose body budget is smaller than a request: refused with 503 and Retry-After, from
    Content-Length before reading and from the bytes as they arrive without one; smaller ones served."""
    settings = live.settings.model_copy(update={"max_buffered_body_bytes": 256 * 1024})
    with TestClient(create_app(settings)) as client:
        url = f"/v2/models/{live.engine_id}/infer"
        big, headers = _binary_request(rows=2000)  # 512 KB of tensors
        refused = client.post(url, content=big, headers=headers)
        assert refused.status_code == 503 and refused.json()["code"] == "server_busy"
        assert refused.headers["retry-after"] == "1"
        streamed = client.post(url, content=iter([big[:200_000], big[200_000:]]), headers=headers)
        assert streamed.status_code == 503 and streamed.headers["retry-after"] == "1"
        small, headers = _binary_request(rows=100)
        assert client.post(url, content=small, headers=headers).status_code == 200
        assert client.app.state.serving.bodies.held == 0  # everything given back


def test_the_json_gate_bounds_what_converts_at_once_and_survives_cancellation() -> None:
    async def scenario() -> None:
        gate, running, peak = JsonGate(10), [0], [0]

        async def convert(weight: int) -> None:
            async with gate.turn(weight):
                running[0] += min(weight, gate.capacity)  # more than the capacity weighs the capacity
                peak[0] = max(peak[0], running[0])
                await asyncio.sleep(0.01)
                running[0] -= min(weight, gate.capacity)

        await asyncio.gather(*(convert(weight) for weight in (6, 6, 4, 3, 50, 1)))
        assert peak[0] == 10  # never more at once; 50 runs alone
        blocker = asyncio.create_task(convert(10))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(convert(5))
        await asyncio.sleep(0)
        waiting.cancel()  # a client gone while it waits gives its place back
        await blocker
        await asyncio.wait_for(convert(10), timeout=1)

    asyncio.run(scenario())


def test_v1_reads_its_own_body_and_answers_as_the_framework_did(live: Live) -> None:
    """/v1 inference parses its raw body itself (off the event loop) with the same answers and the
    same OpenAPI document as when the framework parsed it into an `InferRequest`."""
    with TestClient(create_app(live.settings)) as client:
        url = f"/v1/engines/{live.engine_id}/infer"
        not_json = client.post(url, content=b'{"inputs": ', headers={"content-type": "application/json"})
        assert not_json.status_code == 422 and not_json.json()["code"] == "validation_error"
        assert not_json.json()["errors"][0]["type"] == "json_invalid"
        missing = client.post(url, json={})
        assert missing.status_code == 422 and missing.json()["errors"][0]["loc"] == ["body", "inputs"]
        assert client.post(url, content=b"").status_code == 422
        ragged = client.post(url, json={"inputs": {"x": [[1.0] * FEATURES, [1.0]]}})
        assert ragged.status_code == 422 and ragged.json()["code"] == "invalid_input"
        unknown = client.post("/v1/engines/eng_nope/infer", json={"inputs": {"x": [[0.0] * FEATURES]}})
        assert unknown.status_code == 404 and unknown.json()["code"] == "engine_not_found"
        ok = client.post(url, json={"inputs": {"x": [[0.5] * FEATURES] * 3}})
        assert ok.status_code == 200 and len(ok.json()["outputs"]["y"]) == 3 and ok.json()["batch_size"] == 3

        operation = client.app.openapi()["paths"]["/v1/engines/{engine_id}/infer"]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["title"] == "InferRequest" and schema["required"] == ["inputs"]
        ok_schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok_schema == {"$ref": "#/components/schemas/InferResponse"}
