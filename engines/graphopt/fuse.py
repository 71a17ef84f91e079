"""ONNX Runtime's transformer optimizer, run for one model type, with an account of what it did.

The account has two halves: the optimizer's own counts per fused operator
(`get_fused_operator_statistics`), and what it left: the patterns the graph offered
(engines.graphopt.detect.fusable_patterns) counted again on the fused graph, each shortfall with
the optimizer's own words for it where it logged any (its fusions log why a pattern did not match,
at debug level, into loggers named after their modules) and ours where it did not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.errors import EngineError
from engines.graphopt.detect import FusionPlan, fusable_patterns
from engines.graphopt.graph import GraphIndex
from engines.graphopt.model_types import MODEL_TYPES

if TYPE_CHECKING:
    from onnx import GraphProto

#: The optimizer's modules (their loggers' names) whose messages explain each kind of fusion.
_FUSION_LOGGERS = {
    "attention": (
        "fusion_attention", "fusion_attention_clip", "fusion_gpt_attention", "fusion_gpt_attention_no_past",
        "fusion_attention_vae", "fusion_bart_attention", "fusion_rotary_attention",
    ),
    "layer_norm": ("fusion_layernorm", "fusion_skiplayernorm"),
    "rms_norm": ("fusion_simplified_layernorm", "fusion_skiplayernorm"),
    "rotary": ("fusion_rotary_attention",),
    "gelu": (
        "fusion_gelu", "fusion_biasgelu", "fusion_fastgelu", "fusion_quickgelu", "fusion_gelu_approximation",
    ),
    "embedding": ("fusion_embedlayer",),
}  # fmt: skip
#: Kinds whose module logs for another kind too, told apart by the function its messages start with.
_LOGGED_BY = {"rotary": "fuse_rotary_embeddings"}
#: What each kind of pattern becomes when fused.
FUSED_FAMILIES = {
    "attention": ("Attention", "MultiHeadAttention", "GroupQueryAttention"),
    "layer_norm": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                   "SkipSimplifiedLayerNormalization"),
    "gelu": ("Gelu", "BiasGelu", "FastGelu", "GemmFastGelu", "QuickGelu"),
    "embedding": ("EmbedLayerNormalization",),
}  # fmt: skip
#: Messages kept per kind of fusion: the first distinct ones say enough.
MAX_REASONS = 3
#: The optimizer keeps state in module-level loggers and is not documented as thread-safe.
_LOCK = threading.Lock()


@dataclass
class FusionResult:
    path: Path
    seconds: float
    #: Fused operator -> count (only those it made), from the optimizer's statistics.
    fused: dict[str, int]
    #: Each kind of pattern left unfused: {"fusion", "expected", "left", "reason"}.
    not_fused: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fused_anything(self) -> bool:
        return any(self.fused.values())


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _optimizer_messages() -> Iterator[_Collect]:
    """The optimizer's log records while it runs, kept from the service's own log (where they would
    read as warnings of ours) and returned for the report."""
    from onnxruntime.transformers import optimizer  # noqa: F401  (creates its modules' loggers)

    explaining = {name for names in _FUSION_LOGGERS.values() for name in names}
    quiet = {"optimizer", "onnx_model", "fusion_base", "fusion_utils", "onnx_model_bert", "onnx_model_gpt2"}
    loggers = [logging.getLogger(name) for name in sorted(explaining | quiet)]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    collect = _Collect()
    for lg in loggers:
        if lg.name in explaining:  # their debug messages say why a pattern did not match
            lg.setLevel(logging.DEBUG)
        lg.propagate = False
        lg.addHandler(collect)
    try:
        yield collect
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(collect)
            lg.setLevel(level)
            lg.propagate = propagate


def _reasons(records: list[logging.LogRecord], kind: str) -> list[str]:
    """The optimizer's distinct messages about one kind of fusion, first ones first."""
    modules = set(_FUSION_LOGGERS[kind])
    seen: list[str] = []
    for record in records:
        if record.name not in modules or record.levelno == logging.INFO:  # INFO: progress and counts
            continue
        text = " ".join(record.getMessage().split())
        claimed = next((other for other, prefix in _LOGGED_BY.items() if text.startswith(prefix)), None)
        if claimed != (kind if kind in _LOGGED_BY else None):  # another kind's, in a shared module
            continue
        if text and text not in seen and not text.lower().startswith(("start ", "fused ")):
            seen.append(text[:240])
    return seen[:MAX_REASONS]


