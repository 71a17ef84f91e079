"""Several machines on one host (issue 22, item 4): two API replicas (A, B) and two workers, each a
process group of its own with its own OPTIFORGE_DATA_DIR (scratch, read cache), sharing only
PostgreSQL (a database of this module's), Redis (a queue prefix of this module's) and a real
S3-compatible server (moto_server, its state in memory): what nodes without a shared file system
share.

- A model and datasets uploaded through A, a job built on a worker, served through B, which pulls
  the engine from the store on first use.
- An alias moved through B is what A serves on its next request.
- A worker node killed (SIGKILL, the whole process group) mid-job: the other worker finishes it;
  the killed node's scratch is its own, removed when that node starts again.
- The job's report, the engine's layer errors, the model and the dataset read through B, which
  received and built none of them.
- A file corrupted in B's read cache is found on B's next load and fetched again.
- An engine deleted through B: its objects are gone and A answers 404 at once.
- The S3 server killed mid-upload: the upload fails with 503 `artifact_store_unavailable`, and no
  model row and no scratch are left.

And throughout: no job lost, no object in the bucket that a manifest does not publish, and no path
shared between the nodes' data directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save_model

from app.core.artifacts.cache import ArtifactCache
from app.core.artifacts.s3 import MANIFEST_NAME, VERSIONS, S3ArtifactStore
from app.core.artifacts.s3_client import S3Location, make_client
from bench.processes import environment, fresh_postgres_database
from tests.conftest import (
    POSTGRES_URL,
    QUICK_MEASURE,
    REDIS_URL,
    REPO_ROOT,
    DigitsArtifacts,
    _base_env,
    _optiforge,
    free_port,
    require_service,
    start_moto,
    wait_for_job,
)

pytestmark = pytest.mark.postgres

BASE = "base/"  # the bucket's prefix under which the service keeps its artifacts
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Node:
    """One machine: a process group (API or worker) with a data directory no other node reads."""

    name: str
    data_dir: Path
    log: Path
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    url: str = ""  # an API's base URL

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """`sig` to the node's whole process group: the Celery parent and its pool child alike."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def restart(self) -> None:
        """The node started again on its own data directory, as a machine that rebooted."""
        assert self.process.poll() is not None, f"{self.name} is still running"
        self.log = self.log.with_suffix(".restarted.log")
        self.process = _spawn(self.command, self.env, self.log)

    def owns(self, pid: int) -> bool:
        try:
            return os.getpgid(pid) == self.process.pid
        except ProcessLookupError:
            return False


@dataclass
class Cluster:
    endpoint: str
    bucket: str
    moto: subprocess.Popen[bytes]
    nodes: dict[str, Node] = field(default_factory=dict)

    def raw_keys(self) -> list[str]:
        contents = self.s3().list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return sorted(item["Key"] for item in contents)

    def s3(self):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **_credentials())

    def observer(self, cache_dir: Path) -> S3ArtifactStore:
        """The test's own view of the bucket (its own cache): what any reader can see."""
        with environment(AWS):
            client = make_client(self.endpoint, None, max_attempts=1)
        return S3ArtifactStore(S3Location(self.bucket, BASE), client, ArtifactCache(cache_dir, None))


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
    }


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )


