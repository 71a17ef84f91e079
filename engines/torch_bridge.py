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

    _torchvision_stand_in()
    try:
        from onnx2torch import convert
    except ImportError as exc:
        raise EngineError(
            f"pruning needs torch, torch-pruning and onnx2torch on the worker ({exc}); install them with "
            "`make serve` / `make test`, or pip install '.[prune]' and then onnx2torch --no-deps",
            code="pruning_unavailable",
        ) from exc

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
