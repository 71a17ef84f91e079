"""A transformer's model type, attention heads and hidden size, read from its ONNX graph.

ONNX Runtime's optimizer needs all three (it detects heads itself only for some types, and a wrong
guess silently fuses nothing). The graph shows them where exporters put them:
- **attention**: a Softmax whose input comes from a MatMul of two computed tensors (Q·Kᵀ, through
  the scale, the padding mask or a causal Where) and whose output feeds another (·V);
- **heads**: the Reshape that splits Q (or K, V) into heads: its target shape `[batch, seq, heads,
  head_size]` (`[batch, seq, 3, heads, head_size]` for a fused QKV), as an initializer, a Constant or
  a Concat of run-time dims and constants (PyTorch's exporter writes the last);
- **hidden size**: heads × head size, checked against the width of the Q projection's weight (a
  MatMul or Gemm, 3× as wide for a fused QKV) and the LayerNorm widths;
- **model type**: a causal mask makes a decoder (gpt2, or clip with QuickGELU), a patch-embedding
  convolution (kernel = stride) an image encoder (vit), token embeddings (a Gather from an integer
  input) a text encoder (bert). Anything else with attention is not identified: stated, it fuses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.errors import InvalidRecipeError
from engines.graphopt.config import GraphOptConfig
from engines.graphopt.graph import GraphIndex
from engines.graphopt.model_types import MODEL_TYPES

if TYPE_CHECKING:  # onnx is imported where a graph is read, not when the API starts
    from onnx import ModelProto, NodeProto

#: ONNX Runtime's fused transformer operators (domain com.microsoft): a graph that has them was
#: optimized already.
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "QuickGelu",
)
#: Between a Softmax and the Q·Kᵀ MatMul: the scale, the padding mask, a causal Where.
_SCORE_PATH = ("Add", "Div", "Mul", "Where", "Cast", "Sub", "Reshape")
#: Between the head-splitting Reshape and Q·Kᵀ (or ·V): transposes, the scale, a fused QKV's pick.
_HEAD_PATH = ("Transpose", "Mul", "Div", "Cast", "Gather", "Split", "Squeeze", "Slice", "Sqrt")
#: Between the Q projection and the head-splitting Reshape: its bias, a fused QKV's split.
_PROJECTION_PATH = ("Add", "Split", "Slice", "Gather", "Squeeze", "Cast")
#: Codes of the 422s a recipe's graph_optimization section can earn.
MISMATCH = "graph_optimization_mismatch"
HEADS_UNKNOWN = "attention_heads_unknown"


@dataclass(frozen=True)
class AttentionSite:
    """One attention block as the graph shows it."""

    softmax: str
    num_heads: int | None
    head_size: int | None
    projection_width: int | None  # the Q projection's output width (3× hidden for a fused QKV)
    model_width: int | None  # the Q projection's input width
    causal: bool


@dataclass(frozen=True)
class Detection:
    model_type: str | None
    num_heads: int | None
    hidden_size: int | None
    attention_blocks: int
    #: How the type was recognised, or why it was not.
    type_reason: str
    #: Where the heads and hidden size were read, or why they could not be.
    heads_reason: str
    layer_norm_widths: tuple[int, ...] = ()
    #: What the graph offers to fuse (engines.graphopt.detect.fusable_patterns).
    patterns: dict[str, int] = field(default_factory=dict)
    #: ONNX Runtime's fused operators already in the graph.
    already_fused: dict[str, int] = field(default_factory=dict)

    @property
    def is_transformer(self) -> bool:
        return self.attention_blocks > 0 or bool(self.already_fused)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FusionPlan:
    """What the optimizer is run with, or why it is not run (`skip`)."""

    model_type: str | None = None
    num_heads: int | None = None
    hidden_size: int | None = None
    skip: str | None = None
    detection: Detection | None = None
    #: Which values were stated in the recipe rather than detected.
    stated: tuple[str, ...] = ()


# ---------------------------------------------------------------- the graph's patterns


def _is_attention_matmul(index: GraphIndex, node: NodeProto | None) -> bool:
    return node is not None and node.op_type == "MatMul" and len(index.activation_inputs(node)) == 2


def _head_split(index: GraphIndex, tensor: str) -> tuple[int | None, int | None, NodeProto | None]:
    """(heads, head size, the Reshape) from the Reshape that splits `tensor`'s source into heads."""
    reshape, _ = index.walk_up(tensor, _HEAD_PATH, ("Reshape",))
    if reshape is None:
        return None, None, None
    shape = index.shape_values(reshape.input[1])
    if shape is None or len(shape) not in (4, 5):
        return None, None, reshape
    heads, size = shape[-2], shape[-1]
    return (heads if heads and heads > 0 else None), (size if size and size > 0 else None), reshape