def _wait_until_up(nodes: list[Node], timeout: float = 90) -> None:
    """APIs answer /readyz (database, broker and store reachable); workers have said `ready.`."""
    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    while waiting:
        for node in list(waiting):
            assert node.process.poll() is None, f"{node.name} exited:\n{node.log.read_text()[-4000:]}"
            if node.url:
                try:
                    up = httpx.get(f"{node.url}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    up = False
            else:
                up = " ready." in node.log.read_text(errors="replace")
            if up:
                waiting.remove(node)
        assert time.monotonic() < deadline, "not up: " + ", ".join(
            f"{node.name}:\n{node.log.read_text()[-2000:]}" for node in waiting
        )
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import redis
    from sqlalchemy.engine import make_url

    admin_url = make_url(POSTGRES_URL)
    redis_url = make_url(REDIS_URL.replace("redis://", "redis+x://"))  # parsed for host/port only
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    require_service("Redis", redis_url.host or "127.0.0.1", redis_url.port or 6379)
    root = tmp_path_factory.mktemp("machines")
    queue_prefix = f"machines-{secrets.token_hex(4)}-"
    database = contextlib.ExitStack()
    database_url = database.enter_context(fresh_postgres_database(POSTGRES_URL, "optiforge_machines"))
    moto, endpoint = start_moto()
    cluster = Cluster(endpoint, f"machines-{secrets.token_hex(4)}", moto)
    try:
        cluster.s3().create_bucket(Bucket=cluster.bucket)
        shared = {
            **AWS,
            "OPTIFORGE_DATABASE_URL": database_url,
            "OPTIFORGE_BROKER_URL": REDIS_URL,
            "OPTIFORGE_QUEUE_PREFIX": queue_prefix,
            "OPTIFORGE_ARTIFACT_URL": f"s3://{cluster.bucket}/{BASE.rstrip('/')}",
            "OPTIFORGE_S3_ENDPOINT_URL": endpoint,
        }

        def env(name: str) -> dict[str, str]:
            return {**_base_env(root / name / "data"), **shared}

        subprocess.run(
            [*_optiforge(), "migrate"], env=env("migrate"), check=True, cwd=REPO_ROOT, capture_output=True
        )
        for name in ("api-a", "api-b", "worker-1", "worker-2"):
            port = free_port()
            if name.startswith("api"):
                command = [*_optiforge(), "serve", "--no-worker", "--port", str(port)]
            else:
                command = [*_optiforge(), "worker", "--queues", "cpu"]
            node_env, log = env(name), root / f"{name}.log"
            url = f"http://127.0.0.1:{port}" if name.startswith("api") else ""
            process = _spawn(command, node_env, log)
            cluster.nodes[name] = Node(name, root / name / "data", log, command, node_env, process, url)
        _wait_until_up(list(cluster.nodes.values()))
        yield cluster
    finally:
        for node in cluster.nodes.values():
            node.kill(signal.SIGTERM)
        for node in cluster.nodes.values():
            try:
                node.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.process.wait(timeout=10)
        moto.kill()
        moto.wait(timeout=10)
        database.close()
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{queue_prefix}*"):
            client.delete(key)


def _upload(client: httpx.Client, path: Path, kind: str, name: str) -> dict:
    with path.open("rb") as handle:
        response = client.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": name})
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
    return response.json()


def _start_job(client: httpx.Client, body: dict) -> str:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _v2(client: httpx.Client, name: str, images: np.ndarray) -> tuple[str, np.ndarray]:
    """(the engine id that answered, its logits) for `images` through /v2/models/{name}/infer."""
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ]
    }
    response = client.post(f"/v2/models/{name}/infer", json=body)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return response.json()["model_version"], np.asarray(output["data"], np.float32).reshape(output["shape"])


def _cache_entry(node: Node, prefix_start: str) -> Path:
    """The folder in `node`'s read cache holding the publication whose prefix starts so."""
    for manifest in (node.data_dir / "cache" / "entries").glob("*/manifest.json"):
        if json.loads(manifest.read_text())["prefix"].startswith(prefix_start):
            return manifest.parent
    raise AssertionError(f"{node.name} has no cached copy of {prefix_start}*")


