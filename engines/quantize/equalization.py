"""`cle`: cross-layer equalization, then ONNX Runtime MinMax INT8, then bias correction.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction": in a
depthwise network one channel's weights can span a hundred times another's, and a per-tensor (or
7-bit) range leaves the small channels a few levels. For Conv₁ → ReLU → Conv₂ the output channel i
of Conv₁ can be divided by sᵢ and Conv₂'s input channel i multiplied by it without changing the
function (ReLU(x/s) = ReLU(x)/s for s > 0); sᵢ = √(r₁ᵢ·r₂ᵢ)/r₂ᵢ makes both ranges √(r₁ᵢ·r₂ᵢ). Pairs are
equalized in turn, a few sweeps over chains (Conv₂ is the next pair's Conv₁). Depthwise → pointwise
pairs are the point: a depthwise conv's channel i is its weight[i]; a depthwise Conv₂'s input
channel i is its weight[i] too.

ReLU6 (Clip 0..6) is not scale-equivariant. The paper replaces it with ReLU; here that is done only
when measured harmless: the float model with every equalized ReLU6 as a ReLU is run on the
calibration set, and kept when its outputs keep cosine ≥ 0.999 and top-1 (class scores) on every
sample (RELU_HARMLESS; the digits depthwise net: cosine 0.9997, 100 %). Otherwise (EfficientNet-Lite0:
cosine 0.69, top-1 agreement 32 %) each ReLU6 that clips on the calibration set becomes ReLU then Min
with a per-channel cap max/sᵢ, the same function exactly (ONNX's Clip has scalar bounds only), and
one that never clips there becomes a ReLU. `equalize(relu6="exact")` always does the latter (tests
check its cosine > 0.9999). The Min costs a second Q/DQ: on the digits net 1.8× the INT8 latency,
which is why the harmless ReLU is preferred.
Bias absorption (the paper's third step) is not done: with BN folded and ReLU6 ranges it rarely
pays, and it changes the function near zero.

Bias correction, after quantizing: for each quantized Conv, E[W_q·x − W·x] = (W_q − W)·E[x], with
E[x] the per-channel mean of the Conv's input measured by running the QDQ model on calibration
batches (exact but for zero-padded borders), is subtracted from its bias (a quantized int32 bias is
re-quantized). Convs without a bias are left as they are.

The rescaled weights and the Q/DQ tensors of rescaled activations get new names (`…_cle…`), so the
per-layer report does not compare them with the original's (they differ by the scale, not by
quantization error); node names are kept, so `nodes_to_exclude` and the accuracy budget's
exclusions work as for every method.

Measured on 200 natural photo crops: CLE pays where weights are quantized per tensor (EfficientNet-Lite0,
top-1 agreement with fp32 2 % → 49 %); with per-channel weights (the default) it matches minmax
(51 % vs 53 %), and NNCF does better there (73 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.errors import EngineError
from engines.ingest.datasets import Dataset
from engines.quantize.methods import (
    QUANTIZATION_METHODS,
    Profile,
    QuantizeConfig,
    QuantizeResult,
    calibration_sample_count,
    load_graph_only,
    register_method,
)

#: Sweeps over the pairs: chains converge in a few (the paper iterates until the scales settle).
SWEEPS = 8
#: Samples run to decide ReLU6 handling and to measure the inputs' means for bias correction.
MEASURE_SAMPLES = 256
_SUFFIX = "_cle"
Relu6 = Literal["auto", "exact"]
#: ReLU6 → ReLU is harmless when the float outputs on the calibration set keep this mean cosine
#: similarity to the original's and (class scores) their top-1 on this share of the samples.
RELU_HARMLESS = {"cosine": 0.999, "top1_agreement": 1.0}


@dataclass
class _Pair:
    first: Any  # Conv NodeProto
    activation: Any | None  # Relu or Clip(0, max) NodeProto, or None
    second: Any  # Conv NodeProto
    second_axis: int  # the axis of Conv₂'s weight that holds Conv₁'s output channels
    clip_max: float | None = None
    scale: np.ndarray | None = None  # cumulative sᵢ


@dataclass
class EqualizationReport:
    pairs: int
    relu6_as_relu: int = 0
    relu6_capped: int = 0
    scale_range: tuple[float, float] = (1.0, 1.0)
    messages: list[str] = field(default_factory=list)
    #: Activations that differ from the original's by a per-channel scale (see hide_rescaled).
    rescaled: list[str] = field(default_factory=list)
    #: The float model with ReLU6 → ReLU against the original, on the calibration set (relu6="auto").
    relu6_check: dict[str, Any] | None = None


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _clip_bounds(node: Any, constants: dict[str, np.ndarray]) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip whose bounds are constants, or None."""
    if len(node.input) > 1 or not node.attribute:
        bounds = []
        for position in (1, 2):
            name = node.input[position] if len(node.input) > position else ""
            if not name:
                bounds.append(None)
            elif name in constants and constants[name].size == 1:
                bounds.append(float(constants[name].reshape(())))
            else:
                return None
        return bounds[0], bounds[1]
    return _attribute(node, "min", None), _attribute(node, "max", None)


