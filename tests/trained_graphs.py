"""Small trained networks on real data, for the quantization methods' tests.

Random-weight networks hide INT8's accuracy problems (near-constant outputs); these are trained. The
depthwise net is MobileNet-style (depthwise separable convolutions, BatchNorm, ReLU6): the structure
where post-training INT8 is weakest (bench/trained.py measures it on EfficientNet-Lite0).
It trains on scikit-learn's digits (real handwriting, upsampled to 32×32) in about ten seconds on one
thread, and is exported like an upload (legacy exporter, opset 17, BatchNorm folded into the Convs).

`build_depthwise_digits(directory)` is the plain builder; `depthwise_digits` the session fixture
(tests/conftest.py imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engines.ingest.datasets import Dataset
from examples import digits as digits_model

#: Channels of the separable blocks and their strides (32×32 in, 4×4 before pooling).
_BLOCKS = ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1))


@dataclass(frozen=True)
class TrainedGraph:
    onnx_path: Path
    train: Dataset  # labelled training split: calibration comes from here
    evaluation: Dataset  # the held-out split, labelled
    torch_top1: float  # the trained module's top-1 on `evaluation`, for reference


def build_depthwise_net():  # -> torch.nn.Module
    """Stem conv, five depthwise-separable blocks (3×3 depthwise, 1×1 pointwise, each BN + ReLU6),
    global average pooling, a linear classifier: MobileNet-V1's layout at digit scale."""
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list:
        return [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        ]

    layers = conv_bn(1, 16, 3, 2)
    for cin, cout, stride in _BLOCKS:
        layers += conv_bn(cin, cin, 3, stride, groups=cin) + conv_bn(cin, cout, 1, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def train_depthwise_net(split: digits_model.DigitsSplit, epochs: int = 12, seed: int = 0):
    """Adam with a one-cycle schedule on one thread (the suite shares two cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = build_depthwise_net()
        x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
        batch_size = 32
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
                schedule.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def build_depthwise_digits(directory: Path) -> tuple[Path, Dataset, Dataset]:
    """Train the depthwise net, export it to `directory/depthwise_digits.onnx`; returns the model
    path, the training split and the held-out split as engines Datasets (input `input`, labels)."""
    return _build(directory).onnx_path, *_datasets(digits_model.load_digits_split())


def _datasets(split: digits_model.DigitsSplit) -> tuple[Dataset, Dataset]:
    return (
        Dataset({"input": split.train_x}, split.train_y),
        Dataset({"input": split.test_x}, split.test_y),
    )


def _build(directory: Path) -> TrainedGraph:
    directory.mkdir(parents=True, exist_ok=True)
    split = digits_model.load_digits_split()
    model = train_depthwise_net(split)
    path = digits_model.export_onnx(model, directory / "depthwise_digits.onnx")
    logits = digits_model.predict(model, split.test_x)
    train, evaluation = _datasets(split)
    return TrainedGraph(path, train, evaluation, float((logits.argmax(1) == split.test_y).mean()))


def build_mlp_digits(directory: Path, epochs: int = 10, seed: int = 0) -> tuple[Path, Dataset, Dataset]:
    """A two-layer MLP on the flattened digits (weights all in Gemms: SmoothQuant's kind of graph),
    trained in about a second; returns the model path, the training and the held-out split."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    split = digits_model.load_digits_split()
    flat = digits_model.DigitsSplit(
        split.train_x.reshape(len(split.train_x), -1),
        split.train_y,
        split.test_x.reshape(len(split.test_x), -1),
        split.test_y,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
        x, y = torch.from_numpy(flat.train_x), torch.from_numpy(flat.train_y)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            for start in range(0, len(x), 64):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(
                    model(x[start : start + 64]), y[start : start + 64]
                ).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path = digits_model.export_onnx(model.eval(), directory / "mlp_digits.onnx", shape=(1024,))
    return path, *_datasets(flat)


@pytest.fixture(scope="session")
def depthwise_digits(tmp_path_factory: pytest.TempPathFactory) -> TrainedGraph:
    """The trained depthwise digits net, once per session."""
    return _build(tmp_path_factory.mktemp("depthwise_digits"))


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())
