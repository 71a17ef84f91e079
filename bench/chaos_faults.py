"""The chaos benchmark's storage, connection and memory faults (bench/chaos.py runs them):

6. database outage: the API's connections to PostgreSQL go through a TCP proxy (bench.tcp_proxy)
   that is cut for 10 s under load from four clients (listings, a job, /v2 on a loaded engine),
   then restored. Targets: no 500, every refusal a 503 with `Retry-After`, everything answering
   again within 5 s of the restore; /v2 on the already loaded engine is reported apart.
7. disk full: a second server on the embedded defaults (SQLite, local artifacts) whose data
   directory is a 64 MB tmpfs, filled to the last byte. Targets: an upload, a new job, an alias
   and a Triton export answer 507 `insufficient_storage` (never 500), deleting a dataset works and
   frees space, /readyz says not ready while the disk is full and ready once space is back.
8. slow connections: the API's descriptor limit lowered to 1 024, then 3 000 connections that
   send half a request line and nothing else, while /healthz is polled every 20 ms (target: every
   probe answered within 100 ms); then four multipart uploads that send their headers and go
   silent, and a real upload behind them (target: accepted once the silent ones are cut).
9. big batches: six concurrent 58.6 MiB binary /v2 requests (batch 15 000 of the digits CNN),
   twice. Targets: API peak RSS below 1.5 GB, each answered with a refusal (413 `batch_too_large`
   naming the limit, or 503 `server_busy` when the bodies pass the buffered-body budget), the API
   alive, its RSS back within 300 MB of where it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from optiforge_client.tensors import HEADER_LENGTH

from bench.chaos import (
    MB,
    MIB,
    REPO_ROOT,
    Assets,
    HealthProbe,
    PeakRss,
    Scenario,
    Stack,
    _host_port,
    open_request,
    post_raw,
)
from bench.processes import free_port, status_kib, stop, tree_rss_mb


def _answer(response: httpx.Response) -> str:
    code = ""
    with contextlib.suppress(ValueError):
        body = response.json()
        code = body.get("code", "") if isinstance(body, dict) else ""
    return f"{response.status_code} {code}".strip()


# ---------------------------------------------------------------- 6. database outage


def _load_loop(
    stack: Stack, assets: Assets, stop_at: float, phase: list[str], tally: dict[str, Counter], retry: list
) -> None:
    """One client: listings, a job and a tiny /v2 inference in turn, each answer tallied under the
    phase it was sent in (`phase[0]`)."""
    x = [0.0] * (32 * 32)
    v2 = {"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": x}]}
    calls = [
        ("GET /v1/models", lambda c: c.get("/v1/models")),
        ("GET /v1/engines/{id}", lambda c: c.get(f"/v1/engines/{assets.engine_id}")),
        ("GET /v1/datasets", lambda c: c.get("/v1/datasets")),
        ("POST /v2 infer", lambda c: c.post(f"/v2/models/{assets.engine_id}/infer", json=v2)),
    ]
    with stack.http(timeout=30) as client:
        index = 0
        while time.monotonic() < stop_at:
            label, call = calls[index % len(calls)]
            index += 1
            sent_in = phase[0]
            try:
                response = call(client)
                answer = _answer(response)
                if response.status_code == 503 and response.headers.get("retry-after") is None:
                    retry.append(f"{label}: 503 without Retry-After")
            except httpx.HTTPError as exc:
                answer = type(exc).__name__
            tally.setdefault(f"{sent_in} | {label}", Counter())[answer] += 1
            time.sleep(0.02)


def scenario_db_outage(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    if stack.db_proxy is None:
        raise RuntimeError("the stack was started without its database proxy")
    outage_s = 4.0 if args.quick else 10.0
    with stack.http() as client:  # the engine loaded and the keys cached, as under steady load
        for _ in range(3):
            client.post(
                f"/v2/models/{assets.engine_id}/infer",
                json={
                    "inputs": [
                        {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}
                    ]
                },
            )
    phase, tally, retry = ["before"], {}, []
    stop_at = time.monotonic() + 3 + outage_s + 8
    threads = [
        threading.Thread(target=_load_loop, args=(stack, assets, stop_at, phase, tally, retry))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    time.sleep(3)
    phase[0] = "outage"
    stack.db_proxy.cut()
    time.sleep(outage_s)
    stack.db_proxy.restore()
    restored = time.monotonic()
    phase[0] = "after"
    recovered_after = None
    with stack.http(timeout=10) as client:
        while time.monotonic() - restored < 30:
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/v1/models").status_code == 200:
                    recovered_after = time.monotonic() - restored
                    break
            time.sleep(0.1)
    for thread in threads:
        thread.join()
    answers = Counter()
    for counter in tally.values():
        answers.update(counter)
    server_errors = {a: n for a, n in answers.items() if a.startswith("5") and not a.startswith("503")}
    out.check(
        "500s (any 5xx but 503)",
        "0",
        str(sum(server_errors.values())) + (f" ({server_errors})" if server_errors else ""),
        not server_errors,
    )
    out.check("503s without Retry-After", "0", str(len(retry)), not retry)
    out.check(
        "first /v1/models 200 after the restore",
        "< 5 s",
        f"{recovered_after:.2f} s" if recovered_after is not None else "not within 30 s",
        recovered_after is not None and recovered_after < 5,
    )
    during_v2 = tally.get("outage | POST /v2 infer", Counter())
    out.check(
        "/v2 on the loaded engine during the outage",
        "—",
        ", ".join(f"{n}× {a}" for a, n in during_v2.items()) or "none sent",
        None,
    )
    for key in sorted(tally):
        if key.startswith("outage") and not key.endswith("/v2 infer"):
            out.check(key, "503", ", ".join(f"{n}× {a}" for a, n in tally[key].items()), None)
    out.details.update({"answers": {k: dict(v) for k, v in tally.items()}, "outage_s": outage_s})
    if not server_errors and recovered_after is not None:
        out.survived.append(f"every request answered through a {outage_s:.0f} s database outage")


# ---------------------------------------------------------------- 7. disk full


@contextlib.contextmanager
def small_filesystem(megabytes: int) -> Any:
    """A tmpfs of `megabytes` (root only); unmounted at the end."""
    mountpoint = Path(tempfile.mkdtemp(prefix="optiforge-chaos-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        mountpoint.rmdir()
        raise RuntimeError(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; the bytes written."""
    written = 0
    block = b"\0" * MIB
    with path.open("wb", buffering=0) as handle:
        while True:
            try:
                written += handle.write(block)
            except OSError:
                break
        with contextlib.suppress(OSError):
            while handle.write(b"\0" * 4096):
                written += 4096
    return written


