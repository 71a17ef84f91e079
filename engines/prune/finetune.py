"""Recover accuracy after pruning: fine-tuning with knowledge distillation from the original model.

The loss is Hinton's distillation term (KL divergence between temperature-softened outputs of the
pruned student and the original teacher, × T²); with labels it is mixed with cross-entropy. Labels
are optional, so any calibration set can train. BatchNorm statistics are re-estimated on the
training data afterwards, since pruning changed every layer's input distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.ingest.datasets import Dataset
from engines.torch_bridge import first_output


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    lr: float = 3e-3
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.7  # weight of distillation vs cross-entropy when there are labels
    batch_size: int = 32


EpochCallback = Callable[[int, dict[str, float]], None]


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
    """Train `student` in place; returns per-epoch mean loss. `on_epoch` may raise to stop.

    `bn_l1` adds λ·Σ|γ| over BatchNorm scales: Network Slimming's sparsity training, which drives
    the γ of unneeded channels towards zero before they are pruned.
    """
    import torch
    import torch.nn.functional as F

    if not config.distill and train.labels is None:
        raise ValueError("fine-tuning without distillation needs labels")
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    batch_size = min(config.batch_size, train.samples)
    steps = config.epochs * max(1, train.samples // batch_size)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    teacher.eval()
    norms = [layer for layer in student.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]
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
    return history


def reestimate_batchnorm(module: Any, data: Dataset, batch_size: int) -> bool:
    """Recompute BatchNorm running statistics over `data` (a cumulative average, not a momentum one)."""
    import torch

    norms = [layer for layer in module.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]
    batch_size = min(batch_size, data.samples)
    if not norms or batch_size < 2:
        return False
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None
    module.train()
    with torch.no_grad():
        for inputs, _ in _batches(data, batch_size, np.random.default_rng(0)):
            module(*inputs)
    module.eval()
    return True