def _flip_a_byte(path: Path) -> None:
    time.sleep(0.05)  # past the file system's coarse clock tick: the write moves the mtime
    with path.open("r+b") as handle:  # in place, as a bad disk or a stray write would
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_nodes_that_share_no_disk_build_serve_recover_and_agree(
    cluster: Cluster, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    nodes = cluster.nodes
    api_a, api_b = nodes["api-a"], nodes["api-b"]
    images = digits.split.test_x[:8]
    with api_a.client() as a, api_b.client() as b:
        # ---- two worker processes on one host are two live workers (one Celery node name each)
        deadline = time.monotonic() + 30
        while a.get("/v1/capabilities").json()["workers"].get("cpu", 0) < 2:
            assert time.monotonic() < deadline, a.get("/v1/capabilities").json()["workers"]
            time.sleep(0.5)

        # ---- upload through A; two jobs, one of them long enough to kill its worker mid-job
        model = _upload(a, digits.onnx_path, "models", "digits-cnn")
        evaluation = _upload(a, digits.eval_npz, "datasets", "digits-test")
        calibration = _upload(a, digits.calib_npz, "datasets", "digits-calib")
        fp32_id = _start_job(
            a,
            {
                "model_id": model["id"],
                "evaluation_dataset_id": evaluation["id"],
                "recipe": {"batch_sizes": [1], "measure": QUICK_MEASURE},
            },
        )
        int8_id = _start_job(
            a,
            {
                "model_id": model["id"],
                "evaluation_dataset_id": evaluation["id"],
                "calibration_dataset_id": calibration["id"],
                "recipe": {
                    "precision": "int8",
                    "batch_sizes": [1],
                    "measure": {"timed_runs": 10, "min_seconds": 3},
                },
            },
        )

        # ---- kill -9 the worker node running the int8 job: the other one finishes it
        deadline = time.monotonic() + 90
        while (job := a.get(f"/v1/jobs/{int8_id}").json())["status"] != "running" or not job["worker"]:
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.1)
        pid = int(job["worker"].rsplit(":", 1)[1])
        killed = next(node for name, node in nodes.items() if name.startswith("worker") and node.owns(pid))
        survivor = nodes["worker-2" if killed.name == "worker-1" else "worker-1"]
        # mid-job: once the attempt has its scratch folder (a job marked running may not have one yet)
        while not list((killed.data_dir / "scratch").glob(f"job-{int8_id}-*")):
            assert time.monotonic() < deadline, a.get(f"/v1/jobs/{int8_id}").json()
            time.sleep(0.05)
        killed.kill()
        killed.process.wait(timeout=10)

        fp32_job = wait_for_job(a, fp32_id, timeout=120)
        int8_job = wait_for_job(a, int8_id, timeout=120)
        assert fp32_job["status"] == "succeeded", fp32_job
        assert int8_job["status"] == "succeeded", (int8_job["error"], int8_job["messages"])
        assert int8_job["attempts"] == 2 and len(int8_job["engine_ids"]) == 1, int8_job
        assert any("was lost; starting over" in message for message in int8_job["messages"])
        assert survivor.owns(int(int8_job["worker"].rsplit(":", 1)[1])), (int8_job["worker"], survivor.name)
        (fp32_engine,), (int8_engine,) = fp32_job["engine_ids"], int8_job["engine_ids"]

        # ---- served through B, which built nothing: it pulls the engine from the store
        response = b.post(f"/v1/engines/{fp32_engine}/infer", json={"inputs": {"input": images.tolist()}})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            response.json()["outputs"]["logits"], digits.torch_test_logits[:8], atol=1e-4
        )
        _cache_entry(api_b, f"jobs/{fp32_id}/engines/")

        # ---- an alias moved through B is what A serves next
        assert a.put(f"/v1/engines/{fp32_engine}/alias", json={"alias": "digits"}).status_code == 200
        assert _v2(a, "digits", images)[0] == fp32_engine
        moved = b.put(f"/v1/engines/{int8_engine}/alias", json={"alias": "digits"})
        assert moved.status_code == 200, moved.text
        answered_by, int8_logits = _v2(a, "digits", images)
        assert answered_by == int8_engine
        assert (int8_logits.argmax(1) == digits.torch_test_logits[:8].argmax(1)).mean() >= 0.875

        # ---- a file corrupted in B's cache is found on B's next load and fetched again
        exported = b.get(f"/v1/engines/{int8_engine}/triton")  # B reads the engine: now in its cache
        assert exported.status_code == 200, exported.text
        entry = _cache_entry(api_b, f"jobs/{int8_id}/engines/")
        manifest = json.loads((entry / "manifest.json").read_text())
        (name,) = [name for name in manifest["files"] if name.endswith(".onnx")]
        _flip_a_byte(entry / "data" / name)
        answered_by, from_b = _v2(b, int8_engine, images)  # B's first load of this engine
        assert answered_by == int8_engine
        np.testing.assert_allclose(from_b, int8_logits, atol=1e-6)
        assert "was modified on this node" in api_b.log.read_text()
        refetched = _cache_entry(api_b, f"jobs/{int8_id}/engines/") / "data" / name
        assert hashlib.sha256(refetched.read_bytes()).hexdigest() == manifest["files"][name]["sha256"]
        # content-addressed: the row holds the hash of the file the worker built, checked on download
        assert b.get(f"/v1/engines/{int8_engine}").json()["sha256"] == manifest["files"][name]["sha256"]

        # ---- what a job and an upload left, read through B, which received and built none of it
        report = b.get(f"/v1/jobs/{int8_id}/report", params={"format": "md"})
        assert report.status_code == 200 and "| int8 | onnxruntime-cpu |" in report.text, report.text
        layer_errors = b.get(f"/v1/engines/{int8_engine}/layer-errors")
        assert layer_errors.status_code == 200 and layer_errors.json()["activations"], layer_errors.text
        downloaded = b.get(f"/v1/models/{model['id']}/download")
        assert (
            downloaded.status_code == 200
            and hashlib.sha256(downloaded.content).hexdigest() == model["sha256"]
        )
        dataset = b.get(f"/v1/datasets/{evaluation['id']}/download")
        assert dataset.status_code == 200 and dataset.content == digits.eval_npz.read_bytes()

        # ---- an engine deleted through B: its objects go, A answers 404 at once
        assert b.delete(f"/v1/engines/{fp32_engine}").status_code == 204
        assert not [key for key in cluster.raw_keys() if key.startswith(f"{BASE}jobs/{fp32_id}/engines/")]
        assert (
            a.post(
                f"/v1/engines/{fp32_engine}/infer", json={"inputs": {"input": images.tolist()}}
            ).status_code
            == 404
        )

        # ---- no job lost
        jobs = a.get("/v1/jobs").json()
        assert sorted(job["id"] for job in jobs) == sorted([fp32_id, int8_id])
        assert {job["status"] for job in jobs} == {"succeeded"}

    # ---- the killed node's scratch is its own: it is cleaned when that node starts again
    assert list((killed.data_dir / "scratch").glob(f"job-{int8_id}-*"))
    killed.restart()
    _wait_until_up([killed])
    assert not list((killed.data_dir / "scratch").glob(f"job-{int8_id}-*"))

    # ---- the workers pulled the model from the store: no node read another's disk
    for node in (api_a, survivor):
        _cache_entry(node, f"models/{model['id']}")
    _assert_every_object_is_published(cluster, tmp_path)
    _assert_no_shared_path(cluster)


