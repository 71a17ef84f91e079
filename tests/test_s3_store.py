"""The S3-compatible artifact store and its node-local read cache (app.core.artifacts), against a
real S3 server: moto's `moto_server`, started on a free loopback port for this module.

Each test gets its own bucket; a "node" is a store with its own cache folder, so two nodes share
nothing but the server, as machines without a shared file system do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from app.core.artifacts import (
    ArtifactBucketMissing,
    ArtifactIntegrityError,
    ArtifactStoreUnavailable,
    LocalArtifactStore,
    Manifest,
    check_at_startup,
    get_store,
)
from app.core.artifacts.cache import ArtifactCache
from app.core.artifacts.s3 import MANIFEST_NAME, S3ArtifactStore
from app.core.artifacts.s3_client import S3Location, make_client
from app.core.migrate import upgrade
from app.main import create_app
from tests.conftest import REPO_ROOT, free_port, make_settings
from tests.conftest import start_moto as _start_moto

MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest part: a 20 MiB file goes up in 4


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto_server on a free loopback port, killed at the end; the AWS_* variables boto3 reads."""
    saved = {
        name: os.environ.get(name)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    process, url = _start_moto()
    try:
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    _raw(endpoint).create_bucket(Bucket=name)
    return name


def _raw(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _node(
    endpoint: str,
    bucket: str,
    cache_dir: Path,
    *,
    max_bytes: int | None = None,
    grace_s: float = 0.0,
    attempts: int = 3,
) -> S3ArtifactStore:
    """One node's store: the shared bucket (under `base/`), its own cache."""
    client = make_client(endpoint, None, max_attempts=attempts, connect_timeout_s=1.0)
    cache = ArtifactCache(cache_dir, max_bytes, eviction_grace_s=grace_s)
    return S3ArtifactStore(S3Location(bucket, "base/"), client, cache, part_size=PART, staging_grace_s=0)


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _keys(endpoint: str, bucket: str) -> list[str]:
    contents = _raw(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(item["Key"] for item in contents)


# ---------------------------------------------------------------- round trip


def test_a_multipart_prefix_goes_up_and_comes_down_on_another_node(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    big = np.random.default_rng(0).bytes(20 * MIB)
    source = _folder(tmp_path / "src", {"model.onnx": big, "extra/vocab.txt": b"a\nb\n"})
    writer, reader = _node(endpoint, bucket, tmp_path / "a"), _node(endpoint, bucket, tmp_path / "b")

    manifest = writer.put_dir("models/m1", source)

    assert manifest.files["model.onnx"].sha256 == hashlib.sha256(big).hexdigest()
    big_object = f"base/models/m1/.v/{manifest.version}/model.onnx"
    etag = _raw(endpoint).head_object(Bucket=bucket, Key=big_object)["ETag"]
    assert etag.strip('"').endswith("-4"), etag  # 4 parts of 5 MiB: streamed, not one 20 MiB body
    assert f"base/models/m1/{MANIFEST_NAME}" in _keys(endpoint, bucket)

    path = reader.local_path("models/m1/model.onnx")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.files["model.onnx"].sha256
    folder = reader.local_path("models/m1")
    assert (folder / "extra" / "vocab.txt").read_bytes() == b"a\nb\n" and path.parent == folder
    assert reader.local_path("models/m1/extra") == folder / "extra"
    assert reader.size("models/m1") == len(big) + 4 and reader.size("models") == len(big) + 4
    assert writer.files() == ["models/m1/extra/vocab.txt", "models/m1/model.onnx"]
    with pytest.raises(FileNotFoundError):
        reader.local_path("models/m1/absent.onnx")
    with pytest.raises(FileNotFoundError):
        reader.local_path("models/m2/model.onnx")


def test_moved_files_become_the_writers_cached_copy(endpoint: str, bucket: str, tmp_path: Path) -> None:
    """The node that stored a prefix with move=True reads it without downloading it."""
    source = _folder(tmp_path / "scratch" / "stored", {"model.onnx": b"x" * 1000})
    writer = _node(endpoint, bucket, tmp_path / "scratch" / "cache")
    writer.put_dir("models/m1", source, move=True)
    assert not source.exists()
    _raw(endpoint).delete_objects(  # the data objects gone: only the cache can answer now
        Bucket=bucket, Delete={"Objects": [{"Key": key} for key in _keys(endpoint, bucket) if "/.v/" in key]}
    )
    assert writer.local_path("models/m1/model.onnx").read_bytes() == b"x" * 1000


def test_a_prefix_published_again_replaces_the_old_version(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    writer, reader = _node(endpoint, bucket, tmp_path / "a"), _node(endpoint, bucket, tmp_path / "b")
    writer.put_dir("datasets/d1", _folder(tmp_path / "v1", {"source.zip": b"zip"}))
    assert reader.local_path("datasets/d1/source.zip").read_bytes() == b"zip"

    second = writer.put_dir("datasets/d1", _folder(tmp_path / "v2", {"dataset.npz": b"npz"}))

    assert [key for key in _keys(endpoint, bucket) if "/.v/" in key] == [
        f"base/datasets/d1/.v/{second.version}/dataset.npz"
    ]
    assert reader.local_path("datasets/d1/dataset.npz").read_bytes() == b"npz"  # seen at once
    with pytest.raises(FileNotFoundError):
        reader.local_path("datasets/d1/source.zip")
    assert reader.cache.cached_prefixes() == ["datasets/d1"]  # the old copy went


# ---------------------------------------------------------------- atomic publication


def test_objects_without_a_manifest_are_invisible_and_cleaned_up(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    """What an upload killed before its manifest leaves: objects no reader sees, removed at start-up."""
    store = _node(endpoint, bucket, tmp_path / "a")
    store.put_dir("models/kept", _folder(tmp_path / "k", {"model.onnx": b"kept"}))
    raw = _raw(endpoint)
    raw.put_object(Bucket=bucket, Key="base/models/half/.v/0123/model.onnx", Body=b"half")
    raw.put_object(Bucket=bucket, Key="base/models/kept/.v/4567/model.onnx", Body=b"a killed re-upload")
    started = raw.create_multipart_upload(Bucket=bucket, Key="base/models/half/.v/89ab/big.bin")

    with pytest.raises(FileNotFoundError):
        store.local_path("models/half/model.onnx")
    assert store.files() == ["models/kept/model.onnx"]

    removed = store.remove_abandoned_staging()

    assert set(removed) >= {"models/half@0123", "models/kept@4567", "multipart:models/half/.v/89ab/big.bin"}
    assert [key for key in _keys(endpoint, bucket) if "half" in key or "4567" in key] == []
    assert not raw.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert started["UploadId"]
    assert store.local_path("models/kept/model.onnx").read_bytes() == b"kept"


def test_an_upload_killed_midway_publishes_nothing(endpoint: str, bucket: str, tmp_path: Path) -> None:
    """A process killed (SIGKILL) while its multipart upload runs: a small file already stored, a
    big one half sent. Readers see nothing; start-up removes both."""
    source = _folder(tmp_path / "src", {"a.txt": b"first", "big.bin": bytes(40 * MIB)})
    script = (
        "import sys; from pathlib import Path\n"
        "from app.core.artifacts.cache import ArtifactCache\n"
        "from app.core.artifacts.s3 import S3ArtifactStore\n"
        "from app.core.artifacts.s3_client import S3Location, make_client\n"
        f"store = S3ArtifactStore(S3Location({bucket!r}, 'base/'), make_client({endpoint!r}, None), "
        f"ArtifactCache(Path({str(tmp_path / 'cache')!r}), None), part_size={PART}, max_concurrency=1)\n"
        f"store.put_dir('models/killed', Path({str(source)!r}))\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    raw = _raw(endpoint)
    deadline = time.monotonic() + 20
    while not raw.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert writer.poll() is None and time.monotonic() < deadline, "the upload ended before it was seen"
        time.sleep(0.01)
    writer.kill()
    writer.wait(timeout=10)

    store = _node(endpoint, bucket, tmp_path / "b")
    assert [key for key in _keys(endpoint, bucket) if key.endswith("a.txt")]  # half an artifact is there
    with pytest.raises(FileNotFoundError):
        store.local_path("models/killed/a.txt")
    assert store.files() == []

    removed = store.remove_abandoned_staging()

    assert any(item.startswith("models/killed@") for item in removed)
    assert any(item.startswith("multipart:models/killed/") for item in removed)
    assert _keys(endpoint, bucket) == [] and not raw.list_multipart_uploads(Bucket=bucket).get("Uploads")


# ---------------------------------------------------------------- integrity


def test_a_damaged_stored_file_is_fetched_twice_then_refused(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    writer, reader = _node(endpoint, bucket, tmp_path / "a"), _node(endpoint, bucket, tmp_path / "b")
    manifest = writer.put_dir("jobs/j1/engines/e1", _folder(tmp_path / "src", {"model.onnx": b"good"}))
    _raw(endpoint).put_object(
        Bucket=bucket, Key=f"base/jobs/j1/engines/e1/.v/{manifest.version}/model.onnx", Body=b"evil"
    )

    with pytest.raises(ArtifactIntegrityError) as raised:
        reader.local_path("jobs/j1/engines/e1/model.onnx")

    error = raised.value
    assert (error.status, error.code, error.headers) == (
        503,
        "artifact_integrity_error",
        {"Retry-After": "5"},
    )
    assert "jobs/j1/engines/e1/model.onnx" in error.detail and str(tmp_path) not in error.detail
    assert reader.cache.cached_prefixes() == []  # nothing unverified is installed


def test_a_publication_replaced_in_the_bucket_is_caught_by_the_recorded_hash(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    """A manifest and file replaced together agree with each other, so only the hash the engine's
    row recorded at build time tells that the file is not the one that was measured."""
    writer, reader = _node(endpoint, bucket, tmp_path / "a"), _node(endpoint, bucket, tmp_path / "b")
    built = writer.put_dir("jobs/j1/engines/e1", _folder(tmp_path / "built", {"model.onnx": b"built"}))
    recorded = built.files["model.onnx"].sha256
    assert reader.local_path("jobs/j1/engines/e1/model.onnx", sha256=recorded).read_bytes() == b"built"

    writer.put_dir("jobs/j1/engines/e1", _folder(tmp_path / "other", {"model.onnx": b"other"}))

    with pytest.raises(ArtifactIntegrityError) as raised:
        reader.local_path("jobs/j1/engines/e1/model.onnx", sha256=recorded)
    assert raised.value.code == "artifact_integrity_error" and "built" in raised.value.detail
    # Without a recorded hash, the manifest is all there is to check against.
    assert reader.local_path("jobs/j1/engines/e1/model.onnx").read_bytes() == b"other"


def test_one_bad_download_is_fetched_again(tmp_path: Path) -> None:
    """The cache alone, with a download that is damaged once (a flaky network): the second passes."""
    cache = ArtifactCache(tmp_path / "cache", None)
    manifest = Manifest.of_dir("models/m", _folder(tmp_path / "src", {"model.onnx": b"good"}))
    calls: list[str] = []

    def download(name: str, target: Path) -> None:
        calls.append(name)
        target.write_bytes(b"bad!" if len(calls) == 1 else b"good")

    folder = cache.get(manifest, download)

    assert calls == ["model.onnx", "model.onnx"] and (folder / "model.onnx").read_bytes() == b"good"


def test_a_file_corrupted_in_the_cache_is_detected_and_fetched_again(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    writer, reader = _node(endpoint, bucket, tmp_path / "a"), _node(endpoint, bucket, tmp_path / "b")
    writer.put_dir("models/m1", _folder(tmp_path / "src", {"model.onnx": b"0123456789" * 100}))
    cached = reader.local_path("models/m1/model.onnx")
    time.sleep(0.05)  # past the file system's coarse clock tick: the write moves the mtime
    with cached.open("r+b") as handle:  # one byte flipped in place, as a bad disk or a stray write would
        handle.seek(10)
        handle.write(b"X")

    again = reader.local_path("models/m1/model.onnx")

    assert again.read_bytes() == b"0123456789" * 100
    os.utime(again)  # touched, not changed: re-hashed once, still the same entry
    assert reader.local_path("models/m1/model.onnx") == again


# ---------------------------------------------------------------- the cache's bound and life


def test_the_cache_evicts_the_least_recently_used_prefix_by_bytes(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    writer = _node(endpoint, bucket, tmp_path / "a")
    reader = _node(endpoint, bucket, tmp_path / "b", max_bytes=3 * MIB)
    for name in ("m1", "m2", "m3"):
        writer.put_dir(f"models/{name}", _folder(tmp_path / name, {"model.onnx": bytes(1200 * 1024)}))

    reader.local_path("models/m1/model.onnx")
    time.sleep(0.02)
    reader.local_path("models/m2/model.onnx")
    time.sleep(0.02)
    reader.local_path("models/m1/model.onnx")  # m1 used again: m2 is now the least recent
    time.sleep(0.02)
    reader.local_path("models/m3/model.onnx")

    assert reader.cache.cached_prefixes() == ["models/m1", "models/m3"]
    assert reader.cache.total_bytes() <= 3 * MIB


def test_recently_used_entries_are_not_evicted_from_under_their_reader(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    writer = _node(endpoint, bucket, tmp_path / "a")
    reader = _node(endpoint, bucket, tmp_path / "b", max_bytes=MIB, grace_s=60)
    for name in ("m1", "m2"):
        writer.put_dir(f"models/{name}", _folder(tmp_path / name, {"model.onnx": bytes(800 * 1024)}))
    first = reader.local_path("models/m1/model.onnx")
    reader.local_path("models/m2/model.onnx")  # over the bound for a while, rather than m1 pulled away
    assert first.exists() and reader.cache.cached_prefixes() == ["models/m1", "models/m2"]


def test_the_cache_survives_a_restart(endpoint: str, bucket: str, tmp_path: Path) -> None:
    writer = _node(endpoint, bucket, tmp_path / "a")
    writer.put_dir("models/m1", _folder(tmp_path / "src", {"model.onnx": b"weights"}))
    _node(endpoint, bucket, tmp_path / "b").local_path("models/m1/model.onnx")
    raw = _raw(endpoint)
    raw.delete_objects(  # the data objects gone: a download would fail, only the cache can answer
        Bucket=bucket, Delete={"Objects": [{"Key": key} for key in _keys(endpoint, bucket) if "/.v/" in key]}
    )

    restarted = _node(endpoint, bucket, tmp_path / "b")

    assert restarted.local_path("models/m1/model.onnx").read_bytes() == b"weights"


# ---------------------------------------------------------------- deletes


def test_delete_removes_the_objects_and_every_cached_copy(endpoint: str, bucket: str, tmp_path: Path) -> None:
    writer, reader = _node(endpoint, bucket, tmp_path / "a"), _node(endpoint, bucket, tmp_path / "b")
    writer.put_dir("jobs/j1/engines/e1", _folder(tmp_path / "e1", {"model.onnx": b"e1"}), move=True)
    writer.put_dir("jobs/j1/autotune", _folder(tmp_path / "at", {"report.json": b"{}"}))
    writer.put_dir("jobs/j10/autotune", _folder(tmp_path / "other", {"report.json": b"{}"}))
    reader.local_path("jobs/j1/engines/e1/model.onnx")
    assert writer.cache.cached_prefixes() == ["jobs/j1/engines/e1"]

    writer.delete("jobs/j1")

    assert [key for key in _keys(endpoint, bucket) if key.startswith("base/jobs/j1/")] == []
    assert writer.files() == ["jobs/j10/autotune/report.json"]  # a sibling with a longer name stays
    assert writer.cache.cached_prefixes() == []
    with pytest.raises(FileNotFoundError):  # the other node finds no manifest and drops its copy
        reader.local_path("jobs/j1/engines/e1/model.onnx")
    assert reader.cache.cached_prefixes() == []
    writer.delete("jobs/never")  # a missing prefix is not an error


# ---------------------------------------------------------------- faults


def test_an_unreachable_endpoint_names_the_variable_and_cached_copies_still_serve(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    _node(endpoint, bucket, tmp_path / "a").put_dir(
        "models/m1", _folder(tmp_path / "src", {"model.onnx": b"w"})
    )
    _node(endpoint, bucket, tmp_path / "b").local_path("models/m1/model.onnx")
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = _node(nowhere, bucket, tmp_path / "b", attempts=1)

    with pytest.raises(ArtifactStoreUnavailable) as raised:
        down.put_dir("models/m2", _folder(tmp_path / "m2", {"model.onnx": b"w"}))

    error = raised.value
    assert (error.status, error.code, error.headers) == (
        503,
        "artifact_store_unavailable",
        {"Retry-After": "5"},
    )
    assert "OPTIFORGE_S3_ENDPOINT_URL" in error.detail and "127.0.0.1" not in error.detail
    assert down.local_path("models/m1/model.onnx").read_bytes() == b"w"  # from this node's cache
    with pytest.raises(ArtifactStoreUnavailable):
        down.local_path("models/m2/model.onnx")
    with pytest.raises(ArtifactStoreUnavailable):
        down.check()
    check_at_startup(down)  # unreachable at start-up: logged, the process starts (readiness says)
    assert down.remove_abandoned_staging() == []


def test_a_bucket_that_does_not_exist_stops_the_start(endpoint: str, tmp_path: Path) -> None:
    store = _node(endpoint, "no-such-bucket", tmp_path / "a")
    with pytest.raises(ArtifactBucketMissing) as raised:
        check_at_startup(store)
    assert "'no-such-bucket'" in raised.value.detail and "OPTIFORGE_ARTIFACT_URL" in raised.value.detail


def test_wrong_credentials_name_the_variable(tmp_path: Path) -> None:
    """A server that checks keys (moto with IAM authentication on) refuses an unknown access key."""
    process, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        with pytest.raises(ArtifactStoreUnavailable) as raised:
            _node(url, "any-bucket", tmp_path / "a", attempts=1).check()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert "AWS_ACCESS_KEY_ID" in raised.value.detail and "testing" not in raised.value.detail


# ---------------------------------------------------------------- choosing a store


def test_the_url_scheme_picks_the_store(endpoint: str, bucket: str, tmp_path: Path) -> None:
    default = make_settings(tmp_path / "data")
    assert default.resolved_artifact_url == (tmp_path / "data" / "artifacts").resolve().as_uri()
    local = get_store(default)
    assert isinstance(local, LocalArtifactStore) and local.root == default.resolved_artifact_dir
    elsewhere = make_settings(tmp_path / "data", artifact_url=f"file://{tmp_path}/elsewhere%20dir")
    assert get_store(elsewhere).root == (tmp_path / "elsewhere dir").resolve()  # type: ignore[attr-defined]

    remote = make_settings(
        tmp_path / "data", artifact_url=f"s3://{bucket}/prefix", s3_endpoint_url=endpoint, cache_max_bytes=MIB
    )
    store = get_store(remote)
    assert isinstance(store, S3ArtifactStore) and get_store(remote) is store  # one per process
    assert (store.bucket, store.location.base, store.cache.max_bytes) == (bucket, "prefix/", MIB)
    assert (
        remote.resolved_artifact_dir == remote.resolved_cache_dir == (tmp_path / "data" / "cache").resolve()
    )
    store.check()

    with pytest.raises(ValueError, match="OPTIFORGE_ARTIFACT_URL"):
        get_store(make_settings(tmp_path / "data", artifact_url="gs://bucket/x"))
    with pytest.raises(ValueError, match="OPTIFORGE_ARTIFACT_URL"):
        make_settings(tmp_path / "data", artifact_url="file://relative/dir")


def test_the_api_answers_503_with_retry_after_when_the_store_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)  # a refused connection answered at once, without backoff
    settings = make_settings(
        tmp_path / "data",
        artifact_url="s3://artifacts",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    caplog.set_level(logging.WARNING)
    with TestClient(create_app(settings)) as client:  # unreachable at start-up: it starts
        response = client.post("/v1/models", files={"file": ("m.onnx", model)})
        ready = client.get("/readyz")
    # not ready while the store is out of reach; the reason is in the log, not in the response
    assert ready.status_code == 503 and ready.json()["checks"]["artifact_store"] == "error", ready.text
    assert "OPTIFORGE_S3_ENDPOINT_URL" not in ready.text and "readiness: the artifact store" in caplog.text
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "artifact_store_unavailable"
    assert response.headers["Retry-After"] == "5"
    assert "OPTIFORGE_S3_ENDPOINT_URL" in response.json()["detail"]
    assert "not usable at start-up" in caplog.text
    assert not list(settings.scratch_dir.glob("upload-*"))  # the upload's scratch went with it
