"""A fake-quantized torch module as a QDQ ONNX model, laid out as the post-training quantizer's.

torch's exporter writes each FakeQuantize as QuantizeLinear -> DequantizeLinear, weights included:
a float weight quantized at run time, its scales and zero points behind Identity and Constant
nodes. ONNX Runtime's and OpenVINO's INT8 fusions look for what ONNX Runtime's own quantizer
writes: an int8 initializer read by a DequantizeLinear whose scale and zero point are initializers.
`fold_constant_quantization` rewrites the export into that form (exactly: the same rounding as
QuantizeLinear), so a QAT model is compiled like a post-training one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from engines.ingest.signature import TensorSpec
from engines.qat.fake_quant import freeze, widen_for_export
from engines.torch_bridge import torch_to_onnx


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Initializers, Constant outputs and Identities of either, by name."""
    from onnx import numpy_helper

    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even, add the zero point, saturate to its type."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    values = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.int32)
    return np.clip(values, info.min, info.max).astype(zero_point.dtype)


def fold_constant_quantization(path: Path, reference_path: Path | None = None) -> int:
    """Replace each QuantizeLinear of a constant (a weight) by its int8 result `<weight>_quantized`,
    make every Q/DQ scale and zero point an initializer, name each activation's dequantized copy
    `<activation>_DequantizeLinear_Output` (ONNX Runtime's convention, which its QDQ debugging tools
    and the per-layer report match on), drop what nothing reads, name every node.

    With `reference_path`, also write the trained float model: the same graph without its Q/DQ
    pairs, weights in float. The per-layer report compares the QDQ model with it: what rounding the
    trained weights and activations costs, layer by layer. Returns how many weights were folded."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    values = _constants(graph)
    initializers = {tensor.name for tensor in graph.initializer}
    folded: dict[str, str] = {}  # QuantizeLinear output -> its int8 initializer
    weights: dict[str, np.ndarray] = {}  # the float weights, by the name the int8 copy refers to
    keep = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(name in values for name in node.input if name):
            axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 1)
            zero = values[node.input[2]] if len(node.input) > 2 and node.input[2] else np.uint8(0)
            weight = np.asarray(values[node.input[0]], dtype=np.float32)
            name = _unique(node.input[0], weights)
            array = _quantize(weight, values[node.input[1]], np.asarray(zero), axis)
            graph.initializer.append(numpy_helper.from_array(array, f"{name}_quantized"))
            initializers.add(f"{name}_quantized")
            weights[name] = weight
            folded[node.output[0]] = f"{name}_quantized"
            continue
        keep.append(node)
    renamed: dict[str, str] = {}
    quantized_inputs = {node.output[0]: node.input[0] for node in keep if node.op_type == "QuantizeLinear"}
    for node in keep:
        for index, name in enumerate(node.input):
            node.input[index] = folded.get(name, renamed.get(name, name))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for index in (1, 2):  # scale and zero point as initializers, scalars when per tensor
                name = node.input[index] if len(node.input) > index else ""
                if not name or name not in values:
                    continue
                value = np.asarray(values[name])
                if value.size == 1 and value.ndim:  # torch writes [1]; ONNX Runtime fuses scalars only
                    value = value.reshape(())
                elif name in initializers:
                    continue
                tensor = numpy_helper.from_array(value, f"{name}_value")
                if tensor.name not in initializers:
                    graph.initializer.append(tensor)
                    initializers.add(tensor.name)
                node.input[index] = tensor.name
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized_inputs:
            wanted = f"{quantized_inputs[node.input[0]]}_DequantizeLinear_Output"
            if wanted not in renamed.values() and node.output[0] not in {o.name for o in graph.output}:
                renamed[node.output[0]] = wanted
                node.output[0] = wanted
    for node in keep:  # readers that come before their producer in the list (none in torch's order)
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(keep)
    _drop_dead(graph)
    _name_nodes(graph)
    onnx.save_model(model, str(path))
    if reference_path is not None:
        _write_float_reference(model, weights, reference_path)
    return len(folded)


def _unique(name: str, taken: dict[str, Any]) -> str:
    candidate, index = name, 1
    while candidate in taken:  # one weight quantized twice: two int8 copies
        candidate, index = f"{name}_{index}", index + 1
    return candidate


def _name_nodes(graph: Any) -> None:
    used: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{index}"
        used.add(node.name)


def _write_float_reference(model: Any, weights: dict[str, np.ndarray], path: Path) -> None:
    """The QDQ model with its Q/DQ pairs bypassed and its weights in float (see above)."""
    import onnx
    from onnx import numpy_helper

    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    graph = reference.graph
    bypass: dict[str, str] = {}
    quantized_inputs = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        if source.endswith("_quantized") and source.removesuffix("_quantized") in weights:
            bypass[node.output[0]] = source.removesuffix("_quantized")
        elif source in quantized_inputs:
            bypass[node.output[0]] = quantized_inputs[source]
    for node in graph.node:
        for index, name in enumerate(node.input):
            while name in bypass:
                name = bypass[name]
            node.input[index] = name
    _restore_relu6(graph)
    for output in graph.output:  # a graph output behind a Q/DQ pair keeps its name: an Identity
        if output.name in bypass:
            graph.node.append(onnx.helper.make_node("Identity", [bypass[output.name]], [output.name]))
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in weights.items())
    keep = [n for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_dead(graph)
    _name_nodes(graph)
    onnx.save_model(reference, str(path))


def _restore_relu6(graph: Any) -> None:
    """A Relu quantized to [0, 6] was a ReLU6 (engines.qat.fake_quant caps it in the quantizer):
    in the float reference, which has no quantizer, it is a Clip(0, 6) again."""
    from onnx import helper, numpy_helper

    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in producers:
            continue
        relu = producers[node.input[0]]
        scale = constants.get(node.input[1])
        zero = constants.get(node.input[2]) if len(node.input) > 2 else None
        if relu.op_type != "Relu" or scale is None or zero is None or scale.size != 1 or int(zero) != 0:
            continue
        if abs(float(scale) * np.iinfo(zero.dtype).max - 6.0) > 1e-4:
            continue
        bounds = [f"{relu.output[0]}_min", f"{relu.output[0]}_max"]
        graph.initializer.extend(
            numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
            for name, value in zip(bounds, (0.0, 6.0), strict=True)
        )
        clip = helper.make_node("Clip", [relu.input[0], *bounds], list(relu.output), name=relu.name)
        relu.CopyFrom(clip)


def _drop_dead(graph: Any) -> None:
    """Remove nodes and initializers whose outputs nothing reads (the graph's outputs count)."""
    while True:
        read = {output.name for output in graph.output}
        for node in graph.node:
            read.update(node.input)
        dead = [node for node in graph.node if not any(name in read for name in node.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    read = {output.name for output in graph.output}
    for node in graph.node:
        read.update(node.input)
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in read]:
        graph.initializer.remove(tensor)


def float_reference_path(qdq_path: Path) -> Path:
    """Where `export_qdq` writes the trained float model beside the QDQ one."""
    return qdq_path.with_name(f"{qdq_path.stem}-trained-float.onnx")


def export_qdq(module: Any, path: Path, inputs: list[TensorSpec], output_names: list[str]) -> Path:
    """The trained fake-quantized module as QDQ ONNX (opset 17, the original's names and batch dims),
    and its float reference at `float_reference_path(path)`."""
    freeze(module)
    widen_for_export(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on FakeQuantize's enabled flags
        torch_to_onnx(module, path, inputs, output_names)
    fold_constant_quantization(path, float_reference_path(path))
    return path


def count_quantize_nodes(path: Path) -> int:
    """QuantizeLinear nodes of an exported model (its subgraphs have none: torch writes none)."""
    import onnx

    return sum(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)
