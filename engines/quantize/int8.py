"""Post-training quantization: INT8 as QDQ ONNX from a calibration set, and FP16.

ONNX Runtime's quantization tooling does the work of its three calibrators (minmax, entropy,
percentile); this module chooses its settings, prepares the float model every method starts from,
and is the entry point (`quantize_int8`) that dispatches to the registered quantization methods
(engines.quantize.methods: NNCF's in nncf_ptq.py, cross-layer equalization in equalization.py).

Two INT8 profiles, chosen by the target that will run the model:
- `cpu`: unsigned activations, symmetric signed per-channel weights, tuned for ONNX Runtime on
  the CPU at hand. CPUs without VNNI (or AMX) multiply u8×s8 through 16-bit intermediates that
  saturate; there weights are quantized to 7 bits (`reduce_range`), which keeps accuracy.
- `tensorrt`: what TensorRT's explicit quantization builds: symmetric activations and weights
  (zero points 0), per-channel weights, bias left in float, opset ≥ 13.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.quantize.matmul_weights import referenced_names
from engines.quantize.methods import (
    QUANTIZATION_METHODS,
    RECOMMENDED_CALIBRATION_SAMPLES,
    Profile,
    QuantizeConfig,
    QuantizeResult,
    always_float_nodes,
    calibration_sample_count,
    count_quantize_nodes,
    load_graph_only,
    not_applicable,
    reduce_range_for,
    register_method,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_METHODS",
    "QUANTIZATION_METHODS",
    "RECOMMENDED_CALIBRATION_SAMPLES",
    "Profile",
    "QuantizeConfig",
    "QuantizeResult",
    "prepare_float_model",
    "quantize_int8",
    "reduce_range_for",
]

#: ONNX Runtime's calibrators: method name → (its CalibrationMethod member, the description).
_ONNXRUNTIME_CALIBRATORS: dict[str, tuple[str, str]] = {
    "minmax": ("MinMax", "ONNX Runtime, the observed range: no clipping, sensitive to outliers"),
    "entropy": (
        "Entropy",
        "ONNX Runtime, the range that keeps the histogram's KL divergence smallest (TensorRT's)",
    ),
    "percentile": ("Percentile", "ONNX Runtime, the 99.999th percentile: outliers clipped"),
}
#: Per-channel Q/DQ (the `axis` attribute) and TensorRT's explicit quantization need opset 13.
PER_CHANNEL_MIN_OPSET = 13


def calibration_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, dataset.samples - batch_size + 1, batch_size):
        yield dataset.batch(start, start + batch_size)


def calibration_reader(dataset: Dataset, batch_size: int) -> Any:
    """An ONNX Runtime CalibrationDataReader over whole batches of `dataset`."""
    from onnxruntime.quantization import CalibrationDataReader

    class DatasetReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = calibration_batches(dataset, batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return DatasetReader()


_CWD_LOCK = threading.Lock()


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Run in `path`: when symbolic shape inference fails, ONNX Runtime saves its partial model
    (`sym_shape_infer_temp.onnx` and a multi-megabyte `.data` file) into the current directory,
    which would fill a worker's directory job after job. In the job's directory it goes with the job."""
    with _CWD_LOCK:
        previous = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(previous)


def preprocess(model_path: Path, out_path: Path) -> tuple[Path, list[str]]:
    """Shape inference and graph optimization before quantizing, as ONNX Runtime recommends.

    Symbolic shape inference fails on many real exported models: two inputs whose batch dims carry
    different names (tf2onnx's `unk__330`, `unk__331`), broadcasts it cannot prove (`Min(512,
    sequence_length)` in transformers). Then try again merging such dims (`auto_merge`), then without
    symbolic inference, then without pre-processing at all, and say which one ran.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = (
        ({}, ""),
        ({"auto_merge": True}, "pre-processed merging conflicting symbolic dims (auto_merge)"),
        ({"skip_symbolic_shape": True}, "pre-processed without it"),
    )
    failures: list[str] = []
    for options, how in attempts:
        try:
            with _working_directory(out_path.parent):
                quant_pre_process(str(model_path.resolve()), str(out_path.resolve()), **options)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        return out_path, [f"symbolic shape inference failed ({failures[0]}); {how}"] if failures else []
    return model_path, [f"pre-processing failed ({failures[-1]}); quantized the model as uploaded"]


def _name_nodes(model: Any) -> None:
    """Give every node a name: exclusions and the per-layer report refer to nodes by name."""
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _ranks(model: Any) -> dict[str, int]:
    """Known ranks of the graph's tensors (inputs, outputs, inferred value_info, initializers)."""
    graph = model.graph
    ranks = {tensor.name: len(tensor.dims) for tensor in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if value.type.WhichOneof("value") == "tensor_type" and tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    return ranks


def _squeeze_constant_addends(model: Any) -> int:
    """Biases shaped [1, …, 1, N] (tf2onnx writes them so; quantization pre-processing fuses
    MatMul+Add into a Gemm with such a C) become [N] where that is the same broadcast: Gemm's C
    always, an Add's constant operand when the other operand's rank is known and not lower.

    ONNX Runtime's quantizer gives such a bias per-channel scales along its axis 0, of size 1: the
    QDQ model then fails in every session that runs that DequantizeLinear (the per-layer report's).
    """
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    ranks = _ranks(model)
    squeezed, replaced = 0, set()
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) == 3:
            candidates = [(2, None)]
        elif node.op_type == "Add" and len(node.input) == 2:
            candidates = [(0, node.input[1]), (1, node.input[0])]
        else:
            continue
        for position, other in candidates:
            tensor = constants.get(node.input[position])
            if tensor is None or len(tensor.dims) < 2 or tensor.dims[0] != 1 or other in constants:
                continue
            if other is not None and ranks.get(other, 0) < len(tensor.dims):
                continue  # the other operand's rank is unknown or lower: squeezing would change the output
            array = numpy_helper.to_array(tensor)
            leading = next(
                index for index, dim in enumerate(array.shape) if dim != 1 or index == array.ndim - 1
            )
            copy = numpy_helper.from_array(np.ascontiguousarray(array.reshape(array.shape[leading:])))
            copy.name = f"{tensor.name}_squeezed"
            if copy.name not in constants:
                model.graph.initializer.append(copy)
                constants[copy.name] = copy
            replaced.add(node.input[position])
            node.input[position] = copy.name
            squeezed += 1
    used = referenced_names(model.graph)
    for tensor in [tensor for tensor in model.graph.initializer if tensor.name in replaced - used]:
        model.graph.initializer.remove(tensor)
    return squeezed


