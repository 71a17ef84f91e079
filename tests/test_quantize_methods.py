"""The registered INT8 quantization methods on a trained depthwise network (real digits).

Each method quantizes the same prepared float model; the engines run in ONNX Runtime and OpenVINO
and are scored on the held-out split. CLE must leave the float function as it was; NNCF must keep
the nodes it is told to keep in float; a method that does not apply, or fails, is an EngineError
with a code and a reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.backends.base import CompileOptions
from engines.backends.registry import get_backend, unavailable_reason
from engines.errors import EngineError
from engines.ingest.datasets import Dataset
from engines.measure.accuracy import run_dataset
from engines.quantize.equalization import equalize, find_pairs
from engines.quantize.int8 import (
    CALIBRATION_METHODS,
    QUANTIZATION_METHODS,
    QuantizeConfig,
    prepare_float_model,
    quantize_int8,
)
from tests import quirk_graphs, trained_graphs
from tests.trained_graphs import TrainedGraph, top1

BATCH = 16
NEW_METHODS = ("nncf", "nncf-smoothquant", "cle")


@pytest.fixture(scope="module")
def prepared(depthwise_digits: TrainedGraph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_float_model(depthwise_digits.onnx_path, tmp_path_factory.mktemp("prepared"), "cpu")[0]


@pytest.fixture(scope="module")
def calibration(depthwise_digits: TrainedGraph) -> Dataset:
    return Dataset({"input": depthwise_digits.train.inputs["input"][:256]}, None)


def _scores(path: Path, evaluation: Dataset, backend: str = "onnxruntime-cpu") -> np.ndarray:
    with get_backend(backend).load(path) as runner:
        return run_dataset(runner, evaluation, BATCH)


def test_the_registry_lists_every_method_with_its_family() -> None:
    assert tuple(QUANTIZATION_METHODS) == CALIBRATION_METHODS
    assert set(NEW_METHODS) <= set(CALIBRATION_METHODS)
    assert CALIBRATION_METHODS[:3] == ("minmax", "entropy", "percentile")
    families = {name: method.family for name, method in QUANTIZATION_METHODS.items()}
    assert {families[name] for name in ("minmax", "entropy", "percentile")} == {"onnxruntime"}
    assert families["nncf"] == "nncf" and families["cle"] == "equalization"
    # a family of its own: the search must not hold SmoothQuant back when plain NNCF missed
    assert families["nncf-smoothquant"] == "smoothquant"
    assert all(
        method.description and "\n" not in method.description for method in QUANTIZATION_METHODS.values()
    )


@pytest.mark.parametrize("method", ["nncf", "cle"])
def test_a_method_keeps_top1_on_the_trained_depthwise_net(
    depthwise_digits: TrainedGraph, prepared: Path, calibration: Dataset, tmp_path: Path, method: str
) -> None:
    evaluation = depthwise_digits.evaluation
    assert evaluation.labels is not None
    result = quantize_int8(
        prepared,
        tmp_path / f"{method}.onnx",
        calibration,
        QuantizeConfig(calibration=method),
        profile="cpu",
        batch_size=BATCH,
        cpu_features=[],
    )
    assert result.metadata["method"] == result.metadata["calibration"] == method
    assert result.metadata["family"] == QUANTIZATION_METHODS[method].family
    assert result.metadata["quantize_nodes"] > 0 and result.metadata["nodes_kept_float"] == []
    float_top1 = top1(_scores(prepared, evaluation), evaluation.labels)
    quantized = _scores(result.path, evaluation)
    assert top1(quantized, evaluation.labels) >= float_top1 - 0.01
    if unavailable_reason("openvino-cpu") is None:  # OpenVINO runs the same QDQ model
        engine = get_backend("openvino-cpu").compile(
            result.path, tmp_path / "openvino", CompileOptions(precision="int8", batch_sizes=(BATCH,))
        )
        on_openvino = _scores(engine.path, evaluation, "openvino-cpu")
        assert (on_openvino.argmax(1) == quantized.argmax(1)).mean() >= 0.99
    if method == "nncf":
        assert result.metadata["fast_bias_correction"] is True and result.metadata["nncf_version"]
    else:
        assert result.metadata["equalized_pairs"] >= 5
        assert result.metadata["bias_correction"]["convs_corrected"] >= 5


def test_cle_keeps_the_float_function_and_evens_the_ranges(
    depthwise_digits: TrainedGraph, prepared: Path, calibration: Dataset, tmp_path: Path
) -> None:
    """`exact` is the same function (ReLU6 kept as ReLU + a per-channel Min where it clips); `auto`
    (the method's) turns ReLU6 into ReLU as the paper does, here measured harmless to top-1."""
    equalized, relu = tmp_path / "equalized.onnx", tmp_path / "relu.onnx"
    report = equalize(prepared, equalized, calibration, BATCH, relu6="exact")
    assert report.pairs >= 5 and report.relu6_capped + report.relu6_as_relu == report.pairs
    evaluation = depthwise_digits.evaluation
    before, after = _scores(prepared, evaluation), _scores(equalized, evaluation)
    cosine = (before * after).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
    assert cosine.min() > 0.9999 and (before.argmax(1) == after.argmax(1)).all()
    automatic = equalize(prepared, relu, calibration, BATCH)
    assert automatic.relu6_check is not None and automatic.relu6_check["harmless"]
    assert automatic.relu6_as_relu == automatic.pairs
    assert (_scores(relu, evaluation).argmax(1) == before.argmax(1)).mean() >= 0.998

    def spread(path: Path) -> float:
        """The worst ratio between a depthwise conv's largest and smallest channel range."""
        model = onnx.load(str(path))
        weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
        ratios = []
        for pair in find_pairs(model):
            weight = np.abs(weights[pair.first.input[1]]).reshape(len(weights[pair.first.input[1]]), -1)
            ranges = weight.max(1)
            ratios.append(ranges.max() / max(ranges.min(), 1e-12))
        return max(ratios)

    assert spread(equalized) < spread(prepared)


def test_nncf_keeps_the_excluded_nodes_in_float(prepared: Path, calibration: Dataset, tmp_path: Path) -> None:
    graph = onnx.load(str(prepared)).graph
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    excluded = (convs[1], convs[2])
    result = quantize_int8(
        prepared,
        tmp_path / "nncf.onnx",
        calibration,
        QuantizeConfig(calibration="nncf", nodes_to_exclude=excluded),
        profile="cpu",
        batch_size=BATCH,
        cpu_features=[],
    )
    assert result.metadata["nodes_kept_float"] == list(excluded) == result.metadata["ignored_scope"]
    quantized = onnx.load(str(result.path)).graph
    initializers = {tensor.name for tensor in quantized.initializer}
    nodes = {node.name: node for node in quantized.node}
    for name in excluded:  # their weights stay float initializers, not DequantizeLinear outputs
        assert nodes[name].input[1] in initializers
    assert nodes[convs[3]].input[1] not in initializers


def test_for_tensorrt_cle_is_symmetric_int8_and_nncf_says_why_not(
    prepared: Path, calibration: Dataset, tmp_path: Path
) -> None:
    def quantize(method: str):
        return quantize_int8(
            prepared,
            tmp_path / f"{method}.onnx",
            calibration,
            QuantizeConfig(calibration=method),
            profile="tensorrt",
            batch_size=BATCH,
            cpu_features=[],
        )

    result = quantize("cle")
    model = onnx.load(str(result.path))
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    zero_points = [
        initializers[node.input[2]]
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2
    ]
    assert zero_points and all(array.dtype == np.int8 and not array.any() for array in zero_points)
    assert result.metadata["bias_correction"]["convs_corrected"] >= 5  # float biases, corrected
    with pytest.raises(EngineError, match="zero points 0") as refused:
        quantize("nncf")
    assert refused.value.code == "quantization_not_applicable"


def test_a_method_that_does_not_apply_says_why(prepared: Path, calibration: Dataset, tmp_path: Path) -> None:
    config = QuantizeConfig(calibration="nncf-smoothquant")
    with pytest.raises(EngineError, match="MatMul/Gemm hold") as refused:
        quantize_int8(
            prepared,
            tmp_path / "sq.onnx",
            calibration,
            config,
            profile="cpu",
            batch_size=BATCH,
            cpu_features=[],
        )
    assert refused.value.code == "quantization_not_applicable"
    plain = prepare_float_model(quirk_graphs.scalar_weight(tmp_path / "plain.onnx"), tmp_path, "cpu")[0]
    assert QUANTIZATION_METHODS["cle"].applies(plain) is not None


def test_smoothquant_applies_to_a_trained_mlp(tmp_path: Path) -> None:
    """The Gemm-only MLP is SmoothQuant's kind of graph: Muls smooth its inputs, top-1 holds."""
    path, train, evaluation = trained_graphs.build_mlp_digits(tmp_path)
    assert evaluation.labels is not None
    prepared = prepare_float_model(path, tmp_path, "cpu")[0]
    assert QUANTIZATION_METHODS["nncf-smoothquant"].applies(prepared) is None
    result = quantize_int8(
        prepared,
        tmp_path / "sq.onnx",
        train.take(256),
        QuantizeConfig(calibration="nncf-smoothquant"),
        profile="cpu",
        batch_size=BATCH,
        cpu_features=[],
    )
    assert result.metadata["smooth_quant_alpha"] > 0 and result.metadata["family"] == "smoothquant"
    assert any(node.name.endswith("nncf_smooth_quant") for node in onnx.load(str(result.path)).graph.node)
    float_top1 = top1(_scores(prepared, evaluation), evaluation.labels)
    assert top1(_scores(result.path, evaluation), evaluation.labels) >= float_top1 - 0.01


def test_a_method_that_fails_on_a_graph_is_an_engine_error(tmp_path: Path) -> None:
    """NNCF cannot take this recurrent cell (its state input has the batch on dim 1): a job's error
    with the reason, not a crash."""
    path = prepare_float_model(quirk_graphs.recurrent_state(tmp_path / "rnn.onnx"), tmp_path, "cpu")[0]
    rng = np.random.default_rng(0)
    data = Dataset(
        {"x": rng.random((16, 4), dtype=np.float32), "h": rng.random((16, 2, 8), dtype=np.float32)},
        None,
        batch_axes={"x": 0, "h": 1},
    )
    with pytest.raises(EngineError) as failed:
        quantize_int8(
            path,
            tmp_path / "q.onnx",
            data,
            QuantizeConfig(calibration="nncf"),
            profile="cpu",
            batch_size=8,
            cpu_features=[],
        )
    assert (
        failed.value.code == "quantization_failed"
        and "NNCF quantization (nncf) failed" in failed.value.detail
    )
