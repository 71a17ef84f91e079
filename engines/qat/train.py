"""Quantization-aware training: the float model with fake quantizers, fine-tuned to match the
original's outputs, exported as QDQ INT8.

Post-training INT8 rounds weights and activations the network never saw rounded; on trained
depthwise networks that costs points of top-1 (bench/trained.py: EfficientNet-Lite0). Here the network trains
with the rounding in its forward pass (straight-through gradients), learning from the float
original's outputs (distillation, engines.prune.finetune: no labels needed; with labels mixed with
cross-entropy), so weights move to where their INT8 copies compute what the float model did.

ONNX -> torch (onnx2torch) -> fake quantizers (engines.qat.fake_quant) -> fine-tuning -> QDQ ONNX
(engines.qat.export). The result is a QuantizeResult like post-training INT8's, so the INT8
builder goes on with the per-layer report and the TensorRT lint as for any INT8 model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.errors import Cancelled, EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.ingest.model import inspect_model
from engines.prune.finetune import FinetuneConfig, finetune
from engines.qat.config import QatConfig
from engines.qat.export import count_quantize_nodes, export_qdq
from engines.qat.fake_quant import TORCH_AO_FX, FakeQuantSpec, fake_quantize, freeze
from engines.quantize.int8 import QuantizeConfig, QuantizeResult, reduce_range_for
from engines.torch_bridge import check_prunable_layout, example_batch, onnx_to_torch

#: Samples that set the fake quantizers' ranges before training (observers start from real data).
_RANGE_SAMPLES = 256
_UNAVAILABLE_ADVICE = "use post-training INT8 (leave out the qat stage) or the float model"


def _unavailable(what: str, exc: BaseException) -> EngineError:
    detail = exc.detail if isinstance(exc, EngineError) else f"{type(exc).__name__}: {str(exc)[:300]}"
    return EngineError(f"{what} ({detail}); {_UNAVAILABLE_ADVICE}", code="qat_unavailable")


def _observe(module: Any, data: Dataset, batch_size: int) -> None:
    """Run a few batches in eval mode so each fake quantizer's range starts from real activations."""
    import torch

    module.eval()
    arrays = list(data.inputs.values())
    with torch.no_grad():
        for start in range(0, min(data.samples, _RANGE_SAMPLES) - batch_size + 1, batch_size):
            module(*(torch.from_numpy(array[start : start + batch_size]) for array in arrays))


def _finetune_config(config: QatConfig, batch_size: int) -> FinetuneConfig:
    """Pruning's distillation loop with QAT's settings: no re-inserted BatchNorm (its folding would
    bypass the weight quantizers), and the small learning rate of a model already trained."""
    return FinetuneConfig(
        epochs=config.epochs,
        lr=config.learning_rate,
        distill=config.distill,
        batch_size=batch_size,
        reinsert_batchnorm=False,
    )


def quantization_aware_training(
    float_path: Path,
    out_path: Path,
    training: Dataset,
    config: QatConfig,
    quantize: QuantizeConfig,
    *,
    profile: str,
    cpu_features: list[str],
    check_cancelled: Callable[[], None] = lambda: None,
    progress: Callable[[int, dict[str, float]], None] = lambda epoch, stats: None,
) -> QuantizeResult:
    """Train `float_path` with fake quantization for `config.epochs` over `training`; write the QDQ
    model to `out_path`. EngineError(`qat_unavailable`) for a model torch cannot take or export."""
    if not config.distill and training.labels is None:
        raise InvalidRecipeError("qat without distillation needs labels in the calibration (training) set")
    started = time.perf_counter()
    if profile == "tensorrt":
        reduce_range, reason = False, "TensorRT profile: symmetric INT8"
    else:
        reduce_range, reason = reduce_range_for(cpu_features)
        if quantize.reduce_range is not None:
            reduce_range, reason = quantize.reduce_range, "set by the recipe"
    spec = FakeQuantSpec(profile, quantize.per_channel, reduce_range)
    info = inspect_model(float_path)
    inputs, output_names = list(info.inputs), [spec_.name for spec_ in info.outputs]
    try:
        check_prunable_layout(inputs)
        student = onnx_to_torch(float_path, purpose="quantization-aware training")
        teacher = onnx_to_torch(float_path, purpose="quantization-aware training")
        example = example_batch(inputs, training.inputs)
    except EngineError as exc:
        raise _unavailable("the model cannot be trained in PyTorch", exc) from exc
    check_cancelled()
    student = fake_quantize(student, example, spec)
    static = [spec_.batch_dim for spec_ in inputs if isinstance(spec_.batch_dim, int)]
    batch_size = static[0] if static else min(config.batch_size, training.samples)  # a fixed batch wins
    try:
        _observe(student, training, batch_size)
    except Exception as exc:
        raise _unavailable("the fake-quantized model does not run", exc) from exc
    check_cancelled()

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        progress(epoch, stats)
        check_cancelled()

    try:
        settings = _finetune_config(config, batch_size)
        history = finetune(student, teacher, training, settings, on_epoch=on_epoch)
    except (Cancelled, InvalidRecipeError, EngineError):
        raise
    except Exception as exc:
        raise _unavailable("quantization-aware training failed", exc) from exc
    trained_seconds = time.perf_counter() - started
    check_cancelled()
    freeze(student)
    try:
        export_qdq(student, out_path, inputs, output_names)
    except Exception as exc:
        raise _unavailable("the trained model could not be exported as QDQ ONNX", exc) from exc
    result = QuantizeResult(out_path)
    if quantize.nodes_to_exclude:
        result.messages.append("qat quantizes every layer it can: quantize.nodes_to_exclude is not used")
    result.metadata = {
        "method": "qat",
        "quantize_nodes": count_quantize_nodes(out_path),
        "profile": profile,
        "per_channel": quantize.per_channel,
        "reduce_range": reduce_range,
        "reduce_range_reason": reason,
        "activation_type": "int8" if profile == "tensorrt" else "uint8",
        "weight_type": "int8 symmetric",
        "qat": {
            "epochs": config.epochs,
            "learning_rate": config.learning_rate,
            "batch_size": batch_size,
            "distill": config.distill,
            "labels": training.labels is not None,
            "loss": [stats["loss"] for stats in history],
            "samples": training.samples,
            "train_seconds": trained_seconds,
            "seconds": time.perf_counter() - started,
            "fake_quant": TORCH_AO_FX,
        },
    }
    return result