def find_pairs(model: Any) -> list[_Pair]:
    """Conv → (Relu | Clip(0, max) | nothing) → Conv chains whose tensors feed only the next node."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    uses = {name: len(nodes) for name, nodes in consumers.items()}

    def only_consumer(tensor: str) -> Any | None:
        nodes = consumers.get(tensor, [])
        return nodes[0] if len(nodes) == 1 and tensor not in outputs else None

    def own_weight(node: Any) -> np.ndarray | None:
        name = node.input[1] if len(node.input) > 1 else ""
        weight = constants.get(name)
        if weight is None or weight.ndim < 3 or uses.get(name, 0) != 1:
            return None
        if len(node.input) > 2 and node.input[2] and uses.get(node.input[2], 0) != 1:
            return None  # a shared bias cannot be rescaled for one Conv
        if len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
            return None
        return weight

    pairs: list[_Pair] = []
    for first in graph.node:
        if first.op_type != "Conv" or (weight1 := own_weight(first)) is None:
            continue
        channels = weight1.shape[0]
        following = only_consumer(first.output[0])
        activation, clip_max = None, None
        if following is not None and following.op_type == "Relu":
            activation = following
        elif following is not None and following.op_type == "Clip":
            bounds = _clip_bounds(following, constants)
            if bounds is None or bounds[0] != 0.0 or bounds[1] is None or bounds[1] <= 0:
                continue
            activation, clip_max = following, bounds[1]
        if activation is not None:
            following = only_consumer(activation.output[0])
        if (
            following is None
            or following.op_type != "Conv"
            or following.input[0] != (activation or first).output[0]
        ):
            continue
        weight2 = own_weight(following)
        if weight2 is None:
            continue
        group = _attribute(following, "group", 1)
        if group == 1 and weight2.shape[1] == channels:
            axis = 1
        elif group == channels and weight2.shape[0] == channels and weight2.shape[1] == 1:
            axis = 0  # depthwise Conv₂ (multiplier 1): input channel i is weight[i]
        else:
            continue
        pairs.append(_Pair(first, activation, following, axis, clip_max, np.ones(channels, np.float64)))
    return pairs


def applies(float_path: Path) -> str | None:
    if find_pairs(load_graph_only(float_path)):
        return None
    return (
        "it equalizes Conv → ReLU/ReLU6 → Conv chains, and this model has none whose channels feed only "
        "the next Conv"
    )


def _ranges(weight: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1).astype(np.float64)


def _broadcast(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = len(values)
    return values.reshape(shape)


def _run(model: Any, data: Dataset, batch_size: int, outputs: list[str]) -> list[np.ndarray]:
    """Run `model` on `data` with `outputs` added as graph outputs; one array per output, batches
    concatenated."""
    import onnx
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {output.name for output in copy.graph.output}
    for name in outputs:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for start in range(0, data.samples - batch_size + 1, batch_size):
        for part, array in zip(
            parts, session.run(outputs, data.batch(start, start + batch_size)), strict=True
        ):
            part.append(array)
    return [np.concatenate(part) for part in parts]


def _channel_means(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [
        array.astype(np.float64).mean(axis=tuple(i for i in range(array.ndim) if i != 1)) for array in arrays
    ]


def equalize(
    float_path: Path, out_path: Path, calibration: Dataset, batch_size: int, *, relu6: Relu6 = "auto"
) -> EqualizationReport:
    """Write the equalized float model of `float_path` to `out_path`.

    `relu6="exact"`: the same function (a ReLU6 that clips on the calibration set becomes ReLU + a
    per-channel Min). `"auto"`: every equalized ReLU6 becomes a ReLU when that is harmless on the
    calibration set (RELU_HARMLESS), as the paper does: the extra Q/DQ around each Min costs time and a
    second rounding; otherwise as `exact`."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(float_path))
    graph = model.graph
    pairs = find_pairs(model)
    report = EqualizationReport(pairs=len(pairs))
    if not pairs:
        onnx.save_model(model, str(out_path))
        return report
    data = calibration.take(max(batch_size, min(MEASURE_SAMPLES, calibration.samples)))
    as_relu = relu6 == "auto" and _relu_is_harmless(model, pairs, data, batch_size, report)
    weights = {tensor.name: numpy_helper.to_array(tensor).astype(np.float64) for tensor in graph.initializer}
    for _ in range(SWEEPS):
        for pair in pairs:
            weight1, weight2 = weights[pair.first.input[1]], weights[pair.second.input[1]]
            r1, r2 = _ranges(weight1, 0), _ranges(weight2, pair.second_axis)
            valid = (r1 > 0) & (r2 > 0)
            scale = np.ones_like(r1)
            scale[valid] = np.sqrt(r1[valid] * r2[valid]) / r2[valid]
            weights[pair.first.input[1]] = weight1 / _broadcast(scale, weight1.ndim, 0)
            if len(pair.first.input) > 2 and pair.first.input[2]:
                weights[pair.first.input[2]] = weights[pair.first.input[2]] / scale
            weights[pair.second.input[1]] = weight2 * _broadcast(scale, weight2.ndim, pair.second_axis)
            pair.scale = pair.scale * scale
    all_scales = np.concatenate([pair.scale for pair in pairs])
    report.scale_range = (float(all_scales.min()), float(all_scales.max()))
    # ReLU6: a ReLU where the calibration set never reaches the cap, else ReLU + a per-channel Min.
    clipped = [pair for pair in pairs if pair.clip_max is not None]
    peaks = {}
    if clipped and not as_relu:
        outputs = [pair.first.output[0] for pair in clipped]
        arrays = _run(model, data, batch_size, outputs)
        peaks = {name: float(array.max()) for name, array in zip(outputs, arrays, strict=True)}
    renamed: dict[str, str] = {}
    new_nodes: list[tuple[Any, Any]] = []  # (after this node, insert this one)
    for pair in pairs:
        report.rescaled += [node.output[0] for node in (pair.first, pair.activation) if node is not None]
        if pair.clip_max is None:
            continue
        activation = pair.activation
        peak = 0.0 if as_relu else peaks[pair.first.output[0]]
        del activation.input[1:]
        del activation.attribute[:]
        activation.op_type = "Relu"
        if peak <= pair.clip_max:
            report.relu6_as_relu += 1
            continue
        report.relu6_capped += 1
        cap_name = f"{activation.name}{_SUFFIX}_cap"
        cap = (pair.clip_max / pair.scale).astype(np.float32)
        rank = weights[pair.first.input[1]].ndim
        graph.initializer.append(numpy_helper.from_array(cap.reshape((-1,) + (1,) * (rank - 2)), cap_name))
        capped = activation.output[0] + "_relu"
        report.rescaled.append(capped)
        minimum = helper.make_node(
            "Min", [capped, cap_name], [activation.output[0]], name=f"{activation.name}_cap"
        )
        activation.output[0] = capped
        new_nodes.append((activation, minimum))
    for after, node in new_nodes:
        index = list(graph.node).index(after)
        graph.node.insert(index + 1, node)
    # New names for the rescaled weights: the per-layer report matches weights by name.
    changed = {name for pair in pairs for name in [*pair.first.input[1:3], pair.second.input[1]] if name}
    for tensor in graph.initializer:
        if tensor.name in changed:
            name = tensor.name
            array = weights[name].astype(numpy_helper.to_array(tensor).dtype)
            tensor.CopyFrom(numpy_helper.from_array(array, name + _SUFFIX))
            renamed[name] = name + _SUFFIX
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
        for position, name in enumerate(node.output):
            if name in renamed:
                node.output[position] = renamed[name]
    onnx.save_model(model, str(out_path))
    check = report.relu6_check
    if report.relu6_as_relu:
        report.messages.append(
            f"{report.relu6_as_relu} ReLU6 replaced by ReLU before equalizing, as in Nagel et al. "
            + (
                f"(harmless on the calibration set: float outputs' cosine {check['cosine']:.5f}, "
                f"top-1 agreement {check['top1_agreement']:.1%})"
                if check and check["harmless"]
                else "(they never clip on the calibration set)"
            )
        )
    if report.relu6_capped:
        report.messages.append(
            f"{report.relu6_capped} ReLU6 kept exact as ReLU + a per-channel Min "
            "(they clip on the calibration set)"
        )
    return report


