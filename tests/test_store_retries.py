"""A job whose artifact store is out of reach is tried again within its attempt, then fails with
`artifact_store_unavailable` (workers.job_runner.STORE_RETRY_DELAYS_S): an S3 endpoint that
restarts for a few seconds costs a job a pause, not its result. A damaged file is not retried
(it is not transient)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.artifacts.errors import ArtifactIntegrityError, ArtifactStoreUnavailable
from app.core.artifacts.local import LocalArtifactStore
from tests.conftest import DigitsArtifacts, LocalApi
from workers import job_runner
from workers.job_runner import run_job_by_id


class FlakyStore(LocalArtifactStore):
    """A local store whose reads fail `failures` times with `error` before they work again."""

    def __init__(self, root: Path, failures: int, error: type[Exception] = ArtifactStoreUnavailable):
        super().__init__(root)
        self.failures = failures
        self.error = error
        self.calls = 0

    def local_path(self, key: str, *, sha256: str | None = None) -> Path:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("the artifact store could not be reached: check OPTIFORGE_S3_ENDPOINT_URL")
        return super().local_path(key, sha256=sha256)


def _queued_job(local_api: LocalApi, digits: DigitsArtifacts) -> str:
    with digits.onnx_path.open("rb") as handle:
        model = local_api.client.post("/v1/models", files={"file": ("digits.onnx", handle)}).json()
    recipe = {"targets": ["onnxruntime-cpu"], "batch_sizes": [1], "measure": {"timed_runs": 1}}
    created = local_api.client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe})
    assert created.status_code == 202, created.text
    return created.json()["id"]


@pytest.mark.parametrize(
    ("failures", "error", "status", "code"),
    [
        (1, ArtifactStoreUnavailable, "succeeded", None),  # back after one pause
        (9, ArtifactStoreUnavailable, "failed", "artifact_store_unavailable"),  # out for good
        (1, ArtifactIntegrityError, "failed", "artifact_integrity_error"),  # not retried
    ],
)
def test_a_store_outage_is_retried_then_fails_with_its_code(
    local_api: LocalApi,
    digits: DigitsArtifacts,
    monkeypatch: pytest.MonkeyPatch,
    failures: int,
    error: type[Exception],
    status: str,
    code: str | None,
) -> None:
    job_id = _queued_job(local_api, digits)
    flaky = FlakyStore(local_api.settings.resolved_artifact_dir, failures, error)
    monkeypatch.setattr(job_runner, "get_store", lambda settings: flaky)
    monkeypatch.setattr(job_runner, "STORE_RETRY_DELAYS_S", (0.1, 0.1))
    run_job_by_id(local_api.settings, job_id)
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == status, job
    assert (job.get("error") or {}).get("code") == code
    tries = 1 if error is ArtifactIntegrityError else min(failures, 2) + 1
    assert flaky.calls >= tries if status == "succeeded" else flaky.calls == tries


def test_a_damaged_engine_file_is_a_503_and_flags_the_engine(
    local_api: LocalApi, digits: DigitsArtifacts, caplog: pytest.LogCaptureFixture
) -> None:
    """Serving an engine whose stored file failed its sha256 twice: 503 `artifact_integrity_error`
    with Retry-After, counted against the engine in the metrics and logged as flagged."""
    job_id = _queued_job(local_api, digits)
    run_job_by_id(local_api.settings, job_id)
    engine_id = local_api.client.get(f"/v1/jobs/{job_id}").json()["engine_ids"][0]
    serving = local_api.client.app.state.serving  # type: ignore[attr-defined]
    serving.store = FlakyStore(local_api.settings.resolved_artifact_dir, 1, ArtifactIntegrityError)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]}
    answer = local_api.client.post(f"/v2/models/{engine_id}/infer", json=body)
    assert answer.status_code == 503 and answer.json()["code"] == "artifact_integrity_error", answer.text
    assert answer.headers["retry-after"] == "5"
    assert f"engine {engine_id} flagged" in caplog.text
    metrics = local_api.client.get("/metrics").text
    counted = f'optiforge_inference_errors_total{{code="artifact_integrity_error",engine="{engine_id}"}}'
    assert counted in metrics
    assert local_api.client.post(f"/v2/models/{engine_id}/infer", json=body).status_code == 200  # then fine
