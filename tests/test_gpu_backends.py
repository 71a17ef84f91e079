"""The GPU side, as far as a CPU machine can take it: the PyTorch backends (torch-cpu runs here; the
runner's casting and CUDA-graph logic is shared with torch-cuda), TensorRT's pure parts (the
optimization profile, plan compatibility), precision rules per backend, routing to the `gpu` queue
and failing a job no worker can take. The tests that need a GPU are marked `gpu` and skip with
their reason here.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from app.core.db import session_scope
from app.core.job_queue import queue_for
from app.core.migrate import upgrade
from app.core.orm import JobRecord, JobStatus, utcnow
from app.core.presence import beat, live_workers_by_queue
from engines.backends.base import CompileOptions
from engines.backends.registry import check_precision, get_backend, unavailable_reason
from engines.backends.tensorrt import PlanInfo, incompatibility, optimization_profile
from engines.backends.torch_runtime import TorchEngineSettings, TorchLoadOptions, TorchRunner
from engines.errors import EngineError, InvalidRecipeError
from engines.ingest.signature import TensorSpec, assign_batch_axes
from engines.measure.latency import MeasureConfig
from engines.pipeline import run_recipe
from engines.recipe import Recipe
from tests.conftest import DigitsArtifacts, make_settings, placeholder_model
from tests.quirk_graphs import external_data_matmul
from workers.recovery import fail_jobs_without_workers

FAST = MeasureConfig(warmup_runs=1, timed_runs=3, min_seconds=0)


def _cuda_reason() -> str | None:
    return unavailable_reason("torch-cuda")


needs_cuda = pytest.mark.skipif(
    _cuda_reason() is not None, reason=f"needs an NVIDIA GPU with CUDA torch: {_cuda_reason()}"
)
needs_tensorrt = pytest.mark.skipif(
    unavailable_reason("tensorrt") is not None,
    reason=f"needs TensorRT on an NVIDIA GPU: {unavailable_reason('tensorrt')}",
)


# ---------------------------------------------------------------- torch-cpu, here


def test_torch_cpu_engine_is_measured_beside_onnxruntime(digits: DigitsArtifacts, tmp_path: Path) -> None:
    from engines.ingest.datasets import Dataset

    evaluation = Dataset({"input": digits.split.test_x[:64]}, digits.split.test_y[:64])
    recipe = Recipe(targets=("onnxruntime-cpu", "torch-cpu"), batch_sizes=(1, 8), measure=FAST)
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation)
    by_backend = {engine.artifact.backend: engine for engine in result.engines}
    assert set(by_backend) == {"onnxruntime-cpu", "torch-cpu"}
    torch_engine = by_backend["torch-cpu"]
    assert torch_engine.artifact.metadata["verified_on_hardware"] is True
    assert torch_engine.artifact.metadata["torch"] and torch_engine.measurement.hardware["cpu_model"]
    assert set(torch_engine.measurement.latency) == {"1", "8"}
    fidelity = torch_engine.measurement.accuracy["fidelity"]
    assert fidelity["top1_agreement"] == 1.0 and fidelity["max_abs_error"] < 1e-4


def test_torch_runner_matches_the_original_and_casts_bf16(digits: DigitsArtifacts, tmp_path: Path) -> None:
    """bf16 runs on a CPU too, so the casting torch-cuda does (weights to the precision, float
    inputs in, float32 out) is checked here on the same runner class."""
    backend = get_backend("torch-cpu")
    artifact = backend.compile(digits.onnx_path, tmp_path / "engine", CompileOptions(batch_sizes=(1, 4)))
    images = digits.split.test_x[:4]
    with backend.load(artifact.path) as runner:
        fp32 = runner.infer({"input": images})["logits"]
    np.testing.assert_allclose(fp32, digits.torch_test_logits[:4], atol=1e-4)

    settings = TorchEngineSettings(device="cpu", precision="bf16")
    with TorchRunner(artifact.path, settings, TorchLoadOptions()) as runner:
        bf16 = runner.infer({"input": images})["logits"]
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert (bf16.argmax(1) == fp32.argmax(1)).all()
    assert np.abs(bf16 - fp32).max() < 0.1 * np.abs(fp32).max()


def test_torch_engine_settings_survive_the_round_trip(tmp_path: Path) -> None:
    settings = TorchEngineSettings("cuda", "fp16", (1, 8), compile=True, notes=("torch.compile kept",))
    settings.write(tmp_path)
    assert TorchEngineSettings.read(tmp_path) == settings


def test_torch_engine_copies_external_data_under_its_own_name(tmp_path: Path) -> None:
    source = external_data_matmul(tmp_path / "src" / "user-model.onnx", np.eye(4, dtype=np.float32))
    backend = get_backend("torch-cpu")
    artifact = backend.compile(source, tmp_path / "engine", CompileOptions(batch_sizes=(2,)))
    assert sorted(path.name for path in artifact.path.parent.iterdir()) == [
        "engine.onnx",
        "engine.onnx.data",
        "torch_engine.json",
    ]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with backend.load(artifact.path) as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], x)


def test_torch_cpu_runs_concurrent_calls_and_torch_cuda_one() -> None:
    cpu = TorchEngineSettings("cpu", "fp32")
    cuda = TorchEngineSettings("cuda", "fp16")
    assert TorchRunner.max_concurrency.fget(_settings_holder(cpu)) is None  # type: ignore[attr-defined]
    assert TorchRunner.max_concurrency.fget(_settings_holder(cuda)) == 1  # type: ignore[attr-defined]


class _settings_holder:  # the property reads only `settings`: no model needed to check the rule
    def __init__(self, settings: TorchEngineSettings):
        self.settings = settings


# ---------------------------------------------------------------- precisions per backend


@pytest.mark.parametrize(
    ("targets", "precision", "refused"),
    [
        (("onnxruntime-cpu",), "bf16", "onnxruntime-cpu"),
        (("torch-cpu",), "int8", "torch-cpu"),
        (("onnxruntime-cpu", "torch-cuda"), "bf16", "onnxruntime-cpu"),
    ],
)
def test_a_precision_a_target_cannot_build_is_refused(targets, precision, refused) -> None:
    with pytest.raises(InvalidRecipeError, match=f"{refused} cannot build {precision}"):
        check_precision(targets, precision)


def test_precisions_every_target_builds_pass() -> None:
    check_precision(("torch-cuda",), "bf16")
    check_precision(("onnxruntime-cpu", "tensorrt"), "int8")
    check_precision(("torch-cpu", "torch-cuda", "onnxruntime-cpu"), "fp32")


def test_capabilities_list_each_backends_precisions_and_live_workers(local_api) -> None:
    body = local_api.client.get("/v1/capabilities").json()
    backends = {backend["name"]: backend for backend in body["backends"]}
    assert backends["torch-cuda"]["precisions"] == ["fp32", "fp16", "bf16"]
    assert backends["torch-cuda"]["queue"] == "gpu" and backends["tensorrt"]["queue"] == "gpu"
    assert backends["torch-cpu"]["available_here"] and not backends["tensorrt"]["available_here"]
    assert "bf16" in body["precisions"] and body["workers"] == {}


# ---------------------------------------------------------------- TensorRT's pure parts


def _specs(*shapes: tuple) -> list[TensorSpec]:
    return assign_batch_axes([TensorSpec(f"in{i}", "float32", shape) for i, shape in enumerate(shapes)])


def test_optimization_profile_covers_the_recipes_batch_sizes() -> None:
    profile = optimization_profile(_specs(("batch", 3, 224, 224), ("batch", 7)), [1, 4, 16])
    assert profile["in0"] == ((1, 3, 224, 224), (16, 3, 224, 224), (16, 3, 224, 224))
    assert profile["in1"] == ((1, 7), (16, 7), (16, 7))
    static = optimization_profile(_specs((8, 10)), [8])
    assert static["in0"] == ((8, 10), (8, 10), (8, 10))


def test_optimization_profile_refuses_dynamic_dims_besides_the_batch() -> None:
    with pytest.raises(EngineError) as caught:
        optimization_profile(_specs(("batch", "seq")), [1, 8])
    assert caught.value.code == "tensorrt_dynamic_dims" and "'in0'" in caught.value.detail


@pytest.mark.parametrize(
    ("version", "capability", "problem"),
    [
        ("10.13.0", "9.0", None),
        ("10.13.3.9", "9.0", None),  # patch releases load each other's plans
        ("11.0.0", "9.0", "built by TensorRT 10.13.0"),
        ("10.13.0", "8.9", "compute capability 9.0 (NVIDIA H200)"),
    ],
)
def test_a_plan_loads_only_where_its_tensorrt_and_gpu_match(version, capability, problem) -> None:
    plan = PlanInfo("10.13.0", "9.0", "NVIDIA H200", "int8", {})
    reason = incompatibility(plan, version, capability)
    assert reason is None if problem is None else problem in reason


# ---------------------------------------------------------------- the gpu queue


def test_a_job_with_a_gpu_target_goes_to_the_gpu_queue() -> None:
    assert queue_for(Recipe(targets=("onnxruntime-cpu", "torch-cpu"))) == "cpu"
    assert queue_for(Recipe(targets=("onnxruntime-cpu", "torch-cuda"))) == "gpu"
    assert queue_for(Recipe(targets=("tensorrt",))) == "gpu"


def _queued_job(settings, targets: list[str], age_s: float) -> str:
    with session_scope(settings.resolved_database_url) as session:
        model = placeholder_model(session)
        job = JobRecord(project_id="default", model_id=model.id, recipe={"targets": targets}, messages=[])
        job.created_at = utcnow() - timedelta(seconds=age_s)
        session.add(job)
        session.flush()
        return job.id


def test_a_gpu_job_fails_when_no_gpu_worker_is_alive(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", queue_wait_s=60)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    beat(settings, "cpu-worker", ["cpu"], {"cpu_model": "x"})
    waited = _queued_job(settings, ["torch-cuda"], age_s=120)
    fresh = _queued_job(settings, ["torch-cuda"], age_s=1)
    cpu_job = _queued_job(settings, ["onnxruntime-cpu"], age_s=120)

    assert fail_jobs_without_workers(settings) == [waited]
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(JobRecord, waited)
        assert job.status == JobStatus.FAILED and job.error["code"] == "no_worker_for_queue"
        assert "optiforge worker --queues gpu" in job.error["detail"]
        assert session.get(JobRecord, fresh).status == JobStatus.QUEUED
        assert session.get(JobRecord, cpu_job).status == JobStatus.QUEUED
        assert live_workers_by_queue(session, settings) == {"cpu": 1}

    beat(settings, "gpu-worker", ["gpu"], {"gpu_model": "NVIDIA H200"})
    old = _queued_job(settings, ["tensorrt"], age_s=120)
    assert fail_jobs_without_workers(settings) == []
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(JobRecord, old).status == JobStatus.QUEUED


def test_a_gpu_job_says_it_waits_for_a_gpu_worker(local_api, digits: DigitsArtifacts) -> None:
    client = local_api.client
    with digits.onnx_path.open("rb") as handle:
        model = client.post("/v1/models", files={"file": ("digits.onnx", handle)}).json()
    response = client.post(
        "/v1/jobs", json={"model_id": model["id"], "recipe": {"targets": ["torch-cuda"], "precision": "bf16"}}
    )
    assert response.status_code == 202, response.text
    assert "no worker takes 'gpu' jobs now" in response.json()["stage"]
    refused = client.post(
        "/v1/jobs",
        json={"model_id": model["id"], "recipe": {"targets": ["onnxruntime-cpu"], "precision": "bf16"}},
    )
    assert refused.status_code == 422 and "onnxruntime-cpu cannot build bf16" in refused.text


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda_engine_matches_torch_cpu(digits: DigitsArtifacts, tmp_path: Path, precision: str) -> None:
    backend = get_backend("torch-cuda")
    artifact = backend.compile(
        digits.onnx_path, tmp_path / precision, CompileOptions(precision=precision, batch_sizes=(1, 8))
    )
    assert artifact.metadata["cuda_graph_batch_sizes"] == [1, 8]
    images = digits.split.test_x[:8]
    with backend.load(artifact.path) as runner:
        graphed = runner.infer({"input": images})["logits"]  # batch 8: a captured graph
        eager = runner.infer({"input": images[:3]})["logits"]  # batch 3: eager
    tolerance = 1e-3 if precision == "fp32" else 0.1
    np.testing.assert_allclose(graphed, digits.torch_test_logits[:8], atol=tolerance * 10, rtol=tolerance)
    np.testing.assert_allclose(eager, graphed[:3], atol=tolerance * 10, rtol=tolerance)


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_builds_and_runs(digits: DigitsArtifacts, tmp_path: Path, precision: str) -> None:
    from engines.ingest.datasets import Dataset

    calibration = Dataset({"input": digits.split.train_x[:128]}, None)
    evaluation = Dataset({"input": digits.split.test_x[:64]}, digits.split.test_y[:64])
    recipe = Recipe(targets=("tensorrt",), precision=precision, batch_sizes=(1, 8), measure=FAST)
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=calibration)
    (engine,) = result.engines
    assert engine.artifact.metadata["compute_capability"]
    assert engine.measurement.accuracy["fidelity"]["top1_agreement"] > 0.95


def test_a_target_that_cannot_take_the_model_leaves_the_others(tmp_path: Path) -> None:
    """Found on magika (a real model): onnx2torch lacks GlobalMaxPool. The torch-cpu target says why
    in the messages; the ONNX Runtime engine is still built (the job used to fail whole)."""
    from tests.quirk_graphs import op_onnx2torch_lacks

    path = op_onnx2torch_lacks(tmp_path / "model.onnx")
    recipe = Recipe(targets=("onnxruntime-cpu", "torch-cpu"), batch_sizes=(1,), measure=FAST)
    result = run_recipe(path, recipe, tmp_path / "work")
    assert [engine.artifact.backend for engine in result.engines] == ["onnxruntime-cpu"]
    assert any("torch-cpu cannot run" in m and "GlobalMaxPool" in m for m in result.messages)
    with pytest.raises(EngineError) as alone:  # alone, the target's own error is the job's
        run_recipe(path, replace(recipe, targets=("torch-cpu",)), tmp_path / "alone")
    assert alone.value.code == "unsupported_op"