def _opset(model: Any) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def prepare_float_model(model_path: Path, workdir: Path, profile: Profile) -> tuple[Path, list[str]]:
    """The float model quantization starts from: pre-processed, nodes named, opset ≥ 13.

    Per-channel Q/DQ (an `axis` on QuantizeLinear/DequantizeLinear) exists from opset 13; on an
    older model ONNX Runtime's quantizer writes it anyway, and the result does not load. So older
    models are converted; one the converter cannot take is quantized per tensor (quantize_int8).
    """
    import onnx

    prepared, messages = preprocess(model_path, workdir / "preprocessed.onnx")
    try:
        model = onnx.load(str(prepared))
        _name_nodes(model)
        if _squeeze_constant_addends(model):
            messages.append("biases shaped [1, …, N] squeezed to [N] so that their Q/DQ scales are valid")
        opset = _opset(model)
        if opset < PER_CHANNEL_MIN_OPSET:
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
                messages.append(
                    f"opset {opset} converted to {PER_CHANNEL_MIN_OPSET}: per-channel Q/DQ needs it"
                    + (" (and TensorRT)" if profile == "tensorrt" else "")
                )
            except Exception as exc:
                messages.append(
                    f"opset {opset} could not be converted to {PER_CHANNEL_MIN_OPSET} "
                    f"({type(exc).__name__}: {str(exc)[:200]}): weights are quantized per tensor"
                )
        target = workdir / f"float-{profile}.onnx"
        onnx.save_model(model, str(target))
    except Exception as exc:
        raise EngineError(
            f"the model could not be prepared for quantization: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc
    return target, messages


@lru_cache(maxsize=8)
def _opset_of(path: Path, _mtime_ns: int) -> int:
    """The opset of a model file, parsed once per version of the file: the budget search quantizes
    the same prepared model many times, and a transformer is tens of megabytes to parse."""
    return _opset(load_graph_only(path))


def tensorrt_placement(float_path: Path) -> tuple[dict[str, Any], list[str]]:
    """ONNX Runtime's options for the `tensorrt` profile, with NVIDIA Model Optimizer's Q/DQ
    placement (its ONNX INT8 path calls the same quantize_static): symmetric INT8, bias in float,
    Q/DQ on the inputs of the ops TensorRT runs in INT8 only (no Q/DQ on any op's output, so none
    before a ReLU or on the logits), and MatMul weights per channel on their last axis (the output
    columns; ONNX Runtime's default axis 1 is wrong for 3-D weights). Returns the extra options and
    the op types to quantize. Not adopted: Model Optimizer's merged Concat scales (a second
    calibration pass) and its small-convolution exclusions (the readiness lint warns about them)."""
    from engines.quantize.tensorrt_readiness import QUANTIZABLE_OPS

    present = {node.op_type for node in load_graph_only(float_path).graph.node}
    options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "OpTypesToExcludeOutputQuantization": sorted(present),
        "ForceQuantizeNoInputCheck": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1},
    }
    return options, sorted(QUANTIZABLE_OPS)


