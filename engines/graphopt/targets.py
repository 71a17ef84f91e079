"""Which backend, at which precision, starts from the fused graph, and why: each rule stated once.

The fused graph is made of ONNX Runtime's contrib operators (domain com.microsoft: Attention,
SkipLayerNormalization, EmbedLayerNormalization, BiasGelu, ...):
- ONNX Runtime runs them, and OpenVINO's ONNX frontend reads them too (checked on MiniLM-L3's fused
  graph: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu); both also fuse on
  their own at load time (ONNX Runtime's level-2 optimizations fuse GELU, LayerNorm and the scaled
  Q·Kᵀ; OpenVINO its attention and normalization), so neither is assumed to gain: each gets the
  faster of the two models on its own runner, timed side by side (engines.graphopt.stage). On this
  project's 2-core Xeon (AVX-512 VNNI) with ONNX Runtime 1.32, MiniLM-L3 fused ran 0.83-0.93× as
  fast as unfused at batch 1, sequence 128 (bench.graphopt), so a rule "fused is faster" would
  have been wrong exactly where the issue expected the gain;
- TensorRT's parser and onnx2torch (torch-cpu, torch-cuda) have no com.microsoft operators: they
  get the unfused model, and fuse on their own terms.

Precisions differ in what they can do with a fused graph: fp32 and fp16 (ONNX Runtime's float16
converter knows the contrib operators) and dynamic INT8 (`quantize_dynamic` turns Attention into
QAttention) start from it; static QDQ INT8 has no quantizer for Attention (it would leave the Q, K
and V projections in float), and weight-only quantization (MatMulNBits) quantizes MatMul weights
only, which the fused Attention holds: both start from the unfused model.
"""

from __future__ import annotations

#: The backends that can run the fused graph; each gets it only where it measured faster.
FUSED_GRAPH_READERS: frozenset[str] = frozenset({"onnxruntime-cpu", "openvino-cpu"})
#: Why a backend not in FUSED_GRAPH_READERS gets the unfused model.
UNREADABLE = "its ONNX reader has no ONNX Runtime contrib (com.microsoft) operators; it fuses on its own"

#: Precision -> whether its variant starts from the fused graph, and why.
PRECISION_SOURCES: dict[str, tuple[bool, str]] = {
    "fp32": (True, "the fused graph as it is"),
    "fp16": (True, "ONNX Runtime's float16 converter keeps the fused operators"),
    "int8-dynamic": (True, "dynamic quantization turns the fused Attention into QAttention"),
    "int8": (
        False,
        "static QDQ INT8 has no quantizer for the fused Attention (it would leave the Q, K and V "
        "projections in float): quantized from the unfused model",
    ),
    "int8-weight": (
        False,
        "weight-only quantization reaches MatMul weights only, which the fused Attention holds",
    ),
    "int4-weight": (
        False,
        "weight-only quantization reaches MatMul weights only, which the fused Attention holds",
    ),
}
UNKNOWN_PRECISION = "not known to start from a fused graph: built from the unfused model"


def precision_takes_fused(precision: str) -> tuple[bool, str]:
    """Whether a variant of `precision` is built from the fused graph, and why."""
    return PRECISION_SOURCES.get(precision, (False, UNKNOWN_PRECISION))
