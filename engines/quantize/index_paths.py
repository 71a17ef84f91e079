"""The float arithmetic that computes indices and shapes: static INT8 must leave it in float.

Exporters write some integer computations in float. MPNet and T5 bucket relative positions so:
positions (integers from Range) → Cast to float → Div → Log → Div → Mul → Cast to int64 → Min/Where
→ Gather into `relative_attention_bias`. A static quantizer sees float Mul/Where/… and puts Q/DQ
around them; the rounding (and a calibrated range that holds Log(0) = -inf) turns the bucket into
garbage, and ONNX Runtime refuses to run the model ("Gather … indices element out of data bounds,
idx=-9223372036854775784"). The same holds for any float computation that ends in an integer
index or a shape: an index off by one reads the wrong row, a shape off by one fails.

`index_path_nodes` walks backwards from every index or shape input (Gather's indices, Reshape's
shape, Slice's starts…, `INDEX_INPUTS`) through the ops such computations are made of
(`INDEX_ARITHMETIC`: Cast, elementwise arithmetic and comparisons, shape manipulation) and returns
the nodes on the way that read or write a float tensor: those are kept in float (every static
method's `nodes_to_exclude`, engines.quantize.methods.always_float_nodes). The walk stops at Shape
and Size (they read a tensor's shape, not its values), at constants, at graph inputs and at any
other op (MatMul, Softmax, ArgMax…): what such an op computes is the model's data, which the
quantizer is there to quantize. So a transformer's Reshape shapes (Shape → Gather → Concat, all
integer) keep nothing in float, and MPNet's bucket computation keeps its few float nodes.
"""

from __future__ import annotations

from typing import Any

#: op type → positions of its inputs that are indices, shapes, axes or counts (per the ONNX spec).
INDEX_INPUTS: dict[str, tuple[int, ...]] = {
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "Scatter": (1,),
    "ScatterElements": (1,),
    "ScatterND": (1,),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "TopK": (1,),
    "OneHot": (0, 1),
    "Pad": (1, 3),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Resize": (2, 3),  # scales (float) and sizes: the output's shape
    "Upsample": (1,),
    "CumSum": (1,),
    "Trilu": (1,),
    "ReduceMax": (1,),
    "ReduceMean": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceSum": (1,),
    "RoiAlign": (2,),
    "NonMaxSuppression": (2,),
}
#: The ops an index or shape computation is made of: the walk goes through these only.
INDEX_ARITHMETIC = frozenset(
    {
        "Abs",
        "Add",
        "And",
        "Cast",
        "CastLike",
        "Ceil",
        "Clip",
        "Concat",
        "ConstantOfShape",
        "CumSum",
        "Div",
        "Equal",
        "Exp",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Greater",
        "GreaterOrEqual",
        "Identity",
        "Less",
        "LessOrEqual",
        "Log",
        "Max",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "Reshape",
        "Round",
        "Sign",
        "Slice",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tile",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Where",
        "Xor",
    }
)
#: Float element types (onnx.TensorProto numbers): FLOAT, FLOAT16, DOUBLE, BFLOAT16.
FLOAT_TYPES = frozenset({1, 10, 11, 16})


def index_path_nodes(graph: Any, types: dict[str, int]) -> tuple[str, ...]:
    """Names of the nodes of `graph` (an onnx GraphProto, nodes named) that compute an index or a
    shape in float, in graph order. `types`: tensor name → element type (onnx.TensorProto), from
    shape inference; a tensor of unknown type counts as float (keeping an integer node in float costs
    nothing: the quantizer does not touch integers)."""
    producers = {name: node for node in graph.node for name in node.output if name}
    stack = [
        node.input[position]
        for node in graph.node
        for position in INDEX_INPUTS.get(node.op_type, ())
        if position < len(node.input) and node.input[position]
    ]
    seen: set[str] = set()
    kept: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = producers.get(tensor)
        if node is None or node.op_type not in INDEX_ARITHMETIC:
            continue  # a graph input, an initializer, a constant, Shape/Size, or the model's data
        if any(_is_float(name, node, types) for name in [*node.input, *node.output] if name):
            kept.add(node.name)
        stack.extend(name for name in node.input if name)
    return tuple(node.name for node in graph.node if node.name in kept)


def _is_float(tensor: str, node: Any, types: dict[str, int]) -> bool:
    if tensor in types:
        return types[tensor] in FLOAT_TYPES
    if node.op_type == "Cast" and tensor in node.output:
        return next(attribute.i for attribute in node.attribute if attribute.name == "to") in FLOAT_TYPES
    return True
