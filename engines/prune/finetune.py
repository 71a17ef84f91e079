"""Recover accuracy after pruning: fine-tuning with knowledge distillation from the original model.

The loss is Hinton's distillation term (KL divergence between temperature-softened outputs of the
pruned student and the original teacher, × T²); with labels it is mixed with cross-entropy. Labels
are optional, so any calibration set can train.

Most exported models have their BatchNorm folded into the convolutions (the default of
torch.onnx.export), so the student is a plain convolution stack whose layers differ in weight scale
by an order of magnitude or more: an ill-conditioned problem on which a few epochs of Adam recover
little (SGD diverges). Fine-tuning therefore re-inserts a BatchNorm after every convolution that
lacks one (`reinsert_batchnorm`), initialised to the identity on the training data, so the network
computes exactly what it did; it trains with batch statistics, and is folded back into the
convolution afterwards (exactly, from re-estimated statistics): the exported graph is unchanged.
BatchNorm statistics are re-estimated on the training data at the end, since pruning and training
changed every layer's input distribution.

The defaults (one-cycle Adam peaking at 2e-2, batch 16, BatchNorm re-inserted, T = 1) come from
controlled runs on the digits CNN (bench/prune.py's recovery table): the former ones (peak 3e-3,
batch 32, no re-inserted BatchNorm, T = 4) left the student far from converged after a few epochs,
where distillation trailed plain cross-entropy. At T = 4 the T²-scaled term is close to matching
logits, a weaker signal per step than T = 1: on the full training split both end level, but with
few steps (a small calibration set) T = 4 trails cross-entropy by a point or more and T = 1 does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.ingest.datasets import Dataset
from engines.torch_bridge import first_output, module_calls


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    lr: float = 2e-2  # peak learning rate of the one-cycle schedule (Adam)
    distill: bool = True
    temperature: float = 1.0
    alpha: float = 0.7  # weight of distillation vs cross-entropy when there are labels
    batch_size: int = 16
    # train with a BatchNorm after each convolution that lacks one (folded back after)
    reinsert_batchnorm: bool = True


EpochCallback = Callable[[int, dict[str, float]], None]

# Samples over which a re-inserted BatchNorm is initialised to the identity (channel mean and variance).
_INIT_SAMPLES = 2048


def _batches(dataset: Dataset, batch_size: int, generator: np.random.Generator) -> Any:
    import torch

    order = generator.permutation(dataset.samples)
    for start in range(0, dataset.samples - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        inputs = tuple(
            torch.from_numpy(np.ascontiguousarray(array[index])) for array in dataset.inputs.values()
        )
        labels = None if dataset.labels is None else torch.from_numpy(dataset.labels[index].astype(np.int64))
        yield inputs, labels


def _batchnorm_layers(module: Any) -> list[Any]:
    import torch

    return [layer for layer in module.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]


def _unnormalized_convs(module: Any) -> list[str]:
    """Names of the convolutions (not transposed) of a torch.fx module whose output no BatchNorm
    follows, called once, and not among the layers that produce the model's outputs."""
    import torch

    from engines.prune.methods import output_layers

    calls = module_calls(module)
    if calls is None:
        return []
    graph = module.graph
    heads = {id(layer) for layer in output_layers(module)}
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        layer = module.get_submodule(node.target)
        if not isinstance(layer, torch.nn.modules.conv._ConvNd) or layer.transposed or id(layer) in heads:
            continue
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(module.get_submodule(users[0].target), torch.nn.modules.batchnorm._BatchNorm)
        ):
            continue
        found.append(node.target)
    return found


def _set_submodule(module: Any, name: str, layer: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, layer)


