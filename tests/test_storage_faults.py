"""Storage faults on a live API: the database out of reach, and the disk full (issue 19, items 10, 11).

Real faults, no mocks: PostgreSQL is cut off by a TCP proxy between the API and the server (the
shared server keeps running for the other tests); SQLite is write-locked by another connection
past the API's busy timeout; the disk is a 40 MB tmpfs filled with a file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from sqlalchemy.engine import make_url

from app.core.store import LocalArtifactStore
from bench.processes import fresh_postgres_database
from bench.tcp_proxy import TcpProxy
from tests.conftest import (
    POSTGRES_URL,
    REPO_ROOT,
    DigitsArtifacts,
    _base_env,
    _optiforge,
    api_process,
    free_port,
    require_service,
    stored_fp32_engine,
)

KEY = "of_" + secrets.token_urlsafe(32)
#: Short caches, so a test outlives them within a second.
CACHE_TTL_S = "0.3"


# ---------------------------------------------------------------- a live API on a given database


@dataclass
class Api:
    base_url: str
    data_dir: Path
    database_url: str  # as the test reaches it (not through the proxy)
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})


@contextlib.contextmanager
def live_api(
    data_dir: Path, api_database_url: str | None, direct_url: str | None, **env: str
) -> Iterator[Api]:
    """`optiforge serve --no-worker` on `api_database_url` (None: SQLite in the data dir), migrated
    through `direct_url`, with the bootstrap key KEY."""
    base = _base_env(data_dir)
    base.update({f"OPTIFORGE_{name.upper()}": value for name, value in env.items()})
    base["OPTIFORGE_BOOTSTRAP_API_KEY"] = KEY
    base["OPTIFORGE_AUTH_CACHE_TTL_S"] = CACHE_TTL_S
    base["OPTIFORGE_ENGINE_CACHE_TTL_S"] = CACHE_TTL_S
    migrate_env = dict(base)
    if direct_url:
        migrate_env["OPTIFORGE_DATABASE_URL"] = direct_url
    subprocess.run(
        [*_optiforge(), "migrate"], env=migrate_env, check=True, cwd=REPO_ROOT, capture_output=True
    )
    if api_database_url:
        base["OPTIFORGE_DATABASE_URL"] = api_database_url
    port = free_port()
    log = data_dir.parent / f"api-{port}.log"
    api = Api(
        f"http://127.0.0.1:{port}", data_dir, direct_url or f"sqlite:///{data_dir / 'optiforge.db'}", log
    )
    with api_process(port, base, log):
        yield api


def upload(client: httpx.Client, kind: str, path: Path) -> httpx.Response:
    with open(path, "rb") as handle:
        return client.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": path.stem})


def seed_engine(api: Api, model_id: str) -> str:
    """An engine to serve without running a job (conftest.stored_fp32_engine)."""
    store = LocalArtifactStore(api.data_dir / "artifacts")
    return stored_fp32_engine(store, api.database_url, model_id)[1]


def assert_database_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable", response.text
    assert int(response.headers["Retry-After"]) > 0
    assert "Traceback" not in response.text and "/" not in response.json().get("detail", "")


@pytest.fixture
def v2_input(digits: DigitsArtifacts) -> dict:
    shape = [1, *digits.split.test_x.shape[1:]]
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": [0.0] * int(np.prod(shape))}]
    }


# ---------------------------------------------------------------- item 10: PostgreSQL cut off


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL; its URL."""
    admin_url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    with fresh_postgres_database(POSTGRES_URL, "optiforge_outage") as url:
        yield url


def test_postgres_outage_is_503_and_v2_keeps_serving_a_loaded_engine(
    tmp_path: Path, postgres_database: str, digits: DigitsArtifacts, v2_input: dict
) -> None:
    direct = make_url(postgres_database)
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432))
    through_proxy = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    with (
        proxy,
        live_api(tmp_path / "data", through_proxy, postgres_database) as api,
        api.client() as client,
    ):
        model = upload(client, "models", digits.onnx_path)
        assert model.status_code == 201, model.text
        engine_id = seed_engine(api, model.json()["id"])
        assert client.post(f"/v2/models/{engine_id}/infer", json=v2_input).status_code == 200
        assert client.get("/v1/models").status_code == 200

        proxy.cut()
        time.sleep(float(CACHE_TTL_S) * 3)  # past the key and name caches: the database is asked
        outage_started = time.monotonic()
        assert_database_unavailable(client.get("/v1/models"))
        assert_database_unavailable(client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "prod"}))
        assert_database_unavailable(client.get(f"/v2/models/{engine_id}"))  # /v2, not the hot path
        unknown = client.post("/v2/models/never-looked-up/infer", json=v2_input)  # the DirectRoute
        assert_database_unavailable(unknown)
        assert unknown.json()["error"]  # the Open Inference Protocol's error body
        # A key this process never saw cannot be checked: the same 503 as every route's.
        assert_database_unavailable(
            httpx.get(f"{api.base_url}/v1/models", headers={"Authorization": "Bearer ofk_" + "n" * 40})
        )
        # A loaded engine keeps serving on the key and name it was looked up with (the decision:
        # README, Reliability), within database_outage_grace_s.
        for _ in range(3):
            served = client.post(f"/v2/models/{engine_id}/infer", json=v2_input)
            assert served.status_code == 200, served.text
        assert httpx.get(f"{api.base_url}/healthz").status_code == 200
        assert httpx.get(f"{api.base_url}/readyz").status_code == 503
        assert time.monotonic() - outage_started < 30  # each refusal is quick (no hanging pool)

        proxy.restore()
        # The pool held connections the outage closed; pre-ping replaces them, so the first
        # request after the outage succeeds.
        assert client.get("/v1/models").status_code == 200
        assert client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "prod"}).status_code == 200
        assert httpx.get(f"{api.base_url}/readyz").status_code == 200
    assert "OperationalError" not in "\n".join(
        line for line in api.log.read_text().splitlines() if '"status": 500' in line
    )


