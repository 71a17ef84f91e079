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

from engines.accuracy_aware import quantize_within_budget
from engines.datasets import Dataset
from engines.errors import InvalidRecipeError
from engines.hardware import cpu_info
from engines.quant_debug import layer_errors
from engines.quantize import QuantizeConfig, QuantizeResult, convert_fp16, prepare_float_model, quantize_int8
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
) -> ModelVariant:
    if recipe.precision == "fp32":
        return ModelVariant(model_path, "fp32")
    variant_dir = workdir / f"{recipe.precision}-{profile}"
    variant_dir.mkdir(parents=True, exist_ok=True)
    if recipe.precision == "fp16":
        path = convert_fp16(model_path, variant_dir / "model-fp16.onnx")
        return ModelVariant(
            path,
            "fp16",
            {"fp16": "float16 weights and activations in the graph, float32 inputs and outputs"},
            [
                "fp16: ONNX Runtime on CPU has float16 kernels for few ops and casts the rest back to "
                "float32; fp16 is meant for GPU targets"
            ],
        )
    if calibration is None:
        raise InvalidRecipeError("int8 needs a calibration dataset (calibration_dataset_id)")
    started = time.perf_counter()
    float_path, messages = prepare_float_model(model_path, variant_dir, profile)  # type: ignore[arg-type]
    features = cpu_info()["cpu_features"]

    def quantize(config: QuantizeConfig, out_path: Path) -> QuantizeResult:
        check_cancelled()
        return quantize_int8(
            float_path,
            out_path,
            calibration,
            config,
            profile=profile,
            batch_size=batch_size,
            cpu_features=features,
        )

    if recipe.accuracy_budget is not None:
        if evaluation is None:
            raise InvalidRecipeError("an accuracy budget needs an evaluation dataset (evaluation_dataset_id)")
        result = quantize_within_budget(
            float_path,
            quantize,
            recipe.quantize,
            recipe.accuracy_budget,
            evaluation=evaluation,
            calibration=calibration,
            batch_size=batch_size,
            workdir=variant_dir,
            check_cancelled=check_cancelled,
        )
    else:
        result = quantize(recipe.quantize, variant_dir / "model-int8.onnx")
    result.metadata["quantize_seconds"] = time.perf_counter() - started
    check_cancelled()
    errors = layer_errors(float_path, result.path, calibration, batch_size=batch_size, workdir=variant_dir)
    return ModelVariant(result.path, "int8", result.metadata, messages + result.messages, errors)
