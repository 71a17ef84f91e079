"""ONNX ⇄ PyTorch, for the stages that train or restructure a model (pruning, fine-tuning) and for
the PyTorch backends (`torch-cpu`, `torch-cuda`), which run the converted module.

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
from engines.ingest.signature import TensorSpec

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


def onnx_to_torch(onnx_path: Path, purpose: str = "pruning") -> Any:
    """The model as a torch.fx.GraphModule, or EngineError(`unsupported_op`) naming what cannot convert
    (and `purpose`, what the conversion was for)."""
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
            f"the model cannot be converted to PyTorch for {purpose}: {exc}", code="unsupported_op"
        ) from exc
    except Exception as exc:
        raise EngineError(
            f"the model cannot be converted to PyTorch for {purpose}: {type(exc).__name__}: {exc}",
            code="unsupported_op",
        ) from exc


def check_prunable_layout(inputs: list[TensorSpec]) -> None:
    """The pruning path feeds and exports samples along dim 0: refuse other layouts, naming them."""
    other = [f"'{spec.name}' (batch axis {spec.batch_axis})" for spec in inputs if spec.batch_axis != 0]
    if other:
        raise EngineError(
            f"pruning needs every input's batch in dim 0; {', '.join(other)} differ",
            code="unsupported_layout",
        )


def example_batch(
    inputs: list[TensorSpec], data: dict[str, Any] | None = None, size: int = 2
) -> tuple[Any, ...]:
    """Example inputs for tracing: real samples when given, else zeros of each input's dtype and shape.
    A static batch dim wins over `size`."""
    import numpy as np
    import torch

    examples = []
    for spec in inputs:
        batch = spec.batch_dim if isinstance(spec.batch_dim, int) else size
        if data is not None:
            examples.append(torch.from_numpy(np.ascontiguousarray(data[spec.name][:batch])))
        else:
            dims = [batch, *[dim if isinstance(dim, int) else 1 for dim in spec.shape[1:]]]
            examples.append(torch.zeros(dims, dtype=getattr(torch, np.dtype(spec.dtype).name)))
    return tuple(examples)


def first_output(result: Any) -> Any:
    """onnx2torch modules return a tensor for one output and a sequence for several: the first."""
    return result[0] if isinstance(result, list | tuple) else result


def torch_to_onnx(module: Any, path: Path, inputs: list[TensorSpec], output_names: list[str]) -> Path:
    """Export with the original input/output names, dtypes and batch dims (legacy exporter, opset 17)."""
    import torch

    dynamic: dict[str, dict[int, str]] = {}
    for spec in inputs:
        if not isinstance(spec.batch_dim, int):
            dynamic[spec.name] = {0: spec.batch_dim or "batch"}
    if dynamic:
        batch_name = next(iter(dynamic.values()))[0]
        dynamic.update({name: {0: batch_name} for name in output_names})
    module.eval()
    torch.onnx.export(
        module,
        example_batch(inputs, None, size=1),
        str(path),
        input_names=[spec.name for spec in inputs],
        output_names=output_names,
        dynamic_axes=dynamic or None,
        opset_version=17,
        dynamo=False,
    )
    return path


def check_same_signature(before: list[TensorSpec], after: list[TensorSpec], what: str) -> None:
    """Names, dtypes and static non-batch dims must survive a transformation; EngineError otherwise."""
    described = [
        (spec.name, spec.dtype, spec.rank, [d for d in spec.shape[1:] if isinstance(d, int)])
        for spec in before
    ]
    now = [
        (spec.name, spec.dtype, spec.rank, [d for d in spec.shape[1:] if isinstance(d, int)])
        for spec in after
    ]
    if described != now:
        raise EngineError(f"the {what} changed: {described} became {now}", code="signature_changed")


def torch_outputs(module: Any, data: Any, batch_size: int = 64) -> Any:
    """The module's first output over a whole engines.ingest.datasets.Dataset, as one numpy array."""
    import numpy as np
    import torch

    module.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, data.samples, batch_size):
            inputs = tuple(
                torch.from_numpy(array[start : start + batch_size]) for array in data.inputs.values()
            )
            chunks.append(first_output(module(*inputs)).numpy())
    return np.concatenate(chunks)


def module_calls(module: Any) -> dict[str, int] | None:
    """How many times the traced graph of an onnx2torch module calls each submodule (by target name),
    or None for a module without a graph. A layer called more than once shares its weights between
    places, so a rewrite that assumes one call site (a BatchNorm inserted after it, an activation
    fused into it) must leave it alone."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls
