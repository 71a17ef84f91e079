"""Float arithmetic that computes indices stays in float under static INT8 (engines.quantize.index_paths).

MPNet (all-mpnet-base-v2, torch.onnx.export opset 17) buckets relative positions in float: positions
→ Cast to float → Abs → Div → Log → Mul → Cast to int64 → Min/Where → Gather into its
`relative_attention_bias`. Quantized, the Mul's calibrated range holds Log(0) = -inf, the bucket
becomes INT64_MIN + 8 and ONNX Runtime refuses to run the model ("Gather … indices element out of
data bounds"). The graph here is that computation on a small table, added to a MatMul's scores;
quantized through the service's quantize function, it must run with the float model's buckets and
scores close to the float model's, and say which nodes it kept in float.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.ingest.datasets import Dataset
from engines.quantize.index_paths import index_path_nodes
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8
from engines.quantize.nncf_ptq import nncf_missing

DIM, BATCH, SEQUENCE = 8, 4, 16
NUM_BUCKETS, MAX_EXACT, MAX_DISTANCE = 16, 4, 32
#: The nodes of the bucket computation that read or write a float tensor.
FLOAT_BUCKET_NODES = {"to_float", "abs", "div", "log", "mul", "to_int", "small", "is_small"}


def _constant(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def relative_bucket_graph(path: Path) -> Path:
    """x [batch, seq, 8] → scores = (x·W)·xᵀ + bias[bucket(j - i)], and the buckets as an output.

    The sequence axis is dynamic, as exporters write it: a static one would let the pre-processing
    fold the whole bucket computation into a constant."""
    rng = np.random.default_rng(0)
    scale = (NUM_BUCKETS - MAX_EXACT) / math.log(MAX_DISTANCE / MAX_EXACT)
    initializers = [
        _constant("W", (rng.standard_normal((DIM, DIM)) * 0.3).astype(np.float32)),
        _constant("bias_table", np.arange(NUM_BUCKETS, dtype=np.float32)),
        _constant("zero", np.array(0, np.int64)),
        _constant("one", np.array(1, np.int64)),
        _constant("axis0", np.array([0], np.int64)),
        _constant("axis1", np.array([1], np.int64)),
        _constant("max_exact_f", np.array(MAX_EXACT, np.float32)),
        _constant("max_exact_i", np.array(MAX_EXACT, np.int64)),
        _constant("scale", np.array(scale, np.float32)),
        _constant("last_bucket", np.array(NUM_BUCKETS - 1, np.int64)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="project"),
        helper.make_node("Transpose", ["x"], ["xt"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xw", "xt"], ["scores_raw"], name="scores"),
        # positions from the sequence length, as MPNet's compute_position_bias does
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["length"], name="length", axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["positions"], name="positions"),
        helper.make_node("Unsqueeze", ["positions", "axis0"], ["memory"], name="memory"),
        helper.make_node("Unsqueeze", ["positions", "axis1"], ["context"], name="context"),
        helper.make_node("Sub", ["memory", "context"], ["relative"], name="relative"),
        # the float part: log-spaced buckets beyond MAX_EXACT
        helper.make_node("Cast", ["relative"], ["relative_f"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Abs", ["relative_f"], ["distance"], name="abs"),
        helper.make_node("Div", ["distance", "max_exact_f"], ["ratio"], name="div"),
        helper.make_node("Log", ["ratio"], ["log_ratio"], name="log"),
        helper.make_node("Mul", ["log_ratio", "scale"], ["scaled"], name="mul"),
        helper.make_node("Cast", ["scaled"], ["offset"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Add", ["offset", "max_exact_i"], ["large_raw"], name="large_raw"),
        helper.make_node("Min", ["large_raw", "last_bucket"], ["large"], name="large"),
        helper.make_node("Cast", ["distance"], ["small"], name="small", to=TensorProto.INT64),
        helper.make_node("Less", ["distance", "max_exact_f"], ["is_small_b"], name="is_small"),
        helper.make_node("Where", ["is_small_b", "small", "large"], ["buckets"], name="bucket"),
        helper.make_node("Gather", ["bias_table", "buckets"], ["bias"], name="relative_attention_bias"),
        helper.make_node("Add", ["scores_raw", "bias"], ["scores_out"], name="add_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "relative-buckets",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", DIM])],
        [
            helper.make_tensor_value_info("scores_out", TensorProto.FLOAT, ["batch", "seq", "seq"]),
            helper.make_tensor_value_info("buckets", TensorProto.INT64, ["seq", "seq"]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["scores_out", "buckets"], {"x": x})


def _x(samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, SEQUENCE, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("index-paths")
    return prepare_float_model(relative_bucket_graph(workdir / "model.onnx"), workdir, "cpu")[0]


@pytest.mark.parametrize("method", ["minmax", "nncf"])
def test_relative_position_buckets_stay_float_and_the_model_runs(
    prepared: Path, tmp_path: Path, method: str
) -> None:
    if method == "nncf" and nncf_missing():
        pytest.skip(nncf_missing())
    result = quantize_int8(
        prepared,
        tmp_path / f"{method}.onnx",
        Dataset({"x": _x(32, seed=1)}, None),
        QuantizeConfig(calibration=method),
        profile="cpu",
        batch_size=BATCH,
        cpu_features=[],
    )
    x = _x(BATCH, seed=2)
    float_scores, float_buckets = _run(prepared, x)
    scores, buckets = _run(result.path, x)  # quantized, the buckets were out of the table's bounds
    np.testing.assert_array_equal(buckets, float_buckets)
    assert float_buckets.max() > MAX_EXACT  # the log-spaced branch is exercised
    cosine = (scores * float_scores).sum() / (np.linalg.norm(scores) * np.linalg.norm(float_scores))
    assert cosine > 0.999

    kept = result.metadata["index_nodes_kept_float"]
    assert set(kept) >= FLOAT_BUCKET_NODES, kept
    # the model's data is still quantized: the MatMuls; and the integer Shape/Range part is not listed
    assert not {"project", "scores", "shape", "length", "positions"} & set(kept), kept
    assert result.metadata["quantize_nodes"] > 0
    assert any(f"kept {len(kept)} node(s) of index/shape computations" in m for m in result.messages)
    if method == "nncf":  # NNCF leaves these ops alone by itself; its ignored scope holds them all the same
        assert set(result.metadata["ignored_scope"]) >= FLOAT_BUCKET_NODES
    quantized = onnx.load(str(result.path)).graph
    dequantized = {node.output[0] for node in quantized.node if node.op_type == "DequantizeLinear"}
    for node in quantized.node:  # no Q/DQ reaches the bucket computation
        if node.name in FLOAT_BUCKET_NODES:
            assert not set(node.input) & dequantized, node.name


def _typed(model: onnx.ModelProto) -> tuple[onnx.GraphProto, dict[str, int]]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {tensor.name: tensor.data_type for tensor in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    return graph, types


def test_shapes_computed_in_integers_and_data_dependent_indices_keep_nothing(tmp_path: Path) -> None:
    """A transformer's Reshape shapes come from Shape → Gather → Concat in integers, its attention
    scale from the head size in float but into arithmetic, not an index; an index the model computes
    from its data (ArgMax of scores) is the model's data. None of it is kept in float."""
    initializers = [
        _constant("W", np.ones((DIM, DIM), np.float32)),
        _constant("two", np.array(2, np.int64)),
        _constant("minus_one", np.array([-1], np.int64)),
        _constant("axis0", np.array([0], np.int64)),
        _constant("table", np.ones((DIM, 3), np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="project"),
        helper.make_node("Shape", ["h"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "two"], ["width"], name="width", axis=0),
        helper.make_node("Cast", ["width"], ["width_f"], name="width_f", to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["width_f"], ["root"], name="root"),
        helper.make_node("Div", ["h", "root"], ["scaled"], name="scale"),
        helper.make_node("Unsqueeze", ["width", "axis0"], ["width_1"], name="width_1"),
        helper.make_node("Concat", ["minus_one", "width_1"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Reshape", ["scaled", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("ArgMax", ["flat"], ["best"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Gather", ["table", "best"], ["picked"], name="pick", axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", DIM])],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert index_path_nodes(*_typed(model)) == ()


def test_a_float_input_rounded_into_an_index_is_kept_up_to_the_model_s_compute() -> None:
    """Float positions given as an input (Abs → Log → Mul → Cast → Gather): the walk keeps the float
    chain and stops at the input and at compute ops (here a MatMul that also feeds it)."""
    initializers = [
        _constant("W", np.ones((4, 4), np.float32)),
        _constant("scale", np.array(3.0, np.float32)),
        _constant("table", np.ones((16, 2), np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["positions", "W"], ["mixed"], name="project"),
        helper.make_node("Add", ["positions", "mixed"], ["shifted"], name="shift"),
        helper.make_node("Abs", ["shifted"], ["distance"], name="abs"),
        helper.make_node("Log", ["distance"], ["log"], name="log"),
        helper.make_node("Mul", ["log", "scale"], ["scaled"], name="mul"),
        helper.make_node("Cast", ["scaled"], ["index"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["rows"], name="lookup", axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "float-positions",
        [helper.make_tensor_value_info("positions", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert index_path_nodes(*_typed(model)) == ("shift", "abs", "log", "mul", "to_int")
