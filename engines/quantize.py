"""Post-training quantization: INT8 as QDQ ONNX from a calibration set, and FP16.

ONNX Runtime's quantization tooling does the work; this module chooses its settings.

Two INT8 profiles, chosen by the target that will run the model:
- `cpu`: unsigned activations, symmetric signed per-channel weights, tuned for ONNX Runtime on
  the CPU at hand. CPUs without VNNI (or AMX) multiply u8×s8 through 16-bit intermediates that
  saturate; there weights are quantized to 7 bits (`reduce_range`), which keeps accuracy.
- `tensorrt`: what TensorRT's explicit quantization builds: symmetric activations and weights
  (zero points 0), per-channel weights, bias left in float, opset ≥ 13.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.datasets import Dataset
from engines.errors import EngineError, InvalidRecipeError

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
Profile = Literal["cpu", "tensorrt"]
#: TensorRT's guidance is ~500-1000 representative samples; far fewer gives ranges that overfit.
RECOMMENDED_CALIBRATION_SAMPLES = 500
_INT8_DOT_PRODUCT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
_TENSORRT_MIN_OPSET = 13


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: str = "minmax"
    per_channel: bool = True
    calibration_samples: int | None = None  # None: the whole calibration set
    reduce_range: bool | None = None  # None: decided from the CPU's features (cpu profile)
    nodes_to_exclude: tuple[str, ...] = ()


@dataclass
class QuantizeResult:
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def reduce_range_for(cpu_features: list[str]) -> tuple[bool, str]:
    """Whether 7-bit weights are needed on this CPU, and why (recorded in the engine)."""
    found = [name for name in _INT8_DOT_PRODUCT_FEATURES if name in cpu_features]
    if found:
        return False, f"CPU has {', '.join(found)}: u8×s8 dot products do not saturate, full 8-bit weights"
    return (
        True,
        "CPU has no VNNI/AMX: u8×s8 products saturate in 16 bits, so weights use 7 bits (reduce_range)",
    )


def calibration_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, dataset.samples - batch_size + 1, batch_size):
        yield {name: array[start : start + batch_size] for name, array in dataset.inputs.items()}


def _reader(dataset: Dataset, batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class DatasetReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = calibration_batches(dataset, batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return DatasetReader()


def preprocess(model_path: Path, out_path: Path) -> tuple[Path, list[str]]:
    """Shape inference and graph optimization before quantizing, as ONNX Runtime recommends.

    Symbolic shape inference fails on many real exported models (detectors, OCR): then try
    without it, then without pre-processing at all, and say so.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    failures: list[str] = []
    for options in ({}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(model_path), str(out_path), **options)
            notes = (
                [f"symbolic shape inference failed ({failures[0]}); pre-processed without it"]
                if failures
                else []
            )
            return out_path, notes
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
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


def prepare_float_model(model_path: Path, workdir: Path, profile: Profile) -> tuple[Path, list[str]]:
    """The float model quantization starts from: pre-processed, nodes named, opset fit for the profile."""
    import onnx

    prepared, messages = preprocess(model_path, workdir / "preprocessed.onnx")
    model = onnx.load(str(prepared))
    _name_nodes(model)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if profile == "tensorrt" and opset < _TENSORRT_MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, _TENSORRT_MIN_OPSET)
        messages.append(f"opset {opset} converted to {_TENSORRT_MIN_OPSET} for per-channel Q/DQ in TensorRT")
    target = workdir / f"float-{profile}.onnx"
    onnx.save_model(model, str(target))
    return target, messages


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
    """Quantize a prepared float model (see `prepare_float_model`) to QDQ INT8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if config.calibration not in CALIBRATION_METHODS:
        raise InvalidRecipeError(
            f"unknown calibration '{config.calibration}'; use one of {CALIBRATION_METHODS}"
        )
    samples = calibration.samples if config.calibration_samples is None else config.calibration_samples
    samples = min(samples, calibration.samples)
    samples -= samples % batch_size if samples >= batch_size else 0  # calibration runs whole batches
    if samples < batch_size:
        raise InvalidRecipeError(
            f"calibration needs at least one batch of {batch_size} samples (the model's batch); "
            f"{samples} are available (calibration set {calibration.samples}, "
            f"calibration_samples {config.calibration_samples})"
        )
    result = QuantizeResult(path=out_path)
    if samples < RECOMMENDED_CALIBRATION_SAMPLES:
        result.messages.append(
            f"calibrated on {samples} samples; about {RECOMMENDED_CALIBRATION_SAMPLES}-1000 representative "
            "samples are recommended (TensorRT's guidance): ranges from few samples can clip real inputs"
        )
    if profile == "tensorrt":
        activation_type, reduce_range, reason = QuantType.QInt8, False, "TensorRT profile: symmetric INT8"
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    else:
        activation_type, extra = QuantType.QUInt8, {"WeightSymmetric": True}
        reduce_range, reason = reduce_range_for(cpu_features)
        if config.reduce_range is not None:
            reduce_range, reason = config.reduce_range, "set by the recipe"
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.calibration]
    try:
        quantize_static(
            str(float_path),
            str(out_path),
            _reader(calibration.take(samples), batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            reduce_range=reduce_range,
            activation_type=activation_type,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=list(config.nodes_to_exclude),
            extra_options=extra,
        )
    except Exception as exc:
        raise EngineError(
            f"INT8 quantization failed: {type(exc).__name__}: {exc}", code="quantization_failed"
        ) from exc
    result.metadata = {
        "profile": profile,
        "calibration": config.calibration,
        "calibration_samples": samples,
        "per_channel": config.per_channel,
        "reduce_range": reduce_range,
        "reduce_range_reason": reason,
        "activation_type": "int8" if profile == "tensorrt" else "uint8",
        "weight_type": "int8 symmetric",
        "nodes_kept_float": list(config.nodes_to_exclude),
    }
    return result


def convert_fp16(model_path: Path, out_path: Path) -> Path:
    """A float16 model with float32 inputs and outputs, so callers do not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
    except Exception as exc:
        raise EngineError(
            f"FP16 conversion failed: {type(exc).__name__}: {exc}", code="quantization_failed"
        ) from exc
    onnx.save_model(model, str(out_path))
    return out_path
