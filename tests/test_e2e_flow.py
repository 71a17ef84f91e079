"""The whole flow over real HTTP, on both stacks: upload → job in a Celery worker → engine → infer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import DigitsArtifacts, LiveStack, wait_for_job

FAST_MEASURE = {"warmup_runs": 3, "timed_runs": 20, "min_seconds": 0}


def _upload(client, path, kind: str, name: str) -> dict:
    with open(path, "rb") as handle:
        response = client.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": name})
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
    return response.json()


def _run_job(
    client, model: dict, recipe: dict, evaluation: dict | None = None, calibration: dict | None = None
) -> dict:
    """Start a job on the uploaded model and datasets and wait for it to finish."""
    body = {"model_id": model["id"], "recipe": recipe}
    if evaluation:
        body["evaluation_dataset_id"] = evaluation["id"]
    if calibration:
        body["calibration_dataset_id"] = calibration["id"]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["id"])


def test_upload_job_engine_infer_report(live_stack: LiveStack, digits: DigitsArtifacts) -> None:
    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        assert model["opset"] == 17 and model["parameters"] > 20_000 and len(model["sha256"]) == 64
        assert model["inputs"] == [
            {"name": "input", "dtype": "float32", "shape": ["batch", 1, 32, 32], "batch_axis": 0}
        ]
        assert model["outputs"][0]["shape"] == ["batch", 10]
        evaluation = _upload(client, digits.eval_npz, "datasets", "digits-test")
        assert evaluation["samples"] == 500 and evaluation["has_labels"] and evaluation["classes"] == 10
        calibration = _upload(client, digits.calib_npz, "datasets", "digits-calib")
        assert not calibration["has_labels"]

        response = client.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "calibration_dataset_id": calibration["id"],
                "evaluation_dataset_id": evaluation["id"],
                "recipe": {
                    "targets": ["onnxruntime-cpu"],
                    "precision": "fp32",
                    "batch_sizes": [1, 8],
                    "measure": FAST_MEASURE,
                },
            },
        )
        assert response.status_code == 202, response.text
        assert response.json()["status"] in ("queued", "running")
        job = wait_for_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"] and job["attempts"] == 1
        assert len(job["engine_ids"]) == 1

        engines = client.get("/v1/engines", params={"job_id": job["id"]}).json()
        assert [engine["id"] for engine in engines] == job["engine_ids"]
        engine = client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
        assert engine["backend"] == "onnxruntime-cpu" and engine["precision"] == "fp32"
        assert (
            engine["size_bytes"] > 0
            and engine["hardware"]["cpu_model"]
            and engine["hardware"]["threads"] >= 1
        )
        metrics = engine["metrics"]
        assert metrics["memory_mb"] >= 0
        assert metrics["vs_baseline"]["verdict"] in ("faster", "mixed", "slower")
        for size in ("1", "8"):
            stats = metrics["latency"][size]
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
            assert stats["throughput_per_s"] > 0 and stats["runs"] == FAST_MEASURE["timed_runs"]
            assert metrics["vs_baseline"]["speedup"][size] > 0
        assert (
            metrics["accuracy"]["top1"] >= 0.97 and metrics["accuracy"]["top5"] >= metrics["accuracy"]["top1"]
        )
        assert metrics["accuracy"]["fidelity"]["top1_agreement"] == 1.0
        assert abs(metrics["vs_baseline"]["top1_delta"]) < 1e-9

        images = digits.split.test_x[:16]
        response = client.post(
            f"/v1/engines/{engine['id']}/infer", json={"inputs": {"input": images.tolist()}}
        )
        assert response.status_code == 200, response.text
        logits = np.asarray(response.json()["outputs"]["logits"])
        assert logits.shape == (16, 10) and response.json()["compute_ms"] > 0
        np.testing.assert_array_equal(logits.argmax(1), digits.torch_test_logits[:16].argmax(1))
        np.testing.assert_allclose(logits, digits.torch_test_logits[:16], atol=1e-4)

        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert [row["engine"] for row in report["rows"]] == ["original", engine["id"]]
        assert report["rows"][0]["top1"] == pytest.approx(metrics["accuracy"]["top1"])
        markdown = client.get(f"/v1/jobs/{job['id']}/report", params={"format": "md"})
        assert markdown.headers["content-type"].startswith("text/markdown")
        # the network column is the model's name: the first upload's, when another test sent the same file
        original_row = "| original | original (onnxruntime-cpu fp32) | fp32 | onnxruntime-cpu | 0.024 | 2.5 |"
        assert original_row in markdown.text
        print(f"\n[{live_stack.name}] report for job {job['id']}:\n{markdown.text}")


def test_unlabeled_evaluation_reports_fidelity(live_stack: LiveStack, digits: DigitsArtifacts) -> None:
    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        unlabeled = _upload(client, digits.eval_unlabeled_npz, "datasets", "digits-unlabeled")
        job = _run_job(client, model, {"batch_sizes": [4], "measure": FAST_MEASURE}, evaluation=unlabeled)
        assert job["status"] == "succeeded", job
        assert any("no labels" in message for message in job["messages"])
        accuracy = client.get(f"/v1/engines/{job['engine_ids'][0]}").json()["metrics"]["accuracy"]
        assert "top1" not in accuracy
        assert accuracy["fidelity"]["top1_agreement"] == 1.0
        assert accuracy["fidelity"]["cosine_similarity"] > 0.9999


def test_cancel_running_job_leaves_nothing(live_stack: LiveStack, digits: DigitsArtifacts) -> None:
    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "recipe": {"batch_sizes": [1], "measure": {"timed_runs": 100_000}},
            },
        )
        job_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.1)
        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
        job = wait_for_job(client, job_id, timeout=30)
        assert job["status"] == "cancelled" and job["engine_ids"] == []
        assert live_stack.job_files(job_id) == []
        again = client.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "job_not_cancellable"


def test_non_finite_outputs_are_reported_not_stored_as_nan(live_stack: LiveStack, tmp_path) -> None:
    """PostgreSQL's JSON refuses NaN: an overflowing model must still get a clean job record."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    graph = helper.make_graph(
        [helper.make_node("Div", ["x", "zero"], ["y"])],
        "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.zeros(4, dtype=np.float32), "zero")],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "div0.onnx")
    np.savez(tmp_path / "ones.npz", x=np.ones((16, 4), np.float32))
    with live_stack.client() as client:
        model = _upload(client, tmp_path / "div0.onnx", "models", "div0")
        dataset = _upload(client, tmp_path / "ones.npz", "datasets", "ones")
        job = _run_job(client, model, {"batch_sizes": [4], "measure": FAST_MEASURE}, evaluation=dataset)
        assert job["status"] == "succeeded", job
        accuracy = client.get(f"/v1/engines/{job['engine_ids'][0]}").json()["metrics"]["accuracy"]
        assert accuracy["non_finite_outputs"] == 64
        assert accuracy["fidelity"]["cosine_similarity"] is None


