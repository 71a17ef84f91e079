"""The openvino-cpu backend: engines that match ONNX Runtime, the runner's lifecycle, int8 from our
QDQ model through the pipeline, dynamic batch, external data, and the errors a user sees.

Skipped, with the reason, where the openvino package is not installed (it is an optional extra).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.backends.base import CompileOptions, EngineArtifact
from engines.backends.registry import get_backend, unavailable_reason
from engines.errors import EngineError, InvalidInputError
from engines.ingest.datasets import Dataset
from engines.measure.latency import MeasureConfig, make_batch
from engines.pipeline import run_recipe
from engines.recipe import Recipe
from tests import quirk_graphs
from tests.conftest import DigitsArtifacts
from tests.quirk_graphs import external_data_matmul

pytestmark = pytest.mark.skipif(
    unavailable_reason("openvino-cpu") is not None,
    reason=f"needs the openvino package: {unavailable_reason('openvino-cpu')}",
)

FAST = MeasureConfig(warmup_runs=1, timed_runs=3, min_seconds=0)


@pytest.fixture(scope="module")
def fp32_engine(digits: DigitsArtifacts, tmp_path_factory: pytest.TempPathFactory) -> EngineArtifact:
    out_dir = tmp_path_factory.mktemp("openvino") / "fp32"
    return get_backend("openvino-cpu").compile(digits.onnx_path, out_dir, CompileOptions(batch_sizes=(1, 8)))


def _saved(model: onnx.ModelProto, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), **options)
    return path


def test_fp32_engine_matches_onnxruntime_and_records_what_the_plugin_runs(
    digits: DigitsArtifacts, fp32_engine: EngineArtifact
) -> None:
    assert sorted(path.name for path in fp32_engine.path.parent.iterdir()) == ["engine.bin", "engine.xml"]
    metadata = fp32_engine.metadata
    # f32 explicitly: on a CPU with AVX512_BF16 or AMX the plugin's default is bf16
    assert metadata["inference_precision"] == "f32" and metadata["verified_on_hardware"] is True
    assert metadata["openvino"] and metadata["compute_layers_by_precision"] == {"f32": 4}
    images = digits.split.test_x
    with get_backend("onnxruntime-cpu").load(digits.onnx_path) as reference:
        expected = reference.infer({"input": images})["logits"]
    with get_backend("openvino-cpu").load(fp32_engine.path) as runner:
        logits = runner.infer({"input": images})["logits"]
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(logits, digits.torch_test_logits, atol=1e-4)


def test_one_engine_takes_batch_1_and_8(digits: DigitsArtifacts, fp32_engine: EngineArtifact) -> None:
    with get_backend("openvino-cpu").load(fp32_engine.path) as runner:
        (spec,) = runner.input_metadata()
        assert spec.shape == ("batch", 1, 32, 32) and spec.batch_axis == 0  # the ONNX dim name is kept
        assert runner.output_metadata()[0].name == "logits"
        for batch in (1, 8, 1):
            logits = runner.infer({"input": digits.split.test_x[:batch]})["logits"]
            assert logits.shape == (batch, 10)
            np.testing.assert_allclose(logits, digits.torch_test_logits[:batch], atol=1e-4)


def test_runner_lifecycle_and_input_validation(digits: DigitsArtifacts, fp32_engine: EngineArtifact) -> None:
    backend = get_backend("openvino-cpu")
    options = backend.options(threads=1, spin_wait=False, unknown_knob=True)  # the pool's knobs
    assert options == backend.load_options(threads=1)
    runner = backend.load(fp32_engine.path, options)
    images = {"input": digits.split.test_x[:2]}
    assert runner.active and runner.max_concurrency == 1  # one infer request under the LATENCY hint
    assert runner.infer(images)["logits"].shape == (2, 10)
    with pytest.raises(InvalidInputError, match="dim 2 is 16") as wrong:
        runner.infer({"input": np.zeros((2, 1, 16, 32), np.float32)})
    assert wrong.value.code == "invalid_input"
    runner.deactivate()
    with pytest.raises(EngineError) as inactive:
        runner.infer(images)
    assert inactive.value.code == "runner_inactive"
    with runner:
        assert runner.infer(images)["logits"].shape == (2, 10)
    assert not runner.active


def test_concurrent_calls_share_a_pool_of_infer_requests(
    digits: DigitsArtifacts, fp32_engine: EngineArtifact
) -> None:
    """An InferRequest is not thread-safe: under THROUGHPUT the runner holds one per stream, and
    calls from many threads (the engine pool's) each get the right answer."""
    backend = get_backend("openvino-cpu")
    with backend.load(fp32_engine.path, backend.load_options(performance_hint="THROUGHPUT")) as runner:
        assert runner.max_concurrency is not None and runner.max_concurrency >= 1
        images = [digits.split.test_x[index : index + 1 + index % 3] for index in range(24)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda batch: runner.infer({"input": batch})["logits"], images))
    for index, logits in enumerate(results):
        np.testing.assert_allclose(logits, digits.torch_test_logits[index : index + 1 + index % 3], atol=1e-4)


