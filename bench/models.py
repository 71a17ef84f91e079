"""Standard architectures for the benchmark, defined here (torchvision is not installed: it would
pull a CUDA build of torch). With random weights they are latency-only rows: a random network's
outputs barely depend on its input, so no accuracy figure may come from them. Accuracy figures
come from trained networks (bench/trained.py); `mobilenet_v2_mini` is the one trained here."""

from __future__ import annotations

from typing import ClassVar

from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, width, 3, stride), _conv_bn(width, width, 3, act=None))
        self.shortcut = (
            _conv_bn(cin, width, 1, stride, act=None) if stride != 1 or cin != width else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            _conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride), _conv_bn(width, cout, 1, act=None)
        )
        self.shortcut = (
            _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for index, count in enumerate(layers):
            width = 64 * 2**index
            for block_index in range(count):
                stride = 2 if index > 0 and block_index == 0 else 1
                stages.append(block(cin, width, stride))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            _conv_bn(hidden, cout, 1, act=None),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    SETTINGS: ClassVar[list[tuple[int, int, int, int]]] = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes))

    def forward(self, x):
        return self.head(self.features(x))


def resnet18() -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3])


def mobilenet_v2() -> nn.Module:
    return MobileNetV2()


class MobileNetV2Mini(nn.Module):
    """MobileNetV2's building blocks (inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 project,
    BatchNorm, ReLU6) at a size one can train on two CPU cores in minutes: 64x64 inputs, 0.15 M
    parameters. Depthwise convolutions are where post-training INT8 is weakest, so a trained one
    belongs in the accuracy tables."""

    SETTINGS: ClassVar[list[tuple[int, int, int, int]]] = [
        (1, 16, 1, 2),
        (4, 24, 2, 1),
        (4, 32, 2, 2),
        (4, 64, 2, 2),
        (4, 96, 1, 1),
    ]

    def __init__(self, in_channels: int = 1, classes: int = 10, head: int = 256):
        super().__init__()
        layers, cin = [_conv_bn(in_channels, 16, 3, 2, act=nn.ReLU6)], 16
        for expand, cout, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, head, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(head, classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


def mobilenet_v2_mini(in_channels: int = 1, classes: int = 10) -> nn.Module:
    return MobileNetV2Mini(in_channels, classes)


def wide_mlp(classes: int = 1000) -> nn.Module:
    """A 25 M-parameter MLP on 32×32 inputs: at batch 1 each call streams ~100 MB of weights for
    little arithmetic (memory-bound, like the dense layers of recommenders and transformers), the
    case where batching requests pays most on a CPU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(32 * 32, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, classes),
    )


ARCHITECTURES = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