def _projection(index: GraphIndex, reshape: NodeProto | None) -> tuple[int | None, int | None]:
    """(output width, input width) of the MatMul/Gemm whose weight projects into `reshape`."""
    if reshape is None:
        return None, None
    node, _ = index.walk_up(reshape.input[0], _PROJECTION_PATH, ("MatMul", "Gemm"))
    if node is None or len(node.input) < 2:
        return None, None
    dims = index.dims(node.input[1])
    if dims is None or len(dims) != 2:
        return None, None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (dims[0], dims[1]) if trans_b else (dims[1], dims[0])
    return dims[1], dims[0]


def _is_triangular(values: np.ndarray) -> bool:
    """A causal mask: square in its last two dims, with the part above the diagonal set apart (False,
    or a large negative) and the rest not."""
    if values.ndim < 2 or values.shape[-1] != values.shape[-2] or values.shape[-1] < 2:
        return False
    square = values.reshape(-1, values.shape[-2], values.shape[-1])[0]
    upper = np.triu(np.ones(square.shape, dtype=bool), 1)
    if square.dtype == bool:
        return bool((~square[upper]).all() and square[~upper].all())
    return bool((square[upper] < -1e3).all() and (square[~upper] > -1e3).all())


def _causal(index: GraphIndex, passed: list[NodeProto]) -> bool:
    """A causal mask on the scores: a Where, a Trilu, or a triangular constant added to them."""
    for node in passed:
        if node.op_type == "Where":
            return True
        if node.op_type == "Add":
            for name in node.input:
                value = index.value(name)
                if value is not None and _is_triangular(np.asarray(value)):
                    return True
                trilu, _ = index.walk_up(
                    name, ("Cast", "Mul", "Sub", "Expand", "Slice", "Unsqueeze"), ("Trilu",), 5
                )
                if trilu is not None:
                    return True
    return False


def attention_sites(index: GraphIndex) -> list[AttentionSite]:
    """Every attention block: a Softmax between Q·Kᵀ and ·V."""
    sites = []
    for softmax in (node for node in index.nodes if node.op_type == "Softmax"):
        scores, passed = index.walk_up(softmax.input[0], _SCORE_PATH, ("MatMul",), max_hops=6)
        context = index.walk_down(softmax.output[0], ("Dropout", "Cast"), ("MatMul",))
        if not (_is_attention_matmul(index, scores) and _is_attention_matmul(index, context)):
            continue
        assert scores is not None and context is not None
        found = [_head_split(index, name) for name in (scores.input[0], scores.input[1], context.input[1])]
        heads = next((h for h, _, _ in found if h), None)
        size = next((s for _, s, _ in found if s), None)
        widths = [_projection(index, reshape) for _, _, reshape in found]
        out_width = next((w for w, _ in widths if w), None)
        in_width = next((w for _, w in widths if w), None)
        if heads is None and size and out_width:  # [b, s, -1, head_size]
            attention_width = in_width if in_width and out_width == 3 * in_width else out_width
            heads = attention_width // size if attention_width % size == 0 else None
        if size is None and heads and out_width:  # [b, s, heads, -1]
            attention_width = in_width if in_width and out_width == 3 * in_width else out_width
            size = attention_width // heads if attention_width % heads == 0 else None
        sites.append(AttentionSite(softmax.name, heads, size, out_width, in_width, _causal(index, passed)))
    return sites


