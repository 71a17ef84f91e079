"""What a QAT stage needs to know: how long to train, how fast, and what it learns from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QatConfig:
    """Fine-tune the fake-quantized model for `epochs` passes over the calibration (training) set.

    `distill`: learn the original's outputs (needs no labels); without it, labels are required.
    """

    epochs: int = 3
    # Peak of the one-cycle schedule (Adam). A trained ImageNet network needs small steps: on
    # EfficientNet-Lite0 (bench.trained, 128 photo crops, 2 epochs) 3e-5 lifted top-1 agreement with
    # fp32 from 0.78 (fake-quantized, untrained) to 0.82 while 1e-4 dropped it to 0.65 and 3e-4 to
    # 0.66 after one epoch. A small net from scratch-like ranges (the suite's digits nets) recovers
    # faster with 3e-4, which the recipe can ask for.
    learning_rate: float = 3e-5
    batch_size: int = 32
    distill: bool = True