#: How ONNX Runtime's quantizer names the tensors around an activation's Q/DQ (onnxruntime.quantization
#: .quant_utils): the per-layer report pairs `X_DequantizeLinear_Output` with the original's `X`.
_ORT_SUFFIXES = ("_QuantizeLinear_Input", "_QuantizeLinear_Output", "_DequantizeLinear_Output")


def _relu_is_harmless(
    model: Any, pairs: list[_Pair], data: Dataset, batch_size: int, report: EqualizationReport
) -> bool:
    """Whether the model with every equalized ReLU6 as a ReLU computes what it did on `data`."""
    import onnx

    clips = {pair.activation.name for pair in pairs if pair.clip_max is not None}
    if not clips:
        return True
    relu = onnx.ModelProto()
    relu.CopyFrom(model)
    for node in relu.graph.node:
        if node.name in clips:
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "Relu"
    names = [output.name for output in model.graph.output]
    before, after = _run(model, data, batch_size, names), _run(relu, data, batch_size, names)
    cosines, agreements = [], []
    for old, new in zip(before, after, strict=True):
        old, new = old.reshape(len(old), -1).astype(np.float64), new.reshape(len(new), -1).astype(np.float64)
        norms = np.linalg.norm(old, axis=1) * np.linalg.norm(new, axis=1)
        cosines.append(float(np.mean((old * new).sum(1) / np.maximum(norms, 1e-30))))
        if old.shape[1] > 1:
            agreements.append(float((old.argmax(1) == new.argmax(1)).mean()))
    cosine, agreement = min(cosines), min(agreements, default=1.0)
    harmless = cosine >= RELU_HARMLESS["cosine"] and agreement >= RELU_HARMLESS["top1_agreement"]
    report.relu6_check = {"cosine": cosine, "top1_agreement": agreement, "harmless": harmless}
    return harmless


