"""The TensorRT-readiness lint: one hand-built QDQ graph per finding, a clean one, and real models
quantized by our own `tensorrt` profile (ONNX Runtime), which must carry no problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.ingest.datasets import Dataset
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8
from engines.quantize.tensorrt_readiness import (
    ReadinessReport,
    check_tensorrt_readiness,
    operator_support,
)

C_IN, C_OUT = 16, 32
PLACEMENT_WARNINGS = {"qdq_on_graph_output", "qdq_not_feeding_quantizable_op", "concat_scales_differ"}


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_conv(
    *,
    opset: int = 17,
    activation_zero_point: np.ndarray | None = None,
    weight_axis: int = 0,
    int32_bias: bool = False,
    runtime_scale: bool = False,
    output_qdq: bool = False,
    extra_nodes: tuple[onnx.NodeProto, ...] = (),
    extra_opsets: tuple[tuple[str, int], ...] = (),
    c_in: int = C_IN,
    c_out: int = C_OUT,
) -> onnx.ModelProto:
    """x → Q → DQ → Conv(DQ(int8 W) per channel, float bias) → y: what TensorRT builds in INT8,
    with one knob per way of getting it wrong."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (c_out, c_in, 3, 3)).astype(np.int8)
    channels = weight.shape[weight_axis]
    initializers = [
        _init("x_scale", np.float32(0.02)),
        _init("x_zp", np.int8(0) if activation_zero_point is None else activation_zero_point),
        _init("w", weight),
        _init("w_scale", np.full(channels, 0.01, np.float32)),
        _init("w_zp", np.zeros(channels, np.int8)),
    ]
    nodes = []
    if runtime_scale:  # the activation scale computed from the input: max|x| / 127
        initializers.append(_init("q_max", np.float32(127.0)))
        nodes += [
            helper.make_node("Abs", ["x"], ["x_abs"], name="abs"),
            helper.make_node("ReduceMax", ["x_abs"], ["x_max"], name="max", keepdims=0),
            helper.make_node("Div", ["x_max", "q_max"], ["x_scale_rt"], name="scale_from_input"),
        ]
    scale = "x_scale_rt" if runtime_scale else "x_scale"
    nodes += [
        helper.make_node("QuantizeLinear", ["x", scale, "x_zp"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", scale, "x_zp"], ["x_dq"], name="x_dq"),
        helper.make_node(
            "DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=weight_axis
        ),
    ]
    if int32_bias:  # what QuantizeBias=True writes: int32 bias, scale = x_scale * w_scale
        initializers += [
            _init("b", np.arange(c_out, dtype=np.int32)),
            _init("b_scale", np.full(c_out, 0.02 * 0.01, np.float32)),
            _init("b_zp", np.zeros(c_out, np.int32)),
        ]
        nodes.append(
            helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["b_dq"], name="b_dq", axis=0)
        )
        bias = "b_dq"
    else:
        initializers.append(_init("b", np.zeros(c_out, np.float32)))
        bias = "b"
    conv_out = "y_float" if output_qdq else "y"
    nodes.append(helper.make_node("Conv", ["x_dq", "w_dq", bias], [conv_out], name="conv", pads=[1, 1, 1, 1]))
    if output_qdq:
        initializers += [_init("y_scale", np.float32(0.05)), _init("y_zp", np.int8(0))]
        nodes += [
            helper.make_node("QuantizeLinear", ["y_float", "y_scale", "y_zp"], ["y_q"], name="y_q"),
            helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="y_dq"),
        ]
    nodes += list(extra_nodes)
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 8, 8])],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def codes(report: ReadinessReport) -> set[str]:
    return {problem.code for problem in report.problems}


def test_a_clean_qdq_conv_is_ready_and_valid_onnx() -> None:
    model = qdq_conv()
    onnx.checker.check_model(model, full_check=True)
    report = check_tensorrt_readiness(model)
    assert report.ready and report.problems == [] and report.warnings == [], report.to_dict()
    assert "TensorRT 10.15" in report.operator_list