def _shortfalls(
    before: dict[str, int],
    after: dict[str, int],
    fused: dict[str, int],
    plan: FusionPlan,
    records: list[logging.LogRecord],
) -> list[dict[str, Any]]:
    """Each kind of pattern the graph offered that the fused graph still has written out."""
    model_type = MODEL_TYPES[plan.model_type]  # type: ignore[index]
    counted = {
        "attention": "attention",
        "layer_norm": "layer_norm_decomposed",
        "rms_norm": "rms_norm_decomposed",
        "rotary": "rotary",
        "gelu": "gelu",
    }
    left = {kind: after[key] for kind, key in counted.items()}
    expected = {kind: before[key] for kind, key in counted.items()}
    own = {
        "attention": (
            f"the blocks' pattern did not match ONNX Runtime's {model_type.ort_type} attention fusion"
        ),
        "layer_norm": "the written-out LayerNorm did not match ONNX Runtime's LayerNorm fusion",
        "rms_norm": (
            "the written-out RMSNorm did not match ONNX Runtime's SimplifiedLayerNormalization fusion"
        ),
        "rotary": (
            f"the rotary embeddings (rotate_half, cos and sin) did not match ONNX Runtime's "
            f"{model_type.ort_type} RotaryEmbedding fusion"
        ),
        "gelu": (
            "the written-out GELU did not match ONNX Runtime's GELU fusions (approximations are not "
            "applied: they change outputs)"
        ),
    }
    found = []
    for kind in counted:
        if left[kind]:
            reasons = _reasons(records, kind)
            found.append({
                "fusion": kind,
                "expected": expected[kind],
                "left": left[kind],
                "reason": "; ".join(reasons) if reasons else own[kind],
            })  # fmt: skip
    if model_type.embeddings and not fused.get("EmbedLayerNormalization"):
        reasons = _reasons(records, "embedding")
        found.append({
            "fusion": "embedding",
            "expected": 1,
            "left": 1,
            "reason": "; ".join(reasons) if reasons else
            "the embeddings (word, position, token type, then LayerNorm) did not match ONNX Runtime's "
            "EmbedLayerNormalization fusion",
        })  # fmt: skip
    return found


def _fused_counts(optimizer: Any, graph: GraphProto) -> dict[str, int]:
    if hasattr(optimizer, "get_fused_operator_statistics"):
        stats = optimizer.get_fused_operator_statistics()
    else:  # an OnnxModel subclass without statistics: count the fused operators ourselves
        ops = {op for family in FUSED_FAMILIES.values() for op in family}
        stats = {op: sum(node.op_type == op for node in graph.node) for op in ops}
    return {op: int(count) for op, count in sorted(stats.items()) if count}


def fuse(model_path: Path, plan: FusionPlan, out_path: Path) -> FusionResult:
    """Run ONNX Runtime's optimizer for the plan's model type, heads and hidden size (no GPU-only or
    approximating fusions), write the fused model to `out_path`, and account for it."""
    assert plan.model_type is not None and plan.num_heads and plan.hidden_size
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[plan.model_type]
    original = onnx.load(str(model_path), load_external_data=False)
    before = fusable_patterns(GraphIndex(original.graph))
    external = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in original.graph.initializer)
    del original
    options = FusionOptions(model_type.ort_type)
    options.enable_gelu_approximation = False  # tanh for erf changes outputs
    started = time.perf_counter()
    try:
        with _LOCK, _optimizer_messages() as messages:
            optimizer = optimize_model(
                str(model_path),
                model_type=model_type.ort_type,
                num_heads=plan.num_heads,
                hidden_size=plan.hidden_size,
                optimization_options=options,
                use_gpu=False,
            )
            fused_graph = optimizer.model.graph
            fused = _fused_counts(optimizer, fused_graph)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            optimizer.save_model_to_file(str(out_path), use_external_data_format=external)
    except Exception as exc:  # the optimizer's own failure: the caller keeps the unfused model
        raise EngineError(
            f"ONNX Runtime's transformer optimizer failed on this {plan.model_type} model: "
            f"{type(exc).__name__}: {str(exc)[:300]}",
            code="fusion_failed",
        ) from exc
    after = fusable_patterns(GraphIndex(fused_graph))
    return FusionResult(
        out_path,
        time.perf_counter() - started,
        fused,
        _shortfalls(before, after, fused, plan, messages.records),
    )
