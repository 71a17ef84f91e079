"""ONNX ⇄ PyTorch, for the stages that train or restructure a model (pruning, fine-tuning).

onnx2torch converts ONNX graphs to `torch.fx` modules that torch-pruning can trace. Version
1.5.15 imports torchvision at import time for two converters (NonMaxSuppression, RoiAlign), and
installing torchvision here would replace the CPU build of torch with a multi-GB CUDA one. So,
when torchvision is absent, a stand-in module is registered before importing onnx2torch: every
other converter works, and a model that uses those two ops gets a clear error naming them.
(onnx2torch itself is installed with `--no-deps` for the same reason; see the Makefile.)
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from engines.errors import EngineError
from engines.signature import TensorSpec

_NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")


def _torchvision_stand_in() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise EngineError(
            f"converting {'/'.join(_NEEDS_TORCHVISION)} to PyTorch needs torchvision, which is not installed",
            code="unsupported_op",
        )

    torchvision = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    for name in ("nms", "roi_align", "box_convert"):
        setattr(ops, name, unavailable)
    torchvision.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = torchvision, ops


_OPSET18_REDUCTIONS = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)


def _register_opset18_reductions() -> None:
    """Opset 18 moved `axes` of these reductions from an attribute to an input (dynamo exports use it);
    onnx2torch 1.5.15 converts them up to opset 13. Registered through its own extension point,
    for constant axes (what exporters write)."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    def convert(node: Any, graph: Any) -> Any:
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            try:
                axes = get_const_value(node.input_values[1], graph).tolist()
            except KeyError as exc:
                raise NotImplementedError(f"{node.operation_type} with non-constant axes") from exc
        module = OnnxReduceStaticAxes(
            operation_type=node.operation_type, axes=axes, keepdims=node.attributes.get("keepdims", 1)
        )
        mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
        return OperationConverterResult(torch_module=module, onnx_mapping=mapping)

    for op_type in _OPSET18_REDUCTIONS:
        if OperationDescription("", op_type, 18) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=op_type, version=18)(convert)


def unconvertible_ops(op_types: list[str], opset: int) -> list[str]:
    """Ops of the default domain that onnx2torch has no converter for at this opset (cheap: no conversion)."""
    _load_onnx2torch()
    from onnx2torch.node_converters.registry import get_converter

    missing = []
    for op_type in op_types:
        try:
            get_converter(op_type, opset)
        except NotImplementedError:
            missing.append(op_type)
    return missing


def _load_onnx2torch() -> Any:
    _torchvision_stand_in()
    try:
        from onnx2torch import convert
    except ImportError as exc:
        raise EngineError(
            f"pruning needs torch, torch-pruning and onnx2torch on the worker ({exc}); install them with "
            "`make serve` / `make test`, or pip install '.[prune]' and then onnx2torch --no-deps",
            code="pruning_unavailable",
        ) from exc
    _register_opset18_reductions()
    return convert


def _inline_identity_initializers(model: Any) -> None:
    """Legacy exports route shared weights through Identity nodes; onnx2torch's Conv converter needs
    the weight as an initializer, so such Identities are replaced by renamed initializer copies."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = type(initializers[node.input[0]])()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def onnx_to_torch(onnx_path: Path) -> Any:
    """The model as a torch.fx.GraphModule, or EngineError(`unsupported_op`) naming what cannot convert."""
    import onnx

    convert = _load_onnx2torch()
    model = onnx.load(str(onnx_path))
    _inline_identity_initializers(model)
    try:
        return convert(model)
    except (
        NotImplementedError
    ) as exc:  # onnx2torch: "Converter is not implemented (OperationDescription(...))"
        raise EngineError(
            f"the model cannot be converted to PyTorch for pruning: {exc}", code="unsupported_op"
        ) from exc
    except Exception as exc:
        raise EngineError(
            f"the model cannot be converted to PyTorch for pruning: {type(exc).__name__}: {exc}",
            code="unsupported_op",
        ) from exc


def torch_to_onnx(module: Any, path: Path, inputs: list[TensorSpec], output_names: list[str]) -> Path:
    """Export with the original input/output names and a dynamic batch dim (legacy exporter, opset 17)."""
    import numpy as np
    import torch

    examples = tuple(
        torch.zeros(
            [1, *[dim if isinstance(dim, int) else 1 for dim in spec.shape[1:]]],
            dtype=getattr(torch, spec.dtype),
        )
        if np.dtype(spec.dtype).kind == "f"
        else torch.zeros(
            [1, *[dim if isinstance(dim, int) else 1 for dim in spec.shape[1:]]], dtype=torch.int64
        )
        for spec in inputs
    )
    dynamic = {spec.name: {0: "batch"} for spec in inputs if not isinstance(spec.batch_dim, int)}
    dynamic.update({name: {0: "batch"} for name in output_names} if dynamic else {})
    module.eval()
    torch.onnx.export(
        module,
        examples,
        str(path),
        input_names=[spec.name for spec in inputs],
        output_names=output_names,
        dynamic_axes=dynamic or None,
        opset_version=17,
        dynamo=False,
    )
    return path