def test_the_store_killed_mid_upload_fails_it_cleanly(cluster: Cluster, tmp_path: Path) -> None:
    """Runs last: the S3 server is gone afterwards (its state was in memory)."""
    api_a = cluster.nodes["api-a"]
    big = tmp_path / "big.onnx"
    weights = numpy_helper.from_array(np.ones(16 * 1024 * 1024, np.float32), "w")  # 64 MiB
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16 * 1024 * 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16 * 1024 * 1024])],
        [weights],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), big)
    raw = cluster.s3()
    with api_a.client() as a:
        models_before = a.get("/v1/models").json()
        answer: dict[str, httpx.Response] = {}
        uploading = threading.Thread(target=lambda: answer.update(r=_post(a, big)))
        uploading.start()
        deadline = time.monotonic() + 60
        while not raw.list_multipart_uploads(Bucket=cluster.bucket).get("Uploads"):
            assert uploading.is_alive() and time.monotonic() < deadline, "the upload ended before it was seen"
            time.sleep(0.01)
        cluster.moto.kill()
        cluster.moto.wait(timeout=10)
        uploading.join(timeout=120)
        response = answer["r"]
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "artifact_store_unavailable"
        assert response.headers["Retry-After"]
        assert a.get("/v1/models").json() == models_before  # no model row for what was not stored
    assert not list((api_a.data_dir / "scratch").glob("upload-*"))


def _post(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/v1/models", files={"file": (path.name, handle)}, data={"name": "big"})


def _assert_every_object_is_published(cluster: Cluster, tmp_path: Path) -> None:
    """Every object in the bucket is a manifest or a file a manifest publishes: nothing half-visible."""
    published = set(cluster.observer(tmp_path / "observer").files())
    assert published
    for key in cluster.raw_keys():
        assert key.startswith(BASE), key
        if key.endswith(f"/{MANIFEST_NAME}"):
            continue
        prefix, rest = key[len(BASE) :].split(f"/{VERSIONS}/", 1)
        assert f"{prefix}/{rest.split('/', 1)[1]}" in published, key
    assert not cluster.s3().list_multipart_uploads(Bucket=cluster.bucket).get("Uploads")


def _assert_no_shared_path(cluster: Cluster) -> None:
    """The data directories are apart, none holds a link out of itself, and none grew a local
    artifact store: every artifact a node used came through the bucket."""
    roots = [node.data_dir.resolve() for node in cluster.nodes.values()]
    for root in roots:
        assert root.is_dir()
        assert not [other for other in roots if other != root and other.is_relative_to(root)]
        assert not (root / "artifacts").exists(), root
        for path in root.rglob("*"):
            assert path.resolve().is_relative_to(root), path