def insert_batchnorm(module: Any, data: Dataset, batch_size: int) -> list[str]:
    """Wrap each convolution that no BatchNorm follows as Sequential(conv, BatchNorm), the BatchNorm
    initialised to the identity on `data` (running statistics and affine = the conv output's channel
    mean and variance), so the module computes what it did. Returns the wrapped names, for
    `fold_batchnorm`."""
    import torch

    names = _unnormalized_convs(module)
    if not names:
        return []
    sums: dict[str, list[Any]] = {name: [0.0, 0.0, 0] for name in names}

    def hook(name: str) -> Callable[..., None]:
        def record(_layer: Any, _inputs: Any, output: Any) -> None:
            dims = [dim for dim in range(output.dim()) if dim != 1]
            values = output.detach().double()
            sums[name][0] = sums[name][0] + values.sum(dims)
            sums[name][1] = sums[name][1] + values.pow(2).sum(dims)
            sums[name][2] += output.numel() // output.shape[1]

        return record

    hooks = [module.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    arrays = list(data.inputs.values())
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, min(data.samples, _INIT_SAMPLES), batch_size):
                module(*(torch.from_numpy(array[start : start + batch_size]) for array in arrays))
    finally:
        for handle in hooks:
            handle.remove()
    norm_class = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
    for name in names:
        conv = module.get_submodule(name)
        total, squares, count = sums[name]
        mean = total / count
        variance = (squares / count - mean * mean).clamp_min(0)
        norm = norm_class[len(conv.kernel_size)](conv.out_channels).to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(variance)
            norm.weight.copy_((variance + norm.eps).sqrt())
            norm.bias.copy_(mean)
        _set_submodule(module, name, torch.nn.Sequential(conv, norm))
    return names


def fold_batchnorm(module: Any, names: list[str]) -> None:
    """Undo `insert_batchnorm`: fold each BatchNorm (its running statistics) into its convolution."""
    import torch

    for name in names:
        wrapped = module.get_submodule(name)
        conv, norm = wrapped[0], wrapped[1]
        with torch.no_grad():
            scale = norm.weight / (norm.running_var + norm.eps).sqrt()
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            shift = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            bias = (shift - norm.running_mean) * scale + norm.bias
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(bias.to(conv.weight.dtype))
            else:
                conv.bias.copy_(bias)
        _set_submodule(module, name, conv)


def finetune(
    student: Any,
    teacher: Any,
    train: Dataset,
    config: FinetuneConfig,
    *,
    on_epoch: EpochCallback = lambda epoch, stats: None,
    seed: int = 0,
    bn_l1: float = 0.0,
) -> list[dict[str, float]]:
    """Train `student` in place; returns per-epoch mean loss. `on_epoch` may raise to stop (the
    student is then left consistent: re-inserted BatchNorms are folded back).

    `bn_l1` adds λ·Σ|γ| over the model's own BatchNorm scales: Network Slimming's sparsity training,
    which drives the γ of unneeded channels towards zero before they are pruned.
    """
    import torch
    import torch.nn.functional as F

    if not config.distill and train.labels is None:
        raise ValueError("fine-tuning without distillation needs labels")
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    batch_size = min(config.batch_size, train.samples)
    norms = _batchnorm_layers(student)
    reinsert = config.reinsert_batchnorm and batch_size > 1
    inserted = insert_batchnorm(student, train, batch_size) if reinsert else []
    try:
        steps = config.epochs * max(1, train.samples // batch_size)
        optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
        teacher.eval()
        history = []
        temperature = config.temperature
        for epoch in range(1, config.epochs + 1):
            student.train()
            losses = []
            for inputs, labels in _batches(train, batch_size, generator):
                logits = first_output(student(*inputs))
                loss = torch.zeros(())
                if config.distill:
                    with torch.no_grad():
                        target = first_output(teacher(*inputs))
                    kd = (
                        F.kl_div(
                            F.log_softmax(logits / temperature, dim=1),
                            F.softmax(target / temperature, dim=1),
                            reduction="batchmean",
                        )
                        * temperature**2
                    )
                    loss = (
                        kd
                        if labels is None
                        else config.alpha * kd + (1 - config.alpha) * F.cross_entropy(logits, labels)
                    )
                elif labels is not None:
                    loss = F.cross_entropy(logits, labels)
                if bn_l1:
                    loss = loss + bn_l1 * sum(layer.weight.abs().sum() for layer in norms)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            stats = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else 0.0}
            history.append(stats)
            on_epoch(epoch, stats)
        reestimate_batchnorm(student, train, batch_size)
    finally:
        fold_batchnorm(student, inserted)
        student.eval()
    return history


def reestimate_batchnorm(module: Any, data: Dataset, batch_size: int) -> bool:
    """Recompute BatchNorm running statistics over `data` (a cumulative average, not a momentum one)."""
    import torch

    norms = _batchnorm_layers(module)
    batch_size = min(batch_size, data.samples)
    if not norms or batch_size < 2:
        return False
    momenta = [layer.momentum for layer in norms]
    module.eval()  # dropout and the like stay off; only the BatchNorms use batch statistics
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    try:
        with torch.no_grad():
            for inputs, _ in _batches(data, batch_size, np.random.default_rng(0)):
                module(*inputs)
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
        module.eval()
    return True