@pytest.mark.parametrize(
    ("model", "code", "node"),
    [
        (qdq_conv(activation_zero_point=np.uint8(0)), "zero_point_not_int8", "x_q"),
        (qdq_conv(activation_zero_point=np.int8(3)), "zero_point_not_zero", "x_q"),
        (qdq_conv(weight_axis=1), "weight_axis_not_output_channels", "w_dq"),
        (qdq_conv(int32_bias=True), "bias_quantized", "b_dq"),
        (qdq_conv(opset=12), "opset_too_old", None),
        (qdq_conv(runtime_scale=True), "scale_not_constant", "x_q"),
    ],
    ids=["uint8-zero-point", "nonzero-zero-point", "wrong-axis", "int32-bias", "opset-12", "runtime-scale"],
)
def test_each_problem_has_its_code(model: onnx.ModelProto, code: str, node: str | None) -> None:
    report = check_tensorrt_readiness(model)
    assert not report.ready
    found = [problem for problem in report.problems if problem.code == code]
    assert found, report.to_dict()
    assert node is None or node in found[0].nodes
    assert all(problem.message for problem in report.problems)


def test_int32_bias_is_reported_once_as_a_bias() -> None:
    report = check_tensorrt_readiness(qdq_conv(int32_bias=True))
    assert codes(report) == {"bias_quantized"}, report.to_dict()
    assert "QuantizeBias=False" in report.problems[0].message


@pytest.mark.parametrize(
    ("node", "opsets", "code"),
    [
        (helper.make_node("Unique", ["y"], ["u"], name="unique"), (), "operator_not_supported"),
        (helper.make_node("NotAnOnnxOp", ["y"], ["u"], name="made_up"), (), "operator_not_listed"),
        (
            helper.make_node("FusedConv", ["y"], ["u"], name="ort_fusion", domain="com.microsoft"),
            (("com.microsoft", 1),),
            "operator_not_onnx_domain",
        ),
    ],
    ids=["marked-N", "not-listed", "com.microsoft"],
)
def test_operators_off_the_onnx_tensorrt_list_are_problems(
    node: onnx.NodeProto, opsets: tuple[tuple[str, int], ...], code: str
) -> None:
    report = check_tensorrt_readiness(qdq_conv(extra_nodes=(node,), extra_opsets=opsets))
    assert codes(report) == {code}, report.to_dict()
    assert report.problems[0].nodes == (node.name,)


def test_qdq_on_a_graph_output_is_a_warning() -> None:
    report = check_tensorrt_readiness(qdq_conv(output_qdq=True))
    assert report.ready, report.to_dict()
    assert [warning.code for warning in report.warnings] == ["qdq_on_graph_output"]
    assert report.warnings[0].nodes == ("y_dq",)


def test_small_convs_are_flagged_like_model_optimizer_does() -> None:
    # 6 → 4 channels, neither a multiple of 8: no fast INT8 kernel shape, even as the first layer.
    small = check_tensorrt_readiness(qdq_conv(c_in=6, c_out=4))
    assert small.ready and "small_conv_quantized" in small.codes
    # The first layer, 3 → 16, square kernel: Model Optimizer keeps it quantized, so do we.
    first = check_tensorrt_readiness(qdq_conv(c_in=3, c_out=16))
    assert "small_conv_quantized" not in first.codes, first.to_dict()


def _model(
    nodes: list[onnx.NodeProto], initializers: list[TensorProto], outputs: list[str]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("op", "attributes", "weight_shape", "axis", "ok"),
    [
        ("Gemm", {"transB": 1}, (C_OUT, C_IN), 0, True),
        ("Gemm", {"transB": 1}, (C_OUT, C_IN), 1, False),
        ("Gemm", {}, (C_IN, C_OUT), 1, True),
        ("Gemm", {}, (C_IN, C_OUT), 0, False),
        ("MatMul", {}, (C_IN, C_OUT), 1, True),
        ("MatMul", {}, (C_IN, C_OUT), -1, True),
        ("MatMul", {}, (C_IN, C_OUT), 0, False),
    ],
)
def test_weight_axes_follow_the_output_channels(
    op: str, attributes: dict, weight_shape: tuple[int, int], axis: int, ok: bool
) -> None:
    channels = weight_shape[axis]
    initializers = [
        _init("s", np.float32(0.02)),
        _init("z", np.int8(0)),
        _init("w", np.ones(weight_shape, np.int8)),
        _init("ws", np.full(channels, 0.01, np.float32)),
        _init("wz", np.zeros(channels, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"], name="xdq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], name="wdq", axis=axis),
        helper.make_node(op, ["xdq", "wdq"], ["y"], name="op", **attributes),
    ]
    report = check_tensorrt_readiness(_model(nodes, initializers, ["y"]))
    assert report.ready is ok, report.to_dict()
    assert ok or codes(report) == {"weight_axis_not_output_channels"}


