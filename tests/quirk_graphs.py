"""Small hand-built ONNX graphs, each reproducing one quirk of real models exported by other tools.

The real pretrained models (bench/zoo.py) showed each of these; these graphs keep the default test
suite honest about them in milliseconds. Weights are seeded random: the graphs are about structure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_RNG_SEED = 0


def _weights(*shape: int, seed: int = _RNG_SEED) -> np.ndarray:
    return (np.random.default_rng(seed + sum(shape)).standard_normal(shape) * 0.3).astype(np.float32)


def _save(
    nodes: list, name: str, inputs: list, outputs: list, initializers: list, path: Path, opset: int
) -> Path:
    from onnx import checker, helper, save_model

    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="quirk-graphs"
    )
    model.ir_version = 7  # what exporters of that era wrote; every ONNX Runtime reads it
    checker.check_model(model)
    save_model(model, str(path))
    return path


def _tensor(name: str, shape: list) -> object:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _small_cnn(x: str, prefix: str, batch_norm: bool) -> tuple[list, list, str]:
    """Conv(+BN)+Relu twice, global pooling, a classifier: nodes, initializers, output name."""
    from onnx import helper, numpy_helper

    nodes, inits, current = [], [], x
    for index, (cin, cout) in enumerate([(3, 8), (8, 16)]):
        conv = f"{prefix}conv{index}"
        inits += [
            numpy_helper.from_array(_weights(cout, cin, 3, 3), f"{conv}.w"),
            numpy_helper.from_array(_weights(cout), f"{conv}.b"),
        ]
        nodes.append(
            helper.make_node("Conv", [current, f"{conv}.w", f"{conv}.b"], [f"{conv}.out"], pads=[1] * 4)
        )
        current = f"{conv}.out"
        if batch_norm:  # what Paddle exports keep, and ORT's optimizer fuses into the Conv
            bn = f"{prefix}bn{index}"
            inits += [
                numpy_helper.from_array(1 + 0.1 * _weights(cout, seed=1), f"{bn}.scale"),
                numpy_helper.from_array(0.1 * _weights(cout, seed=2), f"{bn}.bias"),
                numpy_helper.from_array(0.1 * _weights(cout, seed=3), f"{bn}.mean"),
                numpy_helper.from_array(np.abs(1 + 0.1 * _weights(cout, seed=4)), f"{bn}.var"),
            ]
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [current, f"{bn}.scale", f"{bn}.bias", f"{bn}.mean", f"{bn}.var"],
                    [f"{bn}.out"],
                )
            )
            current = f"{bn}.out"
        nodes.append(helper.make_node("Relu", [current], [f"{prefix}relu{index}"]))
        current = f"{prefix}relu{index}"
    inits += [
        numpy_helper.from_array(_weights(16, 5), f"{prefix}fc.w"),
        numpy_helper.from_array(_weights(5), f"{prefix}fc.b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], [f"{prefix}pool"]),
        helper.make_node("Flatten", [f"{prefix}pool"], [f"{prefix}flat"]),
        helper.make_node("Gemm", [f"{prefix}flat", f"{prefix}fc.w", f"{prefix}fc.b"], ["logits"]),
    ]
    return nodes, inits, "logits"


def minus_one_batch(path: Path) -> Path:
    """Paddle-style: the batch dim written as `dim_value: -1` instead of a symbolic name."""
    nodes, inits, out = _small_cnn("x", "", batch_norm=False)
    return _save(nodes, "minus_one", [_tensor("x", [-1, 3, 8, 8])], [_tensor(out, [-1, 5])], inits, path, 13)


def fused_batchnorm_opset11(path: Path) -> Path:
    """Conv+BatchNorm at opset 11 (Paddle, older exporters): fused into Convs with bias by ORT's
    optimizer, and per-channel Q/DQ (an opset-13 attribute) written into an opset-11 graph."""
    nodes, inits, out = _small_cnn("x", "", batch_norm=True)
    return _save(nodes, "fused_bn", [_tensor("x", ["N", 3, 8, 8])], [_tensor(out, ["N", 5])], inits, path, 11)


def scalar_weight(path: Path) -> Path:
    """0-d weight initializers (a scale and an offset as scalars, as tf2onnx and jax2tf write them)."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(_weights(8, 6), "w"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(0.25, dtype=np.float32), "offset"),
        numpy_helper.from_array(_weights(6, 4), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["act"]),
        helper.make_node("MatMul", ["act", "w2"], ["y"]),
    ]
    return _save(
        nodes, "scalar_weight", [_tensor("x", ["batch", 8])], [_tensor("y", ["batch", 4])], inits, path, 13
    )