def test_job_survives_its_worker_being_killed(live_stack: LiveStack, digits: DigitsArtifacts) -> None:
    """SIGKILL the process running a job: the job is re-queued once its lease expires and completes."""
    import os
    import signal

    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        recipe = {"batch_sizes": [1], "measure": {"timed_runs": 10, "min_seconds": 4}}
        job_id = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe}).json()["id"]
        deadline = time.monotonic() + 60
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != "running" or not job["worker"]:
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        job = wait_for_job(client, job_id, timeout=120)
        assert job["status"] == "succeeded", (job["error"], job["messages"], job["attempts"])
        assert job["attempts"] == 2 and len(job["engine_ids"]) == 1
        assert any("was lost; starting over" in message for message in job["messages"])
        assert len(live_stack.job_files(job_id)) >= 1
        # the killed attempt's scratch folder went with the next attempt; the finished one's too
        assert not list((live_stack.data_dir / "scratch").glob(f"job-{job_id}-*"))


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_job_over_http(live_stack: LiveStack, digits: DigitsArtifacts, method: str) -> None:
    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        evaluation = _upload(client, digits.eval_npz, "datasets", "digits-test")
        calibration = _upload(client, digits.calib_npz, "datasets", "digits-calib")
        recipe = {
            "precision": "int8",
            "quantize": {"calibration": method},
            "batch_sizes": [1, 8],
            "measure": FAST_MEASURE,
        }
        job = _run_job(client, model, recipe, evaluation, calibration)
        assert job["status"] == "succeeded", job
        assert any("calibrated on 256 samples" in message for message in job["messages"])
        engine = client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
        assert engine["precision"] == "int8" and engine["build_info"]["calibration"] == method
        assert engine["metrics"]["vs_baseline"]["top1_delta"] >= -0.005
        errors = client.get(f"/v1/engines/{engine['id']}/layer-errors").json()
        assert {"tensor", "node", "op_type", "local_sqnr_db", "model_sqnr_db"} <= set(
            errors["activations"][0]
        )
        report = client.get(f"/v1/jobs/{job['id']}/report", params={"format": "md"}).text
        assert "| int8 | onnxruntime-cpu |" in report
        assert "| Lineage |" in report and f"| {engine['lineage']['label']} |" in report


