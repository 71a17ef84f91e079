"""Pruning: structured channel pruning with a named criterion, and unstructured magnitude pruning.

Structured: ONNX → torch (engines.torch_bridge) → torch-pruning's dependency graph removes whole
channels, ranked by the criterion from the literature:
`l1` (filter L1 norm, Li et al.), `slimming` (BatchNorm γ, Network Slimming, Liu et al.),
`taylor` (first-order Taylor expansion of the loss, Molchanov et al.), `fpgm` (filters near the
geometric median, He et al.), `random` (the control). Channel counts are rounded to multiples of
`round_to` (8 by default) so dense kernels speed up. Layers that produce the model's outputs are
never pruned, so the output signature stays.

Unstructured (`magnitude`, Deep Compression): the smallest weights are set to zero. The file
compresses, but dense runtimes do the same work: it is reported, not sold as a speedup.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import InvalidRecipeError
from engines.prune.criteria import criterion
from engines.torch_bridge import first_output

SLIMMING_EXPORT_HINT = (
    "export the model with BatchNorm kept: torch.onnx.export(model, x, path, dynamo=False, "
    "training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)"
)


@dataclass(frozen=True)
class PruneConfig:
    method: str = "l1"
    ratio: float = 0.5  # structured: fraction of channels removed (per layer, or overall when global)
    scope: str = "uniform"  # "uniform": every layer loses `ratio`; "global": ranked across layers
    round_to: int = 8
    ignore: tuple[str, ...] = ()  # layer (node) names never pruned
    sparsity: float = 0.8  # magnitude: fraction of weights set to zero
    sparsity_epochs: int = 0  # slimming: epochs of training with an L1 penalty on BN γ before pruning
    sparsity_lambda: float = 1e-4  # slimming: weight of that penalty (Liu et al. use 1e-4 to 1e-5)
    layer_ratios: dict[str, float] | None = None  # per-layer ratios (from a sensitivity analysis)


@dataclass
class PruneResult:
    module: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def check_prune_config(config: PruneConfig, op_types: dict[str, int]) -> None:
    """What can be refused before any work: bad ratios, slimming without BatchNorm."""
    method = criterion(config.method)
    if not method.structured:
        if not 0 < config.sparsity < 1:
            raise InvalidRecipeError(f"sparsity must be in (0, 1), got {config.sparsity}")
    elif not 0 < config.ratio < 1:
        raise InvalidRecipeError(f"ratio must be in (0, 1), got {config.ratio}")
    if config.sparsity_epochs and not method.needs_batchnorm:
        raise InvalidRecipeError("sparsity_epochs (L1 on BatchNorm γ) belongs to the slimming method")
    if method.needs_batchnorm and "BatchNormalization" not in op_types:
        raise InvalidRecipeError(
            f"{method.name} ranks channels by BatchNorm γ, and this model has no BatchNormalization (the "
            f"legacy exporter folds it into Conv by default); {SLIMMING_EXPORT_HINT}"
        )


def _module_name(name: str) -> str:
    """onnx2torch names modules after ONNX nodes without the leading '/'."""
    return name.lstrip("/")


def weight_layers() -> tuple[type, ...]:
    """Layers whose output channels pruning removes: any convolution (transposed too) and Linear."""
    import torch

    return (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


def output_layers(module: Any) -> list[Any]:
    """The Conv/Linear layers nearest to the graph outputs: pruning them would change the outputs."""

    found, seen = [], set()
    nodes = [node for node in module.graph.nodes if node.op == "output"]
    stack = list(nodes[0].all_input_nodes) if nodes else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            layer = module.get_submodule(node.target)
            if isinstance(layer, weight_layers()):
                found.append(layer)
                continue
        stack.extend(node.all_input_nodes)
    return found


def count_params_and_macs(module: Any, example: Any) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example)
    return int(params), int(macs)


def importance_for(config: PruneConfig) -> Any:
    make = criterion(config.method).importance
    if make is None:
        raise InvalidRecipeError(f"'{config.method}' is not a structured criterion")
    return make()


def prune_structured(
    module: Any, example: Any, config: PruneConfig, *, taylor_batches: list[tuple[Any, Any]] | None = None
) -> PruneResult:
    """Remove channels in place; `taylor_batches` are (inputs, targets) for the Taylor criterion."""
    import torch
    import torch_pruning as tp

    wanted = {_module_name(name) for name in config.ignore}
    ignored = output_layers(module) + [layer for name, layer in module.named_modules() if name in wanted]
    ratio_dict = None
    if config.layer_ratios is not None:
        ratio_dict = {
            module.get_submodule(name): ratio for name, ratio in config.layer_ratios.items() if ratio > 0
        }
        ignored += [module.get_submodule(name) for name, ratio in config.layer_ratios.items() if ratio <= 0]
    unknown = wanted - {name for name, _ in module.named_modules()}
    before_params, before_macs = count_params_and_macs(module, example)
    pruner = tp.pruner.MetaPruner(
        module,
        example,
        importance=importance_for(config),
        pruning_ratio=config.ratio,
        pruning_ratio_dict=ratio_dict,
        global_pruning=config.scope == "global",
        round_to=config.round_to or None,
        ignored_layers=ignored,
    )
    method = criterion(config.method)
    if method.needs_data:
        method.check_data(bool(taylor_batches))
        module.zero_grad()
        for inputs, targets in taylor_batches:
            logits = first_output(module(*inputs)).reshape(len(targets), -1)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
    pruner.step()
    after_params, after_macs = count_params_and_macs(module, example)
    result = PruneResult(
        module,
        {
            "method": config.method,
            "ratio": config.ratio,
            "scope": config.scope,
            "round_to": config.round_to,
            "params_before": before_params,
            "params_after": after_params,
            "macs_before": before_macs,
            "macs_after": after_macs,
            "macs_reduction": before_macs / max(after_macs, 1),
            "kept_whole": sorted(name for name, layer in module.named_modules() if layer in ignored),
        },
    )
    if unknown:
        result.messages.append(
            f"ignore names {sorted(unknown)} match no layer; layers: node names of the model"
        )
    return result


def prune_magnitude(module: Any, sparsity: float) -> PruneResult:
    """Zero the smallest-magnitude weights of Conv/Linear layers, globally, to reach `sparsity`."""
    import torch

    weights = [
        layer.weight for layer in module.modules() if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear)
    ]
    magnitudes = torch.cat([weight.detach().abs().flatten() for weight in weights])
    threshold = (
        torch.quantile(magnitudes, sparsity)
        if magnitudes.numel() < 2**24
        else magnitudes.kthvalue(int(sparsity * magnitudes.numel())).values
    )
    with torch.no_grad():
        for weight in weights:
            weight[weight.abs() <= threshold] = 0.0
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    total = sum(weight.numel() for weight in weights)
    return PruneResult(
        module,
        {"method": "magnitude", "sparsity_target": sparsity, "sparsity": zeros / total},
        [
            f"magnitude pruning zeroed {zeros / total:.1%} of the Conv/Linear weights; dense runtimes "
            "such as ONNX Runtime and TensorRT do the same work on zeros: expect a smaller compressed "
            "file, not speed"
        ],
    )


def compressed_size(path: Path) -> int:
    """Bytes of the file deflated: what sparsity buys in storage and transfer."""
    return len(zlib.compress(path.read_bytes(), 6))