def test_weights_as_q_dq_pairs_and_convtranspose_axis() -> None:
    """Model Optimizer's AddQDQPairToWeight form: float weight → Q → DQ; ConvTranspose is per axis 1."""
    rng = np.random.default_rng(1)
    initializers = [
        _init("s", np.float32(0.02)),
        _init("z", np.int8(0)),
        _init("w", rng.standard_normal((C_IN, C_OUT, 2, 2)).astype(np.float32)),  # [C_in, C_out, k, k]
        _init("ws", np.full(C_OUT, 0.01, np.float32)),
        _init("wz", np.zeros(C_OUT, np.int8)),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["x4"], name="to_4d"),
        helper.make_node("QuantizeLinear", ["x4", "s", "z"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"], name="xdq"),
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="wq", axis=1),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], name="wdq", axis=1),
        helper.make_node("ConvTranspose", ["xdq", "wdq"], ["y"], name="deconv", strides=[2, 2]),
    ]
    initializers.append(_init("axes", np.array([2, 3], np.int64)))
    report = check_tensorrt_readiness(_model(nodes, initializers, ["y"]))
    assert report.ready and report.warnings == [], report.to_dict()
    for node in nodes:
        if node.name in ("wq", "wdq"):
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("axis", 0))
    initializers[3] = _init("ws", np.full(C_IN, 0.01, np.float32))
    initializers[4] = _init("wz", np.zeros(C_IN, np.int8))
    wrong = check_tensorrt_readiness(_model(nodes, initializers, ["y"]))
    assert codes(wrong) == {"weight_axis_not_output_channels"}, wrong.to_dict()


def test_scales_zero_points_and_domains_of_qdq_nodes() -> None:
    initializers = [
        _init("neg", np.float32(-0.1)),
        _init("s", np.float32(0.1)),
        _init("per_channel", np.full(C_IN, 0.1, np.float32)),
        _init("zc", np.zeros(C_IN, np.int8)),
        _init("z", np.int8(0)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "neg", "z"], ["a"], name="negative_scale"),
        helper.make_node("QuantizeLinear", ["x", "s"], ["b"], name="no_zero_point"),  # UINT8 by default
        helper.make_node(
            "QuantizeLinear", ["x", "per_channel", "zc"], ["c"], name="activation_per_channel", axis=1
        ),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["d"], name="contrib_q", domain="com.microsoft"),
    ]
    model = _model(nodes, initializers, ["a", "b", "c", "d"])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    found = {(problem.code, problem.nodes[0]) for problem in check_tensorrt_readiness(model).problems}
    assert found == {
        ("scale_not_positive_finite", "negative_scale"),
        ("zero_point_not_int8", "no_zero_point"),
        ("activation_per_channel", "activation_per_channel"),
        ("qdq_not_onnx_domain", "contrib_q"),
    }, found


def test_concat_of_differently_scaled_inputs_and_idle_qdq_are_warnings() -> None:
    initializers = [
        _init("s1", np.float32(0.1)),
        _init("s2", np.float32(0.2)),
        _init("s3", np.float32(0.3)),
        _init("z", np.int8(0)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z"], ["q1"], name="q1"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z"], ["d1"], name="d1"),
        helper.make_node("QuantizeLinear", ["x", "s2", "z"], ["q2"], name="q2"),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["d2"], name="d2"),
        helper.make_node("Concat", ["d1", "d2"], ["cat"], name="cat", axis=1),
        helper.make_node("QuantizeLinear", ["cat", "s3", "z"], ["q3"], name="q3"),
        helper.make_node("DequantizeLinear", ["q3", "s3", "z"], ["d3"], name="d3"),
        helper.make_node("Softmax", ["d3"], ["y"], name="softmax"),  # no INT8 kernel reads d3
    ]
    report = check_tensorrt_readiness(_model(nodes, initializers, ["y"]))
    assert report.ready, report.to_dict()
    warnings = {warning.code: set(warning.nodes) for warning in report.warnings}
    assert warnings["concat_scales_differ"] == {"cat"}
    # d1 and d2 are looked at through the Concat and the requantization: only a Softmax reads them.
    assert warnings["qdq_not_feeding_quantizable_op"] == {"d1", "d2", "d3"}


