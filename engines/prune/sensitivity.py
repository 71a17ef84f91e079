"""Pruning sensitivity analysis (as in Distiller): prune each layer alone at a few ratios and
measure what it costs, so per-layer ratios can be chosen instead of one ratio for all.

The drop is in top-1 against labels when the data has them, else in top-1 agreement with the
original model (fidelity). Layers that produce the model's outputs are not analysed: they are
never pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec
from engines.prune.methods import PruneConfig, output_layers
from engines.torch_bridge import example_batch, onnx_to_torch, torch_outputs

DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)
SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_PNG = "sensitivity.png"


@dataclass(frozen=True)
class SensitivityConfig:
    method: str = "l1"
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    max_samples: int = 500


def _score(outputs: np.ndarray, data: Dataset, reference: np.ndarray) -> float:
    predicted = outputs.reshape(len(outputs), -1).argmax(1)
    if data.labels is not None:
        return float((predicted == data.labels).mean())
    return float((predicted == reference.reshape(len(reference), -1).argmax(1)).mean())


def analyse(
    model_path: Path,
    inputs: list[TensorSpec],
    data: Dataset,
    config: SensitivityConfig,
    *,
    progress: Callable[[float, str], None] = lambda fraction, stage: None,
) -> dict[str, Any]:
    """{"metric", "baseline", "layers": {layer: {ratio: drop}}}: drops as fractions (0.01 = 1 point),
    null where the layer cannot be pruned alone (its channels are coupled to other layers')."""
    import torch
    import torch_pruning as tp

    from engines.prune.methods import importance_for

    data = data.take(min(config.max_samples, data.samples))
    module = onnx_to_torch(model_path)
    reference = torch_outputs(module, data)
    baseline = _score(reference, data, reference)
    protected = set(map(id, output_layers(module)))
    layers = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Linear)
        and id(layer) not in protected
    ]
    if not layers:
        raise InvalidRecipeError("the model has no prunable Conv/Linear layers besides its output layers")
    example = example_batch(inputs, data.inputs)
    table: dict[str, dict[str, float | None]] = {}
    for index, name in enumerate(layers):
        progress(index / len(layers), f"sensitivity of {name}")
        table[name] = {}
        for ratio in config.ratios:
            candidate = copy.deepcopy(module)
            target = candidate.get_submodule(name)
            others = [
                layer
                for layer in candidate.modules()
                if isinstance(layer, torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Linear)
                and layer is not target
            ]
            pruner = tp.pruner.MetaPruner(
                candidate,
                example,
                importance=importance_for(PruneConfig(method=config.method)),
                pruning_ratio=ratio,
                ignored_layers=others,
                round_to=None,
            )
            before = sum(parameter.numel() for parameter in candidate.parameters())
            pruner.step()
            if sum(parameter.numel() for parameter in candidate.parameters()) == before:
                # coupled with other layers (a residual add, a depthwise conv): cannot be pruned alone
                table[name][str(ratio)] = None
                continue
            table[name][str(ratio)] = baseline - _score(torch_outputs(candidate, data), data, reference)
    return {
        "metric": "top1" if data.labels is not None else "fidelity",
        "method": config.method,
        "baseline": baseline,
        "samples": data.samples,
        "ratios": list(config.ratios),
        "layers": table,
    }


def ratios_within(report: dict[str, Any], max_drop: float) -> dict[str, float]:
    """Per layer, the largest ratio r such that every analysed ratio up to r stays within `max_drop`
    (0 when the smallest already does not, or when the layer cannot be pruned alone: `null` drops)."""
    chosen = {}
    for layer, drops in report["layers"].items():
        ratio_ok = 0.0
        for ratio in sorted(drops, key=float):
            drop = drops[ratio]
            if drop is None or drop > max_drop:
                break
            ratio_ok = float(ratio)
        chosen[layer] = ratio_ok
    return chosen


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    for layer, drops in report["layers"].items():
        ratios = sorted(drops, key=float)
        measured = [r for r in ratios if drops[r] is not None]
        if measured:
            axis.plot(
                [float(r) for r in measured], [drops[r] * 100 for r in measured], marker="o", label=layer
            )
    axis.set(
        xlabel=f"fraction of channels pruned ({report['method']})",
        ylabel=f"{report['metric']} drop (points)",
        title="pruning sensitivity, one layer at a time",
    )
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
