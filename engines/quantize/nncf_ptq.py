"""NNCF's post-training quantization of the ONNX model: `nncf` and `nncf-smoothquant`.

NNCF (OpenVINO's compression library) quantizes with MinMax ranges on OpenVINO's Q/DQ placement,
then fast bias correction: each quantized layer's mean output shift on the calibration set is
subtracted from its bias, which is what depthwise networks lose most to. `nncf-smoothquant` first
migrates activation outliers into MatMul weights (SmoothQuant, Xiao et al. 2023): it applies to
graphs whose weights are mostly MatMul/Gemm (transformers), not to convolutional ones.

The result is a QDQ ONNX that ONNX Runtime and OpenVINO both run. Settings per profile:
- `cpu`: asymmetric unsigned activations (NNCF's MIXED preset; the u8×s8 products ONNX Runtime's
  CPU kernels run), symmetric per-channel weights; on CPUs without VNNI the weights use 7 bits
  (NNCF's overflow fix, the same reason as ONNX Runtime's reduce_range).
- `tensorrt`: refused. TensorRT takes int8 Q/DQ with zero points 0 only; NNCF's hardware setups
  allow symmetric activations but not forcing them signed (`signedness_to_force=True` on activations
  is "incompatible with HW capabilities"), so activations after a ReLU come out uint8.
Activations are quantized per tensor in both (NNCF's CPU setup asks per-channel activations for
depthwise convolutions, which neither ONNX Runtime's INT8 kernels nor TensorRT take).

NNCF is imported lazily (seconds to import); `nodes_to_exclude` become its ignored scope.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from engines.errors import EngineError
from engines.ingest.datasets import Dataset
from engines.quantize.matmul_weights import matmul_weights
from engines.quantize.methods import (
    Profile,
    QuantizeConfig,
    QuantizeResult,
    always_float_nodes,
    calibration_sample_count,
    count_quantize_nodes,
    load_graph_only,
    reduce_range_for,
    register_method,
)

logger = logging.getLogger(__name__)

#: SmoothQuant smooths activations into MatMul/Gemm weights: below this share of the weights the
#: model's compute is elsewhere (convolutions) and there is nothing for it to do.
SMOOTHQUANT_MIN_MATMUL_SHARE = 0.5
#: SmoothQuant's migration strength for MatMuls (NNCF's default for transformers).
SMOOTHQUANT_ALPHA = 0.95
_TENSORRT_REASON = (
    "NNCF cannot force activations to signed int8 (its hardware setups refuse it), and TensorRT takes "
    "int8 Q/DQ with zero points 0 only; use minmax, entropy, percentile or cle for TensorRT"
)


def nncf_missing() -> str | None:
    """Why NNCF cannot run here, or None (checked without importing it: the import takes seconds)."""
    from importlib.util import find_spec

    if find_spec("nncf") is None:
        return "NNCF is not installed on this worker (pip install nncf==3.4.0, in optiforge's prune extra)"
    return None


def _smoothquant_applies(float_path: Path) -> str | None:
    missing = nncf_missing()
    if missing:
        return missing
    # of the weights compute ops read: a transformer's embedding tables (Gather) are most of a small
    # encoder's parameters (MiniLM-L3: 69 %) but no arithmetic, and SmoothQuant is for exactly such graphs
    weights = matmul_weights(float_path)
    if weights.share_of_compute < SMOOTHQUANT_MIN_MATMUL_SHARE:
        return (
            f"SmoothQuant moves activation outliers into MatMul/Gemm weights, and this model's MatMul/Gemm "
            f"hold {weights.share_of_compute:.0%} of the {weights.compute_params} weights it computes with "
            "(the rest are convolutions): use nncf or cle"
        )
    return None


def _parameters(
    profile: Profile, config: QuantizeConfig, cpu_features: list[str], smooth_quant: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """nncf.quantize's keyword arguments for the profile, and what they mean for the metadata."""
    import nncf
    from nncf.common.quantization.structs import QuantizationScheme
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
        QuantizationParameters,
    )

    if profile != "cpu":
        raise EngineError(_TENSORRT_REASON, code="quantization_not_applicable")
    activations = QuantizationParameters(per_channel=False)
    preset, device = nncf.QuantizationPreset.MIXED, nncf.TargetDevice.CPU
    reduce_range, reason = reduce_range_for(cpu_features)
    if config.reduce_range is not None:
        reduce_range, reason = config.reduce_range, "set by the recipe"
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.DISABLE,
        activations_quantization_params=activations,
        weights_quantization_params=QuantizationParameters(
            mode=QuantizationScheme.SYMMETRIC, per_channel=config.per_channel
        ),
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=SMOOTHQUANT_ALPHA if smooth_quant else -1),
    )
    arguments: dict[str, Any] = {
        "preset": preset,
        "target_device": device,
        "fast_bias_correction": True,
        "advanced_parameters": advanced,
    }
    if smooth_quant:
        arguments["model_type"] = nncf.ModelType.TRANSFORMER
    described = {
        "nncf_version": nncf.__version__,
        "preset": preset.value,
        "target_device": device.value,
        "fast_bias_correction": True,
        "smooth_quant_alpha": SMOOTHQUANT_ALPHA if smooth_quant else None,
        "reduce_range": reduce_range,
        "reduce_range_reason": reason + (" (NNCF's overflow fix)" if reduce_range else ""),
        "activation_type": "uint8",
    }
    return arguments, described


