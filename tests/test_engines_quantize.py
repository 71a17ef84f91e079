"""INT8 and FP16 on the digits CNN, through the library (tests/test_e2e_flow.py covers the API)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.errors import InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.measure.latency import MeasureConfig
from engines.pipeline import run_recipe
from engines.quantize.budget import AccuracyBudget, quantize_within_budget
from engines.quantize.fp16 import convert_fp16
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8, reduce_range_for
from engines.quantize.layer_errors import layer_errors, most_harmful_nodes
from engines.recipe import Recipe
from tests.conftest import QUICK_MEASURE, DigitsArtifacts

FAST = MeasureConfig(**QUICK_MEASURE)


@pytest.fixture(scope="module")
def calibration(digits: DigitsArtifacts) -> Dataset:
    return Dataset({"input": digits.split.train_x[:512]}, None)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_keeps_top1_within_half_a_point(
    digits: DigitsArtifacts, evaluation: Dataset, calibration: Dataset, tmp_path: Path, method: str
) -> None:
    recipe = Recipe(
        precision="int8", quantize=QuantizeConfig(calibration=method), batch_sizes=(8,), measure=FAST
    )
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=calibration)
    (engine,) = result.engines
    assert engine.comparison["top1_delta"] >= -0.005, engine.comparison
    metadata = engine.artifact.metadata
    assert metadata["calibration"] == method and metadata["profile"] == "cpu" and metadata["per_channel"]
    assert isinstance(metadata["reduce_range"], bool) and metadata["reduce_range_reason"]
    assert (engine.artifact.path.parent / "layer_errors.json").is_file()
    ops = {node.op_type for node in onnx.load(str(engine.artifact.path)).graph.node}
    assert ops & {"QuantizeLinear", "QLinearConv", "DequantizeLinear"}, ops
    # the whole build (calibration and quantization included), not the backend's compile step alone
    assert metadata["build_seconds"] > engine.artifact.build_seconds
    assert metadata["build_seconds"] >= metadata.get("quantize_seconds", 0.0)


def test_reduce_range_follows_the_cpu() -> None:
    assert reduce_range_for(["avx2"])[0] is True
    assert reduce_range_for(["avx2", "avx512f", "avx512_vnni"])[0] is False
    assert reduce_range_for(["avx2", "avx_vnni"])[0] is False


def test_tensorrt_profile_is_symmetric_with_float_bias(
    digits: DigitsArtifacts, calibration: Dataset, tmp_path: Path
) -> None:
    float_path, _ = prepare_float_model(digits.onnx_path, tmp_path, "tensorrt")
    out = tmp_path / "trt.onnx"
    result = quantize_int8(
        float_path, out, calibration, QuantizeConfig(), profile="tensorrt", batch_size=16, cpu_features=[]
    )
    model = onnx.load(str(out))
    assert result.metadata["activation_type"] == "int8"
    assert next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 13
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    zero_points = [
        node.input[2]
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2
    ]
    assert zero_points and all(not initializers[name].any() for name in zero_points if name in initializers)
    assert all(initializers[name].dtype == np.int8 for name in zero_points if name in initializers)
    assert not [array for array in initializers.values() if array.dtype == np.int32]  # bias stays float
    per_channel = [
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and initializers.get(node.input[1]) is not None
        and initializers[node.input[1]].size > 1
    ]
    assert per_channel, "weights are quantized per channel"


def test_fp16_keeps_float32_io(digits: DigitsArtifacts, evaluation: Dataset, tmp_path: Path) -> None:
    path = convert_fp16(digits.onnx_path, tmp_path / "fp16.onnx")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in model.graph.initializer)
    result = run_recipe(
        digits.onnx_path,
        Recipe(precision="fp16", batch_sizes=(8,), measure=FAST),
        tmp_path / "run",
        evaluation=evaluation,
    )
    assert abs(result.engines[0].comparison["top1_delta"]) <= 0.002


def test_small_calibration_sets_are_warned_about(
    digits: DigitsArtifacts, evaluation: Dataset, tmp_path: Path
) -> None:
    small = Dataset({"input": digits.split.train_x[:64]}, None)
    recipe = Recipe(precision="int8", batch_sizes=(8,), measure=FAST)
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=small)
    assert any("calibrated on 64 samples" in message for message in result.messages)
    with pytest.raises(InvalidRecipeError, match="calibration dataset"):
        run_recipe(digits.onnx_path, recipe, tmp_path / "none", evaluation=evaluation)


def test_layer_errors_rank_worst_first(digits: DigitsArtifacts, calibration: Dataset, tmp_path: Path) -> None:
    float_path, _ = prepare_float_model(digits.onnx_path, tmp_path, "cpu")
    quantize_int8(
        float_path,
        tmp_path / "q.onnx",
        calibration,
        QuantizeConfig(),
        profile="cpu",
        batch_size=16,
        cpu_features=[],
    )
    report = layer_errors(float_path, tmp_path / "q.onnx", calibration, batch_size=8, workdir=tmp_path)
    model_sqnr = [row["model_sqnr_db"] for row in report["activations"] if row["model_sqnr_db"] is not None]
    assert model_sqnr == sorted(model_sqnr) and len(model_sqnr) >= 5
    assert report["weights"] and all(row["sqnr_db"] > 10 for row in report["weights"])
    conv_nodes = {node.name for node in onnx.load(str(float_path)).graph.node if node.op_type == "Conv"}
    assert conv_nodes <= set(most_harmful_nodes(report))  # Convs are ranked through their folded Relus


def test_accuracy_budget_keeps_nodes_in_float_until_it_holds(
    digits: DigitsArtifacts, calibration: Dataset, tmp_path: Path
) -> None:
    noise = Dataset({"input": np.random.default_rng(0).random((200, 1, 32, 32), dtype=np.float32)}, None)
    recipe = Recipe(
        precision="int8", accuracy_budget=AccuracyBudget("fidelity", 0.0), batch_sizes=(8,), measure=FAST
    )
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=noise, calibration=calibration)
    budget = result.engines[0].artifact.metadata["accuracy_budget"]
    assert budget["met"] and budget["drop"] <= 0.0 and len(budget["steps"]) >= 2
    assert result.engines[0].artifact.metadata["nodes_kept_float"]
    assert result.engines[0].measurement.accuracy["fidelity"]["top1_agreement"] == 1.0


def test_a_budget_that_cannot_be_met_is_reported_with_numbers(
    digits: DigitsArtifacts, calibration: Dataset, tmp_path: Path
) -> None:
    float_path, _ = prepare_float_model(digits.onnx_path, tmp_path, "cpu")
    noise = Dataset({"input": np.random.default_rng(1).random((200, 1, 32, 32), dtype=np.float32)}, None)

    def quantize_ignoring_exclusions(config: QuantizeConfig, out: Path):  # a quantizer that cannot keep float
        return quantize_int8(
            float_path,
            out,
            calibration,
            replace(config, nodes_to_exclude=()),
            profile="cpu",
            batch_size=16,
            cpu_features=[],
        )

    result = quantize_within_budget(
        float_path,
        quantize_ignoring_exclusions,
        QuantizeConfig(),
        AccuracyBudget("fidelity", 0.0),
        evaluation=noise,
        calibration=calibration,
        batch_size=8,
        workdir=tmp_path,
    )
    assert not result.metadata["accuracy_budget"]["met"]
    assert any(
        message.startswith("accuracy budget missed") and "pt of fidelity" in message
        for message in result.messages
    )


def test_a_few_calibration_samples_still_calibrate(
    digits: DigitsArtifacts, calibration: Dataset, tmp_path: Path
) -> None:
    recipe = Recipe(
        precision="int8", quantize=QuantizeConfig(calibration_samples=4), batch_sizes=(8,), measure=FAST
    )
    result = run_recipe(digits.onnx_path, recipe, tmp_path, calibration=calibration)
    assert result.engines[0].artifact.metadata["calibration_samples"] == 4
    assert any("calibrated on 4 samples" in message for message in result.messages)