def recurrent_state(path: Path, *, named: bool = True) -> Path:
    """A recurrent cell whose state is [layers, batch, hidden]: the batch is dim 1 of `h`.

    `named=False` writes every dynamic dim as -1 (Paddle), so the rule falls back to each input's
    first dynamic dim."""
    from onnx import helper, numpy_helper

    batch = "batch" if named else -1
    inits = [
        numpy_helper.from_array(_weights(4, 8), "w"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["hx"]),
        helper.make_node("ReduceSum", ["h", "axis0"], ["hs"], keepdims=0),
        helper.make_node("Add", ["hx", "hs"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["y"]),
        helper.make_node("Unsqueeze", ["y", "axis0"], ["y1"]),
        helper.make_node("Add", ["h", "y1"], ["h_out"]),
    ]
    return _save(
        nodes,
        "recurrent",
        [_tensor("x", [batch, 4]), _tensor("h", [2, batch, 8])],
        [_tensor("y", [batch, 8]), _tensor("h_out", [2, batch, 8])],
        inits,
        path,
        13,
    )


def scalar_input(path: Path) -> Path:
    """An audio front end taking `[batch, samples]` and a scalar sample rate `sr` (no batch axis)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(_weights(16, 4), "w"),
        numpy_helper.from_array(np.array(16000.0, dtype=np.float32), "reference_rate"),
    ]
    nodes = [
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "reference_rate"], ["gain"]),
        helper.make_node("Mul", ["audio", "gain"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w"], ["features"]),
    ]
    return _save(
        nodes,
        "scalar_input",
        [_tensor("audio", ["batch", 16]), helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [_tensor("features", ["batch", 4])],
        inits,
        path,
        13,
    )


def row_vector_bias(path: Path) -> Path:
    """tf2onnx's dense layer: MatMul then Add of a bias shaped [1, N]. Quantization pre-processing
    fuses the pair into a Gemm whose C is that [1, N] bias."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(_weights(8, 6), "dense/kernel"),
        numpy_helper.from_array(_weights(1, 6), "dense/bias"),
        numpy_helper.from_array(_weights(6, 3), "out/kernel"),
        numpy_helper.from_array(_weights(1, 3), "out/bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "dense/kernel"], ["h"]),
        helper.make_node("Add", ["h", "dense/bias"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["act"]),
        helper.make_node("MatMul", ["act", "out/kernel"], ["o"]),
        helper.make_node("Add", ["o", "out/bias"], ["y"]),
    ]
    inputs, outputs = [_tensor("x", ["unk__214", 8])], [_tensor("y", ["unk__215", 3])]
    return _save(nodes, "row_bias", inputs, outputs, inits, path, 13)


def data_dependent_output(path: Path) -> Path:
    """A detector-like output whose size depends on the data (boxes above a threshold): each batch
    gives another shape, so outputs cannot be compared sample by sample."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(_weights(8, 8), "w"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(3.0, dtype=np.float32), "spread"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Mul", ["peak", "spread"], ["count_f"]),
        helper.make_node("Cast", ["count_f"], ["count"], to=TensorProto.INT64),
        helper.make_node("Clip", ["count", "one"], ["count_clipped"]),  # at least one box
        helper.make_node("Reshape", ["count_clipped", "one"], ["k"]),
        helper.make_node("TopK", ["scores", "k"], ["boxes", "indices"], axis=1),
    ]
    outputs = [_tensor("boxes", ["batch", "boxes"])]
    return _save(nodes, "detector", [_tensor("x", ["batch", 8])], outputs, inits, path, 13)


def wrong_declared_output(path: Path) -> Path:
    """An output declared [batch, 2, 3] that really comes out [batch, 4] (exporters get these wrong)."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [numpy_helper.from_array(_weights(8, 4), "w")]
    return _save(
        nodes, "wrong_shape", [_tensor("x", ["batch", 8])], [_tensor("y", ["batch", 2, 3])], inits, path, 13
    )


def external_data_matmul(path: Path, weight: np.ndarray) -> Path:
    """`y = x @ w` with `w` in an external-data file beside the model, named after it (what the
    dynamo exporter writes): every backend must carry the data file under its own engine's name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def op_onnx2torch_lacks(path: Path) -> Path:
    """Conv then GlobalMaxPool (magika's head): ONNX Runtime runs it, onnx2torch has no converter,
    so a PyTorch target cannot take the model while the others can."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(_weights(4, 3, 3, 3), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalMaxPool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def static_batch_dynamic_sequence(path: Path) -> Path:
    """A token model exported with its batch fixed at 1 and only the sequence dynamic
    (`input_ids` [1, 2, "seq_len"], int64): the one dynamic dim is a length, not the batch."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(_weights(32, 8), "embedding"),
        numpy_helper.from_array(_weights(8, 5), "head"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),  # [1, 2, seq, 8]
        helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[2], keepdims=0),  # [1, 2, 8]
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),  # [1, 2, 5]
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 2, "seq_len"])
    return _save(nodes, "static_batch_seq", [ids], [_tensor("logits", [1, 2, 5])], inits, path, 13)


def float16_islands(path: Path) -> Path:
    """A U-Net decoder step converted to float16 in part: the upsampling (Resize) and the skip
    connection's Concat run in float16 between Cast nodes, and the decoder's weights are stored in
    float16 behind a Cast. Float32 in and out, float16 inside (Concat has a float16 kernel on the
    CPU, so ONNX Runtime's optimizer leaves it in float16 for the quantizer to meet)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(_weights(8, 3, 3, 3), "enc.w"),
        numpy_helper.from_array(_weights(8), "enc.b"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
        numpy_helper.from_array(_weights(4, 16, 3, 3).astype(np.float16), "dec.w16"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "enc.w", "enc.b"], ["enc"], pads=[1] * 4),  # [N, 8, 16, 16]
        helper.make_node("Relu", ["enc"], ["skip"]),
        helper.make_node("MaxPool", ["skip"], ["down"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Cast", ["down"], ["down16"], to=TensorProto.FLOAT16),
        helper.make_node("Resize", ["down16", "", "scales"], ["up16"], mode="nearest"),
        helper.make_node("Cast", ["skip"], ["skip16"], to=TensorProto.FLOAT16),
        helper.make_node("Concat", ["up16", "skip16"], ["cat16"], axis=1),
        helper.make_node("Cast", ["cat16"], ["cat"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["dec.w16"], ["dec.w"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["cat", "dec.w"], ["y"], pads=[1] * 4),
    ]
    return _save(
        nodes,
        "fp16_unet",
        [_tensor("x", ["batch", 3, 16, 16])],
        [_tensor("y", ["batch", 4, 16, 16])],
        inits,
        path,
        13,
    )


def time_major_sequence(path: Path) -> Path:
    """A sequence model exported time-major, `x` ["T", "N", 4] with both dims dynamic (what
    torch.nn.GRU/LSTM without batch_first take): the graph alone says dim 0 (the first dynamic dim),
    the samples stack along dim 1 (a user states it). `logits` [N, 3] (mean over time) and
    `frames` [T, N, 3] (one score per time step)."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["frames"]),  # [T, N, 3]
        helper.make_node("ReduceMean", ["frames"], ["logits"], axes=[0], keepdims=0),  # [N, 3]
    ]
    inits = [numpy_helper.from_array(_weights(4, 3), "w")]
    outputs = [_tensor("logits", ["N", 3]), _tensor("frames", ["T", "N", 3])]
    return _save(nodes, "time_major", [_tensor("x", ["T", "N", 4])], outputs, inits, path, 13)
