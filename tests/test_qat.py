"""Quantization-aware training (engines.qat): on a trained depthwise net where post-training INT8
loses tens of points it recovers to the float model's top-1, its QDQ model runs (fused) in ONNX
Runtime and in OpenVINO, the recipe stage is checked at job creation, a job runs it end to end, and
a model torch cannot take is a clean error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.errors import EngineError
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.qat.config import QatConfig
from engines.qat.train import quantization_aware_training
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8
from tests.conftest import QUICK_MEASURE, DigitsArtifacts, LocalApi

#: Training samples for the QAT tests: enough steps to move, few enough to stay fast on two cores.
TRAIN_SAMPLES = 512


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())


def _ort_top1(path: Path, data: Dataset) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return top1(session.run(None, data.inputs)[0], data.labels)


def _train_mobilenet_v2_mini(split, epochs: int = 4, lr: float = 3e-2):  # -> torch.nn.Module
    """bench.models' MobileNetV2-style net (inverted residuals, depthwise 3×3, ReLU6) on the digits,
    trained hard and short: its folded weights spread so far between channels that post-training
    INT8 with one weight scale per tensor loses tens of points (0.968 -> 0.47 here), where QAT
    recovers (the note's measurements)."""
    import torch

    from bench.models import mobilenet_v2_mini

    torch.manual_seed(0)
    model = mobilenet_v2_mini()
    torch.manual_seed(0)  # dropout's draws
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    steps = epochs * ((len(x) + 31) // 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr / 3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start : start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@pytest.fixture(scope="module")
def qat_models(digits: DigitsArtifacts, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fp32, post-training INT8 (minmax) and QAT (3 epochs on 512 samples) of the MobileNetV2-style
    net, all with per-tensor weights on the cpu profile; the held-out split is the digits test split."""
    import torch

    from examples import digits as digits_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workdir = tmp_path_factory.mktemp("qat")
        split = digits.split
        fp32 = digits_model.export_onnx(_train_mobilenet_v2_mini(split), workdir / "mobilenet_v2_mini.onnx")
        features = cpu_info()["cpu_features"]
        per_tensor = QuantizeConfig(calibration="minmax", per_channel=False)
        float_path, _ = prepare_float_model(fp32, workdir, "cpu")
        train = Dataset({"input": split.train_x[:TRAIN_SAMPLES]}, None)  # distillation only
        ptq = quantize_int8(
            float_path,
            workdir / "ptq.onnx",
            train.take(256),
            per_tensor,
            profile="cpu",
            batch_size=16,
            cpu_features=features,
        )
        qat = quantization_aware_training(
            float_path,
            workdir / "qat.onnx",
            train,
            QatConfig(epochs=3, learning_rate=3e-4),
            per_tensor,
            profile="cpu",
            cpu_features=features,
        )
    finally:
        torch.set_num_threads(threads)
    held_out = Dataset({"input": split.test_x}, split.test_y)
    return {"fp32": fp32, "ptq": ptq.path, "qat": qat, "held_out": held_out}


def test_qat_recovers_what_post_training_int8_loses(qat_models: dict) -> None:
    held_out = qat_models["held_out"]
    fp32, ptq = _ort_top1(qat_models["fp32"], held_out), _ort_top1(qat_models["ptq"], held_out)
    qat = _ort_top1(qat_models["qat"].path, held_out)
    # within a point of fp32; below post-training INT8 only where that is itself within a point
    # (trained elsewhere, floats differ: the breakdown seen here, 0.47, may not happen)
    assert qat >= fp32 - 0.01 and qat >= min(ptq, fp32 - 0.01), (fp32, ptq, qat)


def test_qat_exports_a_qdq_model_that_onnx_runtime_and_openvino_run(qat_models: dict) -> None:
    result = qat_models["qat"]
    model = onnx.load(str(result.path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 13
    # weights are int8 initializers read by DequantizeLinear, as ONNX Runtime's quantizer writes them
    int8 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8) == ops.count("Conv")
    meta = result.metadata
    assert meta["method"] == "qat" and meta["quantize_nodes"] == ops.count("QuantizeLinear")
    assert meta["qat"]["epochs"] == 3 and len(meta["qat"]["loss"]) == 3
    assert meta["qat"]["samples"] == TRAIN_SAMPLES and meta["qat"]["seconds"] > 0
    assert "torch.ao" in meta["qat"]["fake_quant"]
    if meta["reduce_range"]:  # 7-bit weights, exported in int8's range
        assert max(int(np.abs(numpy_helper.to_array(t)).max()) for t in int8) <= 64
    # ONNX Runtime fuses it as it fuses its own quantizer's output: every Conv and Add in INT8
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(result.path.with_name("optimized.onnx"))
    ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == ops.count("Conv") and "Conv" not in fused and "Add" not in fused

    import openvino as ov

    held_out = qat_models["held_out"]
    compiled = ov.Core().compile_model(str(result.path), "CPU")
    openvino_top1 = top1(compiled(held_out.inputs["input"])[0], held_out.labels)
    assert abs(openvino_top1 - _ort_top1(result.path, held_out)) <= 0.01


def test_a_model_with_a_fixed_batch_trains_and_keeps_it(digits: DigitsArtifacts, tmp_path: Path) -> None:
    data = Dataset({"input": digits.split.train_x[:48]}, None)
    result = quantization_aware_training(
        digits.static_batch_onnx_path,
        tmp_path / "q.onnx",
        data,
        QatConfig(epochs=1),
        QuantizeConfig(),
        profile="cpu",
        cpu_features=[],
    )
    assert result.metadata["qat"]["batch_size"] == 1
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 32, 32]
    assert session.run(None, {"input": digits.split.test_x[:1]})[0].shape == (1, 10)


def _thresholded_relu_model(path: Path) -> Path:
    """y = ThresholdedRelu(x @ W): ONNX Runtime runs it, onnx2torch has no converter for it."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("ThresholdedRelu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_relu6_after_a_conv_with_asymmetric_pads_is_capped_too(tmp_path: Path) -> None:
    """TensorFlow's "same" padding at stride 2 (or a Pad that ONNX Runtime's optimizer merged into
    the Conv) gives a Conv with asymmetric pads, which onnx2torch writes as Sequential(pad, conv).
    Its ReLU6 must become the fixed [0, 6] quantizer like any other: quantizing the conv's whole
    pre-activation range before a ReLU6 halved EfficientNet-Lite0's top-1 agreement."""
    from torch.ao.quantization import FixedQParamsFakeQuantize

    from engines.qat.fake_quant import FakeQuantSpec, fake_quantize
    from engines.torch_bridge import onnx_to_torch

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w")
    bounds = [numpy_helper.from_array(np.float32(v), n) for n, v in (("low", 0.0), ("high", 6.0))]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 0, 1, 1], strides=[2, 2]),
            helper.make_node("Clip", ["c", "low", "high"], ["y"]),
        ],
        "asymmetric_pads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [weight, *bounds],
    )
    path = tmp_path / "asymmetric.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    module = onnx_to_torch(path, purpose="a test")
    assert any(type(layer).__name__ == "OnnxPadStatic" for layer in module.modules())  # the layout under test
    example = (torch_tensor(rng.normal(0, 1, (1, 3, 8, 8))),)
    prepared = fake_quantize(module, example, FakeQuantSpec("cpu"))
    assert sum(isinstance(layer, FixedQParamsFakeQuantize) for layer in prepared.modules()) == 1
    assert not any(type(layer).__name__ == "ReLU6" for layer in prepared.modules())