def test_int8_from_the_qdq_model_is_as_accurate_as_onnxruntime(
    digits: DigitsArtifacts, evaluation: Dataset, tmp_path: Path
) -> None:
    calibration = Dataset({"input": digits.split.train_x[:128]}, None)
    recipe = Recipe(
        targets=("onnxruntime-cpu", "openvino-cpu"), precision="int8", batch_sizes=(1, 8), measure=FAST
    )
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=calibration)
    by_backend = {engine.artifact.backend: engine for engine in result.engines}
    assert set(by_backend) == {"onnxruntime-cpu", "openvino-cpu"}
    openvino = by_backend["openvino-cpu"]
    assert openvino.artifact.metadata["profile"] == "cpu"  # the QDQ model ONNX Runtime runs too
    assert set(openvino.artifact.metadata["compute_layers_by_precision"]) <= {"u8", "i8"}  # all int8
    top1 = {name: engine.measurement.accuracy["top1"] for name, engine in by_backend.items()}
    assert abs(top1["openvino-cpu"] - top1["onnxruntime-cpu"]) <= 0.01, top1


def test_fp16_says_which_precision_it_computes_in(digits: DigitsArtifacts, tmp_path: Path) -> None:
    from engines.quantize.fp16 import convert_fp16

    fp16_model = convert_fp16(digits.onnx_path, tmp_path / "model-fp16.onnx")
    artifact = get_backend("openvino-cpu").compile(fp16_model, tmp_path / "engine", CompileOptions("fp16"))
    metadata = artifact.metadata
    if "FP16" in metadata["cpu_capabilities"]:
        assert metadata["inference_precision"] == "f16" and not metadata["notes"]
    else:  # never bf16 under an fp16 name
        assert metadata["inference_precision"] == "f32" and "computes in f32" in metadata["notes"][0]
    with get_backend("openvino-cpu").load(artifact.path) as runner:
        logits = runner.infer({"input": digits.split.test_x[:32]})["logits"]
    assert logits.dtype == np.float32
    assert (logits.argmax(1) == digits.torch_test_logits[:32].argmax(1)).all()


def test_a_model_with_external_data(tmp_path: Path) -> None:
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    source = external_data_matmul(tmp_path / "src" / "user-model.onnx", weight)
    backend = get_backend("openvino-cpu")
    artifact = backend.compile(source, tmp_path / "engine", CompileOptions(batch_sizes=(3,)))
    assert (artifact.path.parent / "engine.bin").stat().st_size >= 64  # the weights moved into the IR
    x = np.ones((3, 4), np.float32)
    with backend.load(artifact.path) as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], x @ weight)


def test_a_model_openvino_cannot_read_is_not_runnable(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    source = _saved(helper.make_model(graph, opset_imports=opsets), tmp_path / "custom.onnx")
    with pytest.raises(EngineError) as caught:
        get_backend("openvino-cpu").compile(source, tmp_path / "engine", CompileOptions())
    assert caught.value.code == "model_not_runnable"
    assert "com.example.Frobnicate" in caught.value.detail
    assert str(tmp_path) not in caught.value.detail and ".cpp" not in caught.value.detail


def test_inputs_the_graph_cannot_take_fail_as_inference_failed(tmp_path: Path) -> None:
    shape = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [shape],
    )
    source = _saved(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    backend = get_backend("openvino-cpu")
    artifact = backend.compile(source, tmp_path / "engine", CompileOptions())
    with backend.load(artifact.path) as runner:
        assert runner.infer({"x": np.arange(6, dtype=np.float32)})["y"].shape == (2, 3)
        with pytest.raises(EngineError) as caught:
            runner.infer({"x": np.arange(5, dtype=np.float32)})
    assert caught.value.code == "inference_failed" and ".cpp" not in caught.value.detail


@pytest.mark.parametrize(
    "build",
    [
        quirk_graphs.minus_one_batch,
        quirk_graphs.fused_batchnorm_opset11,
        quirk_graphs.scalar_weight,
        quirk_graphs.recurrent_state,
        quirk_graphs.scalar_input,
        quirk_graphs.row_vector_bias,
        quirk_graphs.data_dependent_output,
        quirk_graphs.wrong_declared_output,
    ],
)
def test_real_world_quirks_run_as_on_onnxruntime(build: Callable[[Path], Path], tmp_path: Path) -> None:
    """Each quirk real exports showed: the same signature (batch axes included) and outputs as
    ONNX Runtime's, at a batch of 3 (the engine is built for 1 and 3)."""
    path = build(tmp_path / "model.onnx")
    with get_backend("onnxruntime-cpu").load(path) as reference:
        feeds = make_batch(reference.input_metadata(), 3, None)
        expected, signature = reference.infer(feeds), reference.input_metadata()
    backend = get_backend("openvino-cpu")
    artifact = backend.compile(path, tmp_path / "engine", CompileOptions(batch_sizes=(1, 3)))
    with backend.load(artifact.path) as runner:
        assert runner.input_metadata() == signature
        outputs = runner.infer(feeds)
    assert set(outputs) == set(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(outputs[name], array, atol=1e-5)
