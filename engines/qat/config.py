"""What a QAT stage needs to know: how long to train, how fast, and what it learns from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QatConfig:
    """Fine-tune the fake-quantized model for `epochs` passes over the calibration (training) set.

    `distill`: learn the original's outputs (needs no labels); without it, labels are required.
    """

    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 32
    distill: bool = True