def hide_rescaled(qdq_path: Path, rescaled: list[str]) -> int:
    """Rename the Q/DQ tensors of rescaled activations so that the per-layer report does not pair them
    with the original's (they differ by the equalization scale, not by quantization error; ONNX
    Runtime's matching has no float tensor for a renamed one either). Returns how many were renamed."""
    import onnx

    model = onnx.load(str(qdq_path))
    graph = model.graph
    wanted = set(rescaled)
    outputs = {output.name for output in graph.output}
    renamed: dict[str, str] = {}
    for node in graph.node:
        for name in node.output:
            for suffix in _ORT_SUFFIXES:
                head, found, tail = name.rpartition(suffix)
                if found and head in wanted and name not in outputs and (not tail or tail[1:].isdigit()):
                    renamed[name] = f"{head}{_SUFFIX}_{suffix.strip('_').lower()}{tail}"
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
        for position, name in enumerate(node.output):
            if name in renamed:
                node.output[position] = renamed[name]
    kept = [value for value in graph.value_info if value.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    onnx.save_model(model, str(qdq_path))
    return len(renamed)


def bias_correct(qdq_path: Path, float_path: Path, calibration: Dataset, batch_size: int) -> dict[str, Any]:
    """Subtract each quantized Conv's mean output error (W_q − W)·E[x] from its bias, in place."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_path))
    graph = model.graph
    float_weights = {}
    float_graph = load_graph_only(float_path).graph
    float_constants = {tensor.name: tensor for tensor in float_graph.initializer}
    for node in float_graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in float_constants:
            float_weights[node.name] = numpy_helper.to_array(float_constants[node.input[1]]).astype(
                np.float64
            )
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def dequantized(name: str) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray, int] | None:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            return None
        values = numpy_helper.to_array(initializers[node.input[0]])
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        zero = (
            numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in initializers
            else np.zeros_like(scale)
        )
        axis = _attribute(node, "axis", 1)
        if scale.ndim == 1 and scale.size > 1:
            axis = axis % values.ndim
            scale_b, zero_b = _broadcast(scale, values.ndim, axis), _broadcast(zero, values.ndim, axis)
        else:
            scale_b, zero_b = scale, zero
        return (values.astype(np.float64) - zero_b) * scale_b, node, scale_b, zero_b, axis

    targets = []
    for node in graph.node:
        if (
            node.op_type != "Conv"
            or node.name not in float_weights
            or len(node.input) < 3
            or not node.input[2]
        ):
            continue
        weight = dequantized(node.input[1])
        if weight is None or weight[0].shape != float_weights[node.name].shape:
            continue
        targets.append((node, weight[0] - float_weights[node.name]))
    if not targets:
        return {"convs_corrected": 0}
    data = calibration.take(max(batch_size, min(MEASURE_SAMPLES, calibration.samples)))
    means = _channel_means(_run(model, data, batch_size, [node.input[0] for node, _ in targets]))
    corrected, shifts = 0, []
    for (node, delta), mean in zip(targets, means, strict=True):
        groups = _attribute(node, "group", 1)
        per_input = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # [O, I/g]
        outputs_per_group = delta.shape[0] // groups
        grouped_mean = mean.reshape(groups, -1)  # [g, I/g]
        correction = np.einsum(
            "oi,oi->o", per_input, grouped_mean[np.arange(delta.shape[0]) // outputs_per_group]
        )
        bias_name = node.input[2]
        if bias_name in initializers:  # float bias (the tensorrt profile)
            tensor = initializers[bias_name]
            bias = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array((bias - correction).astype(bias.dtype), bias_name))
        else:
            found = dequantized(bias_name)
            if found is None:
                continue
            bias, dq_node, scale, zero, _ = found
            tensor = initializers[dq_node.input[0]]
            stored = numpy_helper.to_array(tensor)
            info = np.iinfo(stored.dtype)
            requantized = np.clip(np.rint((bias - correction) / scale + zero), info.min, info.max)
            tensor.CopyFrom(numpy_helper.from_array(requantized.astype(stored.dtype), tensor.name))
        corrected += 1
        shifts.append(float(np.abs(correction).mean()))
    onnx.save_model(model, str(qdq_path))
    return {"convs_corrected": corrected, "mean_abs_bias_shift": float(np.mean(shifts)) if shifts else 0.0}


@register_method(
    "cle",
    description="cross-layer equalization of Conv→ReLU→Conv chains, ONNX Runtime MinMax INT8, then bias "
    "correction (Nagel et al. 2019): for depthwise networks",
    family="equalization",
    applies=applies,
)
def quantize_cle(
    float_path: Path,
    out_path: Path,
    calibration: Dataset,
    config: QuantizeConfig,
    *,
    profile: Profile,
    batch_size: int,
    cpu_features: list[str],
) -> QuantizeResult:
    samples, _ = calibration_sample_count(calibration, config, batch_size)
    equalized = out_path.with_name(out_path.stem + "-equalized.onnx")
    try:
        report = equalize(float_path, equalized, calibration.take(samples), batch_size)
    except Exception as exc:
        raise EngineError(
            f"cross-layer equalization failed: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc
    result = QUANTIZATION_METHODS["minmax"].quantize(
        equalized,
        out_path,
        calibration,
        replace(config, calibration="minmax"),
        profile=profile,
        batch_size=batch_size,
        cpu_features=cpu_features,
    )
    try:
        correction = bias_correct(out_path, equalized, calibration.take(samples), batch_size)
    except Exception as exc:
        raise EngineError(
            f"bias correction after equalization failed: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc
    try:
        hide_rescaled(out_path, report.rescaled)
    except Exception as exc:
        raise EngineError(
            f"renaming the equalized tensors failed: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc
    result.messages = [*report.messages, *result.messages]
    result.metadata.update(
        {
            "calibration": "cle",
            "equalized_pairs": report.pairs,
            "equalization_scale_range": list(report.scale_range),
            "relu6_as_relu": report.relu6_as_relu,
            "relu6_capped": report.relu6_capped,
            "relu6_check": report.relu6_check,
            "bias_correction": correction,
            "quantizer": "onnxruntime minmax",
        }
    )
    return result
