"""The model a backend compiles for a recipe's precision: the original (fp32), a float16 copy,
a QDQ INT8 model quantized for the backend's profile (optionally within an accuracy budget), a
dynamic INT8 model (int8-dynamic) or one with weight-only 4/8-bit MatMuls (int4-weight, int8-weight).
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
from engines.quantize.dynamic import dynamic_does_not_pay, dynamic_not_applicable, quantize_dynamic_int8
from engines.quantize.fp16 import convert_fp16
from engines.quantize.int8 import QuantizeConfig, QuantizeResult, prepare_float_model, quantize_int8
from engines.quantize.layer_errors import layer_errors
from engines.quantize.tensorrt_readiness import check_tensorrt_readiness
from engines.quantize.weight_only import (
    PRECISION_BITS,
    check_weight_only,
    quantize_weight_only,
    weight_only_does_not_pay,
    weight_only_not_applicable,
)
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
#: A model -> why a precision cannot (applies) or should not (pays, the search's view) be built for it.
ModelCheck = Callable[[Path], str | None]


def _always(_model_path: Path) -> str | None:
    return None


@dataclass(frozen=True)
class PrecisionRules:
    """What the search and the job checks know of a precision besides its builder."""

    #: None, or why the precision has nothing to work on in this model (a recipe asking it gets the
    #: fp32 engine with this reason; the search skips it as `not_applicable`).
    applies: ModelCheck = _always
    #: None, or why the search leaves it out although it applies (it would not pay on this model).
    pays: ModelCheck = _always
    #: It learns from the calibration set (int8 always; others per recipe, see `uses_calibration`).
    calibrated: Callable[[Recipe], bool] = lambda _recipe: False


PRECISION_RULES: dict[str, PrecisionRules] = {}


def register_precision(
    name: str,
    *,
    applies: ModelCheck = _always,
    pays: ModelCheck = _always,
    calibrated: Callable[[Recipe], bool] = lambda _recipe: False,
) -> Callable[[VariantBuilder], VariantBuilder]:
    """Register the builder of a precision, with when it applies to a model and when the search finds
    it worth trying; the recipe checks, API enums, capabilities and the search read them."""

    def add(builder: VariantBuilder) -> VariantBuilder:
        PRECISIONS[name] = builder
        PRECISION_RULES[name] = PrecisionRules(applies, pays, calibrated)
        return builder

    return add


def precision_not_applicable(precision: str, model_path: Path, *, searching: bool = False) -> str | None:
    """Why `precision` does not apply to this model (searching: or would not pay), or None. A check
    that fails on a model it cannot read says nothing: the build then says what is wrong."""
    rules = PRECISION_RULES.get(precision)
    if rules is None:
        return None
    try:
        return rules.applies(model_path) or (rules.pays(model_path) if searching else None)
    except Exception:
        return None


def uses_calibration(recipe: Recipe) -> bool:
    """Whether the recipe's precision reads the calibration set (int8; int4-weight with gptq)."""
    rules = PRECISION_RULES.get(recipe.precision)
    return rules is not None and rules.calibrated(recipe)


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
    """bfloat16 has no ONNX of its own here: the backends that run it cast the fp32 model's weights
    themselves (`Backend.native_precisions`: torch-cuda; torch-cpu and openvino-cpu on a CPU whose
    flags, recorded in engines.hardware, include bfloat16 arithmetic), so this builder only explains."""
    raise InvalidRecipeError(
        "bf16 engines are built by backends that cast the fp32 model themselves (torch-cuda; torch-cpu "
        "and openvino-cpu on CPUs with AVX512_BF16 or AMX); ONNX Runtime on CPU has no bf16 engines"
    )


@register_precision("int8", calibrated=lambda _recipe: True)
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


def _not_applicable(reason: str | None) -> None:
    """A precision with nothing to work on in this model: EngineError `quantization_not_applicable`,
    which the pipeline answers with the fp32 engine and this reason."""
    if reason is not None:
        raise EngineError(reason, code="quantization_not_applicable")


@register_precision("int8-dynamic", applies=dynamic_not_applicable, pays=dynamic_does_not_pay)
def build_int8_dynamic(request: VariantRequest) -> ModelVariant:
    """MatMul weights in int8, activations quantized at run time: no calibration set."""
    _not_applicable(dynamic_not_applicable(request.model_path))
    result = quantize_dynamic_int8(
        request.model_path,
        _variant_dir(request),
        request.recipe.dynamic,
        cpu_features=cpu_info()["cpu_features"],
        check_cancelled=request.check_cancelled,
    )
    return ModelVariant(result.path, "int8-dynamic", result.metadata, result.messages)


def _gptq(recipe: Recipe) -> bool:
    return recipe.weight_only.algorithm == "gptq"


def _build_weight_only(request: VariantRequest) -> ModelVariant:
    """MatMul weights in 4 or 8 bits (MatMulNBits), block by block; activations in float."""
    precision = request.recipe.precision
    bits, config = PRECISION_BITS[precision], request.recipe.weight_only
    check_weight_only(config, bits, has_calibration=request.calibration is not None)
    _not_applicable(weight_only_not_applicable(request.model_path))
    result = quantize_weight_only(
        request.model_path,
        _variant_dir(request),
        bits,
        config,
        calibration=request.calibration if _gptq(request.recipe) else None,
        batch_size=request.batch_size,
        check_cancelled=request.check_cancelled,
    )
    return ModelVariant(result.path, precision, result.metadata, result.messages)


for _precision in PRECISION_BITS:
    register_precision(
        _precision, applies=weight_only_not_applicable, pays=weight_only_does_not_pay, calibrated=_gptq
    )(_build_weight_only)