def _quantize(
    float_path: Path,
    out_path: Path,
    calibration: Dataset,
    config: QuantizeConfig,
    *,
    profile: Profile,
    batch_size: int,
    cpu_features: list[str],
    smooth_quant: bool,
) -> QuantizeResult:
    import onnx

    samples, messages = calibration_sample_count(calibration, config, batch_size)
    result = QuantizeResult(path=out_path, messages=messages)
    method = "nncf-smoothquant" if smooth_quant else "nncf"
    model = onnx.load(str(float_path))
    names = {node.name for node in model.graph.node}
    always_float = always_float_nodes(float_path, float_path.stat().st_mtime_ns)
    unknown = [name for name in config.nodes_to_exclude if name not in names]
    if unknown:
        result.messages.append(f"nodes to keep in float that are not in the graph (ignored): {unknown[:10]}")
    ignored = [
        name for name in dict.fromkeys([*config.nodes_to_exclude, *always_float.names]) if name in names
    ]
    result.messages.extend(always_float.messages())
    try:
        import nncf

        arguments, described = _parameters(profile, config, cpu_features, smooth_quant)
        data = calibration.take(samples)
        batches = [data.batch(start, start + batch_size) for start in range(0, samples, batch_size)]
        quantized = nncf.quantize(
            model,
            nncf.Dataset(batches),
            subset_size=len(batches),  # NNCF counts dataset items, here whole batches
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            **arguments,
        )
        _name_like_onnxruntime(quantized, model)
        onnx.save_model(quantized, str(out_path))
    except Exception as exc:
        raise EngineError(
            f"NNCF quantization ({method}) failed: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc
    _check_loads(out_path, method)
    count = count_quantize_nodes(load_graph_only(out_path).graph)
    if count == 0:
        result.messages.append(
            f"{method} quantized no node of this model: this 'int8' engine computes in float"
        )
    result.metadata = {
        "quantize_nodes": count,
        "profile": profile,
        "calibration": method,
        "calibration_samples": samples,
        "per_channel": config.per_channel,
        **described,
        "weight_type": "int8 symmetric",
        "nodes_kept_float": list(config.nodes_to_exclude),
        "ignored_scope": ignored,
        **always_float.metadata(),
    }
    return result


def _name_like_onnxruntime(quantized: Any, original: Any) -> None:
    """Name NNCF's Q/DQ tensors as ONNX Runtime's quantizer does (`X_QuantizeLinear_Output`,
    `X_DequantizeLinear_Output`, weights `W_quantized`): the per-layer report, and through it the
    accuracy budget's ranking of nodes to keep in float, find quantized tensors by these names."""
    graph = quantized.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    originals = {node.name: node for node in original.graph.node}
    float_weights = {tensor.name for tensor in original.graph.initializer}
    outputs = {output.name for output in graph.output}
    taken = {name for node in graph.node for name in node.output} | set(initializers)

    def rename(old: str, wanted: str) -> None:
        if old in outputs or old == wanted:
            return
        new, index = wanted, 0
        while new in taken:
            index += 1
            new = f"{wanted}_{index}"
        taken.add(new)
        for node, position in consumers.get(old, []):
            node.input[position] = new
        for node in graph.node:
            for position, name in enumerate(node.output):
                if name == old:
                    node.output[position] = new
        if old in initializers:
            initializers[old].name = new
        consumers[new] = consumers.pop(old, [])

    for node in list(graph.node):
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            activation = node.input[0]
            for dequantize, _ in list(consumers.get(node.output[0], [])):
                if dequantize.op_type == "DequantizeLinear":
                    rename(dequantize.output[0], f"{activation}_DequantizeLinear_Output")
            rename(node.output[0], f"{activation}_QuantizeLinear_Output")
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            users = consumers.get(node.output[0], [])
            if not users:
                continue
            user, position = users[0]
            source = originals.get(user.name)
            if (
                source is not None
                and position < len(source.input)
                and source.input[position] in float_weights
            ):
                rename(node.input[0], f"{source.input[position]}_quantized")


def _check_loads(path: Path, method: str) -> None:
    """The model must load in ONNX Runtime (every CPU worker has it): fail here, with the reason, rather
    than at compile time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError(
            f"{method} wrote a model ONNX Runtime cannot load: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc


# Registered here, once _quantize exists; the two differ only in SmoothQuant. SmoothQuant is a family of
# its own: it fixes the failure plain NNCF has on transformers (activation outliers in MatMuls), so plain
# NNCF failing by far there says nothing about it (the search holds back a family's other methods then).
register_method(
    "nncf",
    description="NNCF post-training quantization: MinMax ranges, OpenVINO's Q/DQ placement, fast bias "
    "correction",
    family="nncf",
    applies=lambda _path: nncf_missing(),
    profiles=("cpu",),
    profiles_reason=_TENSORRT_REASON,
)(partial(_quantize, smooth_quant=False))
register_method(
    "nncf-smoothquant",
    description="NNCF post-training quantization with SmoothQuant (activation outliers moved into MatMul "
    "weights): for transformers",
    family="smoothquant",
    applies=_smoothquant_applies,
    profiles=("cpu",),
    profiles_reason=_TENSORRT_REASON,
)(partial(_quantize, smooth_quant=True))
