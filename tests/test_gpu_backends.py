"""The GPU side, as far as a CPU machine can take it: the PyTorch backends (torch-cpu runs here; the
runner's casting and CUDA-graph logic is shared with torch-cuda), TensorRT's pure parts (the
optimization profile over the batch and a token model's sequence, plan compatibility), the sequence
shapes the pipeline hands every build, precision rules per backend, routing to the `gpu` queue
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
from engines.backends.tensorrt import (
    PlanInfo,
    incompatibility,
    optimization_profile,
    outside_profile,
    profile_axes,
    profile_metadata,
    sequence_range,
)
from engines.backends.torch_runtime import TorchEngineSettings, TorchLoadOptions, TorchRunner, graph_shapes
from engines.errors import EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec, assign_batch_axes
from engines.measure.latency import MeasureConfig
from engines.pipeline import run_recipe, sequence_options
from engines.recipe import Recipe
from tests.conftest import DigitsArtifacts, make_settings, placeholder_model
from tests.quirk_graphs import external_data_matmul
from tests.transformer_graphs import bert_encoder
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
    assert settings.cuda_graph_shapes == [(1, None), (8, None)]
    token = replace(settings, cuda_graph_sequence_lengths=(16, 128), sequence_axes={"input_ids": 1})
    token.write(tmp_path)
    assert TorchEngineSettings.read(tmp_path) == token
    assert token.cuda_graph_shapes == [(1, 16), (1, 128), (8, 16), (8, 128)]


def test_torch_engine_settings_written_before_sequence_lengths_still_load(tmp_path: Path) -> None:
    (tmp_path / "torch_engine.json").write_text(
        '{"device": "cuda", "precision": "fp16", "cuda_graph_batch_sizes": [1, 8], "compile": false, '
        '"notes": []}'
    )
    settings = TorchEngineSettings.read(tmp_path)
    assert settings.cuda_graph_shapes == [(1, None), (8, None)] and settings.sequence_axes == {}


def test_cuda_graph_shapes_follow_the_batch_and_the_sequence_axes() -> None:
    specs = assign_batch_axes(
        [
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("mask", "float32", ("batch", 1, 1, "sequence")),
            TensorSpec("scale", "float32", (1,)),
        ]
    )
    axes = {"input_ids": 1, "mask": 3}
    assert graph_shapes(specs, 8, 128, axes) == [(8, 128), (8, 1, 1, 128), (1,)]
    assert graph_shapes(_specs(("batch", 3, 32, 32)), 4, None, {}) == [(4, 3, 32, 32)]
    # a dynamic dim that is neither the batch nor a sequence: no one shape to capture (eager)
    assert graph_shapes(specs, 8, None, axes) is None
    assert graph_shapes(_specs(("batch", "height", 32)), 4, 16, {}) is None


def test_torch_engine_of_a_token_model_is_tried_at_the_longest_timed_shape(tmp_path: Path) -> None:
    """The sequence axes and lengths reach the build: the trial run goes at (largest batch, longest
    length), so the engine is proven to run there; without lengths it says it was not tried."""
    model = bert_encoder(tmp_path / "bert.onnx")
    axes = {"input_ids": 1, "attention_mask": 1, "token_type_ids": 1}
    backend = get_backend("torch-cpu")
    options = CompileOptions(batch_sizes=(1, 4), sequence_lengths=(16, 32), sequence_axes=axes)
    artifact = backend.compile(model, tmp_path / "engine", options)
    assert artifact.metadata["sequence_axes"] == axes and artifact.metadata["notes"] == []
    # graphs are CUDA's: torch-cpu captures none, at any batch or length
    assert (
        artifact.metadata["cuda_graph_batch_sizes"] == artifact.metadata["cuda_graph_sequence_lengths"] == []
    )
    untried = backend.compile(model, tmp_path / "untried", CompileOptions(batch_sizes=(1, 4)))
    assert untried.metadata["sequence_axes"] == axes  # the rule of engines.ingest.sequence, read here
    assert "no sequence length was named" in untried.metadata["notes"][0]
    ids = np.ones((2, 20), dtype=np.int64)  # a length no build named runs all the same
    with backend.load(artifact.path) as runner:
        out = runner.infer({"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids})
    assert next(iter(out.values())).shape == (2, 20, 32)


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
    profile = optimization_profile(
        _specs(("batch", 3, 224, 224), ("batch", 7)), CompileOptions(batch_sizes=(1, 4, 16))
    )
    assert profile["in0"] == ((1, 3, 224, 224), (16, 3, 224, 224), (16, 3, 224, 224))
    assert profile["in1"] == ((1, 7), (16, 7), (16, 7))
    static = optimization_profile(_specs((8, 10)), CompileOptions(batch_sizes=(8,)))
    assert static["in0"] == ((8, 10), (8, 10), (8, 10))


def _token_specs() -> list[TensorSpec]:
    """BERT's inputs, a float mask sharing the sequence dim's name, and position ids without a batch."""
    return assign_batch_axes(
        [
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            TensorSpec("bias_mask", "float32", ("batch", 1, 1, "sequence")),
            TensorSpec("position_ids", "int64", (1, "sequence")),
        ]
    )


def test_optimization_profile_ranges_a_token_models_sequence_dim() -> None:
    specs = _token_specs()
    options = CompileOptions(
        batch_sizes=(1, 8),
        sequence_lengths=(128, 16),
        sequence_axes=sequence_options(specs, ())["sequence_axes"],
    )
    assert options.sequence_axes == {"input_ids": 1, "attention_mask": 1, "bias_mask": 3, "position_ids": 1}
    profile = optimization_profile(specs, options)
    assert profile["input_ids"] == ((1, 1), (8, 128), (8, 128))
    assert profile["attention_mask"] == profile["input_ids"]
    assert profile["bias_mask"] == ((1, 1, 1, 1), (8, 1, 1, 128), (8, 1, 1, 128))
    assert profile["position_ids"] == ((1, 1), (1, 128), (1, 128))
    longer = optimization_profile(
        specs, replace(options, sequence_lengths=(16, 64, 128), max_sequence_length=384)
    )
    assert longer["input_ids"] == ((1, 1), (8, 64), (8, 384))


@pytest.mark.parametrize(
    ("lengths", "longest", "expected"),
    [
        ((128,), None, (1, 128, 128)),  # a search objective's one length is opt
        ((16, 128), None, (1, 128, 128)),  # two middle lengths: the longer
        ((512, 16, 64), None, (1, 64, 512)),  # the middle timed length, whatever the order
        ((16, 16, 64), None, (1, 64, 64)),  # lengths count once each
        ((32,), 256, (1, 32, 256)),  # an evaluation set longer than every timed length
        ((), 200, (1, 200, 200)),
    ],
)
def test_sequence_range_rule(lengths, longest, expected) -> None:
    assert sequence_range(lengths, longest) == expected


def test_optimization_profile_refuses_dynamic_dims_it_has_no_range_for() -> None:
    with pytest.raises(EngineError) as caught:
        optimization_profile(_specs(("batch", "seq")), CompileOptions(batch_sizes=(1, 8)))
    assert caught.value.code == "tensorrt_dynamic_dims" and "'in0'" in caught.value.detail
    specs = _token_specs()
    axes = sequence_options(specs, ())["sequence_axes"]
    with pytest.raises(EngineError) as unnamed:  # a sequence axis, but no length to range it over
        optimization_profile(specs, CompileOptions(sequence_axes=axes))
    assert unnamed.value.code == "tensorrt_dynamic_dims" and "sequence_lengths" in unnamed.value.detail
    image = assign_batch_axes([TensorSpec("pixels", "float32", ("batch", 3, "height", "width"))])
    with pytest.raises(EngineError) as other:
        optimization_profile(image, CompileOptions(sequence_lengths=(128,)))
    assert (
        other.value.code == "tensorrt_dynamic_dims"
        and "besides the batch and the sequence" in other.value.detail
    )


def test_profile_axes_and_metadata_of_a_token_model(tmp_path: Path) -> None:
    """A caller that names no axes gets engines.ingest.sequence's rule over the ONNX file (TensorRT's
    parsed network has lost the dim names); the metadata states the sequence range built."""
    model = bert_encoder(tmp_path / "bert.onnx")
    axes = {"input_ids": 1, "attention_mask": 1, "token_type_ids": 1}
    assert profile_axes(model, CompileOptions()) == axes
    assert profile_axes(model, CompileOptions(sequence_axes={"input_ids": 1})) == {"input_ids": 1}
    options = CompileOptions(batch_sizes=(1, 8), sequence_lengths=(16, 64, 128), sequence_axes=axes)
    specs = [TensorSpec(name, "int64", (None, None), 0) for name in axes]  # as TensorRT parses them
    metadata = profile_metadata(optimization_profile(specs, options), options)
    assert metadata["optimization_profile"]["input_ids"] == [[1, 1], [8, 64], [8, 128]]
    assert metadata["sequence_profile"] == {
        "axes": axes,
        "timed_lengths": [16, 64, 128],
        "min": 1,
        "opt": 64,
        "max": 128,
    }
    cnn = CompileOptions(batch_sizes=(1, 8))
    assert "sequence_profile" not in profile_metadata(optimization_profile(_specs(("batch", 7)), cnn), cnn)


def test_a_shape_outside_the_plan_names_the_range() -> None:
    profile = {"input_ids": [[1, 1], [8, 64], [8, 128]]}
    message = outside_profile("input_ids", (2, 300), profile)
    assert "[2, 300]" in message and "from [1, 1] to [8, 128]" in message and "sequence_lengths" in message


# ---------------------------------------------------------------- what the pipeline hands every build


def test_sequence_options_cover_the_timed_lengths_and_the_datasets_own() -> None:
    specs = _token_specs()[:2]
    rows = np.ones((6, 256), dtype=np.int64)
    evaluation = Dataset({"input_ids": rows, "attention_mask": rows}, None)
    named = sequence_options(specs, (16, 128), evaluation, None)
    assert named == {
        "sequence_axes": {"input_ids": 1, "attention_mask": 1},
        "sequence_lengths": (16, 128),
        "max_sequence_length": 256,  # accuracy runs the evaluation set at its own length
    }
    own = sequence_options(specs, (), evaluation)
    assert own["sequence_lengths"] == (256,) and own["max_sequence_length"] == 256
    assert sequence_options(specs, (16,))["max_sequence_length"] == 16
    assert sequence_options(_specs(("batch", 3, 32, 32)), (), None) == {}  # no sequence axis


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


def test_a_recipe_with_sequence_lengths_builds_a_torch_engine_shaped_by_them(tmp_path: Path) -> None:
    """run_recipe hands the sequence axes and lengths to the build (the trial ran, no `not tried`
    note) and times every (batch, length)."""
    model = bert_encoder(tmp_path / "bert.onnx")
    recipe = Recipe(targets=("torch-cpu",), batch_sizes=(1, 2), sequence_lengths=(8, 16), measure=FAST)
    result = run_recipe(model, recipe, tmp_path / "work")
    (engine,) = result.engines
    assert engine.artifact.metadata["sequence_axes"] == {
        "input_ids": 1,
        "attention_mask": 1,
        "token_type_ids": 1,
    }
    assert engine.artifact.metadata["notes"] == []
    assert set(engine.measurement.latency) == {"1x8", "1x16", "2x8", "2x16"}


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
@needs_cuda
def test_torch_cuda_token_engine_captures_per_batch_and_sequence(tmp_path: Path) -> None:
    model = bert_encoder(tmp_path / "bert.onnx")
    axes = {"input_ids": 1, "attention_mask": 1, "token_type_ids": 1}
    options = CompileOptions(batch_sizes=(1, 4), sequence_lengths=(16, 32), sequence_axes=axes)
    artifact = get_backend("torch-cuda").compile(model, tmp_path / "engine", options)
    assert artifact.metadata["cuda_graph_batch_sizes"] == [1, 4]
    assert artifact.metadata["cuda_graph_sequence_lengths"] == [16, 32]  # a graph at each batch × length
    assert artifact.metadata["uncaptured_shapes"].startswith("eager")
    reference = get_backend("onnxruntime-cpu").load(model)
    with get_backend("torch-cuda").load(artifact.path) as runner:
        for shape in ((4, 32), (3, 20)):  # a captured shape (if its capture held), and an eager one
            ids = np.random.default_rng(0).integers(1, 100, size=shape)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
            (got,) = runner.infer(feeds).values()
            (want,) = reference.infer(feeds).values()
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    reference.deactivate()


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_token_engine_ranges_the_sequence(tmp_path: Path) -> None:
    model = bert_encoder(tmp_path / "bert.onnx")
    recipe = Recipe(targets=("tensorrt",), batch_sizes=(1, 4), sequence_lengths=(16, 32), measure=FAST)
    (engine,) = run_recipe(model, recipe, tmp_path / "work").engines
    assert engine.artifact.metadata["sequence_profile"]["max"] == 32
    assert engine.artifact.metadata["optimization_profile"]["input_ids"] == [[1, 1], [4, 32], [4, 32]]
    assert set(engine.measurement.latency) == {"1x16", "1x32", "4x16", "4x32"}


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
