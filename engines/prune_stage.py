"""The prune stage of a recipe: convert, prune, recover (distillation), export, validate.

A model that cannot be converted for pruning still goes on to its other stages: the stage then
returns the original model with the reason in its messages, and the job reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.datasets import Dataset
from engines.errors import EngineError, InvalidRecipeError
from engines.finetune import FinetuneConfig, finetune, reestimate_batchnorm
from engines.ingest import inspect_model
from engines.prune import (
    PruneConfig,
    compressed_size,
    example_batch,
    prune_magnitude,
    prune_structured,
)
from engines.signature import TensorSpec
from engines.torch_bridge import onnx_to_torch, torch_to_onnx

Progress = Callable[[float, str], None]


@dataclass
class PruneStageResult:
    path: Path
    pruned: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def _torch_top1(module: Any, data: Dataset, batch_size: int = 64) -> float | None:
    import torch

    if data.labels is None:
        return None
    module.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, data.samples, batch_size):
            inputs = tuple(
                torch.from_numpy(array[start : start + batch_size]) for array in data.inputs.values()
            )
            hits += int((module(*inputs).argmax(1).numpy() == data.labels[start : start + batch_size]).sum())
    return hits / data.samples


def _taylor_batches(module: Any, data: Dataset, batches: int = 4, size: int = 32) -> list[tuple[Any, Any]]:
    """(inputs, targets): labels when there are any, else the model's own outputs to distil from."""
    import torch

    found = []
    for start in range(0, min(data.samples, batches * size), size):
        inputs = torch.from_numpy(next(iter(data.inputs.values()))[start : start + size])
        if data.labels is not None:
            targets = torch.from_numpy(data.labels[start : start + size].astype(np.int64))
        else:
            with torch.no_grad():
                targets = module(inputs)
        found.append((inputs, targets))
    return found


def run_prune_stage(
    model_path: Path,
    prune: PruneConfig,
    recovery: FinetuneConfig | None,
    workdir: Path,
    *,
    inputs: list[TensorSpec],
    output_names: list[str],
    calibration: Dataset | None,
    evaluation: Dataset | None,
    progress: Progress,
    check_cancelled: Callable[[], None],
) -> PruneStageResult:
    try:
        module = onnx_to_torch(model_path)
    except EngineError as exc:
        return PruneStageResult(model_path, False, {"error": exc.detail}, [f"pruning skipped: {exc.detail}"])
    data = calibration or evaluation
    metadata: dict[str, Any] = {}
    messages: list[str] = []
    if prune.method == "magnitude":
        result = prune_magnitude(module, prune.sparsity)
    else:
        if prune.sparsity_epochs:
            if calibration is None:
                raise InvalidRecipeError("sparsity training needs a calibration (training) dataset")
            teacher = onnx_to_torch(model_path)
            metadata["sparsity_training"] = {
                "epochs": prune.sparsity_epochs,
                "lambda": prune.sparsity_lambda,
                "history": finetune(
                    module,
                    teacher,
                    calibration,
                    FinetuneConfig(epochs=prune.sparsity_epochs),
                    bn_l1=prune.sparsity_lambda,
                    on_epoch=lambda epoch, stats: (
                        progress(0.1 * epoch / prune.sparsity_epochs, f"sparsity training: epoch {epoch}"),
                        check_cancelled(),
                    ),
                ),
            }
        if prune.method == "taylor" and calibration is None:
            raise InvalidRecipeError("the taylor criterion needs a calibration dataset to take gradients on")
        example = example_batch(inputs, None if data is None else data.inputs)
        taylor = _taylor_batches(module, calibration) if prune.method == "taylor" and calibration else None
        result = prune_structured(module, example, prune, taylor_batches=taylor)
    metadata.update(result.metadata)
    messages += result.messages
    check_cancelled()
    if evaluation is not None:
        metadata["top1_after_pruning"] = _torch_top1(module, evaluation)
    if recovery is not None and prune.method != "magnitude":
        if calibration is None:
            raise InvalidRecipeError("fine-tuning needs a calibration (training) dataset")
        teacher = onnx_to_torch(model_path)

        def on_epoch(epoch: int, stats: dict[str, float]) -> None:
            progress(0.3 * epoch / recovery.epochs, f"fine-tuning: epoch {epoch}/{recovery.epochs}")
            check_cancelled()

        metadata["finetune"] = {
            "history": finetune(module, teacher, calibration, recovery, on_epoch=on_epoch)
        }
        if evaluation is not None:
            metadata["top1_after_finetune"] = _torch_top1(module, evaluation)
    elif recovery is not None:
        messages.append("fine-tuning skipped: training would refill the zeros that magnitude pruning set")
    elif data is not None and prune.method != "magnitude" and reestimate_batchnorm(module, data, 32):
        metadata["batchnorm_reestimated"] = True
    pruned_path = torch_to_onnx(module, workdir / "pruned.onnx", inputs, output_names)
    info = inspect_model(pruned_path)  # validated like an upload
    metadata.update({"params": info.parameters, "macs": info.macs})
    if prune.method == "magnitude":
        metadata["compressed_bytes"] = compressed_size(pruned_path)
        metadata["compressed_bytes_original"] = compressed_size(model_path)
    return PruneStageResult(pruned_path, True, metadata, messages)