def quantize_int8(
    float_path: Path,
    out_path: Path,
    calibration: Dataset,
    config: QuantizeConfig,
    *,
    profile: Profile,
    batch_size: int,
    cpu_features: list[str],
) -> QuantizeResult:
    """Quantize a prepared float model (see `prepare_float_model`) to QDQ INT8 with the method
    `config.calibration` names (engines.quantize.methods). A method that does not apply to this
    graph or profile is EngineError `quantization_not_applicable`; one that fails, EngineError
    `quantization_failed`: either way the reason is in the error, and the job goes on without it."""
    method = QUANTIZATION_METHODS.get(config.calibration)
    if method is None:
        raise InvalidRecipeError(
            f"unknown calibration '{config.calibration}'; use one of {CALIBRATION_METHODS}"
        )
    if profile not in method.profiles:
        raise not_applicable(
            method.name,
            f"it cannot produce the {profile} profile's INT8 (it makes {list(method.profiles)})"
            + (f": {method.profiles_reason}" if method.profiles_reason else ""),
        )
    reason = method.applies(float_path)
    if reason is not None:
        raise not_applicable(method.name, reason)
    result = method.quantize(
        float_path,
        out_path,
        calibration,
        config,
        profile=profile,
        batch_size=batch_size,
        cpu_features=cpu_features,
    )
    result.metadata.setdefault("method", method.name)
    result.metadata.setdefault("family", method.family)
    return result


def quantize_onnxruntime(
    float_path: Path,
    out_path: Path,
    calibration: Dataset,
    config: QuantizeConfig,
    *,
    profile: Profile,
    batch_size: int,
    cpu_features: list[str],
    calibrate_method: str,
) -> QuantizeResult:
    """ONNX Runtime's static QDQ quantization with calibrator `calibrate_method` (a member of its
    CalibrationMethod), settings chosen for `profile`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    samples, sample_messages = calibration_sample_count(calibration, config, batch_size)
    result = QuantizeResult(path=out_path)
    per_channel = config.per_channel
    if per_channel and _opset_of(float_path, float_path.stat().st_mtime_ns) < PER_CHANNEL_MIN_OPSET:
        per_channel = False
        result.messages.append(
            f"per-channel weights need opset {PER_CHANNEL_MIN_OPSET}: this model is quantized per tensor"
        )
    result.messages.extend(sample_messages)
    op_types: list[str] | None = None  # None: ONNX Runtime's own list
    if profile == "tensorrt":
        activation_type, reduce_range, reason = QuantType.QInt8, False, "TensorRT profile: symmetric INT8"
        extra, op_types = tensorrt_placement(float_path)
    else:
        activation_type, extra = QuantType.QUInt8, {"WeightSymmetric": True}
        reduce_range, reason = reduce_range_for(cpu_features)
        if config.reduce_range is not None:
            reduce_range, reason = config.reduce_range, "set by the recipe"
    method = getattr(CalibrationMethod, calibrate_method)
    always_float = always_float_nodes(float_path, float_path.stat().st_mtime_ns)
    exclude = list(dict.fromkeys([*config.nodes_to_exclude, *always_float.names]))
    result.messages.extend(always_float.messages())
    # ONNX Runtime's step that widens weight scales for tiny int32 bias scales breaks on some real
    # graphs (a per-tensor weight scale meeting a per-channel bias, in tf2onnx/jax2tf exports):
    # quantize again without that step rather than fail, and say so.
    attempts = [(extra, ""), ({**extra, "QDQDisableWeightAdjustForInt32Bias": True}, "bias-scale adjustment")]
    failures: list[str] = []
    for options, skipped in attempts:
        try:
            quantize_static(
                str(float_path),
                str(out_path),
                calibration_reader(calibration.take(samples), batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=activation_type,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=exclude,
                op_types_to_quantize=op_types,
                extra_options=options,
            )
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        if failures:
            result.messages.append(
                f"ONNX Runtime's quantizer failed ({failures[0]}); quantized again without its {skipped}"
            )
        break
    else:
        raise EngineError(f"INT8 quantization failed: {failures[0]}", code="quantization_failed")
    quantized = count_quantize_nodes(load_graph_only(out_path).graph)
    if quantized == 0:
        result.messages.append(
            "ONNX Runtime's quantizer quantized no node of this model (its compute sits inside If/Loop/Scan "
            "subgraphs, which the quantizer does not enter, or in ops it has no INT8 form for): this 'int8' "
            "engine computes in float"
        )
    result.metadata = {
        "quantize_nodes": quantized,
        "profile": profile,
        "calibration": config.calibration,
        "calibration_samples": samples,
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "reduce_range_reason": reason,
        "activation_type": "int8" if profile == "tensorrt" else "uint8",
        "weight_type": "int8 symmetric",
        "nodes_kept_float": list(config.nodes_to_exclude),
        **always_float.metadata(),
    }
    return result


for _name, (_member, _description) in _ONNXRUNTIME_CALIBRATORS.items():
    register_method(_name, description=_description, family="onnxruntime")(
        partial(quantize_onnxruntime, calibrate_method=_member)
    )

# The other families register themselves on import (after ONNX Runtime's, which they build on and
# which come first in every list).
from engines.quantize import equalization, nncf_ptq  # noqa: E402, F401

#: The quantization methods' names, in registration order: what `QuantizeConfig.calibration`, the
#: recipe checks, the API's enum and GET /v1/capabilities accept.
CALIBRATION_METHODS: tuple[str, ...] = tuple(QUANTIZATION_METHODS)
