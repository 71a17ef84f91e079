"""Serving benchmark: what `/v2/.../infer` adds to the engine's own time, what dynamic batching buys
under concurrency, and 10 000 sequential requests without errors or memory growth.

    make bench-serve                 # or: .venv/bin/python -m bench.serve [--quick] [--model resnet18]

It starts `optiforge serve` on a temporary data directory, builds an fp32 ONNX Runtime engine
through the SDK, and then, in one run:
1. overhead: the same engine file loaded in this process vs requests over HTTP (binary tensors
   and JSON tensors), interleaved in rounds, batch 1; medians and their ratios;
2. load: a closed-loop load generator (N threads, one connection each, single-sample binary
   requests) at concurrency 1, 4 and 16, without and with dynamic batching, side by side;
   Triton's perf_analyzer is run too when it is on PATH (its PyPI package is a placeholder here);
3. soak: sequential requests, errors counted, the server's RSS before and after.
Results go to bench/results/serve.json and serve.md; the hardware is printed with them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from optiforge_client import Client
from optiforge_client.tensors import HEADER_LENGTH, encode

from engines.backends.registry import get_backend
from engines.hardware import cpu_info
from engines.measure.latency import latency_stats
from examples.digits import export_onnx

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    data_dir: Path

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS")


def start_server(data_dir: Path, port: int, log: Path) -> Server:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTIFORGE_")}
    env.update({"OPTIFORGE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--loglevel", "WARNING"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, data_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not start:\n" + log.read_text()[-3000:])


MODELS = ["resnet18", "wide_mlp", "mobilenet_v2", "resnet50", "digits"]


def export_model(name: str, workdir: Path) -> tuple[Path, tuple[int, ...]]:
    """ONNX with a dynamic batch dim; ImageNet-shaped CNNs take 3×224×224, the others 1×32×32."""
    if name == "digits":
        from examples.digits import load_digits_split, train_cnn

        return export_onnx(train_cnn(load_digits_split()), workdir / "digits.onnx"), (1, 32, 32)
    from bench import models

    shape = (1, 32, 32) if name == "wide_mlp" else (3, 224, 224)
    return export_onnx(getattr(models, name)().eval(), workdir / f"{name}.onnx", shape=shape), shape


def build_engine(client: Client, onnx_path: Path, data_dir: Path) -> tuple[str, Path]:
    model = client.upload_model(onnx_path)
    recipe = {"batch_sizes": [1], "measure": {"warmup_runs": 2, "timed_runs": 5, "min_seconds": 0}}
    job = client.wait_for_job(client.create_job(model.id, recipe).id, timeout=1800)
    engine_id = job.engine_ids[0]
    (engine_file,) = data_dir.rglob(f"{engine_id}/engine.onnx")
    return engine_id, engine_file


# ---------------------------------------------------------------- 1. overhead


class RawHttp:
    """A minimal keep-alive HTTP client (the standard library's): what the protocol itself costs,
    without a client library's own overhead (httpx adds about 1 ms per request on this machine)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port))

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        self.connection.request("POST", path, body=body, headers=headers)
        response = self.connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def overhead(
    server: Server, engine_id: str, engine_file: Path, x: np.ndarray, rounds: int, per_round: int
) -> dict:
    """The engine in-process (loaded as the server loads it) vs /v2 infer at batch 1, interleaved:
    binary tensors over a raw HTTP client and through the SDK, and JSON tensors."""
    backend = get_backend("onnxruntime-cpu")
    runner = backend.load(engine_file, backend.options(spin_wait=False))
    binary_header = {"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    binary_body, length = encode(binary_header, "inputs", {"input": x})
    json_body, _ = encode({}, "inputs", {"input": x}, binary=False)
    path = f"/v2/models/{engine_id}/infer"
    raw, sdk = RawHttp(server.url), Client(server.url)
    compute: list[float] = []

    def binary_request() -> None:
        status, headers, content = raw.post(path, binary_body, {HEADER_LENGTH: str(length)})
        assert status == 200, content[:300]
        head = json.loads(content[: int(headers[HEADER_LENGTH.lower()])])
        compute.append(head["parameters"]["compute_ms"])

    def json_request() -> None:
        status, _headers, content = raw.post(path, json_body, {"Content-Type": "application/json"})
        assert status == 200, content[:300]

    paths = {
        "in_process": lambda: runner.infer({"input": x}),
        "http_binary": binary_request,
        "sdk_binary": lambda: sdk.infer(engine_id, {"input": x}),
        "http_json": json_request,
    }
    samples: dict[str, list[float]] = {kind: [] for kind in paths}
    for _ in range(5):  # warm-up of every path
        for run in paths.values():
            run()
    compute.clear()
    for _ in range(rounds):
        for kind, run in paths.items():
            for _ in range(per_round if kind != "http_json" else max(1, per_round // 4)):
                started = time.perf_counter()
                run()
                samples[kind].append((time.perf_counter() - started) * 1000.0)
    sdk.close()
    stats = {kind: latency_stats(np.asarray(values), 1) for kind, values in samples.items()}
    stats["server_compute"] = latency_stats(np.asarray(compute), 1)
    base = stats["in_process"]["p50_ms"]
    return {
        **stats,
        "ratios_vs_engine_p50": {
            kind: stats[kind]["p50_ms"] / base for kind in ("http_binary", "sdk_binary", "http_json")
        },
        "request_bytes": {"binary": len(binary_body), "json": len(json_body)},
    }


# ---------------------------------------------------------------- 2. load


def load(
    url: str | list[str],
    engine_id: str,
    x: np.ndarray,
    concurrency: int,
    seconds: float,
    auth: dict[str, str] | None = None,
) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the last one returns.
    Several URLs (API replicas): the clients are spread over them in turn, as a client-side
    balancer would."""
    urls = [url] if isinstance(url, str) else url
    body, length = encode({}, "inputs", {"input": x})
    headers = {HEADER_LENGTH: str(length), **(auth or {})}
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        with httpx.Client(base_url=urls[index % len(urls)], timeout=60) as http:
            http.post(f"/v2/models/{engine_id}/infer", content=body, headers=headers)  # connect, warm
            start.wait()
            while time.perf_counter() < stop_at[0]:
                began = time.perf_counter()
                response = http.post(f"/v2/models/{engine_id}/infer", content=body, headers=headers)
                if response.status_code == 200:
                    latencies[index].append((time.perf_counter() - began) * 1000.0)
                else:
                    errors[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds + 60  # provisional, until everyone is connected
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    flat = np.asarray([value for values in latencies for value in values])
    stats = latency_stats(flat, 1)
    return {
        "concurrency": concurrency,
        "requests": len(flat),
        "errors": sum(errors),
        "throughput_per_s": len(flat) / elapsed,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
    }


def perf_analyzer(url: str, engine_id: str, shape: tuple[int, ...], concurrency: int) -> dict | None:
    """Triton's own load tool, when installed (its PyPI package on this index is a 0.1.0 placeholder)."""
    binary = shutil.which("perf_analyzer")
    if binary is None:
        return None
    run = subprocess.run(
        [binary, "-m", engine_id, "-u", url.removeprefix("http://"), "-i", "http",
         "--concurrency-range", f"{concurrency}", "--shape", "input:" + ",".join(map(str, (1, *shape))),
         "--percentile", "99"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return {"concurrency": concurrency, "returncode": run.returncode, "output": run.stdout[-2000:]}


# ---------------------------------------------------------------- 3. soak


def soak(server: Server, engine_id: str, x: np.ndarray, requests: int) -> dict:
    body, length = encode({}, "inputs", {"input": x})
    errors = 0
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(min(200, requests // 10)):  # warm-up: pools, caches, allocator arenas
            http.post(f"/v2/models/{engine_id}/infer", content=body, headers={HEADER_LENGTH: str(length)})
        rss_before = server.rss_mb()
        started = time.perf_counter()
        for _ in range(requests):
            response = http.post(
                f"/v2/models/{engine_id}/infer", content=body, headers={HEADER_LENGTH: str(length)}
            )
            errors += response.status_code != 200
        seconds = time.perf_counter() - started
    rss_after = server.rss_mb()
    return {
        "requests": requests,
        "errors": errors,
        "seconds": seconds,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_growth_mb": rss_after - rss_before,
    }


# ---------------------------------------------------------------- report


def _row(name: str, stats: dict[str, float], ratio: str) -> str:
    return f"| {name} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} | {ratio} |"


def render_model(result: dict[str, Any], load_seconds: float) -> list[str]:
    o = result["overhead"]
    ratios = o["ratios_vs_engine_p50"]
    lines = [
        f"## {result['model']} (fp32, onnxruntime-cpu)",
        "",
        "Overhead at batch 1 (interleaved rounds; ratios of p50s):",
        "",
        "| Path | p50 ms | p99 ms | vs engine in-process |",
        "|---|---|---|---|",
        _row("engine in-process", o["in_process"], "1.00×"),
        _row("/v2 infer, binary tensors", o["http_binary"], f"**{ratios['http_binary']:.3f}×**"),
        _row(
            "/v2 infer, binary tensors, through the SDK (httpx)",
            o["sdk_binary"],
            f"{ratios['sdk_binary']:.3f}×",
        ),
        _row("/v2 infer, JSON tensors", o["http_json"], f"{ratios['http_json']:.2f}×"),
        _row("(server-side compute of the binary requests)", o["server_compute"], ""),
        "",
        f"Load: single-sample binary requests, closed loop, {load_seconds:.0f} s per point:",
        "",
        "| Concurrency | Unbatched req/s | p50 ms | p99 ms | Batched req/s | p50 ms | p99 ms "
        "| Throughput gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for plain, batched in zip(result["load"]["unbatched"], result["load"]["batched"], strict=True):
        lines.append(
            f"| {plain['concurrency']} | {plain['throughput_per_s']:.1f} | {plain['p50_ms']:.1f} "
            f"| {plain['p99_ms']:.1f} | "
            f"{batched['throughput_per_s']:.1f} | {batched['p50_ms']:.1f} | {batched['p99_ms']:.1f} | "
            f"**{batched['throughput_per_s'] / plain['throughput_per_s']:.2f}×** |"
        )
    errors = sum(point["errors"] for points in result["load"].values() for point in points)
    lines += ["", f"Errors under load: {errors}."]
    if result.get("soak"):
        soak_result = result["soak"]
        lines += [
            "",
            f"Soak: {soak_result['requests']} sequential binary requests in {soak_result['seconds']:.0f} s, "
            f"{soak_result['errors']} errors; server RSS {soak_result['rss_before_mb']:.1f} MB before, "
            f"{soak_result['rss_after_mb']:.1f} MB after ({soak_result['rss_growth_mb']:+.1f} MB).",
        ]
    return [*lines, ""]


def render(report: dict[str, Any]) -> str:
    batching = report["batching"]
    lines = [
        "# Serving benchmark",
        "",
        f"Hardware: {report['hardware']['cpu_model']}, {report['hardware']['logical_cores']} logical cores "
        f"({', '.join(report['hardware']['cpu_features'])}); Python {report['python']}; server and load "
        "generator on the same machine. Batching: max_batch_size "
        f"{batching['max_batch_size']}, max_queue_delay_ms {batching['max_queue_delay_ms']}. perf_analyzer: "
        + (
            "ran, see serve.json."
            if report["perf_analyzer"]
            else "not installed here (the load generator above)."
        ),
        "",
    ]
    for result in report["models"]:
        lines += render_model(result, report["load_seconds"])
    return "\n".join(lines)


def bench_model(
    client: Client, server: Server, name: str, workdir: Path, args: argparse.Namespace, soak_requests: int
) -> dict[str, Any]:
    rounds, per_round = (3, 10) if args.quick else (10, 30)
    load_seconds = 4.0 if args.quick else 15.0
    onnx_path, shape = export_model(name, workdir)
    engine_id, engine_file = build_engine(client, onnx_path, server.data_dir)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    result: dict[str, Any] = {"model": name, "engine_id": engine_id, "input_shape": [1, *shape]}
    print(f"{name}: overhead …", flush=True)
    result["overhead"] = overhead(server, engine_id, engine_file, x, rounds, per_round)
    result["load"] = {"unbatched": [], "batched": []}
    for concurrency in (1, 4, 16):
        for mode in ("unbatched", "batched"):
            if mode == "batched":
                client.set_batching(engine_id, args.max_batch_size, args.max_queue_delay_ms)
            print(f"{name}: load at concurrency {concurrency}, {mode} …", flush=True)
            result["load"][mode].append(load(server.url, engine_id, x, concurrency, load_seconds))
            if mode == "batched":
                client.clear_batching(engine_id)
    result["perf_analyzer"] = [
        run for c in (1, 4, 16) if (run := perf_analyzer(server.url, engine_id, shape, c))
    ]
    if name == args.soak_model:
        print(f"{name}: soak, {soak_requests} requests …", flush=True)
        result["soak"] = soak(server, engine_id, x, soak_requests)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "wide_mlp"], choices=MODELS)
    parser.add_argument("--soak-model", default="wide_mlp", help="the model of the sequential soak")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds, 4 s load points")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--soak-requests", type=int, default=None, help="default 10000 (1000 with --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    soak_requests = args.soak_requests or (1000 if args.quick else 10_000)
    report: dict[str, Any] = {
        "hardware": cpu_info(),
        "python": platform.python_version(),
        "load_seconds": 4.0 if args.quick else 15.0,
        "batching": {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms},
        "models": [],
    }
    print(f"hardware: {report['hardware']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="optiforge-bench-serve-") as tmp:
        workdir = Path(tmp)
        server = start_server(workdir / "data", args.port, workdir / "serve.log")
        try:
            with Client(server.url) as client:
                for name in args.models:
                    report["models"].append(bench_model(client, server, name, workdir, args, soak_requests))
        finally:
            server.process.terminate()
            server.process.wait(timeout=30)
    report["perf_analyzer"] = any(result["perf_analyzer"] for result in report["models"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (args.out / "serve.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