def test_operator_list_is_data_with_its_source_and_loaded_once() -> None:
    support = operator_support()
    assert operator_support() is support
    assert support.source["url"].endswith("onnx-tensorrt/blob/main/docs/operators.md")
    assert support.source["tensorrt_version"] and support.source["read_on"]
    operators = support.operators
    assert operators["Conv"]["supported"] and operators["QuantizeLinear"]["supported"]
    assert not operators["QLinearConv"]["supported"] and not operators["DynamicQuantizeLinear"]["supported"]
    assert "zero" in operators["DequantizeLinear"]["restrictions"]
    assert len(operators) > 150


# --- real models, quantized by our own `tensorrt` profile ------------------------------------------


def _quantize_tensorrt(onnx_path: Path, shape: tuple[int, ...], tmp_path: Path) -> Path:
    float_path, _ = prepare_float_model(onnx_path, tmp_path, "tensorrt")
    samples = np.random.default_rng(0).random((32, *shape), dtype=np.float32)
    out = tmp_path / "int8-tensorrt.onnx"
    quantize_int8(
        float_path,
        out,
        Dataset({"input": samples}, None),
        QuantizeConfig(),
        profile="tensorrt",
        batch_size=8,
        cpu_features=[],
    )
    return out


def test_the_digits_cnn_quantized_by_the_tensorrt_profile_has_no_problem(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from examples import digits

    torch.manual_seed(0)  # untrained: placement and types do not depend on the weights' values
    onnx_path = digits.export_onnx(digits.build_cnn().eval(), tmp_path / "digits.onnx")
    report = check_tensorrt_readiness(_quantize_tensorrt(onnx_path, (1, 32, 32), tmp_path))
    assert report.ready and report.problems == [], report.to_dict()
    # Model Optimizer's placement (engines.quantize.int8.tensorrt_placement): no Q/DQ on the logits
    # nor on Conv outputs before ReLU, none that feeds no INT8 op.
    codes = {warning.code for warning in report.warnings}
    assert not codes & {"qdq_on_graph_output", "qdq_not_feeding_quantizable_op"}, report.to_dict()


def test_a_branchy_network_quantized_by_the_tensorrt_profile_has_no_problem(tmp_path: Path) -> None:
    """Concat, ConvTranspose (axis 1), MatMul (last axis) and Gemm (transB=1, axis 0) as ONNX
    Runtime's quantizer writes them."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 1)
            self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
            self.proj = nn.Parameter(torch.randn(16, 8))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
            x = self.up(x).mean((2, 3)).unsqueeze(1) @ self.proj
            return self.head(x.flatten(1))

    torch.manual_seed(0)
    onnx_path = tmp_path / "branchy.onnx"
    torch.onnx.export(
        Branchy().eval(),
        (torch.zeros(1, 3, 16, 16),),
        str(onnx_path),
        input_names=["input"],
        output_names=["out"],
        dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    quantized = _quantize_tensorrt(onnx_path, (3, 16, 16), tmp_path)
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"Concat", "ConvTranspose", "MatMul", "Gemm"} <= ops
    report = check_tensorrt_readiness(quantized)
    assert report.ready and report.problems == [], report.to_dict()
    assert {warning.code for warning in report.warnings} <= PLACEMENT_WARNINGS, report.to_dict()


def test_a_batched_matmul_weight_quantized_by_the_tensorrt_profile_has_no_problem(tmp_path: Path) -> None:
    """Found by this lint: ONNX Runtime's default per-channel axis for MatMul is 1, which for a
    batched [B, K, N] weight is K; the profile now asks for the last axis (engines.quantize.int8)."""
    weight = np.random.default_rng(0).standard_normal((2, C_IN, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["y"], name="batched_matmul")],
        "batched_matmul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 4, C_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4, 8])],
        [_init("w", weight)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "batched_matmul.onnx")
    report = check_tensorrt_readiness(
        _quantize_tensorrt(tmp_path / "batched_matmul.onnx", (2, 4, C_IN), tmp_path)
    )
    assert report.problems == [], report.to_dict()