def _embedded_server(data_dir: Path, stack: Stack, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIFORGE_", "REDIS_URL"))}
    # Ready while a few MB are free (the default asks 256 MB), so the test can fill it.
    env.update(
        {"OPTIFORGE_DATA_DIR": str(data_dir), "OPTIFORGE_MIN_FREE_DISK_MB": "16", "PYTHONUNBUFFERED": "1"}
    )
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--loglevel", "WARNING"],
        env=env,
        cwd=REPO_ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the embedded server exited:\n" + log.read_text()[-2000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        time.sleep(0.3)
    stop(process, timeout=20)  # never left running (with its worker) past the scenario
    raise RuntimeError("the embedded server did not become ready:\n" + log.read_text()[-2000:])


def scenario_disk_full(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    with small_filesystem(64) as mountpoint:
        process, url = _embedded_server(mountpoint / "data", stack, stack.logs / "disk-full-api.log")
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                model = client.post(
                    "/v1/models", files={"file": ("digits.onnx", assets.digits_onnx.read_bytes())}
                ).json()
                dataset = client.post(
                    "/v1/datasets", files={"file": ("calib.npz", assets.calib_npz.read_bytes())}
                ).json()
                job = client.post(
                    "/v1/jobs",
                    json={
                        "model_id": model["id"],
                        "recipe": {
                            "batch_sizes": [1],
                            "measure": {"warmup_runs": 1, "timed_runs": 3, "min_seconds": 0},
                        },
                    },
                ).json()
                engine_id = None
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    state = client.get(f"/v1/jobs/{job['id']}").json()
                    if state["status"] in ("succeeded", "failed", "cancelled"):
                        engine_id = (state.get("engine_ids") or [None])[0]
                        break
                    time.sleep(0.5)
                ballast = mountpoint / "ballast"
                filled = fill(ballast)
                answers: dict[str, str] = {}
                answers["upload a dataset"] = _answer(
                    client.post("/v1/datasets", files={"file": ("eval.npz", assets.eval_npz.read_bytes())})
                )
                answers["create a job"] = _answer(
                    client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"batch_sizes": [1]}})
                )
                if engine_id:
                    answers["set an alias"] = _answer(
                        client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "full"})
                    )
                    answers["export to Triton"] = _answer(client.get(f"/v1/engines/{engine_id}/triton"))
                answers["/readyz while full"] = _answer(client.get("/readyz"))
                answers["/healthz while full"] = _answer(client.get("/healthz"))
                answers["delete a dataset while full"] = _answer(
                    client.delete(f"/v1/datasets/{dataset['id']}")
                )
                ballast.unlink()
                ready_after = None
                started = time.monotonic()
                while time.monotonic() - started < 30:
                    if client.get("/readyz").status_code == 200:
                        ready_after = time.monotonic() - started
                        break
                    time.sleep(0.2)
                answers["upload once space is back"] = _answer(
                    client.post("/v1/datasets", files={"file": ("eval.npz", assets.eval_npz.read_bytes())})
                )
        finally:
            stop(process, timeout=20)
    fivehundreds = [k for k, a in answers.items() if a.startswith("500")]
    for name, answer in answers.items():
        expected = {
            "/readyz while full": "503",
            "/healthz while full": "200",
            "delete a dataset while full": "204",
            "upload once space is back": "201",
        }.get(name, "507 insufficient_storage")
        out.check(name, expected, answer, answer.startswith(expected.split()[0]))
    out.check(
        "500 answers",
        "0",
        str(len(fivehundreds)) + (f" ({', '.join(fivehundreds)})" if fivehundreds else ""),
        not fivehundreds,
    )
    out.check(
        "/readyz ready again after freeing space",
        "< 30 s",
        "no" if ready_after is None else f"{ready_after:.1f} s",
        ready_after is not None,
    )
    out.details.update({"answers": answers, "ballast_bytes": filled})
    if not fivehundreds:
        out.survived.append("every request on a full disk answered with a code, none with 500")


