"""The model types the stage fuses: each maps onto one of ONNX Runtime's optimizer types.

A registry like the others (API enum, `GET /v1/capabilities`, the recipe checks read it): adding a
type is one `register(ModelType(...))`. `detected` types are the ones engines.graphopt.detect
recognises from a graph; the others are fused only when a recipe states them. A type whose ONNX
Runtime type the installed optimizer lacks (`optimizer_lacks`) is not fused: the model runs unfused
and the job says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class ModelType:
    name: str
    #: The `model_type` ONNX Runtime's `optimizer.optimize_model` takes.
    ort_type: str
    description: str
    #: engines.graphopt.detect recognises it from the graph (else: only when stated).
    detected: bool
    #: Whether ONNX Runtime's fusion for it also folds the embeddings (EmbedLayerNormalization).
    embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODEL_TYPES: dict[str, ModelType] = {}


def register(model_type: ModelType) -> ModelType:
    MODEL_TYPES[model_type.name] = model_type
    return model_type


register(
    ModelType(
        "bert",
        "bert",
        "encoders over token ids (BERT, RoBERTa, MiniLM, DistilBERT, sentence embedders): token "
        "embeddings, bidirectional attention with a padding mask",
        detected=True,
        embeddings=True,
    )
)
register(
    ModelType(
        "vit",
        "vit",
        "image encoders (ViT, DeiT, CLIP's and DINO's vision towers): a patch-embedding convolution, "
        "then transformer blocks",
        detected=True,
    )
)
register(
    ModelType(
        "gpt2",
        "gpt2",
        "decoders (GPT-2 and kin): causal self-attention over token ids",
        detected=True,
    )
)
register(
    ModelType(
        "clip",
        "clip",
        "CLIP's text encoder: causal attention with QuickGELU (x·sigmoid(1.702x)) activations",
        detected=True,
    )
)
register(
    ModelType(
        "llama",
        "qwen3",
        "decoders with RMSNorm (Llama, Mistral, Qwen, SmolLM): causal self-attention, usually rotary "
        "positions and grouped-query attention. ONNX Runtime's qwen3 type (its decoder-only type for "
        "RoPE, GQA and RMSNorm; no mask format, no embedding fusion) fuses the RMSNorms into "
        "SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization",
        detected=True,
    )
)
register(
    ModelType(
        "swin",
        "swin",
        "Swin transformers: windowed attention with a relative position bias (state it: it reads as vit)",
        detected=False,
    )
)
register(ModelType("t5", "t5", "T5 encoders and decoders (RMS norm, relative position bias)", detected=False))
register(ModelType("bart", "bart", "BART encoder-decoders", detected=False))


def model_type_names() -> tuple[str, ...]:
    return tuple(MODEL_TYPES)


@cache
def optimizer_lacks(name: str) -> str | None:
    """Why the installed ONNX Runtime's transformer optimizer cannot fuse this type (it has no such
    model type: `qwen3`, which llama maps onto, is recent), or None."""
    try:
        import onnxruntime
        from onnxruntime.transformers.optimizer import MODEL_TYPES as ORT_TYPES
    except ImportError:  # the optimizer ships with onnxruntime; a build without it fuses nothing
        return "ONNX Runtime's transformer optimizer is not installed"
    ort_type = MODEL_TYPES[name].ort_type
    if ort_type in ORT_TYPES:
        return None
    return (
        f"ONNX Runtime {onnxruntime.__version__}'s transformer optimizer has no '{ort_type}' model type "
        f"(the one {name} maps onto): a newer ONNX Runtime fuses it"
    )
