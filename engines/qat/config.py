"""What a QAT stage needs to know: how long to train, how fast, and what it learns from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QatConfig:
    """Fine-tune the fake-quantized model for `epochs` passes over the calibration (training) set.

    `distill`: learn the original's outputs (needs no labels); without it, labels are required.
    """

    epochs: int = 3
    # peak of the one-cycle schedule (Adam): on a MobileNetV2-style digits net 3e-4 reached fp32 in 1 epoch
    # where 1e-4 took 3
    learning_rate: float = 3e-4
    batch_size: int = 32
    distill: bool = True