# ---------------------------------------------------------------- 8. slow connections


def _raise_own_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def scenario_slow_connections(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    count = 1_200 if args.quick else 3_000
    _raise_own_fd_limit(count + 512)
    assert stack.api is not None
    stop(stack.api, timeout=20)  # started again under the limit the hostile review ran it with
    stack.api_descriptor_limit = 1024
    try:
        _flood(stack, assets, count, out)
    finally:
        stop(stack.api, timeout=20)
        stack.api_descriptor_limit = None
        stack.start_api()


def _flood(stack: Stack, assets: Assets, count: int, out: Scenario) -> None:
    stack.start_api()
    host, port = _host_port(stack.url)
    held: list[socket.socket] = []
    refused = 0
    with HealthProbe(stack) as probe:
        time.sleep(0.5)
        for _ in range(count):
            try:
                sock = socket.create_connection((host, port), timeout=5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: loc")  # and nothing more
                held.append(sock)
            except OSError:
                refused += 1
        time.sleep(3.0)
    closed = 0
    for sock in held:
        sock.setblocking(False)
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    worst = max(probe.latencies) if probe.latencies else float("inf")
    out.check(
        f"/healthz while {count} partial-header connections are opened (descriptor limit 1 024)",
        "every probe < 100 ms",
        f"max {worst:.1f} ms over {len(probe.latencies)} probes, {sum(probe.errors.values())} failed",
        worst < 100 and not probe.errors,
    )
    out.check(
        "partial-header connections closed by the server after 3 s",
        "—",
        f"{closed} of {len(held)} ({refused} refused)",
        None,
    )
    # Silent uploads: headers and a multipart preamble, then nothing.
    silent = []
    for _ in range(4):
        sock = open_request(
            stack.url,
            "POST",
            "/v1/datasets",
            {
                **stack.headers,
                "Content-Type": "multipart/form-data; boundary=xyz",
                "Content-Length": str(10 * MB),
            },
        )
        sock.sendall(b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n')
        silent.append(sock)
    time.sleep(1.0)  # their headers read: each holds an upload slot now
    started = time.monotonic()
    accepted_after, last, first = None, "", None
    with stack.http(timeout=30) as client:
        while time.monotonic() - started < 120:
            response = client.post("/v1/datasets", files={"file": ("eval.npz", assets.eval_npz.read_bytes())})
            last = _answer(response)
            first = first or last
            if response.status_code == 201:
                accepted_after = time.monotonic() - started
                client.delete(f"/v1/datasets/{response.json()['id']}")
                break
            time.sleep(1)
    for sock in silent:
        sock.close()
    out.check(
        "an upload behind 4 silent uploads (every slot taken)",
        "refused at once, accepted once they are cut",
        f"first {first}; 201 after {accepted_after:.1f} s"
        if accepted_after is not None
        else f"first {first}; not within 120 s (last: {last})",
        accepted_after is not None and first is not None and first.startswith("503"),
    )
    out.details.update(
        {
            "connections": count,
            "healthz_max_ms": worst,
            "healthz_probes": len(probe.latencies),
            "healthz_errors": dict(probe.errors),
            "closed_by_server": closed,
            "upload_accepted_after_s": accepted_after,
        }
    )
    if worst < 100 and not probe.errors:
        out.survived.append("/healthz, for everyone, through a slow-connection flood")


# ---------------------------------------------------------------- 9. big batches


def big_batch_body(batch: int) -> tuple[bytes, dict[str, str]]:
    x = np.zeros((batch, 1, 32, 32), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    return header + x.tobytes(), {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def scenario_big_batch(
    stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario, peak: PeakRss
) -> None:
    assert stack.api is not None
    batch = 15_000
    body, headers = big_batch_body(batch)
    path = f"/v2/models/{assets.engine_id}/infer"
    rss_before = tree_rss_mb(stack.api.pid)
    rounds = 1 if args.quick else 2
    results: list[dict[str, Any]] = []
    for _ in range(rounds):
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    post_raw(stack.url, path, body, {**stack.headers, **headers}, False)
                )
            )
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(1.0)
    alive = stack.api.poll() is None
    time.sleep(2.0)
    rss_after = tree_rss_mb(stack.api.pid) if alive else 0.0
    peak_now = max(peak.peak, status_kib(stack.api.pid, "VmHWM") * 1024 / MB if alive else 0.0)
    answers = Counter(f"{r.get('status')} {r.get('code') or ''}".strip() for r in results)
    out.check(
        f"API peak RSS, 6 × {len(body) / MIB:.1f} MiB binary requests (batch {batch:,})",
        "< 1500 MB",
        f"{peak_now:.0f} MB (before {rss_before:.0f} MB)",
        peak_now < 1500,
    )
    out.check(
        "API RSS after", "< before + 300 MB", f"{rss_after:.0f} MB", alive and rss_after < rss_before + 300
    )
    out.check(
        "answers",
        "each answered: 413 over the batch limit, or 503 server_busy over the body budget",
        ", ".join(f"{n}× {a}" for a, n in answers.items()),
        all(a in ("413 batch_too_large", "503 server_busy") for a in answers),
    )
    out.check("the API process alive afterwards", "yes", "yes" if alive else "no", alive, loss=True)
    out.details.update({"requests": results, "rss_before_mb": rss_before, "rss_after_mb": rss_after})
    (out.survived if alive else out.lost).append("the API process")
