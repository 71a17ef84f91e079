"""Fake quantization of an onnx2torch module, for training: PyTorch's FX graph mode QAT.

Which path, and why (tried on the digits nets with torch 2.13 and nncf 3.4.0):
NNCF's PyTorch QAT (`nncf.quantize` on a torch module) routes an onnx2torch `GraphModule` to its
FX backend, which needs torchao and yields no trainable model; wrapped in a plain module it
quantizes, but (1) its CPU quantizer kernels are a C++ extension compiled on first use (over a
minute and ~3 GB on two cores; a process killed mid-build leaves a lock that hangs every later
load), (2) `nncf.strip` needs torchao, and (3) its hooks put quantizers inside onnx2torch's custom
ONNX-export functions (GlobalAveragePool, Reshape, reductions…), and the ONNX export then fails.
`torch.ao.quantization`'s FX QAT (`prepare_qat_fx`) ships with torch, needs no compiler, keeps
onnx2torch's own modules as leaves (`non_traceable_module_classes`), and its FakeQuantize modules
export as standard QuantizeLinear/DequantizeLinear. It is deprecated in favour of torchao's pt2e
flow (`prepare_qat_pt2e`), the migration path when torchao is a dependency; a new path is one
entry in `FAKE_QUANT_PATHS`.

The quantizers mirror the post-training profiles (engines.quantize.int8): `cpu` is unsigned
asymmetric activations with symmetric signed per-channel weights, 7-bit weights where the CPU
needs `reduce_range`; `tensorrt` is symmetric signed activations and weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.errors import EngineError
from engines.torch_bridge import module_calls

#: onnx2torch modules torch.ao traces into (plain torch.add/mul/…, no custom export, no data-dependent
#: branches), so residual additions are quantized as ONNX Runtime's quantizer does (QLinearAdd);
#: every other onnx2torch module stays a float leaf.
_TRACED = frozenset({"OnnxBinaryMathOperation"})

#: torch.ao's name of the whole path, as the engine's metadata records it.
TORCH_AO_FX = "torch.ao.quantization FX (prepare_qat_fx)"


@dataclass(frozen=True)
class FakeQuantSpec:
    """How the fake quantizers are set: what the exported QDQ model will compute."""

    profile: str  # "cpu" | "tensorrt"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights (cpu profile on CPUs without VNNI)


#: A fake-quant path: (float module, example inputs, spec) -> a trainable fake-quantized module.
FakeQuantPath = Callable[[Any, tuple[Any, ...], FakeQuantSpec], Any]
FAKE_QUANT_PATHS: dict[str, FakeQuantPath] = {}


def register_path(name: str) -> Callable[[FakeQuantPath], FakeQuantPath]:
    def add(path: FakeQuantPath) -> FakeQuantPath:
        FAKE_QUANT_PATHS[name] = path
        return path

    return add


def _qconfigs(spec: FakeQuantSpec) -> tuple[Any, Any]:
    """(default QConfig, QConfig for transposed convolutions: their weights per tensor)."""
    import torch
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
    )

    if spec.profile == "tensorrt":
        activation = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
    else:
        activation = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        )
    low, high = (-64, 63) if spec.reduce_range else (-128, 127)
    per_tensor_weight = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=low,
        quant_max=high,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )
    weight = (
        FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=low,
            quant_max=high,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
        if spec.per_channel
        else per_tensor_weight
    )
    return QConfig(activation=activation, weight=weight), QConfig(
        activation=activation, weight=per_tensor_weight
    )


def _fixed_range_quantizer(spec: FakeQuantSpec) -> Any:
    """A quantizer of the fixed range [0, 6]: saturating, it computes ReLU6 after a ReLU."""
    import torch
    from torch.ao.quantization import FixedQParamsFakeQuantize, FixedQParamsObserver

    if spec.profile == "tensorrt":
        observer = FixedQParamsObserver.with_args(
            scale=6.0 / 127, zero_point=0, dtype=torch.qint8, quant_min=-128, quant_max=127
        )
    else:
        observer = FixedQParamsObserver.with_args(
            scale=6.0 / 255, zero_point=0, dtype=torch.quint8, quant_min=0, quant_max=255
        )
    return FixedQParamsFakeQuantize(observer=observer)


def _fix_capped_ranges(prepared: Any, capped: list[tuple[str, str]], spec: FakeQuantSpec) -> None:
    """After torch.ao fused each capped layer with its ReLU: the quantizer of the fused output gets
    the fixed [0, 6] range. A pair torch.ao did not fuse gets its ReLU6 back (the plain layout)."""
    import torch

    modules = dict(prepared.named_modules())
    nodes = {node.target: node for node in prepared.graph.nodes if node.op == "call_module"}
    for layer, activation in capped:
        if activation in modules:  # not fused: the ReLU is still there
            _set_submodule(prepared, activation, torch.nn.ReLU6())
            continue
        quantizers = [
            user.target
            for user in nodes[layer].users
            if user.op == "call_module" and user.target in fake_quantizer_names(prepared)
        ]
        if len(quantizers) != 1:
            raise RuntimeError(f"the fused layer {layer} has no quantizer of its own after its ReLU6")
        _set_submodule(prepared, quantizers[0], _fixed_range_quantizer(spec))


def fake_quantizer_names(module: Any) -> set[str]:
    from torch.ao.quantization import FakeQuantizeBase

    return {name for name, layer in module.named_modules() if isinstance(layer, FakeQuantizeBase)}


def _set_submodule(module: Any, name: str, layer: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, layer)


def _cap_relu6_after_layers(module: Any) -> list[tuple[str, str]]:
    """Conv/Linear -> ReLU6 pairs become Conv/Linear -> ReLU with a quantizer fixed to [0, 6].

    torch.ao fuses a layer with a following ReLU (one quantizer after both) but not with ReLU6,
    whose output it quantizes with the layer's own range, negative part included: the export is
    then Conv -> Q/DQ -> Clip -> Q/DQ, which ONNX Runtime runs with a float Clip between
    requantizations (slower than the float model on the digits nets) and with half the levels
    spent on values ReLU6 removes. A saturating [0, 6] quantizer after a ReLU computes ReLU6
    exactly, so the exported layer is Conv -> Relu -> Q/DQ, which ONNX Runtime fuses into one
    QLinearConv as its post-training quantizer does. Returns the (layer, activation) names."""
    import torch

    calls = module_calls(module)
    if calls is None:
        return []
    graph = module.graph
    layers = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    pairs = []
    for node in graph.nodes:
        users = list(node.users)
        if node.op != "call_module" or calls[node.target] != 1 or len(users) != 1:
            continue
        layer = _layer_of(module, node.target, layers)
        if layer is None:
            continue
        user = users[0]
        if user.op != "call_module" or calls[user.target] != 1:
            continue
        if not isinstance(module.get_submodule(user.target), torch.nn.ReLU6):
            continue
        _set_submodule(module, user.target, torch.nn.ReLU())
        pairs.append((layer, user.target))
    return pairs


def _layer_of(module: Any, target: str, layers: tuple[type, ...]) -> str | None:
    """The convolution or linear layer a call computes last: the module itself, or the last child
    of a Sequential. onnx2torch writes a convolution with asymmetric pads (TensorFlow's "same"
    padding at stride 2, or a Pad that ONNX Runtime's optimizer merged into the Conv) as
    Sequential(pad, conv); torch.ao traces through the Sequential and fuses its conv with the
    ReLU after it like any other, so its ReLU6 is capped the same way. Missing one leaves the
    conv's output quantized over its whole pre-activation range before ReLU6 keeps [0, 6]: on
    EfficientNet-Lite0's stem, [-78, 50] in steps of 0.5, twelve levels for what the network
    uses, and top-1 agreement fell from 0.77 to 0.39 before any training."""
    import torch

    found = module.get_submodule(target)
    if isinstance(found, torch.nn.Sequential) and len(found) and isinstance(found[-1], layers):
        return f"{target}.{len(found) - 1}"
    return target if isinstance(found, layers) else None


@register_path(TORCH_AO_FX)
def prepare_torch_ao_fx(module: Any, example: tuple[Any, ...], spec: FakeQuantSpec) -> Any:
    """FakeQuantize on the inputs, weights and outputs of the ops torch.ao quantizes (convolutions,
    linear layers, additions…); onnx2torch's own modules stay float leaves."""
    import torch
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.backend_config import get_tensorrt_backend_config
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    default, transposed = _qconfigs(spec)
    mapping = QConfigMapping().set_global(default)
    capped = _cap_relu6_after_layers(module)
    for kind in (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d):
        mapping = mapping.set_object_type(kind, transposed)
    leaves = sorted(
        {
            type(layer)
            for layer in module.modules()
            if type(layer).__module__.startswith("onnx2torch") and type(layer).__name__ not in _TRACED
        },
        key=lambda kind: f"{kind.__module__}.{kind.__qualname__}",
    )
    custom = PrepareCustomConfig().set_non_traceable_module_classes(leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, once per call
        # torch.ao's default (fbgemm) patterns take unsigned activations only; its TensorRT patterns
        # take the signed symmetric ones of the tensorrt profile
        backend = get_tensorrt_backend_config() if spec.profile == "tensorrt" else None
        prepared = prepare_qat_fx(
            module, mapping, example, prepare_custom_config=custom, backend_config=backend
        )
    _fix_capped_ranges(prepared, capped, spec)
    return prepared


def fake_quantize(module: Any, example: tuple[Any, ...], spec: FakeQuantSpec, path: str = TORCH_AO_FX) -> Any:
    """`module` with fake quantizers through `path`; EngineError(`qat_unavailable`) when it cannot."""
    try:
        return FAKE_QUANT_PATHS[path](module, example, spec)
    except Exception as exc:
        raise EngineError(
            f"the model could not be prepared for quantization-aware training ({type(exc).__name__}: "
            f"{str(exc)[:300]}); use post-training INT8 (leave out the qat stage)",
            code="qat_unavailable",
        ) from exc


def fake_quantizers(module: Any) -> list[Any]:
    from torch.ao.quantization import FakeQuantizeBase

    return [layer for layer in module.modules() if isinstance(layer, FakeQuantizeBase)]


def freeze(module: Any) -> None:
    """Stop the observers: ranges stay what training ended with (evaluation and export use them)."""
    for layer in fake_quantizers(module):
        layer.disable_observer()


def widen_for_export(module: Any) -> None:
    """ONNX's QuantizeLinear takes int8 as [-128, 127] only: 7-bit weights are exported with that
    range and the same scale, which represents every value they take (|q| ≤ 64), so the exported
    model computes what was trained."""
    import torch

    for layer in fake_quantizers(module):
        if layer.dtype == torch.qint8 and (layer.quant_min, layer.quant_max) == (-64, 63):
            layer.quant_min, layer.quant_max = -128, 127
            layer.activation_post_process.quant_min = -128
            layer.activation_post_process.quant_max = 127
