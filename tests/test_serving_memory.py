"""Inference memory grows with the batch, not the body (issue 19, item 5).

A binary /v2 body of 58.6 MiB carried 15 000 digits samples, and its engine call peaked at 1.3 GB;
six at once took the API from 1.4 to 5.6 GB, and ONNX Runtime's arena kept it. So: a largest
batch per engine (413 `batch_too_large` above it, on /v1 and /v2, JSON and binary), engine calls
admitted by their estimated activations against a per-process budget, and memory given back after
big calls. The last two are checked on a live server's resident memory (/proc/<pid>/status).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from optiforge_client import tensors

from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.serving.limits import engine_max_batch
from tests.conftest import QUICK_MEASURE, REPO_ROOT, DigitsArtifacts, free_port, make_settings
from workers.job_runner import run_job_by_id

MAX_BATCH = 16


@dataclass
class Built:
    settings: Settings
    engine_id: str


def build_engine(settings: Settings, onnx_path: Path) -> str:
    """A digits engine measured at batch 1 only, built by the worker's own entry point."""
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client, onnx_path.open("rb") as handle:
        model_id = client.post("/v1/models", files={"file": (onnx_path.name, handle)}).json()["id"]
        job = client.post(
            "/v1/jobs", json={"model_id": model_id, "recipe": {"batch_sizes": [1], "measure": QUICK_MEASURE}}
        ).json()
        run_job_by_id(settings, job["id"])
        return client.get(f"/v1/jobs/{job['id']}").json()["engine_ids"][0]


@pytest.fixture(scope="module")
def limited(digits: DigitsArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("limited") / "data", max_inference_batch=MAX_BATCH)
    engine_id = build_engine(settings, digits.onnx_path)
    with TestClient(create_app(settings)) as client:
        client.engine_id = engine_id  # type: ignore[attr-defined]
        yield client


def _samples(batch: int) -> np.ndarray:
    return np.random.default_rng(0).random((batch, 1, 32, 32), dtype=np.float32)


def _v2_json(client: TestClient, engine_id: str, x: np.ndarray) -> httpx.Response:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    return client.post(f"/v2/models/{engine_id}/infer", json=body)


def _v2_binary(client: TestClient | httpx.Client, engine_id: str, x: np.ndarray) -> httpx.Response:
    header = {"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    body, length = tensors.encode(header, "inputs", {"input": x}, binary=True)
    return client.post(
        f"/v2/models/{engine_id}/infer", content=body, headers={tensors.HEADER_LENGTH: str(length)}
    )


def _v1_json(client: TestClient, engine_id: str, x: np.ndarray) -> httpx.Response:
    return client.post(f"/v1/engines/{engine_id}/infer", json={"inputs": {"input": x.tolist()}})


@pytest.mark.parametrize("send", [_v1_json, _v2_json, _v2_binary], ids=["v1-json", "v2-json", "v2-binary"])
def test_a_batch_over_the_engine_limit_is_refused_with_the_limit(limited: TestClient, send) -> None:
    engine_id = limited.engine_id  # type: ignore[attr-defined]
    refused = send(limited, engine_id, _samples(MAX_BATCH + 1))
    assert refused.status_code == 413, refused.text
    body = refused.json()
    assert body["code"] == "batch_too_large" and body["max_batch"] == MAX_BATCH, body
    assert str(MAX_BATCH) in (body.get("detail") or body.get("error")), body
    accepted = send(limited, engine_id, _samples(MAX_BATCH))
    assert accepted.status_code == 200, accepted.text


def test_v2_metadata_and_v1_engines_state_the_largest_batch(limited: TestClient) -> None:
    engine_id = limited.engine_id  # type: ignore[attr-defined]
    metadata = limited.get(f"/v2/models/{engine_id}").json()
    assert metadata["parameters"]["max_batch_size"] == MAX_BATCH
    assert limited.get(f"/v1/engines/{engine_id}").json()["max_batch"] == MAX_BATCH
    listed = next(engine for engine in limited.get("/v1/engines").json() if engine["id"] == engine_id)
    assert listed["max_batch"] == MAX_BATCH


def test_the_largest_batch_comes_from_what_the_engine_was_built_and_measured_for() -> None:
    measured = {"latency": {"1": {}, "4096": {}}}
    assert engine_max_batch(measured, {}, 1024) == 4096  # seen to run there
    assert engine_max_batch({"latency": {"1": {}, "8": {}}}, {}, 1024) == 1024  # the server's default
    # A TensorRT plan cannot run past its optimization profile, whatever the default.
    profile = {"input": [[1, 1, 32, 32], [32, 1, 32, 32], [32, 1, 32, 32]]}
    assert engine_max_batch({"latency": {"1": {}, "32": {}}}, {"optimization_profile": profile}, 1024) == 32
    fixed = {"input": [[8, 1, 32, 32], [8, 1, 32, 32], [8, 1, 32, 32]]}
    assert engine_max_batch({"latency": {"8": {}}}, {"optimization_profile": fixed}, 1024) == 8


# ---------------------------------------------------------------- resident memory of a live server

#: Samples per request: 16 MiB of body, an engine call that peaks near 350 MB.
BIG_BATCH = 4096
CONCURRENT = 6
#: Budget for the engine calls' activations: 4096 samples are estimated over it, so they run alone.
ACTIVATION_BUDGET_MB = 256
#: What the server may grow by under the six requests: one engine call, six bodies and their
#: outputs, and slack. Six calls at once took about 2.1 GB more, and the arena kept 3 GB.
PEAK_GROWTH_MB = 800
#: What it may keep once they are done (the engine call's memory is given back).
KEPT_MB = 200


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_concurrent_large_requests_stay_under_a_memory_bound(digits: DigitsArtifacts, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    engine_id = build_engine(settings, digits.onnx_path)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTIFORGE_")}
    env |= {
        "PYTHONUNBUFFERED": "1",
        "OPTIFORGE_DATA_DIR": str(settings.data_dir),
        "OPTIFORGE_MAX_INFERENCE_BATCH": str(BIG_BATCH),
        "OPTIFORGE_INFERENCE_ACTIVATION_BUDGET_MB": str(ACTIVATION_BUDGET_MB),
        "OPTIFORGE_INFERENCE_THREADS": "2",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            assert _v2_binary(client, engine_id, _samples(1)).status_code == 200  # loaded, warm
            before = _status_mb(server.pid, "VmRSS:")
            x = _samples(BIG_BATCH)
            with ThreadPoolExecutor(CONCURRENT) as pool:
                statuses = list(
                    pool.map(lambda _: _v2_binary(client, engine_id, x).status_code, range(CONCURRENT))
                )
            assert statuses == [200] * CONCURRENT, log.read_text()[-3000:]
            peak, after = _status_mb(server.pid, "VmHWM:"), _status_mb(server.pid, "VmRSS:")
    finally:
        server.terminate()
        server.wait(timeout=30)
    growth = {"before_mb": round(before), "peak_mb": round(peak), "after_mb": round(after)}
    assert peak - before < PEAK_GROWTH_MB, growth
    assert after - before < KEPT_MB, growth
