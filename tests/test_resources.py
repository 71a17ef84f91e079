"""CRUD on models, datasets, jobs and engines, and the job runner's contract, in-process on SQLite.

Jobs here are run by calling the worker's own entry point (`run_job_by_id`) in the test process:
the same code a Celery worker runs, without the broker hop that tests/test_e2e_flow.py covers.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import pytest

from app.core.db import session_scope
from app.core.orm import JobRecord, utcnow
from tests.conftest import DigitsArtifacts, LocalApi
from tests.test_bad_input import assert_nothing_stored, expect_error, linear_model, post_file
from workers.job_runner import Attempt, Superseded, run_job_by_id
from workers.recovery import requeue_lost_jobs

FAST = {"batch_sizes": [1, 4], "measure": {"warmup_runs": 1, "timed_runs": 5, "min_seconds": 0}}


@pytest.fixture
def uploaded(local_api: LocalApi, digits: DigitsArtifacts) -> dict[str, str]:
    model = post_file(local_api, "models", "digits.onnx", digits.onnx_path.read_bytes()).json()
    dataset = post_file(local_api, "datasets", "eval.npz", digits.eval_npz.read_bytes()).json()
    return {"model_id": model["id"], "evaluation_dataset_id": dataset["id"]}


def create_job(api: LocalApi, uploaded: dict[str, str], recipe: dict | None = None) -> str:
    response = api.client.post("/v1/jobs", json={**uploaded, "recipe": recipe or FAST})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_model_listing_download_and_delete(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    created = post_file(local_api, "models", "digits.onnx", digits.onnx_path.read_bytes()).json()
    assert created["name"] == "digits" and created["macs"] > 0
    assert [model["id"] for model in local_api.client.get("/v1/models").json()] == [created["id"]]
    assert local_api.client.get(f"/v1/models/{created['id']}").json() == created
    download = local_api.client.get(f"/v1/models/{created['id']}/download")
    assert download.status_code == 200 and download.content[:2] == digits.onnx_path.read_bytes()[:2]
    assert local_api.client.delete(f"/v1/models/{created['id']}").status_code == 204
    assert local_api.client.get("/v1/models").json() == []
    assert_nothing_stored(local_api)


def test_dataset_listing_download_and_delete(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    created = post_file(local_api, "datasets", "eval.npz", digits.eval_npz.read_bytes()).json()
    assert created["arrays"] == {"input": {"shape": [500, 1, 32, 32], "dtype": "float32"}}
    assert [item["id"] for item in local_api.client.get("/v1/datasets").json()] == [created["id"]]
    download = local_api.client.get(f"/v1/datasets/{created['id']}/download")
    assert download.content == digits.eval_npz.read_bytes()
    assert local_api.client.delete(f"/v1/datasets/{created['id']}").status_code == 204
    assert_nothing_stored(local_api)


def test_cancel_queued_job_and_in_use_guards(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)  # no worker runs here: the job stays queued
    assert local_api.client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    expect_error(local_api.client.delete(f"/v1/models/{uploaded['model_id']}"), 409, "model_in_use")
    expect_error(
        local_api.client.delete(f"/v1/datasets/{uploaded['evaluation_dataset_id']}"), 409, "dataset_in_use"
    )
    expect_error(local_api.client.get(f"/v1/jobs/{job_id}/report"), 409, "job_not_succeeded")
    cancelled = local_api.client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    run_job_by_id(local_api.settings, job_id)  # a late delivery of a cancelled job does nothing
    assert local_api.client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 0
    assert local_api.client.delete(f"/v1/models/{uploaded['model_id']}").status_code == 204
    assert local_api.client.get(f"/v1/jobs/{job_id}").status_code == 404  # jobs go with their model
    assert local_api.client.delete(f"/v1/datasets/{uploaded['evaluation_dataset_id']}").status_code == 204
    assert_nothing_stored(local_api)


def test_job_runs_and_redelivery_is_idempotent(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    run_job_by_id(local_api.settings, job_id)
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and len(job["engine_ids"]) == 1 and job["attempts"] == 1
    files = local_api.store.files()
    run_job_by_id(local_api.settings, job_id)  # re-delivered after success: nothing changes
    assert local_api.client.get(f"/v1/jobs/{job_id}").json() == job
    assert local_api.store.files() == files
    assert [
        item["id"] for item in local_api.client.get("/v1/jobs", params={"status": "succeeded"}).json()
    ] == [job_id]


def test_job_found_running_after_a_crash_starts_clean(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    run_job_by_id(local_api.settings, job_id)
    first_engine = local_api.client.get(f"/v1/jobs/{job_id}").json()["engine_ids"][0]
    with session_scope(local_api.settings.resolved_database_url) as session:  # as if the worker died mid-job
        job = session.get(JobRecord, job_id)
        job.status, job.finished_at, job.heartbeat_at = "running", None, utcnow() - timedelta(hours=1)
    run_job_by_id(local_api.settings, job_id)
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert len(job["engine_ids"]) == 1 and job["engine_ids"] != [first_engine]
    assert any("was lost; starting over" in message for message in job["messages"])
    assert not [key for key in local_api.store.files() if first_engine in key]


def test_job_that_keeps_killing_workers_is_failed(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    with session_scope(local_api.settings.resolved_database_url) as session:
        job = session.get(JobRecord, job_id)
        job.status, job.attempts = "running", local_api.settings.job_max_attempts
        job.heartbeat_at = utcnow() - timedelta(hours=1)
    run_job_by_id(local_api.settings, job_id)
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"


def test_model_onnxruntime_cannot_run_fails_the_job_clearly(local_api: LocalApi, tmp_path) -> None:
    """It passes the ONNX checker (unknown domains are not checked) but no runtime has the op."""
    from onnx import helper

    model = linear_model()
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    created = post_file(local_api, "models", "custom.onnx", model.SerializeToString())
    assert created.status_code == 201, created.text
    job_id = create_job(local_api, {"model_id": created.json()["id"]})
    run_job_by_id(local_api.settings, job_id)
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_runnable"
    assert "Frobnicate" in job["error"]["detail"]
    assert job["engine_ids"] == [] and not [key for key in local_api.store.files() if key.startswith("jobs/")]


def test_engine_inference_validation_and_delete(
    local_api: LocalApi, uploaded: dict, digits: DigitsArtifacts
) -> None:
    job_id = create_job(local_api, uploaded)
    run_job_by_id(local_api.settings, job_id)
    engine_id = local_api.client.get(f"/v1/jobs/{job_id}").json()["engine_ids"][0]
    infer = f"/v1/engines/{engine_id}/infer"
    good = digits.split.test_x[:2].tolist()
    response = local_api.client.post(infer, json={"inputs": {"input": good}})
    assert response.status_code == 200
    np.testing.assert_allclose(response.json()["outputs"]["logits"], digits.torch_test_logits[:2], atol=1e-4)
    cases = [
        ({"wrong": good}, "missing input 'input'"),
        ({"input": good, "extra": [1]}, "unknown input 'extra'"),
        ({"input": np.zeros((2, 1, 28, 28)).tolist()}, "dim 2 is 28"),
        ({"input": np.zeros((2, 32, 32)).tolist()}, "rank 3"),
        ({"input": [[1, 2], [3]]}, "not a rectangular array"),
        ({"input": "pixels"}, "not a rectangular array"),
    ]
    for inputs, fragment in cases:
        body = expect_error(local_api.client.post(infer, json={"inputs": inputs}), 422, "invalid_input")
        assert fragment in body["detail"], body
    assert local_api.client.post(infer, json={"inputs": {"input": good}}).status_code == 200  # still serving
    assert local_api.client.delete(f"/v1/engines/{engine_id}").status_code == 204
    expect_error(local_api.client.post(infer, json={"inputs": {"input": good}}), 404, "engine_not_found")
    assert not [key for key in local_api.store.files() if engine_id in key]


def test_health_and_docs(local_api: LocalApi) -> None:
    assert local_api.client.get("/healthz").json() == {"status": "ok"}
    ready = local_api.client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"] == {
        "database": "ok",
        "broker": "ok",
        "artifact_store": "ok",
        "disk": "ok",
    }
    assert local_api.client.get("/docs").status_code == 200
    paths = local_api.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/models",
        "/v1/datasets",
        "/v1/jobs",
        "/v1/jobs/{job_id}/cancel",
        "/v1/engines/{engine_id}/infer",
    ):
        assert path in paths


def _lose_worker(api: LocalApi, job_id: str) -> None:
    """The state a job is left in when its worker is killed: running, heartbeat gone quiet."""
    with session_scope(api.settings.resolved_database_url) as session:
        job = session.get(JobRecord, job_id)
        job.status, job.attempts, job.worker = "running", 1, "gone:1"
        job.heartbeat_at = utcnow() - timedelta(seconds=api.settings.job_lease_s + 5)


def test_two_deliveries_at_once_run_the_job_once(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    threads = [threading.Thread(target=run_job_by_id, args=(local_api.settings, job_id)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1 and len(job["engine_ids"]) == 1
    assert len([key for key in local_api.store.files() if key.startswith("jobs/")]) == 1


def test_sweeper_requeues_a_job_whose_worker_was_lost(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    _lose_worker(local_api, job_id)
    assert requeue_lost_jobs(local_api.settings) == [job_id]
    assert requeue_lost_jobs(local_api.settings) == []  # once is enough
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and "worker was lost" in job["stage"]
    run_job_by_id(local_api.settings, job_id)  # what the re-sent message does in a worker
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 2


def test_a_live_attempt_is_not_disturbed(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    _lose_worker(local_api, job_id)
    with session_scope(local_api.settings.resolved_database_url) as session:
        session.get(JobRecord, job_id).heartbeat_at = utcnow()  # alive after all
    assert requeue_lost_jobs(local_api.settings) == []
    run_job_by_id(local_api.settings, job_id)  # a duplicate delivery: ignored
    assert local_api.client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1
    cancelled = local_api.client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "running" and cancelled["cancel_requested"]  # the owner will stop


def test_cancel_of_a_job_whose_worker_was_lost_is_immediate(
    local_api: LocalApi, uploaded: dict[str, str]
) -> None:
    job_id = create_job(local_api, uploaded)
    _lose_worker(local_api, job_id)
    cancelled = local_api.client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert local_api.client.delete(f"/v1/models/{uploaded['model_id']}").status_code == 204


def test_superseded_attempt_stops_without_writing(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    job_id = create_job(local_api, uploaded)
    _lose_worker(local_api, job_id)
    attempt = Attempt(local_api.settings.resolved_database_url, job_id, number=1, heartbeat_s=60)
    attempt.check_cancelled(force=True)  # still ours
    with session_scope(local_api.settings.resolved_database_url) as session:
        session.get(JobRecord, job_id).attempts = 2  # another worker took over
    with pytest.raises(Superseded):
        attempt.check_cancelled(force=True)
    assert not attempt.finish("failed", error={"code": "x", "detail": "y"})
    assert local_api.client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_readyz_reports_an_unreachable_broker(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from app.core.migrate import upgrade
    from app.core.settings import Settings
    from app.main import create_app

    settings = Settings(data_dir=tmp_path, database_url=None, broker_url="redis://127.0.0.1:1/0")
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    # "error" alone: the probe answers without a key, so the reason is logged, not shown.
    assert response.status_code == 503 and response.json()["checks"]["broker"] == "error"


def test_int8_and_fp16_jobs_and_their_guards(local_api: LocalApi, uploaded: dict[str, str], digits) -> None:
    calib = post_file(local_api, "datasets", "calib.npz", digits.calib_npz.read_bytes()).json()["id"]
    unlabeled = post_file(local_api, "datasets", "u.npz", digits.eval_unlabeled_npz.read_bytes()).json()["id"]
    jobs = local_api.client
    cases = [
        ({"precision": "int8"}, {}, "int8 needs a calibration dataset"),
        (
            {"precision": "int8", "accuracy_budget": {"max_drop": 0.01}},
            {"calibration_dataset_id": calib, "evaluation_dataset_id": None},
            "accuracy budget needs an evaluation dataset",
        ),
        (
            {"precision": "int8", "accuracy_budget": {"metric": "top1"}},
            {"calibration_dataset_id": calib, "evaluation_dataset_id": unlabeled},
            "needs labels",
        ),
        ({"precision": "fp16", "accuracy_budget": {"metric": "fidelity"}}, {}, "int8 only"),
    ]
    for recipe, datasets, fragment in cases:
        body = {**uploaded, **datasets, "recipe": {**FAST, **recipe}}
        response = jobs.post(
            "/v1/jobs", json={key: value for key, value in body.items() if value is not None}
        )
        assert expect_error(response, 422, "invalid_recipe")["detail"].find(fragment) >= 0, response.text
    expect_error(
        jobs.post("/v1/jobs", json={**uploaded, "recipe": {"quantize": {"calibration": "kl"}}}),
        422,
        "validation_error",
    )

    job_id = create_job(
        local_api,
        {**uploaded, "calibration_dataset_id": calib},
        {**FAST, "precision": "int8", "quantize": {"calibration": "entropy"}},
    )
    run_job_by_id(local_api.settings, job_id)
    engine_id = local_api.client.get(f"/v1/jobs/{job_id}").json()["engine_ids"][0]
    assert local_api.client.get(f"/v1/engines/{engine_id}/layer-errors").json()["activations"]
    fp16_job = create_job(local_api, uploaded, {**FAST, "precision": "fp16"})
    run_job_by_id(local_api.settings, fp16_job)
    fp16_engine = local_api.client.get(f"/v1/jobs/{fp16_job}").json()["engine_ids"][0]
    assert local_api.client.get(f"/v1/engines/{fp16_engine}").json()["precision"] == "fp16"
    expect_error(
        local_api.client.get(f"/v1/engines/{fp16_engine}/layer-errors"), 404, "layer_errors_not_available"
    )


def test_sensitivity_analysis_and_ratios_from_it(local_api: LocalApi, uploaded: dict[str, str]) -> None:
    model_id, dataset_id = uploaded["model_id"], uploaded["evaluation_dataset_id"]
    response = local_api.client.post(
        f"/v1/models/{model_id}/sensitivity", json={"dataset_id": dataset_id, "ratios": [0.25, 0.75]}
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    expect_error(local_api.client.get(f"/v1/jobs/{job_id}/sensitivity"), 409, "sensitivity_not_available")
    run_job_by_id(local_api.settings, job_id)
    assert local_api.client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    report = local_api.client.get(f"/v1/jobs/{job_id}/sensitivity").json()
    assert report["metric"] == "top1" and set(report["layers"]) == {"0/Conv", "4/Conv", "8/Conv"}
    assert all(set(drops) == {"0.25", "0.75"} for drops in report["layers"].values())
    png = local_api.client.get(f"/v1/jobs/{job_id}/sensitivity", params={"format": "png"})
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"

    prune = {"method": "l1", "ratios_from_sensitivity": {"max_drop": 0.02}}  # the latest analysis
    optimize = create_job(local_api, uploaded, {**FAST, "prune": prune})
    layer_ratios = local_api.client.get(f"/v1/jobs/{optimize}").json()["recipe"]["prune"]["layer_ratios"]
    assert set(layer_ratios) == set(report["layers"])
    for layer, ratio in layer_ratios.items():
        assert ratio == 0 or report["layers"][layer][str(ratio)] <= 0.02
    run_job_by_id(local_api.settings, optimize)
    assert local_api.client.get(f"/v1/jobs/{optimize}").json()["status"] == "succeeded"
    other = local_api.client.post(
        "/v1/jobs", json={**uploaded, "recipe": {"prune": {"ratios_from_sensitivity": {"job_id": optimize}}}}
    )
    expect_error(other, 409, "sensitivity_not_available")


@pytest.mark.parametrize("method", ["l1", "taylor", "fpgm", "random", "slimming", "magnitude"])
def test_every_pruning_method_through_the_api(
    local_api: LocalApi, digits: DigitsArtifacts, tmp_path, method: str
) -> None:
    """Each method as a user runs it: upload, job, engine; accuracy before and after recovery recorded."""
    # Network Slimming needs BatchNorm kept in the export
    path = digits.bn_onnx_path if method == "slimming" else digits.onnx_path
    model_id = post_file(local_api, "models", "m.onnx", path.read_bytes()).json()["id"]
    train = io_npz(
        input=digits.split.train_x[:800], labels=digits.split.train_y[:800]
    )  # under the 4 MiB test limit
    train_id = post_file(local_api, "datasets", "train.npz", train).json()["id"]
    eval_id = post_file(local_api, "datasets", "eval.npz", digits.eval_npz.read_bytes()).json()["id"]
    prune = {"method": method, "ratio": 0.3} if method != "magnitude" else {"method": method, "sparsity": 0.3}
    recipe = {**FAST, "prune": prune, **({"finetune": {"epochs": 2}} if method != "magnitude" else {})}
    job_id = create_job(
        local_api,
        {"model_id": model_id, "calibration_dataset_id": train_id, "evaluation_dataset_id": eval_id},
        recipe,
    )
    run_job_by_id(local_api.settings, job_id)
    job = local_api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    prune_info = local_api.client.get(f"/v1/engines/{job['engine_ids'][0]}").json()["build_info"]["prune"]
    assert prune_info["method"] == method and prune_info["top1_after_pruning"] is not None
    if method == "magnitude":
        assert prune_info["sparsity"] == pytest.approx(0.3, abs=0.01)
    else:
        assert prune_info["macs_after"] < prune_info["macs_before"]
        assert prune_info["top1_after_finetune"] >= prune_info["top1_after_pruning"]


def io_npz(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
