"""Dynamic INT8 (precision `int8-dynamic`): MatMul weights in int8, activations quantized at run time.

ONNX Runtime's `quantize_dynamic` stores each MatMul's constant weight as int8 and puts a
DynamicQuantizeLinear before it, which finds the activation's range on every call (uint8, per
tensor: the only activation type ONNX Runtime's MatMulInteger kernels take). No calibration set is
needed, and no range learned on one set clips another: why it is the usual INT8 for transformers
(sentence-transformers' benchmark: ONNX dynamic INT8 3.08× PyTorch fp32 on short texts on a CPU).

Settings, and why:
- per-channel weights by default: on MiniLM-L3 (the corpus's embedder) per-tensor weights kept a
  cosine of 0.977 to the fp32 sentence embeddings, per-channel 0.998;
- `reduce_range` (7-bit weights) on CPUs without VNNI/AMX, for the same reason as static INT8
  (engines.quantize.methods.reduce_range_for: u8×s8 products saturate in 16 bits there);
- Gemm rewritten as MatMul first (engines.quantize.matmul_weights.gemm_as_matmul): the quantizer
  has no integer Gemm, and a Linear on 2-D inputs is exported as one;
- op types: MatMul (and the Gemms made MatMuls) and fused Attention by default; Gather (embedding
  tables in uint8: a smaller file, no faster) and LSTM on request. Conv is not offered: ONNX
  Runtime's ConvInteger is slower than its float convolutions on the CPU.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.errors import EngineError
from engines.quantize.int8 import prepare_float_model
from engines.quantize.matmul_weights import gemm_as_matmul, matmul_weights
from engines.quantize.methods import QuantizeResult, reduce_range_for

#: The op types a recipe may ask to quantize dynamically (Gemm through its MatMul form).
DYNAMIC_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Attention", "Gather", "LSTM")
DEFAULT_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Attention")
#: The search tries dynamic INT8 where MatMul/Gemm/Attention weights are at least this share of the
#: weights compute ops read: below it the arithmetic is in convolutions, which it leaves in float.
DYNAMIC_MIN_COMPUTE_SHARE = 0.5
#: The ops quantize_dynamic writes: how much of the model it reached.
_INTEGER_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM", "QGemm", "ConvInteger"}
)
#: quantize_dynamic writes external data above this size (protobuf's limit is 2 GiB).
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class DynamicConfig:
    """How `int8-dynamic` quantizes (the recipe's `dynamic`)."""

    per_channel: bool = True
    reduce_range: bool | None = None  # None: decided from the CPU's features
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    nodes_to_exclude: tuple[str, ...] = ()


def dynamic_not_applicable(model_path: Path) -> str | None:
    """Why dynamic INT8 cannot quantize this model (it has no constant MatMul/Gemm weight), or None."""
    weights = matmul_weights(model_path)
    if weights.nodes == 0:
        return (
            "dynamic INT8 quantizes the constant weights of MatMul, Gemm and Attention nodes, and this "
            "model has none (its weights are read by other ops, e.g. convolutions): use precision int8 "
            "with a calibration set"
        )
    return None


def dynamic_does_not_pay(model_path: Path) -> str | None:
    """Why the search leaves dynamic INT8 out for this model although it applies, or None."""
    weights = matmul_weights(model_path)
    if weights.share_of_compute < DYNAMIC_MIN_COMPUTE_SHARE:
        return (
            f"dynamic INT8 reaches MatMul/Gemm/Attention weights only, and they hold "
            f"{weights.share_of_compute:.0%} of the weights this model computes with (the rest are "
            "convolutions, left in float): static int8 quantizes those"
        )
    return None


def quantize_dynamic_int8(
    model_path: Path,
    workdir: Path,
    config: DynamicConfig,
    *,
    cpu_features: list[str],
    check_cancelled: Callable[[], None] = lambda: None,
) -> QuantizeResult:
    """The model with its MatMul weights in int8 and activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reason = dynamic_not_applicable(model_path)
    if reason is not None:
        raise EngineError(reason, code="quantization_not_applicable")
    started = time.perf_counter()
    float_path, messages = prepare_float_model(model_path, workdir, "cpu")
    check_cancelled()
    model = onnx.load(str(float_path))
    rewritten = gemm_as_matmul(model) if "Gemm" in config.op_types else 0
    if rewritten:
        float_path = workdir / "float-dynamic.onnx"
        onnx.save_model(model, str(float_path))
        messages.append(f"{rewritten} Gemm node(s) written as MatMul + Add, so that they are quantized")
    del model
    reduce_range, range_reason = reduce_range_for(cpu_features)
    if config.reduce_range is not None:
        reduce_range, range_reason = config.reduce_range, "set by the recipe"
    op_types = sorted({"MatMul" if op == "Gemm" else op for op in config.op_types})
    out_path = workdir / "model-int8-dynamic.onnx"
    try:
        quantize_dynamic(
            str(float_path),
            str(out_path),
            per_channel=config.per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
            nodes_to_exclude=list(config.nodes_to_exclude),
            use_external_data_format=float_path.stat().st_size >= _EXTERNAL_DATA_BYTES,
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:
        raise EngineError(
            f"dynamic INT8 quantization failed: {type(exc).__name__}: {str(exc)[:300]}",
            code="quantization_failed",
        ) from exc
    integer_ops = _integer_ops(out_path)
    if not integer_ops:
        messages.append(
            "ONNX Runtime's dynamic quantizer quantized no node of this model (its MatMuls sit inside "
            "If/Loop/Scan subgraphs or read weights computed at run time): this engine computes in float"
        )
    return QuantizeResult(
        out_path,
        {
            "dynamic": {
                "per_channel": config.per_channel,
                "reduce_range": reduce_range,
                "reduce_range_reason": range_reason,
                "op_types": list(config.op_types),
                "nodes_kept_float": list(config.nodes_to_exclude),
                "activation_type": "uint8, per tensor, range found on every call",
                "weight_type": "int8 symmetric" + (", per channel" if config.per_channel else ", per tensor"),
                "integer_ops": integer_ops,
                "gemm_rewritten": rewritten,
                "weights": matmul_weights(model_path).to_dict(),
            },
            "quantize_seconds": time.perf_counter() - started,
        },
        messages,
    )


def _integer_ops(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node if node.op_type in _INTEGER_OPS).items()))
