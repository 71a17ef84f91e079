"""The model a backend compiles for a recipe's precision: the original (fp32), a float16 copy,
or a QDQ INT8 model quantized for the backend's profile (optionally within an accuracy budget).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import EngineError, InvalidRecipeError
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.qat.export import float_reference_path
from engines.qat.train import quantization_aware_training
from engines.quantize.budget import RunnerFor, cpu_runner, quantize_within_budget
from engines.quantize.fp16 import convert_fp16
from engines.quantize.int8 import QuantizeConfig, QuantizeResult, prepare_float_model, quantize_int8
from engines.quantize.layer_errors import layer_errors
from engines.quantize.tensorrt_readiness import check_tensorrt_readiness
from engines.recipe import Recipe

LAYER_ERRORS_FILENAME = "layer_errors.json"


@dataclass
class ModelVariant:
    path: Path
    precision: str
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    layer_errors: dict[str, Any] | None = None

    def write_layer_errors(self, engine_dir: Path) -> None:
        """Keep the per-layer report beside the engine it describes."""
        if self.layer_errors is not None:
            (engine_dir / LAYER_ERRORS_FILENAME).write_text(json.dumps(self.layer_errors))


@dataclass(frozen=True)
class VariantRequest:
    """What every precision's builder gets: the model, the recipe, the target's INT8 profile, data."""

    model_path: Path
    recipe: Recipe
    profile: str
    workdir: Path
    calibration: Dataset | None
    evaluation: Dataset | None
    batch_size: int
    check_cancelled: Callable[[], None]
    #: An ONNX model -> an active runner of the target backend, for accuracy checks during the build.
    runner_for: RunnerFor = cpu_runner


#: A precision: the function that builds the model it compiles.
VariantBuilder = Callable[[VariantRequest], ModelVariant]
PRECISIONS: dict[str, VariantBuilder] = {}


def register_precision(name: str) -> Callable[[VariantBuilder], VariantBuilder]:
    """Register the builder of a precision; the recipe checks, API enums and capabilities read it."""

    def add(builder: VariantBuilder) -> VariantBuilder:
        PRECISIONS[name] = builder
        return builder

    return add


def build_variant(
    model_path: Path,
    recipe: Recipe,
    profile: str,
    workdir: Path,
    *,
    calibration: Dataset | None,
    evaluation: Dataset | None,
    batch_size: int,
    check_cancelled: Callable[[], None] = lambda: None,
    runner_for: RunnerFor = cpu_runner,
) -> ModelVariant:
    """The model the recipe's precision compiles, built by that precision's registered builder."""
    if recipe.precision not in PRECISIONS:
        raise InvalidRecipeError(f"unknown precision '{recipe.precision}'; use one of {tuple(PRECISIONS)}")
    request = VariantRequest(
        model_path, recipe, profile, workdir, calibration, evaluation, batch_size, check_cancelled, runner_for
    )
    return PRECISIONS[recipe.precision](request)


def _variant_dir(request: VariantRequest) -> Path:
    path = request.workdir / f"{request.recipe.precision}-{request.profile}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@register_precision("fp32")
def build_fp32(request: VariantRequest) -> ModelVariant:
    """The model as it is: the backend's own graph optimizations are the whole engine."""
    return ModelVariant(request.model_path, "fp32")


@register_precision("fp16")
def build_fp16(request: VariantRequest) -> ModelVariant:
    """A float16 copy with float32 inputs and outputs."""
    path = convert_fp16(request.model_path, _variant_dir(request) / "model-fp16.onnx")
    return ModelVariant(
        path,
        "fp16",
        {"fp16": "float16 weights and activations in the graph, float32 inputs and outputs"},
        [
            "fp16: ONNX Runtime on CPU has float16 kernels for few ops and casts the rest back to "
            "float32; fp16 is meant for GPU targets"
        ],
    )


@register_precision("bf16")
def build_bf16(request: VariantRequest) -> ModelVariant:
    """bfloat16 has no ONNX of its own here: the backends that run it (torch-cuda) cast the fp32
    model's weights themselves (`Backend.native_precisions`), so this builder only explains."""
    raise InvalidRecipeError(
        "bf16 engines are built by backends that cast the fp32 model themselves (torch-cuda); "
        "ONNX Runtime on CPU has no bf16 engines"
    )


@register_precision("int8")
def build_int8(request: VariantRequest) -> ModelVariant:
    """QDQ INT8 for the target's profile, within the recipe's accuracy budget when it has one, with
    its per-layer error report."""
    recipe, calibration, evaluation = request.recipe, request.calibration, request.evaluation
    if calibration is None:
        raise InvalidRecipeError("int8 needs a calibration dataset (calibration_dataset_id)")
    variant_dir = _variant_dir(request)
    started = time.perf_counter()
    float_path, messages = prepare_float_model(request.model_path, variant_dir, request.profile)  # type: ignore[arg-type]
    features = cpu_info()["cpu_features"]

    def quantize(config: QuantizeConfig, out_path: Path) -> QuantizeResult:
        request.check_cancelled()
        return quantize_int8(
            float_path,
            out_path,
            calibration,
            config,
            profile=request.profile,  # type: ignore[arg-type]
            batch_size=request.batch_size,
            cpu_features=features,
        )

    if recipe.qat is not None:
        request.check_cancelled()
        result = quantization_aware_training(
            float_path,
            variant_dir / "model-int8-qat.onnx",
            calibration,
            recipe.qat,
            recipe.quantize,
            profile=request.profile,
            cpu_features=features,
            check_cancelled=request.check_cancelled,
        )
    elif recipe.accuracy_budget is not None:
        if evaluation is None:
            raise InvalidRecipeError("an accuracy budget needs an evaluation dataset (evaluation_dataset_id)")
        result = quantize_within_budget(
            float_path,
            quantize,
            recipe.quantize,
            recipe.accuracy_budget,
            evaluation=evaluation,
            calibration=calibration,
            batch_size=request.batch_size,
            workdir=variant_dir,
            check_cancelled=request.check_cancelled,
            runner_for=request.runner_for,
        )
    else:
        result = quantize(recipe.quantize, variant_dir / "model-int8.onnx")
    result.metadata["quantize_seconds"] = time.perf_counter() - started
    if request.profile == "tensorrt":
        _check_tensorrt_readiness(result)
    request.check_cancelled()
    # a QAT model's rounding is measured against its own trained float weights, not the original's
    reference = float_reference_path(result.path) if recipe.qat is not None else float_path
    errors = layer_errors(
        reference, result.path, calibration, batch_size=request.batch_size, workdir=variant_dir
    )
    return ModelVariant(result.path, "int8", result.metadata, messages + result.messages, errors)


def _check_tensorrt_readiness(result: QuantizeResult) -> None:
    """Lint the QDQ model for TensorRT before a GPU worker spends a build on it: its findings go in
    the engine's metadata; a model TensorRT would refuse or misread is an EngineError naming why."""
    report = check_tensorrt_readiness(result.path)
    result.metadata["tensorrt_readiness"] = report.to_dict()
    if not report.ready:
        raise EngineError(
            "the INT8 model is not ready for TensorRT: "
            + "; ".join(problem.message for problem in report.problems[:5]),
            code="tensorrt_not_ready",
        )