def test_prune_finetune_int8_pipeline_over_http(
    live_stack: LiveStack, digits: DigitsArtifacts, tmp_path
) -> None:
    np.savez(tmp_path / "train.npz", input=digits.split.train_x, labels=digits.split.train_y)
    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        evaluation = _upload(client, digits.eval_npz, "datasets", "digits-test")
        train = _upload(client, tmp_path / "train.npz", "datasets", "digits-train")
        recipe = {
            "precision": "int8",
            "prune": {"method": "l1", "ratio": 0.3},
            "finetune": {"epochs": 2},
            "batch_sizes": [8],
            "measure": FAST_MEASURE,
        }
        job = _run_job(client, model, recipe, evaluation, calibration=train)
        assert job["status"] == "succeeded", job
        engines = [client.get(f"/v1/engines/{engine_id}").json() for engine_id in job["engine_ids"]]
        assert [engine["precision"] for engine in engines] == ["fp32", "int8"]
        prune = engines[0]["build_info"]["prune"]
        assert prune["macs_after"] * 2 <= prune["macs_before"] and prune["top1_after_finetune"] > 0.8
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert [row["precision"] for row in report["rows"]] == ["fp32", "fp32", "int8"]
        assert report["rows"][1]["macs"] * 2 <= report["rows"][0]["macs"] == 2_507_392

        folded = client.post(
            "/v1/jobs", json={"model_id": model["id"], "recipe": {"prune": {"method": "slimming"}}}
        )
        assert folded.status_code == 422 and "TrainingMode.PRESERVE" in folded.json()["detail"]


def test_every_cpu_backend_in_one_job_served_over_v2(live_stack: LiveStack, digits: DigitsArtifacts) -> None:
    """ONNX Runtime, OpenVINO and what a user would otherwise run (PyTorch on the CPU), built and
    measured in the same job, one report comparing them, each engine served over /v2 like any other."""
    from optiforge_client import Client

    with live_stack.client() as client:
        model = _upload(client, digits.onnx_path, "models", "digits-cnn")
        evaluation = _upload(client, digits.eval_npz, "datasets", "digits-test")
        recipe = {
            "targets": ["onnxruntime-cpu", "torch-cpu", "openvino-cpu"],
            "batch_sizes": [1, 8],
            "measure": FAST_MEASURE,
        }
        job = _run_job(client, model, recipe, evaluation)
        assert job["status"] == "succeeded", job
        engines = {
            engine["backend"]: engine
            for engine in client.get("/v1/engines", params={"job_id": job["id"]}).json()
        }
        assert set(engines) == {"onnxruntime-cpu", "torch-cpu", "openvino-cpu"}
        torch_engine = engines["torch-cpu"]
        assert torch_engine["build_info"]["verified_on_hardware"] is True
        assert torch_engine["hardware"]["torch"] and torch_engine["metrics"]["accuracy"]["top1"] >= 0.97
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert sorted(row["backend"] for row in report["rows"][1:]) == [
            "onnxruntime-cpu",
            "openvino-cpu",
            "torch-cpu",
        ]
        assert engines["openvino-cpu"]["metrics"]["accuracy"]["top1"] >= 0.97

    sdk = Client(live_stack.base_url)
    for backend in ("torch-cpu", "openvino-cpu"):
        outputs = sdk.infer(engines[backend]["id"], {"input": digits.split.test_x[:4]}).outputs
        np.testing.assert_allclose(outputs["logits"], digits.torch_test_logits[:4], atol=1e-4)
    sdk.close()