# ---------------------------------------------------------------- item 10: SQLite write-locked


def test_sqlite_locked_past_busy_timeout_is_503(
    tmp_path: Path, digits: DigitsArtifacts, v2_input: dict
) -> None:
    """SQLite's outage: another process holds the write lock longer than the busy timeout (1 s
    here, `?timeout=` in the URL). Writes are 503 `database_unavailable`; reads (WAL) and
    inference go on; nothing is half-stored."""
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'optiforge.db'}?timeout=1"
    with live_api(data_dir, url, url) as api, api.client() as client:
        model = upload(client, "models", digits.onnx_path)
        assert model.status_code == 201, model.text
        engine_id = seed_engine(api, model.json()["id"])
        assert client.post(f"/v2/models/{engine_id}/infer", json=v2_input).status_code == 200
        stored = sorted(path.name for path in (data_dir / "artifacts" / "models").iterdir())

        locker = sqlite3.connect(data_dir / "optiforge.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            assert_database_unavailable(client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "prod"}))
            assert_database_unavailable(client.delete(f"/v1/engines/{engine_id}"))
            other = tmp_path / "other.onnx"  # not the stored file: the same one is deduplicated, a read
            renamed = onnx.load(str(digits.onnx_path))
            renamed.doc_string = "another upload"
            onnx.save(renamed, str(other))
            assert_database_unavailable(upload(client, "models", other))
            assert client.get("/v1/models").status_code == 200
            assert client.post(f"/v2/models/{engine_id}/infer", json=v2_input).status_code == 200
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert sorted(path.name for path in (data_dir / "artifacts" / "models").iterdir()) == stored
        assert not [p for p in (data_dir / "scratch").glob("upload-*")]
        assert client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "prod"}).status_code == 200


# ---------------------------------------------------------------- item 11: the disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs (as root; CI runs as root), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path) -> None:
    """Write `path` until the file system has no space left (big blocks, then small ones)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1024 * 1024, 4096):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)


def assert_insufficient_storage(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.json()["code"] == "insufficient_storage"
    assert "/" not in response.json()["detail"]


def assert_no_500(response: httpx.Response) -> None:
    """A write that SQLite could still fit in its write-ahead log succeeds; one that cannot is 507."""
    if response.status_code >= 400:
        assert_insufficient_storage(response)


@pytest.fixture
def tiny_files(tmp_path: Path) -> tuple[Path, Path]:
    """A one-node ONNX model ([N, 4] float) and a dataset for it: quick to make and to check."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_path, data_path = tmp_path / "tiny.onnx", tmp_path / "tiny.npz"
    onnx.save(model, model_path)
    np.savez(data_path, input=np.ones((16, 4), np.float32))
    return model_path, data_path


def test_disk_full_is_507_deletes_recover_and_readyz_says_so(
    small_disk: Path, tiny_files: tuple[Path, Path]
) -> None:
    model_file, dataset_file = tiny_files
    data_dir = small_disk / "data"
    settings = {"min_free_disk_mb": "8", "disk_reserve_mb": "2"}
    with live_api(data_dir, None, None, **settings) as api, api.client() as client:
        model = upload(client, "models", model_file)
        assert model.status_code == 201, model.text
        model_id = model.json()["id"]
        dataset = upload(client, "datasets", dataset_file)
        assert dataset.status_code == 201, dataset.text
        engine_id = seed_engine(api, model_id)
        assert httpx.get(f"{api.base_url}/readyz").status_code == 200
        assert (data_dir / ".disk-reserve").stat().st_size == 2 * 1024 * 1024  # written by readiness
        stored = sorted(path.name for path in (data_dir / "artifacts" / "models").iterdir())

        filler = small_disk / "filler"
        fill(filler)
        ready = httpx.get(f"{api.base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["disk"] == "error", ready.text
        assert httpx.get(f"{api.base_url}/healthz").status_code == 200
        assert "under min_free_disk_mb" in api.log.read_text()

        assert_insufficient_storage(upload(client, "models", model_file))
        assert_insufficient_storage(upload(client, "datasets", dataset_file))
        assert sorted(path.name for path in (data_dir / "artifacts" / "models").iterdir()) == stored
        assert not list((data_dir / "scratch").glob("upload-*"))  # nothing half-stored
        assert_insufficient_storage(client.get(f"/v1/engines/{engine_id}/triton"))
        assert not list((data_dir / "scratch").glob("export-*"))
        job = {"model_id": model_id, "evaluation_dataset_id": dataset.json()["id"], "recipe": {}}
        assert_no_500(client.post("/v1/jobs", json=job))
        assert_no_500(client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "prod"}))

        # Deletes free space, so they work on the full disk (the reserve is given up if needed).
        assert client.delete(f"/v1/datasets/{dataset.json()['id']}").status_code == 204
        assert client.delete(f"/v1/engines/{engine_id}").status_code == 204
        assert client.get(f"/v1/engines/{engine_id}").status_code == 404

        filler.unlink()
        assert httpx.get(f"{api.base_url}/readyz").status_code == 200
        assert (data_dir / ".disk-reserve").exists()
        assert client.delete(f"/v1/models/{model_id}").status_code == 204  # else the upload is deduplicated
        assert upload(client, "models", model_file).status_code == 201
