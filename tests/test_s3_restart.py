"""The S3 server restarted mid-upload (issue 22, item 4), against s3rver: an S3-compatible server that
keeps its data on disk, so what was published before the restart is still there after it (moto's
state lives in memory and would vanish with it).

The API streams a 64 MiB model into the store in 5 MiB parts; the test kills s3rver once the first
part is on its disk, waits for the API's answer, then starts s3rver again on the same folder:
- the upload failed cleanly: 503 `artifact_store_unavailable` with Retry-After, no model row, no
  scratch left on the node;
- nothing of it is visible: every published file is one the earlier model's manifest names (the
  parts s3rver kept are invisible: no manifest publishes them);
- the model published before the restart still downloads, byte for byte, on a node that never saw
  it;
- the same upload sent again succeeds, and reads back on another node.

s3rver comes from npm (`make .tools/s3rver/.installed`, which `.ci/run` runs). Without it the test
skips, unless OPTIFORGE_REQUIRE_SERVICES=1 (CI), where a missing server is a failure.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save_model

from app.core.artifacts.cache import ArtifactCache
from app.core.artifacts.s3 import S3ArtifactStore
from app.core.artifacts.s3_client import S3Location, make_client
from tests.conftest import REPO_ROOT, REQUIRE_SERVICES, free_port, start_stack

S3RVER = REPO_ROOT / ".tools" / "s3rver" / "node_modules" / ".bin" / "s3rver"
#: s3rver's default credentials; it checks the signature, so boto3 must sign with these.
AWS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1"}
BASE = "optiforge"


class S3rver:
    """One s3rver on a fixed port and folder, which can be killed and started again."""

    def __init__(self, executable: str, folder: Path) -> None:
        self.executable, self.folder, self.port = executable, folder, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable, "-d", str(self.folder), "-p", str(self.port), "-a", "127.0.0.1", "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.process.poll() is None, "s3rver exited at start"
                time.sleep(0.1)
        pytest.fail("s3rver did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def uploading(self) -> bool:
        """Whether a multipart upload has parts on s3rver's disk (it cannot list them over S3)."""
        return any(self.folder.glob("*/._S3rver_uploads/*/1"))


def _s3rver_executable() -> str:
    found = str(S3RVER) if S3RVER.exists() else shutil.which("s3rver")
    if found is None:
        message = "s3rver is not installed (make .tools/s3rver/.installed installs it from npm)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def s3rver(tmp_path: Path) -> Iterator[S3rver]:
    server = S3rver(_s3rver_executable(), tmp_path / "s3rver")
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _observer(server: S3rver, bucket: str, cache_dir: Path) -> S3ArtifactStore:
    """A node that has seen nothing: its own empty cache, the shared bucket."""
    client = make_client(server.endpoint, None, max_attempts=2, connect_timeout_s=1.0)
    return S3ArtifactStore(S3Location(bucket, f"{BASE}/"), client, ArtifactCache(cache_dir, None))


def _onnx_model(path: Path, elements: int, fill: float) -> Path:
    weights = numpy_helper.from_array(np.full(elements, fill, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])],
        [weights],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _post(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/v1/models", files={"file": (path.name, handle)}, data={"name": path.stem})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_s3_server_restarted_mid_upload_leaves_nothing_half_visible(
    s3rver: S3rver, tmp_path: Path
) -> None:
    bucket = f"restart-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS.items():
            patch.setenv(name, value)
        boto3.client("s3", endpoint_url=s3rver.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        small = _onnx_model(tmp_path / "small.onnx", 1024, 1.0)
        big = _onnx_model(tmp_path / "big.onnx", 16 * 1024 * 1024, 2.0)  # 64 MiB: 13 parts of 5 MiB
        (tmp_path / "node").mkdir()
        stack_env = {
            **AWS,
            "OPTIFORGE_ARTIFACT_URL": f"s3://{bucket}/{BASE}",
            "OPTIFORGE_S3_ENDPOINT_URL": s3rver.endpoint,
        }
        with (
            start_stack("embedded", tmp_path / "node", **stack_env) as stack,
            httpx.Client(base_url=stack.base_url, timeout=120) as api,
        ):
            first = _post(api, small)
            assert first.status_code == 201, first.text
            kept = first.json()
            published_before = _observer(s3rver, bucket, tmp_path / "observer-1").files()
            assert published_before and all(
                key.startswith(f"models/{kept['id']}/") for key in published_before
            )

            # ---- the server goes away while the big model's parts are going up
            answer: dict[str, httpx.Response] = {}
            uploading = threading.Thread(target=lambda: answer.update(response=_post(api, big)))
            uploading.start()
            deadline = time.monotonic() + 60
            while not s3rver.uploading():
                assert uploading.is_alive() and time.monotonic() < deadline, (
                    "the upload ended before it was seen"
                )
                time.sleep(0.01)
            s3rver.kill()
            uploading.join(timeout=180)
            response = answer["response"]
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "artifact_store_unavailable"
            assert response.headers["Retry-After"]
            s3rver.start()  # the same folder: what was published before is still there

            # ---- failed cleanly: no row, no scratch, nothing of it published
            assert [model["id"] for model in api.get("/v1/models").json()] == [kept["id"]]
            assert not list((stack.data_dir / "scratch").glob("upload-*"))
            observer = _observer(s3rver, bucket, tmp_path / "observer-2")
            assert observer.files() == published_before
            assert any(s3rver.folder.glob("*/._S3rver_uploads/*/1"))  # s3rver kept the parts: invisible

            # ---- what was published before the restart survived it, byte for byte
            downloaded = api.get(f"/v1/models/{kept['id']}/download")
            assert downloaded.status_code == 200, downloaded.text
            assert hashlib.sha256(downloaded.content).hexdigest() == _sha256(small)
            pulled = observer.local_path(f"models/{kept['id']}")
            assert any(_sha256(path) == _sha256(small) for path in pulled.rglob("*.onnx"))

            # ---- the same upload, sent again once the server is back, succeeds
            again = _post(api, big)
            assert again.status_code == 201, again.text
            fresh = _observer(s3rver, bucket, tmp_path / "observer-3").local_path(
                f"models/{again.json()['id']}"
            )
            assert any(_sha256(path) == _sha256(big) for path in fresh.rglob("*.onnx"))