def torch_tensor(array: np.ndarray):  # -> torch.Tensor
    import torch

    return torch.from_numpy(array.astype(np.float32))


def test_a_model_torch_cannot_take_is_a_clean_error(tmp_path: Path) -> None:
    path = _thresholded_relu_model(tmp_path / "m.onnx")
    data = Dataset({"x": np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)}, None)
    with pytest.raises(EngineError) as caught:
        quantization_aware_training(
            path,
            tmp_path / "q.onnx",
            data,
            QatConfig(epochs=1),
            QuantizeConfig(),
            profile="cpu",
            cpu_features=[],
        )
    assert caught.value.code == "qat_unavailable"
    assert "ThresholdedRelu" in caught.value.detail and "post-training INT8" in caught.value.detail


# ---------------------------------------------------------------- the recipe stage over the API


def _post(api: LocalApi, kind: str, name: str, content: bytes) -> str:
    response = api.client.post(f"/v1/{kind}", files={"file": (name, content)})
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
    return response.json()["id"]


def _npz(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize(
    ("recipe", "datasets", "fragment"),
    [
        ({"precision": "int8", "qat": {"epochs": 1}}, (), "calibration_dataset_id"),
        ({"precision": "fp32", "qat": {"epochs": 1}}, ("calibration",), "precision 'int8'"),
        ({"precision": "int8", "qat": {"epochs": 1, "distill": False}}, ("calibration",), "labels"),
        (
            {"precision": "int8", "qat": {"epochs": 1}, "accuracy_budget": {"metric": "fidelity"}},
            ("calibration",),
            "accuracy budget",
        ),
    ],
)
def test_bad_qat_recipes_are_refused(
    local_api: LocalApi, digits: DigitsArtifacts, recipe: dict, datasets: tuple, fragment: str
) -> None:
    body = {"model_id": _post(local_api, "models", "digits.onnx", digits.onnx_path.read_bytes())}
    if "calibration" in datasets:  # no labels in it
        body["calibration_dataset_id"] = _post(local_api, "datasets", "c.npz", _npz(digits.calib_npz))
    response = local_api.client.post("/v1/jobs", json={**body, "recipe": recipe})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_recipe" and fragment in response.json()["detail"]


def test_qat_epochs_are_bounded_by_the_schema(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    model_id = _post(local_api, "models", "digits.onnx", digits.onnx_path.read_bytes())
    recipe = {"precision": "int8", "qat": {"epochs": 21}}
    response = local_api.client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"][-1] == "epochs"


def test_a_qat_job_builds_an_int8_engine_end_to_end(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    from workers.job_runner import run_job_by_id

    body = {
        "model_id": _post(local_api, "models", "digits.onnx", digits.onnx_path.read_bytes()),
        "calibration_dataset_id": _post(local_api, "datasets", "c.npz", _npz(digits.calib_npz)),
        "evaluation_dataset_id": _post(local_api, "datasets", "e.npz", _npz(digits.eval_npz)),
        "recipe": {"precision": "int8", "qat": {"epochs": 2}, "batch_sizes": [8], "measure": QUICK_MEASURE},
    }
    response = local_api.client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    run_job_by_id(local_api.settings, response.json()["id"])
    job = local_api.client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["status"] == "succeeded", job
    engine = local_api.client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
    assert engine["precision"] == "int8", engine
    qat = engine["build_info"]["qat"]
    assert qat["epochs"] == 2 and len(qat["loss"]) == 2 and engine["build_info"]["method"] == "qat"
    assert engine["metrics"]["accuracy"]["top1"] >= 0.96, engine["metrics"]
