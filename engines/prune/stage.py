"""The prune stage of a recipe: convert, prune, recover (distillation), export, validate.

A model that cannot be converted for pruning still goes on to its other stages: the stage then
returns the original model with the reason in its messages, and the job reports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import Cancelled, EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.ingest.model import inspect_model
from engines.ingest.signature import TensorSpec
from engines.prune.criteria import criterion
from engines.prune.finetune import FinetuneConfig, finetune, reestimate_batchnorm
from engines.prune.methods import PruneConfig, compressed_size, prune_magnitude, prune_structured
from engines.torch_bridge import (
    check_prunable_layout,
    check_same_signature,
    example_batch,
    first_output,
    onnx_to_torch,
    torch_outputs,
    torch_to_onnx,
)

Progress = Callable[[float, str], None]


@dataclass
class PruneStageResult:
    path: Path
    pruned: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def _torch_top1(module: Any, data: Dataset) -> float | None:
    if data.labels is None:
        return None
    return float((torch_outputs(module, data).reshape(data.samples, -1).argmax(1) == data.labels).mean())


def _taylor_batches(module: Any, data: Dataset, batches: int = 4, size: int = 32) -> list[tuple[Any, Any]]:
    """(inputs, class targets) for the Taylor criterion: labels, or else the model's own predictions
    (pseudo-labels; distilling the model from itself would give zero loss and zero gradients)."""
    import torch

    found = []
    for start in range(0, min(data.samples, batches * size), size):
        inputs = tuple(torch.from_numpy(array[start : start + size]) for array in data.inputs.values())
        if data.labels is not None:
            targets = torch.from_numpy(data.labels[start : start + size].astype(np.int64))
        else:
            with torch.no_grad():
                targets = first_output(module(*inputs)).reshape(len(inputs[0]), -1).argmax(1)
        found.append((inputs, targets))
    return found


def _skip_on_failure(stage: Callable[..., PruneStageResult]) -> Callable[..., PruneStageResult]:
    """Any failure of conversion, pruning or export skips the stage with the reason, so the recipe's
    other stages still run on the original; recipe errors and cancellation propagate."""

    @functools.wraps(stage)
    def guarded(model_path: Path, *args: Any, **kwargs: Any) -> PruneStageResult:
        try:
            return stage(model_path, *args, **kwargs)
        except (Cancelled, InvalidRecipeError):
            raise
        except Exception as exc:
            detail = exc.detail if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            return PruneStageResult(model_path, False, {"error": detail}, [f"pruning skipped: {detail}"])

    return guarded


@_skip_on_failure
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
    check_prunable_layout(inputs)
    module = onnx_to_torch(model_path)
    data = calibration or evaluation
    metadata: dict[str, Any] = {}
    messages: list[str] = []
    if not criterion(prune.method).structured:
        result = prune_magnitude(module, prune.sparsity)
    else:
        if prune.sparsity_epochs:
            if calibration is None:
                raise InvalidRecipeError("sparsity training needs a calibration (training) dataset")
            metadata["sparsity_training"] = {
                "epochs": prune.sparsity_epochs,
                "lambda": prune.sparsity_lambda,
                "history": finetune(
                    module,
                    onnx_to_torch(model_path),
                    calibration,
                    FinetuneConfig(epochs=prune.sparsity_epochs),
                    bn_l1=prune.sparsity_lambda,
                    on_epoch=lambda epoch, stats: (
                        progress(0.1 * epoch / prune.sparsity_epochs, f"sparsity training: epoch {epoch}"),
                        check_cancelled(),
                    ),
                ),
            }
        criterion(prune.method).check_data(calibration is not None)
        example = example_batch(inputs, None if data is None else data.inputs)
        needs_data = criterion(prune.method).needs_data
        taylor = _taylor_batches(module, calibration) if needs_data and calibration else None
        result = prune_structured(module, example, prune, taylor_batches=taylor)
        if result.metadata["macs_after"] >= result.metadata["macs_before"]:
            messages.append(
                "pruning removed no channels (every layer was protected, ignored or given ratio 0)"
            )
    metadata.update(result.metadata)
    messages += result.messages
    check_cancelled()
    if evaluation is not None:
        metadata["top1_after_pruning"] = _torch_top1(module, evaluation)
    if recovery is not None and prune.method != "magnitude":
        if calibration is None:
            raise InvalidRecipeError("fine-tuning needs a calibration (training) dataset")

        def on_epoch(epoch: int, stats: dict[str, float]) -> None:
            progress(0.3 * epoch / recovery.epochs, f"fine-tuning: epoch {epoch}/{recovery.epochs}")
            check_cancelled()

        history = finetune(module, onnx_to_torch(model_path), calibration, recovery, on_epoch=on_epoch)
        metadata["finetune"] = {"history": history}
        if evaluation is not None:
            metadata["top1_after_finetune"] = _torch_top1(module, evaluation)
    elif recovery is not None:
        messages.append("fine-tuning skipped: training would refill the zeros that magnitude pruning set")
    elif data is not None and prune.method != "magnitude" and reestimate_batchnorm(module, data, 32):
        metadata["batchnorm_reestimated"] = True
    pruned_path = torch_to_onnx(module, workdir / "pruned.onnx", inputs, output_names)
    info = inspect_model(pruned_path)  # validated like an upload
    original = inspect_model(model_path)
    check_same_signature(list(original.inputs), list(info.inputs), "input signature")
    check_same_signature(list(original.outputs), list(info.outputs), "output signature")
    metadata.update({"params": info.parameters, "macs": info.macs})
    if not criterion(prune.method).structured:
        metadata["compressed_bytes"] = compressed_size(pruned_path)
        metadata["compressed_bytes_original"] = compressed_size(model_path)
    return PruneStageResult(pruned_path, True, metadata, messages)
