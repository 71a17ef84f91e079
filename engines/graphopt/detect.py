"""A transformer's model type, attention heads and hidden size, read from its ONNX graph.

ONNX Runtime's optimizer needs all three (it detects heads itself only for some types, and a wrong
guess silently fuses nothing). The graph shows them where exporters put them:
- **attention**: a Softmax whose input comes from a MatMul of two computed tensors (Q·Kᵀ, through
  the scale, the padding mask or a causal Where) and whose output feeds another (·V);
- **heads**: the Reshape that splits Q (or K, V) into heads: its target shape `[batch, seq, heads,
  head_size]` (`[batch, seq, 3, heads, head_size]` for a fused QKV), as an initializer, a Constant or
  a Concat of run-time dims and constants (PyTorch's exporter writes the last), found through rotary
  position embeddings (q·cos + rotate_half(q)·sin) and, for grouped-query attention, through the
  repeat of the K/V heads (Unsqueeze, Expand, Reshape) to the Reshape that split them;
- **hidden size**: heads × head size, checked against the width of the Q projection's weight (a
  MatMul or Gemm, 3× as wide for a fused QKV) and the LayerNorm widths;
- **causal mask**: what the scores' mask is computed from (every node above the Add or Where on the
  scores, up to Shape and the weights' ops): a Trilu, a triangular constant (GPT-2's `bias` buffer,
  read up to MASK_CONSTANT elements), or a comparison of two position ranges (Less, Greater…);
  a Where over a padding mask alone (DistilBERT's masked_fill) is not causal;
- **model type**: a causal mask makes a decoder: clip with QuickGELU, llama with RMSNorm
  (x / √(mean(x²) + ε), no mean subtracted; usually rotary positions and grouped-query attention
  too), gpt2 otherwise; a patch-embedding convolution (kernel = stride) an image encoder (vit);
  token embeddings (a Gather from an integer input) with LayerNorm a text encoder (bert). RMSNorm
  or rotary positions without a causal mask found are not identified (ONNX Runtime's bert fusion
  does not match them), nor is anything else with attention: stated, it fuses. A type the installed
  ONNX Runtime's optimizer does not have (llama maps onto its `qwen3`) runs unfused, and says so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.errors import InvalidRecipeError
from engines.graphopt.config import GraphOptConfig
from engines.graphopt.graph import SMALL_CONSTANT, GraphIndex
from engines.graphopt.model_types import MODEL_TYPES, optimizer_lacks

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
#: Between the head-splitting Reshape and Q·Kᵀ (or ·V): transposes, the scale, a fused QKV's pick,
#: rotary position embeddings (q·cos + rotate_half(q)·sin: an Add of two Muls).
_HEAD_PATH = ("Transpose", "Mul", "Div", "Cast", "Gather", "Split", "Squeeze", "Slice", "Sqrt", "Add")
#: Grouped-query attention's repeat of each K/V head for its group of query heads.
_REPEAT_PATH = ("Expand", "Tile", "Unsqueeze")
#: What a mask is searched above, not through: a Shape's input is read for its size only, and a mask
#: is not computed from the weights' operators.
_MASK_STOP = ("Shape", "MatMul", "Gemm", "Conv", "Softmax", "LayerNormalization")
#: Comparisons of two position ranges (j <= i) make a causal mask at run time.
_COMPARISONS = ("Less", "LessOrEqual", "Greater", "GreaterOrEqual")
#: A square constant under the scores is read up to this many elements to see whether it is
#: triangular (GPT-2's 1024×1024 `bias` buffer is 1 Mi booleans).
MASK_CONSTANT = 1 << 22
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
    kv_heads: int | None = None  # grouped-query attention: fewer K/V heads than query heads


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
    #: Grouped-query attention's key/value heads (None: as many as the query heads).
    kv_heads: int | None = None

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


def _repeats_heads(index: GraphIndex, reshape: NodeProto) -> bool:
    """A Reshape that merges K/V heads repeated for grouped-query attention (repeat_kv: Unsqueeze,
    Expand, Reshape to the query heads), not the one that split them."""
    source = index.producer.get(reshape.input[0])
    return source is not None and source.op_type in ("Expand", "Tile")


def _head_split(index: GraphIndex, tensor: str) -> tuple[int | None, int | None, NodeProto | None]:
    """(heads, head size, the Reshape) from the Reshape that splits `tensor`'s source into heads (for
    K and V of grouped-query attention: their own heads, above the repeat)."""
    reshape, _ = index.walk_up(tensor, _HEAD_PATH, ("Reshape",))
    if reshape is not None and _repeats_heads(index, reshape):
        reshape, _ = index.walk_up(reshape.input[0], (*_HEAD_PATH, *_REPEAT_PATH), ("Reshape",))
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
    """A causal mask: square in its last two dims, one value above the diagonal (False, 0, or a large
    negative) and another on and below it."""
    if values.ndim < 2 or values.shape[-1] != values.shape[-2] or values.shape[-1] < 2:
        return False
    square = values.reshape(-1, values.shape[-2], values.shape[-1])[0]
    upper = np.triu(np.ones(square.shape, dtype=bool), 1)
    above, below = square[upper], square[~upper]
    return bool((above == above[0]).all() and (below == below[0]).all() and above[0] != below[0])


def _triangular_constant(index: GraphIndex, name: str) -> bool:
    dims = index.dims(name)
    if dims is not None and (len(dims) < 2 or dims[-1] != dims[-2] or math.prod(dims) > MASK_CONSTANT):
        return False
    value = index.value(name, MASK_CONSTANT if dims is not None else SMALL_CONSTANT)
    return value is not None and _is_triangular(np.asarray(value))


def _from_positions(index: GraphIndex, name: str) -> bool:
    """A tensor computed from a Range (positions), not far above."""
    return any(node.op_type == "Range" for node in index.ancestors([name], _MASK_STOP, limit=16))


def _causal(index: GraphIndex, scores: NodeProto, passed: list[NodeProto]) -> bool:
    """A causal mask on the scores: among what the nodes between Q·Kᵀ and the Softmax (the scale,
    the mask's Add, a Where) read besides the scores, a Trilu, a triangular constant, or a comparison
    of two position ranges."""
    inside = {name for node in (scores, *passed) for name in node.output}
    starts = [name for node in passed for name in node.input if name and name not in inside]
    above = index.ancestors(starts, _MASK_STOP)
    for node in above:
        if node.op_type == "Trilu":
            return True
        if node.op_type in _COMPARISONS and all(_from_positions(index, name) for name in node.input[:2]):
            return True
    constants = {
        name for name in starts + [n for node in above for n in node.input] if index.is_constant(name)
    }
    return any(_triangular_constant(index, name) for name in constants)


def _attention_width(out_width: int | None, in_width: int | None) -> int | None:
    """The width of one of Q, K, V from its projection's (a fused QKV projection is 3× as wide)."""
    return in_width if out_width and in_width and out_width == 3 * in_width else out_width


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
        widths = [_projection(index, reshape) for _, _, reshape in found]
        q_width = _attention_width(*widths[0])
        kv_width = next((_attention_width(*w) for w in widths[1:] if w[0]), None)
        kv_heads = next((h for h, _, _ in found[1:] if h), None)
        heads = found[0][0]
        if heads is None and (q_width is None or kv_width == q_width):  # K and V have Q's heads
            heads = kv_heads
        size = next((s for _, s, _ in found if s), None)
        if size is None:  # [b, s, heads, -1]
            for known, width in ((heads, q_width), (kv_heads, kv_width)):
                if known and width and width % known == 0:
                    size = width // known
                    break
        if heads is None and size and q_width and q_width % size == 0:  # [b, s, -1, head_size]
            heads = q_width // size
        if kv_heads is None and size and kv_width and kv_width % size == 0:
            kv_heads = kv_width // size
        out_width = next((w for w, _ in widths if w), None)
        in_width = next((w for _, w in widths if w), None)
        causal = _causal(index, scores, passed)
        grouped = kv_heads if kv_heads and heads and kv_heads < heads else None
        sites.append(AttentionSite(softmax.name, heads, size, out_width, in_width, causal, grouped))
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


def _rms_norms(index: GraphIndex) -> int:
    """RMSNorms written out (Llama, T5: x / √(mean(x²) + ε), no mean subtracted): a ReduceMean of the
    square (Pow 2, or x·x) of a tensor that is not x minus its own mean."""
    count = 0
    for node in index.nodes:
        square = index.producer.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if square is None:
            continue
        squared = (square.op_type == "Pow" and _scalar(index, square) == 2.0) or (
            square.op_type == "Mul" and square.input[0] == square.input[1]
        )
        if not squared:
            continue
        x = square.input[0]
        centred = index.producer.get(x)
        if centred is not None and centred.op_type == "Sub":
            mean = index.producer.get(centred.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == centred.input[0]:
                continue  # a LayerNorm's variance
        count += 1
    return count


def _rotations(index: GraphIndex) -> int:
    """Rotary position embeddings' rotate_half written out: a Concat of a negated half and the other."""
    return sum(
        node.op_type == "Concat"
        and any(
            (source := index.producer.get(name)) is not None and source.op_type == "Neg"
            for name in node.input
        )
        for node in index.nodes
    )


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
    out), RMSNorms and rotary embeddings written out, GELUs written out. Counted again on the fused
    graph, it says what was left unfused."""
    gelus = _gelus(index)
    return {
        "attention": len(attention_sites(index) if sites is None else sites),
        "layer_norm": index.count("LayerNormalization"),
        "layer_norm_decomposed": _decomposed_layer_norms(index),
        "rms_norm_decomposed": _rms_norms(index),
        "rotary": _rotations(index),
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
    kv_heads, _ = _agreed([site.kv_heads for site in sites])
    model_type, type_reason = _model_type(index, sites, patterns, heads, kv_heads)
    assert model_type is None or model_type in MODEL_TYPES
    return Detection(
        model_type, heads, hidden, len(sites), type_reason, heads_reason, widths, patterns, already, kv_heads
    )


def _model_type(
    index: GraphIndex,
    sites: list[AttentionSite],
    patterns: dict[str, int],
    heads: int | None,
    kv_heads: int | None,
) -> tuple[str | None, str]:
    """The type and how it was recognised, or None and what the graph has instead (this module's
    docstring has the rules)."""
    rms = (
        patterns["rms_norm_decomposed"]
        + index.count("SimplifiedLayerNormalization")
        + index.count("RMSNormalization")
    )
    rotary = patterns["rotary"] > 0  # rotate_half: Sin and Cos alone may be absolute positions
    decoder_parts = [
        part
        for part, present in (
            ("RMSNorm (no mean subtracted)", rms),
            ("rotary position embeddings", rotary),
            (f"grouped-query attention ({heads} query heads over {kv_heads} key/value heads)", kv_heads),
        )
        if present
    ]
    if any(site.causal for site in sites):
        if patterns.get("quick_gelu", 0):
            return "clip", "causal self-attention with QuickGELU activations"
        if rms:
            return "llama", "causal self-attention with " + ", ".join(decoder_parts)
        return "gpt2", "causal self-attention" + (
            f" with {', '.join(decoder_parts)}" if decoder_parts else ""
        )
    if _patch_embedding(index):
        return "vit", "a patch-embedding convolution (stride = kernel) before attention"
    token_embedding = _token_embedding(index)
    if decoder_parts:
        token_types = any("token_type" in value.name for value in index.inputs)
        return None, (
            f"{len(sites)} attention blocks with {', '.join(decoder_parts)}"
            + (
                ", token embeddings and no token_type_ids input"
                if token_embedding and not token_types
                else ""
            )
            + ", as in Llama-style decoders, but no causal mask on the scores (a Trilu, a triangular "
            "constant or a comparison of positions), so not known for a decoder; ONNX Runtime's bert "
            "fusion does not match them"
        )
    if token_embedding:
        return "bert", "token embeddings (a Gather from integer ids) before bidirectional attention"
    return None, (
        f"{len(sites)} attention blocks, but neither token embeddings (bert), a patch embedding (vit) "
        "nor a causal mask (gpt2, clip, llama)"
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
    lacking = optimizer_lacks(model_type) if model_type is not None else None
    if lacking is not None:
        how = "stated" if stated_type else f"detected ({detection.type_reason})"
        return FusionPlan(
            skip=f"unfused: the model type {model_type} was {how}, but {lacking}; it runs unfused",
            detection=detection,
        )
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