def _layer_norm_widths(index: GraphIndex) -> tuple[int, ...]:
    widths = set()
    for node in index.nodes:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization") and len(node.input) > 1:
            dims = index.dims(node.input[1 if node.op_type == "LayerNormalization" else 2])
            if dims and len(dims) == 1:
                widths.add(dims[0])
    return tuple(sorted(widths))


def _decomposed_layer_norms(index: GraphIndex) -> int:
    """LayerNorms written out (x - mean(x), its variance, the division): a ReduceMean whose output is
    subtracted from its own input."""
    count = 0
    for node in index.nodes:
        if node.op_type != "ReduceMean":
            continue
        if any(
            c.op_type == "Sub" and c.input[0] == node.input[0]
            for c in index.consumers.get(node.output[0], [])
        ):
            count += 1
    return count


def _scalar(index: GraphIndex, node: NodeProto) -> float | None:
    for name in node.input:
        value = index.value(name)
        if value is not None and np.asarray(value).size == 1:
            return float(np.asarray(value).reshape(-1)[0])
    return None


def _gelus(index: GraphIndex) -> dict[str, int]:
    """GELUs written out: exact (Erf), tanh approximation (x³ under Tanh), QuickGELU (sigmoid(1.702x))."""
    found = Counter()
    for node in index.nodes:
        if node.op_type == "Erf":
            found["gelu_erf"] += 1
        elif node.op_type == "Pow" and _scalar(index, node) == 3.0:
            found["gelu_tanh"] += 1
        elif node.op_type == "Sigmoid":
            source = index.producer.get(node.input[0])
            if (
                source is not None
                and source.op_type == "Mul"
                and abs((_scalar(index, source) or 0) - 1.702) < 1e-3
            ):
                found["quick_gelu"] += 1
    return dict(found)


def _token_embedding(index: GraphIndex) -> bool:
    """A Gather from a 2-D table whose indices come from an integer graph input (token ids)."""
    from onnx import TensorProto

    integer_inputs = {
        value.name
        for value in index.inputs
        if value.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)
    }
    for node in index.nodes:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        dims = index.dims(node.input[0])
        if dims is None or len(dims) != 2:
            continue
        source = node.input[1]
        for _ in range(3):
            if source in integer_inputs:
                return True
            producer = index.producer.get(source)
            if producer is None or producer.op_type not in ("Cast", "Unsqueeze", "Reshape"):
                break
            source = producer.input[0]
    return False


def _patch_embedding(index: GraphIndex) -> bool:
    """A convolution with stride equal to its kernel (> 1) on a 4-D graph input: image patches."""
    image_inputs = {value.name for value in index.inputs if len(value.type.tensor_type.shape.dim) == 4}
    for node in index.nodes:
        if node.op_type != "Conv":
            continue
        attributes = {a.name: list(a.ints) for a in node.attribute}
        kernel, strides = attributes.get("kernel_shape"), attributes.get("strides")
        if not (kernel and kernel == strides and min(kernel) > 1):
            continue
        source = node.input[0]
        for _ in range(4):  # through the preprocessing an exporter may have kept (scale, layout)
            if source in image_inputs:
                return True
            producer = index.producer.get(source)
            if producer is None or producer.op_type not in ("Cast", "Sub", "Div", "Mul", "Transpose"):
                break
            source = index.activation_inputs(producer)[0] if index.activation_inputs(producer) else ""
    return False


