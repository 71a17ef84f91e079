"""Fault-injection benchmark: the real service, killed and abused on purpose; what survived, what
was lost (must be nothing) and the API's peak memory.

    make bench-chaos                 # or: .venv/bin/python -m bench.chaos [--quick] [--out FILE]

It starts the deployed shape as separate processes: its own `redis-server` (on a free port, no
persistence), a fresh PostgreSQL database (created on the local server, dropped at the end), a
temporary data directory, `optiforge serve --no-worker` and `optiforge worker`. Each service
process gets a temp folder of its own (TMPDIR), so what a killed process leaves there is counted
without anything else's files. Then, with a digits CNN trained on the spot:
1. worker kill: SIGKILL a worker (the whole process group) in the middle of an INT8 job, start a
   new one (twice: while it prepares the INT8 model, then while its second attempt measures;
   once with --quick): the job finishes once the lease expires, and no scratch is left;
2. broker restart: a worker busy on one job, 10 jobs queued behind it, Redis killed and started
   again empty: every job finishes (the sweeper sends lost messages again);
3. API kill mid-upload: a big model sent over a raw socket, the API SIGKILLed while receiving the
   body, while storing the upload, while validating it; each time the API is started again and no
   upload file may be left in the data dir or the API's temp folder;
4. slow clients: 64 connections send headers and 10 bytes of a /v2 inference, then nothing, while
   a well-behaved client measures its /v2 p99 (target: within 2× of its unloaded p99);
5. big JSON bodies: 4 concurrent 60 MB JSON bodies to /v1 and /v2 infer (two without
   Content-Length, /v2 with `Inference-Header-Content-Length` = the body length), three times
   (once with --quick), while /healthz is polled every 20 ms from a process of its own
   (targets: API peak RSS < 1.5 GB, /healthz within 100 ms throughout);
6-9. database outage, disk full, slow connections and big batches: bench/chaos_faults.py says
   what each does and its targets. The API reaches PostgreSQL through a TCP proxy of this
   benchmark's (bench.tcp_proxy), so an outage can be made without stopping the server.

Every request carries `Authorization: Bearer <key>` when OPTIFORGE_API_KEY or --api-key is set
(ensure_api_key). Prints a table per scenario and the machine; writes the results as JSON
(--out, default bench/results/chaos.json). Exit status: 1 when anything was lost or orphaned (or
a scenario could not run), 2 with --strict when a performance target was missed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from optiforge_client.tensors import HEADER_LENGTH, encode

from bench.processes import (
    free_port,
    kill_group,
    reset_peak_rss,
    start_redis,
    status_kib,
    stop,
    tree_rss_mb,
)
from bench.serve import RawHttp, export_model
from bench.tcp_proxy import TcpProxy
from engines.hardware import cpu_info

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
POSTGRES_URL = os.environ.get(
    "OPTIFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SCENARIOS = (
    "worker-kill",
    "broker-restart",
    "api-kill-upload",
    "slow-clients",
    "big-json",
    "db-outage",
    "disk-full",
    "slow-connections",
    "big-batch",
)
JOB_LEASE_S = 4
QUEUE_REPUBLISH_S = 3
MB = 1_000_000
MIB = 1024 * 1024
#: A measurement that only proves the path works.
TINY_MEASURE = {"warmup_runs": 1, "timed_runs": 3, "min_seconds": 0}


# ---------------------------------------------------------------- API keys


def ensure_api_key(env: dict[str, str]) -> str | None:
    """THE one place where this benchmark gets its API key; every request sends it as
    `Authorization: Bearer <key>` when there is one.

    For now: the key from OPTIFORGE_API_KEY (or --api-key, which main() puts there), else None;
    a server with no key yet serves loopback clients without one. When the server refuses
    requests without a key, complete this function: the database is a fresh one (`env` holds its
    OPTIFORGE_DATABASE_URL, already migrated), so create the key there through the server's CLI,
    e.g. `subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", ...], env=env, ...)`,
    and return the key it prints (scopes: everything the scenarios do: write, read, infer); or,
    if the server makes a key it is given at start-up, put it in `env` for the services here (the
    API and workers are started with `env` after this call).
    """
    return env.get("OPTIFORGE_API_KEY") or None


# ---------------------------------------------------------------- results


@dataclass
class Check:
    name: str
    target: str
    measured: str
    ok: bool | None  # None: information, not judged
    #: True: failing it means something was lost or orphaned (exit status 1); False: a
    #: performance target (reported; exit status 2 with --strict).
    loss: bool = False

    @property
    def verdict(self) -> str:
        return "—" if self.ok is None else ("pass" if self.ok else ("**LOST**" if self.loss else "**FAIL**"))


@dataclass
class Scenario:
    key: str
    title: str
    checks: list[Check] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    api_peak_rss_mb: float | None = None
    seconds: float = 0.0
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, target: str, measured: str, ok: bool | None, loss: bool = False) -> bool:
        self.checks.append(Check(name, target, measured, ok, loss))
        return bool(ok)

    @property
    def lost_something(self) -> bool:
        return self.error is not None or bool(self.lost) or any(c.loss and c.ok is False for c in self.checks)

    @property
    def missed_target(self) -> bool:
        return any(not c.loss and c.ok is False for c in self.checks)


# ---------------------------------------------------------------- the stack


def _limit_descriptors(limit: int) -> None:
    """In a child before it runs the API: soft and hard descriptor limits of `limit` (an
    unprivileged server's `ulimit -n`), which the server cannot raise."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class Stack:
    """Redis, a PostgreSQL database, a data dir, the API and workers: separate processes, each
    with its own log under <root>/logs and its own TMPDIR under <root>/tmp-*."""

    def __init__(self, root: Path, args: argparse.Namespace):
        from sqlalchemy.engine import make_url

        self.root, self.args = root, args
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.tmp = {"api": root / "tmp-api", "worker": root / "tmp-worker"}
        for path in (self.data_dir, self.logs, *self.tmp.values()):
            path.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.admin_url = make_url(args.postgres_url)
        self.db_name = f"optiforge_chaos_{secrets.token_hex(4)}"
        self.db_url = self.admin_url.set(database=self.db_name).render_as_string(hide_password=False)
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        #: The API's descriptor limit (soft and hard), when a scenario starts it under one.
        self.api_descriptor_limit: int | None = None
        #: The API reaches PostgreSQL through this proxy, which the database-outage scenario cuts.
        self.db_proxy: TcpProxy | None = None
        self.key: str | None = None
        self._started: Counter[str] = Counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIFORGE_", "REDIS_URL"))}
        env.update(
            {
                "OPTIFORGE_DATA_DIR": str(self.data_dir),
                "OPTIFORGE_DATABASE_URL": self.db_url,
                "OPTIFORGE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "OPTIFORGE_JOB_LEASE_S": str(JOB_LEASE_S),
                "OPTIFORGE_JOB_SWEEP_INTERVAL_S": "1",
                "OPTIFORGE_QUEUE_REPUBLISH_S": str(QUEUE_REPUBLISH_S),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if args.quick:  # silent uploads are cut after one rate window: 5 s instead of 30 in a smoke run
            env["OPTIFORGE_BODY_RATE_WINDOW_S"] = "5"
        if args.api_key or os.environ.get("OPTIFORGE_API_KEY"):
            env["OPTIFORGE_API_KEY"] = args.api_key or os.environ["OPTIFORGE_API_KEY"]
        self.env = env

    # -- set-up and tear-down

    def _admin_conninfo(self) -> str:
        return self.admin_url.set(drivername="postgresql").render_as_string(hide_password=False)

    def start(self) -> None:
        import psycopg

        self.redis = start_redis(self.redis_port, self.root, self.args.redis_server)
        with psycopg.connect(self._admin_conninfo(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.db_name}"')
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            env=self.env,
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        self.key = ensure_api_key(self.env)
        self.db_proxy = TcpProxy((self.admin_url.host or "127.0.0.1", self.admin_url.port or 5432))
        self.db_proxy.start()
        self.start_api()
        self.start_worker()
        self.wait_for_live_worker()

    def close(self) -> None:
        import psycopg

        for process in [*self.workers, self.api]:
            if process is not None:
                stop(process, timeout=20)
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
        if self.db_proxy is not None:
            self.db_proxy.close()
        with contextlib.suppress(Exception), psycopg.connect(self._admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # -- processes

    def _spawn(self, role: str, argv: list[str]) -> subprocess.Popen:
        from sqlalchemy.engine import make_url

        self._started[role] += 1
        log = self.logs / f"{role}-{self._started[role]}.log"
        env = {**self.env, "TMPDIR": str(self.tmp[role])}
        if role == "api" and self.db_proxy is not None:
            proxied = make_url(self.db_url).set(host="127.0.0.1", port=self.db_proxy.port)
            env["OPTIFORGE_DATABASE_URL"] = proxied.render_as_string(hide_password=False)
        limit = self.api_descriptor_limit if role == "api" else None
        with log.open("wb") as handle:
            return subprocess.Popen(
                [sys.executable, "-m", "app.cli", *argv],
                env=env,
                cwd=REPO_ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole, pool children included
                preexec_fn=None if limit is None else lambda: _limit_descriptors(limit),
            )

    def log_tail(self, role: str, chars: int = 3000) -> str:
        logs = sorted(self.logs.glob(f"{role}-*.log"), key=lambda path: path.stat().st_mtime)
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""

    def start_api(self, timeout: float = 90) -> float:
        """Start the API and wait until /readyz says ready; returns the seconds that took."""
        started = time.monotonic()
        argv = ["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(self.api_port)]
        self.api = self._spawn("api", [*argv, "--loglevel", "WARNING"])
        while time.monotonic() - started < timeout:
            if self.api.poll() is not None:
                raise RuntimeError("the API exited at start:\n" + self.log_tail("api"))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", headers=self.headers, timeout=2).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError("the API did not become ready:\n" + self.log_tail("api"))

    def kill_api(self) -> None:
        assert self.api is not None
        kill_group(self.api, signal.SIGKILL)

    def start_worker(self) -> subprocess.Popen:
        worker = self._spawn("worker", ["worker", "--queues", "cpu", "--loglevel", "WARNING"])
        self.workers.append(worker)
        return worker

    def wait_for_live_worker(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        with self.http() as client:
            while time.monotonic() < deadline:
                if all(worker.poll() is not None for worker in self.workers):
                    raise RuntimeError("the worker exited at start:\n" + self.log_tail("worker"))
                if client.get("/v1/capabilities").json().get("workers", {}).get("cpu"):
                    return
                time.sleep(0.3)
        raise RuntimeError("no worker became live:\n" + self.log_tail("worker"))

    def running_worker(self) -> subprocess.Popen:
        return next(worker for worker in self.workers if worker.poll() is None)

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait()

    def restart_redis(self) -> None:
        self.redis = start_redis(self.redis_port, self.root, self.args.redis_server)

    # -- talking to it

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def http(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def db_ids(self, table: str) -> set[str]:
        """Row ids straight from the database (works while the API is down)."""
        import psycopg

        url = self.admin_url.set(drivername="postgresql", database=self.db_name)
        with psycopg.connect(url.render_as_string(hide_password=False)) as connection:
            return {row[0] for row in connection.execute(f"SELECT id FROM {table}")}


def upload(client: httpx.Client, kind: str, path: Path, name: str | None = None) -> dict:
    with path.open("rb") as handle:
        response = client.post(
            f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": name} if name else None
        )
    if response.status_code != 201:
        raise RuntimeError(f"upload of {path.name} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def create_job(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}")
    return response.json()


def wait_jobs(client: httpx.Client, job_ids: list[str], timeout: float) -> dict[str, dict]:
    """The jobs as they are when all have finished, or when `timeout` has passed."""
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    pending = list(job_ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            with contextlib.suppress(httpx.HTTPError):
                jobs[job_id] = client.get(f"/v1/jobs/{job_id}").json()
                if jobs[job_id]["status"] in ("succeeded", "failed", "cancelled"):
                    pending.remove(job_id)
        time.sleep(0.3)
    return jobs


class PeakRss:
    """The API's resident memory (with its children) sampled every 20 ms, following restarts, and
    its VmHWM (reset at the start where the kernel allows): the peak of the two, in MB."""

    def __init__(self, stack: Stack):
        self.stack, self.peak, self._stop = stack, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self.stack.api is not None:
                self.peak = max(self.peak, tree_rss_mb(self.stack.api.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        if self.stack.api is not None:
            reset_peak_rss(self.stack.api.pid)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.stack.api is not None:
            self.peak = max(self.peak, status_kib(self.stack.api.pid, "VmHWM") * 1024 / MB)


def listing(root: Path, pattern: str = "*") -> list[str]:
    """Entries under `root` matching `pattern`, with their size on disk (what a leak costs)."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob(pattern)):
        size = 0
        for file in path.rglob("*") if path.is_dir() else [path]:
            with contextlib.suppress(OSError):  # removed while we looked
                size += file.stat().st_size if file.is_file() else 0
        found.append(f"{path.relative_to(root.parent)} ({size / MB:.1f} MB)")
    return found


#: Temp-folder entries that are no process's scratch: onnxruntime writes `.ses` (a session id,
#: one fixed name per temp folder; /tmp has one too) from every process that imports it, and
#: Python's multiprocessing (Celery's pool) makes an empty `pymp-*` folder per process. Listed
#: apart in the results, never counted as leftovers.
RUNTIME_TEMP_ENTRIES = (".ses", "pymp-*")


def temp_entries(folder: Path) -> tuple[list[str], list[str]]:
    """What is in a service's temp folder: (leftovers, runtime entries)."""
    entries = listing(folder)
    runtime = [
        e for e in entries if any(fnmatch(e.split("/")[-1].split(" ")[0], p) for p in RUNTIME_TEMP_ENTRIES)
    ]
    return [e for e in entries if e not in runtime], runtime


# ---------------------------------------------------------------- assets


@dataclass
class Assets:
    digits_onnx: Path
    calib_npz: Path
    eval_npz: Path
    big_onnx: Path
    model_id: str = ""
    calib_id: str = ""
    eval_id: str = ""
    engine_id: str = ""


def big_model(path: Path, megabytes: int) -> Path:
    """A valid ONNX model of about `megabytes` MB (one MatMul with a large weight): a realistic
    upload that takes the API a while to receive, store and validate."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = 1024
    cols = max(1, megabytes * MB // (4 * rows))
    weight = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def prepare_assets(workdir: Path, quick: bool) -> Assets:
    import torch

    from examples.digits import load_digits_split

    workdir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, two torch threads train 10× slower than one
    try:
        digits_onnx, _shape = export_model("digits", workdir)  # trains the CNN
    finally:
        torch.set_num_threads(threads)
    split = load_digits_split()
    calib, evaluation = workdir / "digits_calib.npz", workdir / "digits_eval.npz"
    np.savez(calib, input=split.train_x[:256])
    np.savez(evaluation, input=split.test_x, labels=split.test_y)
    big = big_model(workdir / "big.onnx", 40 if quick else 200)
    return Assets(digits_onnx, calib, evaluation, big)


# ---------------------------------------------------------------- raw HTTP (what abusive clients send)


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def open_request(
    url: str, method: str, path: str, headers: dict[str, str], timeout: float = 60
) -> socket.socket:
    """A connection with the request line and headers sent, the body not yet."""
    host, port = _host_port(url)
    sock = socket.create_connection((host, port), timeout=timeout)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return sock


def send_body(sock: socket.socket, body: bytes | memoryview, chunked: bool, chunk: int = MIB) -> int:
    """Send `body` (chunked transfer encoding or plain); returns the bytes sent. Raises OSError
    when the server closes the connection first."""
    view, sent = memoryview(body), 0
    while sent < len(view):
        part = view[sent : sent + chunk]
        if chunked:
            sock.sendall(b"%x\r\n" % len(part) + part.tobytes() + b"\r\n")
        else:
            sock.sendall(part)
        sent += len(part)
    if chunked:
        sock.sendall(b"0\r\n\r\n")
    return sent


def read_response(sock: socket.socket, timeout: float = 60) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def post_raw(url: str, path: str, body: bytes, headers: dict[str, str], chunked: bool) -> dict[str, Any]:
    """POST `body` over a raw socket, to the end even if the server answers early; what happened."""
    headers = {
        **headers,
        **({"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}),
    }
    started = time.perf_counter()
    result: dict[str, Any] = {"path": path, "bytes": len(body), "chunked": chunked}
    sock = open_request(url, "POST", path, headers, timeout=120)
    try:
        try:
            result["sent"] = send_body(sock, body, chunked)
        except OSError as exc:
            result["sent"] = None
            result["send_error"] = type(exc).__name__
        try:
            status, content = read_response(sock, timeout=120)
            result["status"] = status
            with contextlib.suppress(ValueError):
                result["code"] = json.loads(content).get("code")
        except (OSError, http.client.HTTPException) as exc:
            result["status"] = None
            result["read_error"] = type(exc).__name__
    finally:
        sock.close()
    result["seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- 1. worker kill


def _kill_worker_at(
    stack: Stack, client: httpx.Client, job_id: str, attempt: int, stage: str | None
) -> dict[str, Any]:
    """Wait until attempt `attempt` of the job runs (its scratch folder made; at `stage` when
    given, else one second in), then SIGKILL the worker's whole process group."""
    scratch = stack.data_dir / "scratch"
    deadline = time.monotonic() + 180
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        running = job["status"] == "running" and job["attempts"] == attempt and job["worker"]
        if running and list(scratch.glob(f"job-{job_id}-*")) and job["stage"].startswith(stage or ""):
            break
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(
                f"attempt {attempt} never ran mid-way" + (f" to '{stage}'" if stage else "") + f": {job}"
            )
        time.sleep(0.05)
    time.sleep(0.5 if stage else 1.0)  # into its work
    job = client.get(f"/v1/jobs/{job_id}").json()
    victim = stack.running_worker()
    kill_group(victim, signal.SIGKILL)
    left = listing(scratch, f"job-{job_id}-*")
    tmp, _runtime = temp_entries(stack.tmp["worker"])
    print(
        f"  killed worker pid {victim.pid} (attempt {attempt}) at '{job['stage']}' ({job['progress']:.0%}); "
        f"left: {left + tmp or 'nothing'}",
        flush=True,
    )
    stack.start_worker()
    return {
        "attempt": attempt,
        "stage": job["stage"],
        "progress": job["progress"],
        "scratch": left,
        "tmp": tmp,
    }


def scenario_worker_kill(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    """An INT8 job (calibration, evaluation, two batch sizes), its worker killed once mid-job
    (--quick), or twice: while it prepares the INT8 model, then on its second attempt while it
    measures; each time a new worker is started."""
    scratch = stack.data_dir / "scratch"
    recipe = {
        "precision": "int8",
        "batch_sizes": [1, 8],
        "measure": {"warmup_runs": 2, "timed_runs": 10, "min_seconds": 1.0 if args.quick else 2.0},
    }
    stages: list[str | None] = [None] if args.quick else [None, "measuring"]
    with stack.http() as client:
        body = {
            "model_id": assets.model_id,
            "calibration_dataset_id": assets.calib_id,
            "evaluation_dataset_id": assets.eval_id,
            "recipe": recipe,
        }
        job_id = create_job(client, body)["id"]
        kills = [
            _kill_worker_at(stack, client, job_id, attempt, stage) for attempt, stage in enumerate(stages, 1)
        ]
        killed_at = time.monotonic()
        final = wait_jobs(client, [job_id], timeout=240)[job_id]
        recovered_s = time.monotonic() - killed_at
        grace = time.monotonic() + 5  # the finished attempt removes its folder just after the row says so
        while list(scratch.glob("job-*")) and time.monotonic() < grace:
            time.sleep(0.1)
        orphans = listing(scratch, "job-*")
        worker_tmp_after, runtime_tmp = temp_entries(stack.tmp["worker"])
    finished = final["status"] == "succeeded"
    for kill in kills:
        out.check(
            f"left when killed at '{kill['stage']}' ({kill['progress']:.0%})",
            "(what a kill leaves)",
            f"{len(kill['scratch']) + len(kill['tmp'])}: {', '.join(kill['scratch'] + kill['tmp'])}",
            None,
        )
    out.check(
        "the job finished",
        "succeeded",
        f"{final['status']} on attempt {final['attempts']}, {recovered_s:.0f} s after the last kill "
        f"(lease {JOB_LEASE_S} s)",
        finished,
        loss=True,
    )
    out.check(
        "its engines stored",
        "≥ 1",
        str(len(final.get("engine_ids") or [])),
        bool(final.get("engine_ids")),
        loss=True,
    )
    out.check(
        "orphaned scratch folders after (<data dir>/scratch)", "0", str(len(orphans)), not orphans, loss=True
    )
    out.check(
        "files left in the workers' temp folder (TMPDIR)",
        "0",
        str(len(worker_tmp_after)) + (f": {', '.join(worker_tmp_after[:4])}" if worker_tmp_after else ""),
        not worker_tmp_after,
        loss=True,
    )
    out.check("runtime entries there (not counted)", "—", ", ".join(runtime_tmp) or "none", None)
    out.details.update(
        {
            "kills": kills,
            "job": final,
            "orphans": orphans,
            "worker_tmp_after": worker_tmp_after,
            "worker_tmp_runtime": runtime_tmp,
        }
    )
    (out.survived if finished else out.lost).append(
        f"job {job_id} ({final['status']}, {len(kills)} worker kill{'s' if len(kills) > 1 else ''})"
    )
    out.lost += [f"orphan: {entry}" for entry in orphans + worker_tmp_after]
    if finished:
        assets.engine_id = final["engine_ids"][0]


# ---------------------------------------------------------------- 2. broker restart


def scenario_broker_restart(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    import redis

    broker = redis.Redis(port=stack.redis_port)
    count = 10
    blocker_measure = {"warmup_runs": 1, "timed_runs": 3, "min_seconds": 2.0 if args.quick else 4.0}
    with stack.http() as client:
        blocker = create_job(
            client, {"model_id": assets.model_id, "recipe": {"batch_sizes": [1], "measure": blocker_measure}}
        )
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "queued":
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never took the first job")
            time.sleep(0.05)
        jobs = [
            create_job(
                client, {"model_id": assets.model_id, "recipe": {"batch_sizes": [1], "measure": TINY_MEASURE}}
            )
            for _ in range(count)
        ]
        ids = [job["id"] for job in jobs]
        statuses = Counter(client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids)
        in_broker = broker.llen("cpu")
        stack.kill_redis()
        time.sleep(1.0)
        stack.restart_redis()
        killed_at = time.monotonic()
        after_restart = broker.llen("cpu")
        print(
            f"  Redis killed with {statuses['queued']} jobs queued ({in_broker} messages in it), the "
            f"worker busy on a job; started again with {after_restart} messages",
            flush=True,
        )
        final = wait_jobs(client, [blocker["id"], *ids], timeout=120 if args.quick else 240)
        seconds = time.monotonic() - killed_at
    done = [job_id for job_id in ids if final[job_id]["status"] == "succeeded"]
    out.check(
        "jobs queued when Redis was killed",
        f"{count}",
        f"{statuses['queued']} ({in_broker} messages)",
        statuses["queued"] == count,
    )
    out.check(
        "messages left in Redis after its restart",
        "0 (no persistence)",
        str(after_restart),
        after_restart == 0,
    )
    out.check(
        "queued jobs finished",
        f"{count}/{count}",
        f"{len(done)}/{count} in {seconds:.0f} s (re-send after {QUEUE_REPUBLISH_S} s)",
        len(done) == count,
        loss=True,
    )
    blocker_final = final[blocker["id"]]["status"]
    out.check(
        "the job running during the restart finished",
        "succeeded",
        blocker_final,
        blocker_final == "succeeded",
        loss=True,
    )
    out.details.update(
        {
            "statuses_at_kill": dict(statuses),
            "messages_at_kill": in_broker,
            "final": {job_id: job["status"] for job_id, job in final.items()},
        }
    )
    out.survived.append(
        f"{len(done)}/{count} queued jobs"
        + (", and the one running through the restart" if blocker_final == "succeeded" else "")
    )
    out.lost += [
        f"job {job_id} ({job['status']})" for job_id, job in final.items() if job["status"] != "succeeded"
    ]
    if not assets.engine_id and done:
        assets.engine_id = final[done[0]]["engine_ids"][0]


# ---------------------------------------------------------------- 3. API kill mid-upload


def upload_leftovers(stack: Stack) -> list[str]:
    """What an upload may leave: anything in the API's temp folder, upload scratch under
    <data dir>/scratch (not jobs'), the artifact store's staging, and stored model or dataset
    folders without their row."""
    artifacts = stack.data_dir / "artifacts"
    found, _runtime = temp_entries(stack.tmp["api"])
    found += [entry for entry in listing(stack.data_dir / "scratch") if not entry.startswith("scratch/job-")]
    found += listing(artifacts / ".staging")
    for kind, table in (("models", "models"), ("datasets", "datasets")):
        rows = stack.db_ids(table)
        found += [
            entry for entry in listing(artifacts / kind) if entry.split("/")[1].split(" ")[0] not in rows
        ]
    return found


def _upload_files(stack: Stack) -> dict[Path, int]:
    """Files in every place the API may write an upload to, with their sizes."""
    places = [stack.tmp["api"], stack.data_dir / "scratch", stack.data_dir / "artifacts" / ".staging"]
    found = {}
    for place in places:
        for path in place.rglob("*") if place.is_dir() else ():
            with contextlib.suppress(OSError):  # removed while we looked
                if path.is_file():
                    found[path] = path.stat().st_size
    return found


def _kill_during_upload(
    stack: Stack, body: bytes, boundary: str, point: str, model_bytes: int
) -> dict[str, Any]:
    """Send the multipart upload over a raw socket and SIGKILL the API at `point`: half-way
    through the body; as soon as the API has written a file of it; once that file holds the whole
    model (0.2 s later: validating)."""
    headers = {
        **stack.headers,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(body)),
    }
    before = set(_upload_files(stack))
    sock = open_request(stack.url, "POST", "/v1/models", headers, timeout=60)
    event: dict[str, Any] = {"point": point}
    view = memoryview(body)
    try:
        if point == "receiving the body":
            half = len(body) // 2
            for start in range(0, half, MIB):  # slowly: 1 MiB every 10 ms
                sock.sendall(view[start : min(start + MIB, half)])
                time.sleep(0.01)
            time.sleep(0.3)
            event["sent_bytes"] = half
        else:
            sock.sendall(view)  # returns once the API has read nearly all of it
            event["sent_bytes"] = len(body)
            deadline = time.monotonic() + 30
            sock.setblocking(False)
            while time.monotonic() < deadline:
                new = {path: size for path, size in _upload_files(stack).items() if path not in before}
                if point == "storing the upload" and new:
                    event["trigger"] = [str(path.relative_to(stack.root)) for path in new]
                    break
                if point == "validating it" and any(size >= model_bytes for size in new.values()):
                    event["trigger"] = [str(path.relative_to(stack.root)) for path in new]
                    time.sleep(0.2)
                    break
                with contextlib.suppress(BlockingIOError):
                    if sock.recv(1, socket.MSG_PEEK):
                        event["answered_before_kill"] = True
                        break
                time.sleep(0.005)
        stack.kill_api()
    finally:
        sock.close()
    return event


def scenario_api_kill_upload(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    boundary = "chaos" + secrets.token_hex(8)
    payload = assets.big_onnx.read_bytes()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    points = ["receiving the body", "storing the upload", "validating it"]
    total_after = 0
    for point in points:
        event = _kill_during_upload(stack, body, boundary, point, len(payload))
        at_kill = upload_leftovers(stack)
        restart_s = stack.start_api()
        after = upload_leftovers(stack)
        total_after += len(after)
        event.update({"left_at_kill": at_kill, "left_after_restart": after, "restart_s": restart_s})
        out.details.setdefault("kills", []).append(event)
        note = " (the API answered before the kill)" if event.get("answered_before_kill") else ""
        print(
            f"  killed the API {point}{note}: {len(at_kill)} left; after restart ({restart_s:.1f} s) "
            f"{len(after)} left {after[:3] if after else ''}",
            flush=True,
        )
        out.check(
            f"left when killed {point}",
            "(what a kill leaves)",
            f"{len(at_kill)}" + (f": {', '.join(at_kill[:3])}" if at_kill else "") + note,
            None,
        )
        out.check(
            f"left after the restart ({point})",
            "0",
            f"{len(after)}" + (f": {', '.join(after[:3])}" if after else ""),
            not after,
            loss=True,
        )
        out.lost += [f"orphan after kill {point}: {entry}" for entry in after]
    with stack.http() as client:  # the restarted API still takes an upload
        model = upload(client, "models", assets.digits_onnx, "after-kill")
    out.check("an upload after the restarts", "201", "201", True)
    out.survived.append(f"the API, restarted {len(points)} times; a later upload stored ({model['id']})")
    out.details["places_checked"] = [
        str(stack.tmp["api"]),
        str(stack.data_dir / "scratch"),
        str(stack.data_dir / "artifacts"),
    ]


# ---------------------------------------------------------------- 4. slow clients


def _measure_client(url: str, path: str, body: bytes, headers: dict[str, str], seconds: float) -> dict:
    """One well-behaved client, sequential requests on one keep-alive connection."""
    raw = RawHttp(url)
    raw.connection.timeout = 10
    latencies, errors = [], Counter()
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        began = time.perf_counter()
        try:
            status, _headers, content = raw.post(path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            errors[type(exc).__name__] += 1
            raw = RawHttp(url)
            raw.connection.timeout = 10
            continue
        if status == 200:
            latencies.append((time.perf_counter() - began) * 1000.0)
        else:
            code = ""
            with contextlib.suppress(ValueError):
                code = json.loads(content).get("code", "")
            errors[f"{status} {code}".strip()] += 1
    raw.connection.close()
    values = np.asarray(latencies)
    return {
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": dict(errors),
        "p50_ms": float(np.percentile(values, 50)) if len(values) else math.inf,
        "p99_ms": float(np.percentile(values, 99)) if len(values) else math.inf,
    }


def _slow_client_state(sock: socket.socket) -> str:
    """What became of a slow connection: still open, answered (with its status), or closed."""
    sock.setblocking(False)
    try:
        data = sock.recv(256)
    except BlockingIOError:
        return "open"
    except OSError:
        return "reset"
    if not data:
        return "closed"
    return "answered " + data.split(b"\r\n", 1)[0].decode("latin-1", "replace").split(" ", 1)[-1]


def scenario_slow_clients(stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario) -> None:
    seconds = 3.0 if args.quick else 10.0
    slow_count = 64
    path = f"/v2/models/{assets.engine_id}/infer"
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    body, length = encode({}, "inputs", {"input": x})
    headers = {**stack.headers, HEADER_LENGTH: str(length)}
    _measure_client(stack.url, path, body, headers, 1.0)  # warm-up: the engine loaded, caches filled
    unloaded = _measure_client(stack.url, path, body, headers, seconds)
    slow_body, _ = encode({}, "inputs", {"input": x}, binary=False)
    slow_headers = {
        **stack.headers,
        "Content-Type": "application/json",
        "Content-Length": str(len(slow_body)),
    }
    slow = []
    for _ in range(slow_count):
        sock = open_request(stack.url, "POST", path, slow_headers)
        sock.sendall(slow_body[:10])
        slow.append(sock)
    time.sleep(0.5)
    loaded = _measure_client(stack.url, path, body, headers, seconds)
    states = Counter(_slow_client_state(sock) for sock in slow)
    for sock in slow:
        sock.close()
    ratio = loaded["p99_ms"] / unloaded["p99_ms"] if loaded["ok"] else math.inf
    errors = sum(loaded["errors"].values())
    out.check(
        "unloaded /v2 p99 (binary, batch 1)",
        "—",
        f"{unloaded['p99_ms']:.2f} ms (p50 {unloaded['p50_ms']:.2f}, {unloaded['ok']} requests)",
        None,
    )
    out.check(
        f"/v2 p99 with {slow_count} slow clients",
        "—",
        f"{loaded['p99_ms']:.2f} ms (p50 {loaded['p50_ms']:.2f}, {loaded['ok']} served)"
        if loaded["ok"]
        else "nothing served",
        None,
    )
    out.check("loaded p99 / unloaded p99", "≤ 2×", f"{ratio:.2f}×", ratio <= 2.0)
    out.check(
        "failed requests of the well-behaved client",
        "0",
        f"{errors} of {loaded['requests']}"
        + (f" ({', '.join(f'{n}× {k}' for k, n in loaded['errors'].items())})" if errors else ""),
        errors == 0,
    )
    out.check(
        "slow connections at the end", "—", ", ".join(f"{n} {state}" for state, n in states.items()), None
    )
    out.details.update(
        {
            "unloaded": unloaded,
            "loaded": loaded,
            "slow_connections": dict(states),
            "seconds_per_measurement": seconds,
        }
    )
    if errors == 0:
        out.survived.append("the well-behaved client: every request served")


# ---------------------------------------------------------------- 5. big JSON bodies


def json_bodies(megabytes: int) -> tuple[bytes, bytes, int]:
    """A /v1 body (nested lists) and a /v2 body (flat data) of about `megabytes` MB each: digits
    inputs, one random sample repeated (parsing costs the same); and the batch size."""
    sample = np.random.default_rng(1).random((1, 32, 32))
    rows = ["[" + ",".join(f"{v:.6f}" for v in row) + "]" for row in sample[0]]
    nested, flat = "[[" + ",".join(rows) + "]]", ",".join(f"{v:.6f}" for v in sample.reshape(-1))
    batch = megabytes * MB // (len(nested) + 1)
    v1 = '{"inputs":{"input":[' + ",".join([nested] * batch) + "]}}"
    v2 = (
        f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[{batch},1,32,32],"data":['
        + ",".join([flat] * batch)
        + "]}]}"
    )
    return v1.encode(), v2.encode(), batch


#: The /healthz probe runs as its own small process, so that the threads sending the big bodies
#: (and their GIL) cannot delay it: what it measures is the server.
_PROBE = r"""
import http.client, json, os, sys, threading, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
headers = json.loads(os.environ.get("CHAOS_PROBE_HEADERS") or "{}")
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, errors = [], {}
connection = http.client.HTTPConnection(host, port, timeout=30)
while not stop.is_set():
    began = time.perf_counter()
    try:
        connection.request("GET", "/healthz", headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            errors[str(response.status)] = errors.get(str(response.status), 0) + 1
    except (OSError, http.client.HTTPException) as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        connection.close()
        connection = http.client.HTTPConnection(host, port, timeout=30)
    elapsed = time.perf_counter() - began
    latencies.append(elapsed * 1000.0)
    stop.wait(max(0.0, interval - elapsed))
print(json.dumps({"latencies": latencies, "errors": errors}))
"""


class HealthProbe:
    """GET /healthz every 20 ms on a keep-alive connection, from a process of its own; the
    latencies (ms) and failures once the block ends."""

    def __init__(self, stack: Stack, interval_s: float = 0.02):
        self.stack, self.interval_s = stack, interval_s
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> HealthProbe:
        host, port = _host_port(self.stack.url)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, host, str(port), str(self.interval_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "CHAOS_PROBE_HEADERS": json.dumps(self.stack.headers)},
        )
        time.sleep(0.2)  # the interpreter starting
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._process is not None
        output, _ = self._process.communicate(timeout=60)  # closing its stdin stops it
        result = json.loads(output)
        self.latencies, self.errors = result["latencies"], Counter(result["errors"])


def scenario_big_json(
    stack: Stack, assets: Assets, args: argparse.Namespace, out: Scenario, peak: PeakRss
) -> None:
    megabytes = 60
    v1, v2, batch = json_bodies(megabytes)
    engine = assets.engine_id
    ihcl_v2 = {HEADER_LENGTH: str(len(v2))}
    plans = [
        (
            "/v1, Content-Length",
            f"/v1/engines/{engine}/infer",
            v1,
            {"Content-Type": "application/json"},
            False,
        ),
        ("/v1, chunked", f"/v1/engines/{engine}/infer", v1, {"Content-Type": "application/json"}, True),
        ("/v2, Content-Length, IHCL = body", f"/v2/models/{engine}/infer", v2, ihcl_v2, False),
        ("/v2, chunked, IHCL = body", f"/v2/models/{engine}/infer", v2, ihcl_v2, True),
    ]
    rounds = 1 if args.quick else 3
    results: dict[str, list[dict]] = {label: [] for label, *_ in plans}
    rss_before = tree_rss_mb(stack.api.pid)
    with HealthProbe(stack) as idle:  # the same probe without the bodies: what the machine gives
        time.sleep(2.0)
    with HealthProbe(stack) as probe:
        time.sleep(0.5)
        for _ in range(rounds):  # the four at once, `rounds` times
            threads = []
            for label, path, body, headers, chunked in plans:

                def send(label=label, path=path, body=body, headers=headers, chunked=chunked) -> None:
                    sent = post_raw(stack.url, path, body, {**stack.headers, **headers}, chunked)
                    results[label].append(sent)

                threads.append(threading.Thread(target=send))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(0.5)
        time.sleep(0.5)
    alive = stack.api.poll() is None
    rss_after = tree_rss_mb(stack.api.pid) if alive else 0.0
    peak_now = max(peak.peak, status_kib(stack.api.pid, "VmHWM") * 1024 / MB if alive else 0.0)
    worst = max(probe.latencies) if probe.latencies else math.inf
    out.check(
        "API peak RSS (process and children)",
        "< 1500 MB",
        f"{peak_now:.0f} MB (before {rss_before:.0f} MB, after {rss_after:.0f} MB)",
        peak_now < 1500,
    )
    out.check(
        "max /healthz latency (every 20 ms)",
        "< 100 ms",
        f"{worst:.1f} ms over {len(probe.latencies)} probes (p99 {np.percentile(probe.latencies, 99):.1f} ms)"
        if probe.latencies
        else "no probe answered",
        worst < 100,
    )
    out.check(
        "max /healthz latency idle (2 s just before)",
        "—",
        f"{max(idle.latencies):.1f} ms over {len(idle.latencies)} probes" if idle.latencies else "none",
        None,
    )
    out.check("/healthz failures", "0", str(sum(probe.errors.values())), not probe.errors)
    out.check(
        "the API process alive afterwards", "yes", "yes" if alive else "no (killed: OOM?)", alive, loss=True
    )
    for label, _path, _body, _headers, _chunked in plans:
        answers = Counter(
            f"{sent['status']} {sent.get('code') or ''}".strip()
            if sent.get("status")
            else sent.get("read_error", "no answer")
            for sent in results[label]
        )
        slowest = max((sent["seconds"] for sent in results[label]), default=0.0)
        out.check(
            f"{label} ({megabytes} MB, batch {batch})",
            "4xx, no crash",
            ", ".join(f"{n}× {answer}" for answer, n in answers.items()) + f" (slowest {slowest:.1f} s)",
            None,
        )
    out.details.update(
        {
            "requests": results,
            "rss_before_mb": rss_before,
            "rss_after_mb": rss_after,
            "healthz_max_ms": worst,
            "healthz_idle_max_ms": max(idle.latencies, default=None),
            "healthz_probes": len(probe.latencies),
            "healthz_errors": dict(probe.errors),
            "body_bytes": {"v1": len(v1), "v2": len(v2)},
            "rounds": rounds,
        }
    )
    if alive:
        out.survived.append("the API process")
    else:
        out.lost.append("the API process")


# ---------------------------------------------------------------- report


def hardware_line(hardware: dict[str, Any]) -> str:
    """The machine, as bench/run.py prints it."""
    return (
        f"{hardware['cpu_model']}, {hardware['logical_cores']} logical cores "
        f"({', '.join(hardware['cpu_features']) or 'no AVX2'}), Python {hardware['python']}, "
        f"onnxruntime {hardware['onnxruntime']}; load average {hardware['load_start']} at the start, "
        f"{hardware.get('load_end', '?')} at the end"
    )


def render(scenarios: list[Scenario], hardware: dict[str, Any]) -> str:
    lines = ["# Chaos benchmark", ""]
    for index, scenario in enumerate(scenarios, 1):
        lines += [f"## {index}. {scenario.title}", ""]
        if scenario.error:
            first, *rest = scenario.error.strip().splitlines()
            lines += [f"Could not run: {first}" + (f" … {rest[-1].strip()}" if rest else ""), ""]
        lines += ["| Check | Target | Measured | Result |", "|---|---|---|---|"]
        for check in scenario.checks:
            lines.append(f"| {check.name} | {check.target} | {check.measured} | {check.verdict} |")
        rss = "—" if scenario.api_peak_rss_mb is None else f"{scenario.api_peak_rss_mb:.0f} MB"
        lines.append(f"| API peak RSS during the scenario | — | {rss} | — |")
        lines += [
            "",
            f"Survived: {'; '.join(scenario.survived) or 'nothing recorded'}. "
            f"Lost: {'; '.join(scenario.lost) or 'nothing'}. ({scenario.seconds:.0f} s)",
            "",
        ]
    lost = [s for s in scenarios if s.lost_something]
    missed = [s for s in scenarios if s.missed_target]
    lines.append(
        "**Nothing lost.**" if not lost else f"**Lost or orphaned in: {', '.join(s.key for s in lost)}.**"
    )
    lines.append(f"Targets missed in: {', '.join(s.key for s in missed)}." if missed else "Every target met.")
    lines += ["", hardware_line(hardware)]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run_scenario(
    key: str, title: str, body: Callable[[Scenario, PeakRss], None], stack: Stack, results: list[Scenario]
) -> None:
    scenario = Scenario(key, title)
    results.append(scenario)
    print(f"{len(results)}. {title} …", flush=True)
    started = time.monotonic()
    peak = PeakRss(stack)
    try:
        with peak:
            body(scenario, peak)
    except Exception as exc:  # report it, go on with the next scenario
        scenario.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    scenario.api_peak_rss_mb = peak.peak or None
    scenario.seconds = time.monotonic() - started
    if stack.api is None or stack.api.poll() is not None:  # the next scenario needs an API
        with contextlib.suppress(Exception):
            stack.start_api()
    if not any(worker.poll() is None for worker in stack.workers):
        with contextlib.suppress(Exception):
            stack.start_worker()


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="optiforge-chaos-"))
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def fault_scenarios(
    stack: Stack, assets: Assets, args: argparse.Namespace, need_engine: Callable[[], None]
) -> list[tuple[str, str, Callable[[Scenario, PeakRss], None]]]:
    """Scenarios 6-9, in bench/chaos_faults.py (imported here: that module builds on this one)."""
    from bench import chaos_faults as faults

    return [
        (
            "db-outage",
            "PostgreSQL unreachable for 10 s under load, then back",
            lambda s, _p: (need_engine(), faults.scenario_db_outage(stack, assets, args, s)),
        ),
        (
            "disk-full",
            "a full disk (64 MB tmpfs, embedded defaults): every request answered, deletes work",
            lambda s, _p: faults.scenario_disk_full(stack, assets, args, s),
        ),
        (
            "slow-connections",
            "3 000 partial-header connections at a 1 024 descriptor limit; silent uploads",
            lambda s, _p: (need_engine(), faults.scenario_slow_connections(stack, assets, args, s)),
        ),
        (
            "big-batch",
            "6 concurrent 58.6 MiB binary /v2 requests (batch 15 000)",
            lambda s, p: (need_engine(), faults.scenario_big_batch(stack, assets, args, s, p)),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a 40 MB upload, 3 s load points")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json", help="where the JSON results go")
    parser.add_argument("--api-key", default=None, help="default: $OPTIFORGE_API_KEY")
    parser.add_argument(
        "--postgres-url", default=POSTGRES_URL, help="a server where a database may be created"
    )
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server executable")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a performance target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, data)")
    args = parser.parse_args(argv)
    import onnxruntime

    hardware = {
        **cpu_info(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_start": load_average(),
    }
    print(f"hardware: {hardware}", flush=True)
    started = time.monotonic()
    scenarios: list[Scenario] = []
    with workspace(args.keep) as root:
        assets = prepare_assets(root / "assets", args.quick)
        print(
            f"digits CNN trained, {assets.big_onnx.stat().st_size / MB:.0f} MB model made in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        stack = Stack(root, args)
        try:
            stack.start()
            with stack.http() as client:
                model = upload(client, "models", assets.digits_onnx, "digits-cnn")
                assets.model_id = model["id"]
                assets.calib_id = upload(client, "datasets", assets.calib_npz)["id"]
                assets.eval_id = upload(client, "datasets", assets.eval_npz)["id"]
            print(
                f"stack up in {time.monotonic() - started:.0f} s: API {stack.url}, "
                f"Redis :{stack.redis_port}, "
                f"database {stack.db_name}, {root}",
                flush=True,
            )

            def need_engine() -> None:
                if not assets.engine_id:  # the scenarios that made one did not run or failed: make one
                    with stack.http() as client:
                        job = create_job(
                            client,
                            {
                                "model_id": assets.model_id,
                                "recipe": {"batch_sizes": [1], "measure": TINY_MEASURE},
                            },
                        )
                        done = wait_jobs(client, [job["id"]], 180)[job["id"]]
                    if done["status"] != "succeeded":
                        raise RuntimeError(f"no engine to serve: {done}")
                    assets.engine_id = done["engine_ids"][0]

            plan: list[tuple[str, str, Callable[[Scenario, PeakRss], None]]] = [
                (
                    "worker-kill",
                    "kill -9 a worker mid-job, start a new one",
                    lambda s, _p: scenario_worker_kill(stack, assets, args, s),
                ),
                (
                    "broker-restart",
                    "restart the broker (Redis, no persistence) with 10 jobs queued",
                    lambda s, _p: scenario_broker_restart(stack, assets, args, s),
                ),
                (
                    "api-kill-upload",
                    "kill -9 the API mid-upload, restart it",
                    lambda s, _p: scenario_api_kill_upload(stack, assets, args, s),
                ),
                (
                    "slow-clients",
                    "64 slow clients on /v2 infer beside a well-behaved client",
                    lambda s, _p: (need_engine(), scenario_slow_clients(stack, assets, args, s)),
                ),
                (
                    "big-json",
                    "4 concurrent 60 MB JSON bodies to /v1 and /v2 infer, /healthz polled",
                    lambda s, p: (need_engine(), scenario_big_json(stack, assets, args, s, p)),
                ),
            ]
            plan += fault_scenarios(stack, assets, args, need_engine)
            for key, title, body in plan:
                if key in args.scenarios:
                    run_scenario(key, title, body, stack, scenarios)
        except Exception as exc:
            print(f"the stack failed: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            for role in ("api", "worker"):
                print(f"--- last {role} log ---\n{stack.log_tail(role)}")
            scenarios.append(Scenario("setup", "setting up the stack", error=f"{type(exc).__name__}: {exc}"))
        finally:
            stack.close()
    hardware["load_end"] = load_average()
    report = {
        "hardware": hardware,
        "quick": args.quick,
        "settings": {
            "OPTIFORGE_JOB_LEASE_S": JOB_LEASE_S,
            "OPTIFORGE_QUEUE_REPUBLISH_S": QUEUE_REPUBLISH_S,
            "OPTIFORGE_JOB_SWEEP_INTERVAL_S": 1,
        },
        "seconds": time.monotonic() - started,
        "lost_anything": any(s.lost_something for s in scenarios),
        "targets_missed": [s.key for s in scenarios if s.missed_target],
        "scenarios": [
            {**asdict(s), "lost_something": s.lost_something, "missed_target": s.missed_target}
            for s in scenarios
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(render(scenarios, hardware))
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    if report["lost_anything"]:
        return 1
    return 2 if args.strict and report["targets_missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
