"""Issue 19, items 6 and 7: what a few bytes of dataset may ask for is bounded before anything is
decoded, large image folders are decoded by a worker job (the dataset `processing` meanwhile, jobs
refused until it is ready), and evaluation reads a dataset in batches from disk."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.migrate import upgrade
from app.main import create_app
from engines.ingest.datasets import load_dataset
from engines.ingest.signature import TensorSpec
from engines.measure.accuracy import classification_accuracy, fidelity
from tests.conftest import DigitsArtifacts, LiveStack, LocalApi, make_settings, wait_for_job
from tests.test_image_datasets import png_declaring
from workers.job_runner import run_job_by_id

GRAY32 = {"size": [32, 32], "resize": "resize", "channel_order": "GRAY", "mean": [0.0], "std": [1.0]}


def _png(width: int, height: int, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _stored(api: LocalApi) -> list[Path]:
    root = api.settings.resolved_artifact_dir / "datasets"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


@pytest.fixture
def small_limits_api(tmp_path: Path) -> Iterator[LocalApi]:
    settings = make_settings(
        tmp_path / "data", max_upload_bytes=4 * 1024 * 1024, max_dataset_samples=100, max_dataset_arrays=8
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield LocalApi(client, settings, app.state.store)


# ------------------------------------------------------------------------- bounds before decoding


def test_an_amplifying_image_zip_is_refused_before_decoding(local_api: LocalApi) -> None:
    """The reported probe: two tiny PNGs asked to become 8192×8192 float32 (1.6 GB) took 21 s and
    2.3 GB of the API; now a 413 from the spec alone, at once, nothing stored."""
    body = _zip({"a.png": _png(4, 4), "b.png": _png(4, 4)})
    assert len(body) < 1000
    started = time.monotonic()
    answer = local_api.client.post(
        "/v1/datasets",
        files={"file": ("tiny.zip", body)},
        data={"preprocessing": json.dumps({"size": [8192, 8192], "dtype": "float32"})},
    )
    assert time.monotonic() - started < 5
    assert answer.status_code == 413, answer.text
    error = answer.json()
    assert error["code"] == "dataset_too_large"
    settings = local_api.settings
    assert error["bytes"] == 2 * 3 * 8192 * 8192 * 4
    assert error["limit"] == min(settings.max_dataset_bytes, settings.max_unpacked_bytes)
    assert "uint8" in error["detail"]
    assert local_api.client.get("/v1/datasets").json() == [] and _stored(local_api) == []


def test_image_pixels_are_bounded_from_the_header(local_api: LocalApi) -> None:
    """An 8000×8000 image (64 MP, under Pillow's own limit) is refused from its header."""
    body = _zip({"a.png": _png(8, 8), "big.png": png_declaring(8000, 8000)})
    answer = local_api.client.post(
        "/v1/datasets", files={"file": ("big.zip", body)}, data={"preprocessing": json.dumps(GRAY32)}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "image_too_large" and answer.json()["member"] == "big.png"
    assert "8000x8000" in answer.json()["detail"] and _stored(local_api) == []


def test_npz_samples_and_members_are_capped(small_limits_api: LocalApi, tmp_path: Path) -> None:
    client = small_limits_api.client
    many_rows = tmp_path / "rows.npz"
    np.savez_compressed(many_rows, input=np.zeros((101, 2), np.float32))
    answer = client.post("/v1/datasets", files={"file": ("rows.npz", many_rows.read_bytes())})
    assert answer.status_code == 413, answer.text
    assert answer.json()["code"] == "too_many_samples"
    assert (answer.json()["samples"], answer.json()["limit"]) == (101, 100)

    many_members = tmp_path / "members.npz"
    np.savez(many_members, **{f"x{i}": np.zeros((2, 1), np.float32) for i in range(9)})
    answer = client.post("/v1/datasets", files={"file": ("members.npz", many_members.read_bytes())})
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "too_many_arrays" and answer.json()["arrays"] == 9
    assert client.get("/v1/datasets").json() == [] and _stored(small_limits_api) == []

    fits = tmp_path / "fits.npz"
    np.savez(fits, input=np.zeros((100, 2), np.float32))
    assert client.post("/v1/datasets", files={"file": ("fits.npz", fits.read_bytes())}).status_code == 201


def test_default_limits_cap_members_and_samples() -> None:
    settings = make_settings(Path("/tmp/unused"))
    assert settings.max_dataset_arrays == 256 and settings.max_dataset_samples == 100_000


# ------------------------------------------------------------------------ decoding in a worker job


def _large_folder() -> bytes:
    """Two 3000×3000 images (18 MP in all, over the 16 MP decoded at upload), of a few KB."""
    return _zip({"cat/a.png": _png(3000, 3000, 40), "dog/b.png": _png(3000, 3000, 200)})


def test_a_large_image_folder_is_decoded_by_a_job(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    """202 `processing` with the job; jobs and the download refused (409) until the worker has
    decoded it; then ready, with the arrays the spec said."""
    client = local_api.client
    answer = client.post(
        "/v1/datasets",
        files={"file": ("big.zip", _large_folder())},
        data={"preprocessing": json.dumps(GRAY32)},
    )
    assert answer.status_code == 202, answer.text
    dataset = answer.json()
    assert dataset["status"] == "processing" and dataset["processing_job_id"]
    assert dataset["samples"] == 2 and dataset["arrays"]["input"]["shape"] == [2, 1, 32, 32]
    job = client.get(f"/v1/jobs/{dataset['processing_job_id']}").json()
    assert job["kind"] == "decode_images" and job["model_id"] is None and job["status"] == "queued"

    with digits.onnx_path.open("rb") as handle:
        model = client.post("/v1/models", files={"file": ("digits.onnx", handle)}).json()
    refused = client.post(
        "/v1/jobs", json={"model_id": model["id"], "evaluation_dataset_id": dataset["id"], "recipe": {}}
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "dataset_not_ready"
    assert refused.json()["processing_job_id"] == job["id"]
    assert client.get(f"/v1/datasets/{dataset['id']}/download").status_code == 409

    run_job_by_id(local_api.settings, job["id"])
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    ready = client.get(f"/v1/datasets/{dataset['id']}").json()
    assert ready["status"] == "ready" and ready["has_labels"] and ready["classes"] == 2
    stored = client.get(f"/v1/datasets/{dataset['id']}/download")
    with np.load(io.BytesIO(stored.content)) as arrays:
        assert arrays["input"].shape == (2, 1, 32, 32) and list(arrays["labels"]) == [0, 1]
        assert abs(float(arrays["input"][0].mean()) - 40 / 255) < 1e-3
    names = sorted(path.name for path in _stored(local_api))
    assert names == ["dataset.npz"]  # the zip is gone once decoded


def test_a_cancelled_decoding_shows_failed_in_the_listing_too(local_api: LocalApi) -> None:
    """A decode job cancelled while queued leaves the row `processing` (no worker saw it): the
    listing reads the job, as the single GET does, and says `failed`."""
    client = local_api.client
    answer = client.post(
        "/v1/datasets",
        files={"file": ("big.zip", _large_folder())},
        data={"preprocessing": json.dumps(GRAY32)},
    )
    assert answer.status_code == 202, answer.text
    dataset = answer.json()
    cancelled = client.post(f"/v1/jobs/{dataset['processing_job_id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    single = client.get(f"/v1/datasets/{dataset['id']}").json()
    listed = next(item for item in client.get("/v1/datasets").json() if item["id"] == dataset["id"])
    assert single["status"] == listed["status"] == "failed"
    assert listed["error"] == single["error"]


def test_a_failed_decoding_fails_its_dataset(local_api: LocalApi) -> None:
    client = local_api.client
    members = {
        "cat/a.png": _png(3000, 3000),
        "dog/b.png": _png(3000, 3000),
        "dog/c.png": png_declaring(3000, 3000),  # a header, then pixels cut short
    }
    answer = client.post(
        "/v1/datasets",
        files={"file": ("bad.zip", _zip(members))},
        data={"preprocessing": json.dumps(GRAY32)},
    )
    assert answer.status_code == 202, answer.text
    dataset = answer.json()
    run_job_by_id(local_api.settings, dataset["processing_job_id"])
    failed = client.get(f"/v1/datasets/{dataset['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "image_decode_failed"
    assert failed["error"]["member"] == "dog/c.png"


def test_image_decoding_job_on_both_stacks(live_stack: LiveStack, tmp_path: Path) -> None:
    """Over HTTP with a real worker, SQLite + embedded broker and PostgreSQL + Redis; the SDK waits."""
    from optiforge_client import Client

    with live_stack.client() as client:
        answer = client.post(
            "/v1/datasets",
            files={"file": ("big.zip", _large_folder())},
            data={"preprocessing": json.dumps(GRAY32)},
        )
        assert answer.status_code == 202, answer.text
        dataset = answer.json()
        job = wait_for_job(client, dataset["processing_job_id"], timeout=120)
        assert job["status"] == "succeeded", job
        ready = client.get(f"/v1/datasets/{dataset['id']}").json()
        assert ready["status"] == "ready" and ready["arrays"]["input"]["shape"] == [2, 1, 32, 32]
        assert any(row["id"] == dataset["id"] for row in client.get("/v1/datasets").json())

    archive = tmp_path / "big.zip"
    archive.write_bytes(_large_folder())
    with Client(live_stack.base_url) as sdk:
        waited = sdk.upload_dataset(archive, preprocessing=GRAY32)
        assert waited.status == "ready" and waited.samples == 2
        # other options: a new dataset to decode (the same upload again would be the ready one)
        pending = sdk.upload_dataset(
            archive, preprocessing={**GRAY32, "interpolation": "nearest"}, wait=False
        )
        assert pending.status == "processing" and pending.processing_job_id
        assert sdk.wait_for_dataset(pending.id, timeout=120).status == "ready"


# --------------------------------------------------------------------------- streamed evaluation


@pytest.mark.parametrize("compressed", [False, True])
def test_evaluation_memory_does_not_grow_with_the_dataset(tmp_path: Path, compressed: bool) -> None:
    """A 120 MB dataset read by a job (memory-mapped; a compressed member inflated once to the
    X
        np.load it held the whole dataset, then a copy)."""
    samples = 30_000
    rows = np.random.default_rng(0).random((samples, 1, 32, 32), dtype=np.float32)
    labels = np.arange(samples) % 10
    path = tmp_path / "eval.npz"
    (np.savez_compressed if compressed else np.savez)(path, input=rows, labels=labels)
    del rows
    spec = [TensorSpec("input", "float32", ("N", 1, 32, 32))]
    tracemalloc.start()
    try:
        data = load_dataset(path, spec, max_unpacked_bytes=1 << 30, scratch_dir=tmp_path / "scratch")
        logits = np.empty((samples, 10), np.float32)
        for start in range(0, samples, 256):
            batch = data.batch(start, start + 256)["input"]
            logits[start : start + 256] = batch.reshape(len(batch), -1)[:, :10]
        top = classification_accuracy(logits, data.labels)
        same = fidelity(logits, logits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.0 <= top["top1"] <= 1.0 and same["cosine_similarity"] == pytest.approx(1.0)
    # A compressed member is inflated 8 MiB at a time (the block, zlib's buffers and the copy into
    # the map): about 33 MiB at its peak, whatever the dataset's size.
    assert peak < 40 * 1024 * 1024, (
        f"peak {peak / 2**20:.0f} MiB for a {samples * 4096 / 2**20:.0f} MiB dataset"
    )