def fusable_patterns(index: GraphIndex, sites: list[AttentionSite] | None = None) -> dict[str, int]:
    """What a graph offers the optimizer: attention blocks, LayerNorms (as operators, and written
    out), GELUs written out. Counted again on the fused graph, it says what was left unfused."""
    gelus = _gelus(index)
    return {
        "attention": len(attention_sites(index) if sites is None else sites),
        "layer_norm": index.count("LayerNormalization"),
        "layer_norm_decomposed": _decomposed_layer_norms(index),
        "gelu": sum(gelus.values()),
        **gelus,
    }


# ---------------------------------------------------------------- detection


def _agreed(values: list[int | None]) -> tuple[int | None, bool]:
    """The most common known value, and whether every known value agrees with it."""
    known = [value for value in values if value]
    if not known:
        return None, True
    common = Counter(known).most_common(1)[0][0]
    return common, all(value == common for value in known)


def detect(model: ModelProto) -> Detection:
    """The model type, heads and hidden size this graph shows (engines.graphopt.detect's docstring)."""
    index = GraphIndex(model.graph)
    already = {
        op: count
        for op in FUSED_OPS
        if (count := sum(n.op_type == op and n.domain == "com.microsoft" for n in index.nodes))
    }
    sites = attention_sites(index)
    widths = _layer_norm_widths(index)
    patterns = fusable_patterns(index, sites)
    if not sites:
        reason = (
            "already optimized: it has ONNX Runtime's fused operators "
            + ", ".join(f"{op} ×{count}" for op, count in already.items())
            if already
            else "no attention found (no Softmax between a Q·Kᵀ MatMul and a ·V MatMul)"
        )
        return Detection(None, None, None, 0, reason, "no attention", widths, patterns, already)
    heads, heads_agree = _agreed([site.num_heads for site in sites])
    sizes, _ = _agreed([site.head_size for site in sites])
    hidden = heads * sizes if heads and sizes else None
    if heads is None:
        heads_reason = (
            f"the {len(sites)} attention blocks split their heads with Reshape targets computed at run "
            "time, not constants, so the number of heads cannot be read from the graph"
        )
    else:
        heads_reason = f"{heads} heads of {sizes} from the Reshape that splits Q, K and V into heads" + (
            "" if heads_agree else " (the most common of the blocks' values)"
        )
    if hidden is None:
        out_width, _ = _agreed([site.projection_width for site in sites])
        in_width, _ = _agreed([site.model_width for site in sites])
        if out_width and in_width:
            hidden = in_width if out_width == 3 * in_width else out_width
        elif len(widths) == 1:
            hidden = widths[0]
    causal = any(site.causal for site in sites)
    quick_gelu = patterns.get("quick_gelu", 0) > 0
    if causal:
        model_type = "clip" if quick_gelu else "gpt2"
        type_reason = "causal self-attention" + (" with QuickGELU activations" if quick_gelu else "")
    elif _patch_embedding(index):
        model_type, type_reason = "vit", "a patch-embedding convolution (stride = kernel) before attention"
    elif _token_embedding(index):
        model_type, type_reason = (
            "bert",
            "token embeddings (a Gather from integer ids) before bidirectional attention",
        )
    else:
        model_type = None
        type_reason = (
            f"{len(sites)} attention blocks, but neither token embeddings (bert), a patch embedding "
            "(vit) nor a causal mask (gpt2, clip)"
        )
    assert model_type is None or model_type in MODEL_TYPES
    return Detection(
        model_type, heads, hidden, len(sites), type_reason, heads_reason, widths, patterns, already
    )


# ---------------------------------------------------------------- a recipe against the graph


def _how_to_state(model_type: str | None, heads: int | None, hidden: int | None) -> str:
    """The recipe section that states them, with what is known filled in and the rest named as the
    model's Hugging Face config.json names it."""
    values = {
        "model_type": f'"{model_type}"' if model_type else "<one of " + "|".join(MODEL_TYPES) + ">",
        "num_heads": str(heads) if heads else "<num_attention_heads>",
        "hidden_size": str(hidden) if hidden else "<hidden_size>",
    }
    body = ", ".join(f'"{key}": {value}' for key, value in values.items())
    return (
        f'state them in the recipe: "graph_optimization": {{{body}}} (the model\'s config.json has '
        "num_attention_heads and hidden_size)"
    )


