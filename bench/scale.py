"""Several machines on one host: what a second worker and a second API replica buy, and what the
object store costs (issue 22, item 6).

    make bench-scale                 # or: .venv/bin/python -m bench.scale [--quick] [--out FILE]

It starts the deployed shape as separate processes, each node with its own data directory, sharing
only a PostgreSQL database (fresh, dropped at the end), its own `redis-server` and an S3-compatible
server (moto_server, state in memory): API replicas A and B and workers 1 and 2 on
`s3://…`, and replica L on a local directory (`file://…`) holding copies of the same engines, the
single-machine store everything is compared against. With a digits CNN trained on the spot:

1. jobs per minute: a queue of INT8 jobs (static calibration, an evaluation set, latency measured)
   finished by one worker, by two, then by one again (the two one-worker runs bracket the two-worker
   run so that drift hits both alike). Target: two workers ≥ 1.6× one on 2 cores.
2. `/v2` throughput through one replica against two: a closed loop of N clients, spread over A and
   B in turn as a client-side balancer would, interleaved rounds; medians.
3. cold start: the first `/v2` request for an engine on B, which never held it (pulled from the
   store into its cache, then loaded), against the first request on L (loaded from its directory),
   and the download alone (a fresh node's cache fetching the engine). Target: B's first request is
   slower than L's by about the download.
4. cache overhead: warm `/v2` latency through B (engine read from its node cache) and L (local
   store), sequential batch-1 requests alternating B and L; medians. Target: no measurable
   difference.
5. rate limits across replicas: a key with `infer_rps` hammered through A and B together. Target:
   accepted rate within 10 % of the limit.

Prints the tables and the machine; writes bench/results/scale.json and scale.md. Run it alone: two
workers on 2 cores are only faster when nothing else wants the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from optiforge_client.tensors import HEADER_LENGTH, encode

from app.core.artifacts.cache import ArtifactCache
from app.core.artifacts.s3 import S3ArtifactStore
from app.core.artifacts.s3_client import S3Location, make_client
from bench.chaos import hardware_line, load_average
from bench.processes import (
    environment,
    free_port,
    fresh_postgres_database,
    kill_group,
    start_moto,
    start_redis,
    stop,
)
from bench.serve import RawHttp, export_model, load
from engines.hardware import cpu_info
from engines.measure.latency import latency_stats

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
POSTGRES_URL = os.environ.get(
    "OPTIFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
BASE = "optiforge"
#: The admin key every node is started with (OPTIFORGE_BOOTSTRAP_API_KEY): replicas listen on
#: loopback, but the rate-limit scenario needs keys.
ADMIN_KEY = "bench-scale-" + secrets.token_hex(16)
#: One thread per job, as a worker given one core would run it (a worker measures with every core
#: it sees by default: two workers on 2 cores would then fight over both). Enough timed runs that a
#: job's own work, not the queue's fixed overhead, is what is timed.
JOB_RECIPE = {
    "precision": "int8",
    "batch_sizes": [1, 8],
    "measure": {"warmup_runs": 5, "timed_runs": 100, "min_seconds": 0.5, "threads": 1},
}
#: Each API replica infers with one thread: a replica per core, as on Kubernetes with a 1-CPU request.
REPLICA_THREADS = "1"


@dataclass
class Node:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    url: str = ""
    process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *self.argv],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            kill_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(self.process, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None


@dataclass
class Cluster:
    root: Path
    redis_port: int = field(default_factory=free_port)
    bucket: str = field(default_factory=lambda: f"scale-{secrets.token_hex(4)}")
    nodes: dict[str, Node] = field(default_factory=dict)
    services: list[subprocess.Popen] = field(default_factory=list)
    endpoint: str = ""
    #: What `close` undoes besides the processes: the fresh PostgreSQL database.
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def start(self) -> None:
        import boto3

        self.services.append(start_redis(self.redis_port, self.root))
        moto, self.endpoint = start_moto(AWS)
        self.services.append(moto)
        boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials()).create_bucket(
            Bucket=self.bucket
        )
        database_url = self.resources.enter_context(fresh_postgres_database(POSTGRES_URL, "optiforge_scale"))
        shared = {
            **{key: value for key, value in os.environ.items() if not key.startswith("OPTIFORGE_")},
            **AWS,
            "PYTHONUNBUFFERED": "1",
            "OPTIFORGE_DATABASE_URL": database_url,
            "OPTIFORGE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "OPTIFORGE_BOOTSTRAP_API_KEY": ADMIN_KEY,
            "OPTIFORGE_ARTIFACT_URL": f"s3://{self.bucket}/{BASE}",
            "OPTIFORGE_S3_ENDPOINT_URL": self.endpoint,
        }
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            env={**shared, "OPTIFORGE_DATA_DIR": str(self.root / "migrate")},
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        for name in ("api-a", "api-b", "api-l", "worker-1", "worker-2"):
            env = {
                **shared,
                "OPTIFORGE_DATA_DIR": str(self.root / name),
                "OPTIFORGE_INFERENCE_THREADS": REPLICA_THREADS,
            }
            if name == "api-l":  # the single-machine store, holding copies of the engines (copy_engine)
                env["OPTIFORGE_ARTIFACT_URL"] = (self.root / "local-store").as_uri()
            if name.startswith("api"):
                port = free_port()
                argv = ["serve", "--no-worker", "--port", str(port), "--loglevel", "WARNING"]
                self.nodes[name] = Node(
                    name, argv, env, self.root / f"{name}.log", f"http://127.0.0.1:{port}"
                )
            else:
                argv = ["worker", "--queues", "cpu", "--loglevel", "WARNING"]
                self.nodes[name] = Node(name, argv, env, self.root / f"{name}.log")
        for name in ("api-a", "api-b", "api-l", "worker-1"):
            self.nodes[name].start()
        for name in ("api-a", "api-b", "api-l"):
            self.wait_ready(self.nodes[name])
        self.wait_workers(1)

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for process in self.services:
            stop(process, timeout=10)
        with contextlib.suppress(Exception):  # a database left behind must not hide the results
            self.resources.close()

    def client(self, name: str = "api-a", timeout: float = 300) -> httpx.Client:
        return httpx.Client(base_url=self.nodes[name].url, headers=self.headers, timeout=timeout)

    def wait_ready(self, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert node.process is not None
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited at start:\n{node.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(node.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{node.name} did not become ready:\n{node.log.read_text()[-3000:]}")

    def wait_workers(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as api:
            while time.monotonic() < deadline:
                live = api.get("/v1/capabilities").json().get("workers", {}).get("cpu", 0)
                if (live if isinstance(live, int) else len(live)) >= count:
                    return
                time.sleep(0.5)
        raise RuntimeError(f"fewer than {count} live workers")

    def observer(self, cache_dir: Path) -> S3ArtifactStore:
        """A node that has seen nothing: an empty cache of its own, the shared bucket."""
        client = make_client(self.endpoint, None, max_attempts=3, connect_timeout_s=2.0)
        return S3ArtifactStore(S3Location(self.bucket, f"{BASE}/"), client, ArtifactCache(cache_dir, None))


def _boto_credentials() -> dict[str, str]:
    return {
        "region_name": AWS["AWS_DEFAULT_REGION"],
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
    }


# ---------------------------------------------------------------- assets


@dataclass
class Assets:
    model_id: str
    calib_id: str
    eval_id: str
    sample: np.ndarray


def prepare(cluster: Cluster, workdir: Path) -> Assets:
    import torch

    from examples.digits import load_digits_split

    workdir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread trains faster than two on a busy 2-core machine
    try:
        onnx_path, _shape = export_model("digits", workdir)
    finally:
        torch.set_num_threads(threads)
    split = load_digits_split()
    calib, evaluation = workdir / "calib.npz", workdir / "eval.npz"
    np.savez(calib, input=split.train_x[:256])
    np.savez(evaluation, input=split.test_x, labels=split.test_y)
    with cluster.client() as api:
        ids = [
            _upload(api, "models", onnx_path),
            _upload(api, "datasets", calib),
            _upload(api, "datasets", evaluation),
        ]
    return Assets(*ids, sample=split.test_x[:1].astype(np.float32))


def _upload(api: httpx.Client, kind: str, path: Path) -> str:
    with path.open("rb") as handle:
        response = api.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": path.stem})
    response.raise_for_status()
    return str(response.json()["id"])


# ---------------------------------------------------------------- 1. jobs per minute


def run_jobs(cluster: Cluster, assets: Assets, count: int) -> dict[str, Any]:
    """Queue `count` INT8 jobs at once and wait for all; the wall time from the first POST to the
    last finish."""
    body = {
        "model_id": assets.model_id,
        "calibration_dataset_id": assets.calib_id,
        "evaluation_dataset_id": assets.eval_id,
        "recipe": JOB_RECIPE,
    }
    with cluster.client() as api:
        started = time.monotonic()
        job_ids = []
        for _ in range(count):
            response = api.post("/v1/jobs", json=body)
            response.raise_for_status()
            job_ids.append(response.json()["id"])
        pending, engines, workers = set(job_ids), [], set()
        while pending:
            for job_id in sorted(pending):
                job = api.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    if job["status"] != "succeeded":
                        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                    pending.discard(job_id)
                    engines += job["engine_ids"]
                    workers.add(job["worker"])
            time.sleep(0.2)
        elapsed = time.monotonic() - started
    return {
        "jobs": count,
        "seconds": elapsed,
        "jobs_per_min": count * 60.0 / elapsed,
        "engines": engines,
        "workers_seen": len(workers),
    }


def jobs_scenario(cluster: Cluster, assets: Assets, count: int) -> dict[str, Any]:
    """One worker, two, one again. Each configuration first runs untimed jobs, one per worker: a
    worker's first job pays its imports and first ONNX Runtime sessions, which is start-up, not
    throughput."""
    run_jobs(cluster, assets, 1)
    one_before = run_jobs(cluster, assets, count)
    cluster.nodes["worker-2"].start()
    cluster.wait_workers(2)
    run_jobs(cluster, assets, 2)
    two = run_jobs(cluster, assets, count)
    cluster.nodes["worker-2"].stop()
    one_after = run_jobs(cluster, assets, count)
    one = statistics.median([one_before["jobs_per_min"], one_after["jobs_per_min"]])
    return {
        "one_worker": [one_before, one_after],
        "two_workers": two,
        "ratio": two["jobs_per_min"] / one,
        "engines": one_before["engines"] + two["engines"] + one_after["engines"],
    }


# ---------------------------------------------------------------- 2. /v2 through one replica or two


def throughput_scenario(
    cluster: Cluster, engine_id: str, sample: np.ndarray, concurrency: int, seconds: float, rounds: int
) -> dict[str, Any]:
    a, b = cluster.nodes["api-a"].url, cluster.nodes["api-b"].url
    for url in (a, b):  # both replicas hold the engine loaded before anything is timed
        load(url, engine_id, sample, 1, 0.5, cluster.headers)
    runs: dict[str, list[dict]] = {"one": [], "two": []}
    for _ in range(rounds):
        runs["one"].append(load(a, engine_id, sample, concurrency, seconds, cluster.headers))
        runs["two"].append(load([a, b], engine_id, sample, concurrency, seconds, cluster.headers))
    medians = {
        kind: statistics.median(run["throughput_per_s"] for run in values) for kind, values in runs.items()
    }
    errors = sum(run["errors"] for values in runs.values() for run in values)
    return {"runs": runs, "median_rps": medians, "ratio": medians["two"] / medians["one"], "errors": errors}


# ---------------------------------------------------------------- 3 and 4. cold start and cache overhead


def assets_model_id(cluster: Cluster) -> str:
    with cluster.client() as api:
        return str(api.get("/v1/models").json()[0]["id"])


def copy_engine(cluster: Cluster, engine_id: str, observer: S3ArtifactStore) -> float:
    """Put the engine's files into L's local store (where a single machine keeps them); returns the
    seconds a node that never saw it takes to download and verify it from the store."""
    with cluster.client() as api:
        job_id = api.get(f"/v1/engines/{engine_id}").json()["job_id"]
    prefix = f"jobs/{job_id}/engines/{engine_id}"
    started = time.perf_counter()
    folder = observer.local_path(prefix)
    download_s = time.perf_counter() - started
    shutil.copytree(folder, cluster.root / "local-store" / prefix)
    return download_s


def _timed_request(http: RawHttp, engine_id: str, body: bytes, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    status, _headers, content = http.post(f"/v2/models/{engine_id}/infer", body, headers)
    elapsed = (time.perf_counter() - started) * 1000.0
    if status != 200:
        raise RuntimeError(f"/v2 answered {status}: {content[:300]!r}")
    return elapsed


def cold_and_warm_scenario(
    cluster: Cluster, engine_ids: list[str], sample: np.ndarray, per_round: int, rounds: int
) -> dict[str, Any]:
    body, length = encode({}, "inputs", {"input": sample})
    headers = {HEADER_LENGTH: str(length), **cluster.headers}
    b_http, l_http = RawHttp(cluster.nodes["api-b"].url), RawHttp(cluster.nodes["api-l"].url)
    # One observer for every engine, warmed on the model first: like replica B, a node whose S3
    # client is connected, fetching an engine it has never held (each engine is a new prefix).
    observer = cluster.observer(cluster.root / "observer")
    observer.local_path(f"models/{assets_model_id(cluster)}")
    cold: list[dict[str, float]] = []
    for index, engine_id in enumerate(engine_ids):
        download_s = copy_engine(cluster, engine_id, observer)
        # Alternate which replica goes first, so neither always meets a warmer machine.
        order = [("b", b_http), ("l", l_http)] if index % 2 == 0 else [("l", l_http), ("b", b_http)]
        first = {name: _timed_request(http, engine_id, body, headers) for name, http in order}
        cold.append(
            {
                "engine": engine_id,
                "download_ms": download_s * 1000.0,
                "b_first_ms": first["b"],
                "l_first_ms": first["l"],
            }
        )
    warm_engine = engine_ids[0]
    # Replica A, on the store like B, is the control: how far two processes differ with nothing
    # between them but being two processes.
    clients = {"a": RawHttp(cluster.nodes["api-a"].url), "b": b_http, "l": l_http}
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for index in range(rounds * per_round):  # request by request, in turn, rotating who goes first
        names = list(clients)[index % 3 :] + list(clients)[: index % 3]
        for name in names:
            samples[name].append(_timed_request(clients[name], warm_engine, body, headers))
    warm = {name: latency_stats(np.asarray(values), 1) for name, values in samples.items()}
    return {
        "cold": cold,
        "median": {
            "download_ms": statistics.median(row["download_ms"] for row in cold),
            "b_first_ms": statistics.median(row["b_first_ms"] for row in cold),
            "l_first_ms": statistics.median(row["l_first_ms"] for row in cold),
            "b_minus_l_ms": statistics.median(row["b_first_ms"] - row["l_first_ms"] for row in cold),
        },
        "warm": warm,
        "warm_requests": len(samples["b"]),
        "warm_ratio_b_over_l": warm["b"]["p50_ms"] / warm["l"]["p50_ms"],
        "warm_paired_difference_ms": statistics.median(
            on_b - on_l for on_b, on_l in zip(samples["b"], samples["l"], strict=True)
        ),
        "warm_control_difference_ms": statistics.median(
            on_b - on_a for on_b, on_a in zip(samples["b"], samples["a"], strict=True)
        ),
    }


# ---------------------------------------------------------------- 5. rate limits across replicas


def rate_limit_scenario(
    cluster: Cluster, engine_id: str, sample: np.ndarray, rps: float, seconds: float
) -> dict:
    with cluster.client() as api:
        created = api.post(
            "/v1/admin/keys",
            json={"project": "default", "name": "scale", "scopes": ["infer"], "infer_rps": rps},
        )
        created.raise_for_status()
        key = created.json()["key"]
    body, length = encode({}, "inputs", {"input": sample})
    counts = {"accepted": 0, "refused": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def hammer(url: str) -> None:
        headers = {HEADER_LENGTH: str(length), "Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < stop_at:
                status = http.post(f"/v2/models/{engine_id}/infer", content=body, headers=headers).status_code
                with lock:
                    counts["accepted" if status == 200 else "refused"] += 1

    urls = [cluster.nodes["api-a"].url, cluster.nodes["api-b"].url] * 2
    threads = [threading.Thread(target=hammer, args=(url,)) for url in urls]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    # A bucket starts full: one second's burst is allowed on top of the rate.
    accepted_rate = (counts["accepted"] - rps) / elapsed
    return {
        **counts,
        "seconds": elapsed,
        "limit_rps": rps,
        "accepted_rps": accepted_rate,
        "deviation": accepted_rate / rps - 1.0,
    }


# ---------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    jobs, v2, cold, rate = report["jobs"], report["throughput"], report["cold_warm"], report["rate_limit"]
    one_runs = ", ".join(f"{run['jobs_per_min']:.1f}" for run in jobs["one_worker"])
    median = cold["median"]
    warm = cold["warm"]
    lines = [
        "# Scale benchmark (bench/scale.py)",
        "",
        "| Measure | One | Two | Ratio | Target |",
        "|---|---|---|---|---|",
        f"| INT8 jobs per minute, 1 worker vs 2 ({jobs['two_workers']['jobs']} jobs a run) | "
        f"{statistics.median(run['jobs_per_min'] for run in jobs['one_worker']):.1f} (runs: {one_runs}) | "
        f"{jobs['two_workers']['jobs_per_min']:.1f} | **{jobs['ratio']:.2f}×** | ≥ 1.6× |",
        f"| `/v2` requests/s, 1 replica vs 2 ({v2['concurrency']} clients, median of {v2['rounds']}) | "
        f"{v2['median_rps']['one']:.0f} | {v2['median_rps']['two']:.0f} | **{v2['ratio']:.2f}×** | — |",
        "",
        "| Store | First `/v2` request on a replica that never held the engine (median) | Warm `/v2` p50 | "
        "Warm p99 |",
        "|---|---|---|---|",
        f"| local directory (replica L) | {median['l_first_ms']:.1f} ms | {warm['l']['p50_ms']:.2f} ms | "
        f"{warm['l']['p99_ms']:.2f} ms |",
        f"| S3 through the node cache (replica B) | {median['b_first_ms']:.1f} ms | "
        f"{warm['b']['p50_ms']:.2f} ms | {warm['b']['p99_ms']:.2f} ms |",
        f"| S3 through the node cache (replica A, control) | — | {warm['a']['p50_ms']:.2f} ms | "
        f"{warm['a']['p99_ms']:.2f} ms |",
        "",
        f"Cold start: B's first request is {median['b_minus_l_ms']:.1f} ms slower than L's (median over "
        f"{len(cold['cold'])} engines); downloading and verifying the engine alone takes "
        f"{median['download_ms']:.1f} ms. Warm: B/L p50 = {cold['warm_ratio_b_over_l']:.3f}, median paired "
        f"difference {cold['warm_paired_difference_ms'] * 1000:+.0f} µs; between B and A, two replicas "
        f"on the same store: {cold['warm_control_difference_ms'] * 1000:+.0f} µs "
        f"({cold['warm_requests']} requests each, in turn).",
        "",
        f"Rate limit across A and B: {rate['accepted_rps']:.1f} accepted/s against a limit of "
        f"{rate['limit_rps']:.0f}/s ({rate['deviation'] * 100:+.1f} %; target within ±10 %); "
        f"{rate['refused']} refused with 429.",
        "",
        hardware_line(report["hardware"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer jobs, shorter loads")
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs per run of scenario 1 (default 6; quick 2)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per load run (default 6; quick 1)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of scenarios 2 and 4 (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)
    jobs = args.jobs or (2 if args.quick else 8)
    seconds = args.seconds or (1.0 if args.quick else 6.0)
    rounds = args.rounds or (1 if args.quick else 3)
    import onnxruntime

    hardware = {
        **cpu_info(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_start": load_average(),
    }
    print(f"hardware: {hardware}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="optiforge-scale-"))
    cluster = Cluster(root)
    try:
        with environment(AWS):
            cluster.start()
            assets = prepare(cluster, root / "assets")
            print("1. jobs per minute …", flush=True)
            jobs_result = jobs_scenario(cluster, assets, jobs)
            engines = jobs_result["engines"]
            print("2. /v2 through one replica and two …", flush=True)
            v2 = throughput_scenario(cluster, engines[0], assets.sample, args.concurrency, seconds, rounds)
            v2.update(concurrency=args.concurrency, rounds=rounds, seconds=seconds)
            print("3-4. cold start and cache overhead …", flush=True)
            cold_engines = engines[1 : 3 if args.quick else 7]
            cold_warm = cold_and_warm_scenario(
                cluster, cold_engines, assets.sample, 20 if args.quick else 200, rounds
            )
            print("5. rate limit across replicas …", flush=True)
            rate = rate_limit_scenario(cluster, engines[0], assets.sample, 20.0, 3.0 if args.quick else 10.0)
    finally:
        cluster.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    hardware["load_end"] = load_average()
    jobs_result.pop("engines")
    report = {
        "hardware": hardware,
        "jobs": jobs_result,
        "throughput": v2,
        "cold_warm": cold_warm,
        "rate_limit": rate,
    }
    markdown = render(report)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown)
    return 0 if jobs_result["ratio"] >= 1.6 and abs(rate["deviation"]) <= 0.10 else 2


if __name__ == "__main__":
    sys.exit(main())