def plan_fusion(config: GraphOptConfig, detection: Detection) -> FusionPlan:
    """What to run the optimizer with, from what the recipe states and the graph shows.

    A model that is not identified (no attention, or a layout the detector does not know) is
    skipped with the reason when the recipe left everything to detection; stated values that
    disagree with the graph, and heads or hidden size that neither the recipe nor the graph gives,
    are an InvalidRecipeError naming how to state them (a 422 when the job is made)."""
    stated_type = config.stated_type
    stated = tuple(
        name
        for name, value in (
            ("model_type", stated_type),
            ("num_heads", config.num_heads),
            ("hidden_size", config.hidden_size),
        )
        if value is not None
    )
    if detection.already_fused:
        return FusionPlan(
            skip=f"the model was {detection.type_reason}; nothing left to fuse", detection=detection
        )
    if not detection.attention_blocks:
        if stated:
            raise InvalidRecipeError(
                f"the recipe states {', '.join(stated)} for graph optimization, but the graph has "
                f"{detection.type_reason}, so there is nothing to fuse: leave graph_optimization out "
                '(or "model_type": "off")',
                code=MISMATCH,
            )
        return FusionPlan(
            skip=f"not identified as a transformer: {detection.type_reason}; it runs unfused",
            detection=detection,
        )
    model_type = stated_type or detection.model_type
    if model_type is None:
        return FusionPlan(
            skip=(
                f"not identified as a model type the optimizer knows: {detection.type_reason}; it runs "
                f"unfused. To fuse it, name its type (one of {', '.join(MODEL_TYPES)}) and "
                + _how_to_state(None, detection.num_heads, detection.hidden_size)
            ),
            detection=detection,
        )
    heads, hidden = detection.num_heads, detection.hidden_size
    if config.num_heads is not None and heads is not None and config.num_heads != heads:
        raise InvalidRecipeError(
            f"the recipe states num_heads {config.num_heads}, but the graph's attention has {heads} heads "
            f"({detection.heads_reason}): state num_heads {heads}, or leave it out to use the detected value",
            code=MISMATCH,
            extra={"detected": {"num_heads": heads, "hidden_size": hidden}},
        )
    if config.hidden_size is not None:
        known = hidden or (detection.layer_norm_widths[0] if len(detection.layer_norm_widths) == 1 else None)
        if known is not None and config.hidden_size != known:
            raise InvalidRecipeError(
                f"the recipe states hidden_size {config.hidden_size}, but the graph's attention is "
                f"{known} wide: state hidden_size {known}, or leave it out to use the detected value",
                code=MISMATCH,
                extra={"detected": {"num_heads": heads, "hidden_size": known}},
            )
    heads = config.num_heads or heads
    hidden = config.hidden_size or hidden
    if heads is None or hidden is None:
        missing = " and ".join(
            name for name, value in (("num_heads", heads), ("hidden_size", hidden)) if value is None
        )
        raise InvalidRecipeError(
            f"the {model_type} model's {missing} could not be found in the graph ({detection.heads_reason}), "
            f"and the optimizer cannot fuse attention without them: "
            + _how_to_state(model_type, heads, hidden),
            code=HEADS_UNKNOWN,
            extra={"detected": {"model_type": model_type, "num_heads": heads, "hidden_size": hidden}},
        )
    if hidden % heads:
        raise InvalidRecipeError(
            f"hidden_size {hidden} is not a multiple of num_heads {heads}: every head must be as wide; "
            + _how_to_state(model_type, detection.num_heads, detection.hidden_size),
            code=MISMATCH,
        )
    return FusionPlan(model_type, heads, hidden, None, detection, stated)
