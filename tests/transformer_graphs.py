"""Small transformer graphs, written node by node in the layouts PyTorch's exporter gives Hugging
Face models (the ones ONNX Runtime's transformer optimizer was written against): a BERT encoder, a
ViT image encoder, a GPT-2 decoder, a Llama decoder, and a CNN that is no transformer at all.

Built with onnx.helper rather than exported from torch here: the tests then run in a second without
torch or transformers, and the layout does not move with the installed exporter's version. The BERT
graph mirrors, node for node, the blocks of sentence-transformers' paraphrase-MiniLM-L3-v2 export
(bench.zoo_corpus `minilm-l3`): Q/K/V MatMul + Add, Reshape into heads (a Concat of run-time dims and
constants, as the exporter writes it, or a constant target), Transpose, Q·Kᵀ / √d + the additive
padding mask, Softmax, ·V, the output projection, residual Add + LayerNorm, GELU via Erf. The Llama
graph mirrors, block for block, the torch.onnx.export (opset 17) of bench.transformer_models'
LlamaDecoder, which holds SmolLM2-135M: RMSNorm written out (Pow, ReduceMean, Add, Sqrt, Div, Mul),
rotary embeddings from Cos and Sin of the positions, grouped-query attention (K/V heads repeated by
Unsqueeze, Expand, Reshape), head size left to the exporter's -1, a causal mask from a Trilu, SiLU
MLP, tied output projection; no token_type_ids.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: np.ndarray | float | list, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int, scale: float = 0.2, hint: str = "w") -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), hint)

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attributes: object) -> str:
        output = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output

    def linear(self, x: str, fan_in: int, fan_out: int) -> str:
        """MatMul by a [in, out] weight, then Add of the bias: nn.Linear as the exporter writes it."""
        return self.op(
            "Add", self.weight(fan_out, scale=0.05), self.op("MatMul", x, self.weight(fan_in, fan_out))
        )

    def layer_norm(self, x: str, width: int) -> str:
        gamma = self.const((1 + 0.1 * self.rng.standard_normal(width)).astype(np.float32), "gamma")
        beta = self.const((0.1 * self.rng.standard_normal(width)).astype(np.float32), "beta")
        return self.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-12)

    def gelu_erf(self, x: str) -> str:
        erf = self.op("Erf", self.op("Div", x, self.const(np.float32(math.sqrt(2.0)))))
        inner = self.op("Mul", x, self.op("Add", erf, self.const(np.float32(1.0))))
        return self.op("Mul", inner, self.const(np.float32(0.5)))

    def gelu_tanh(self, x: str) -> str:
        """GPT-2's gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
        cube = self.op(
            "Mul", self.op("Pow", x, self.const(np.float32(3.0))), self.const(np.float32(0.044715))
        )
        inner = self.op("Mul", self.op("Add", x, cube), self.const(np.float32(math.sqrt(2.0 / math.pi))))
        one_plus = self.op("Add", self.op("Tanh", inner), self.const(np.float32(1.0)))
        return self.op("Mul", self.op("Mul", x, self.const(np.float32(0.5))), one_plus)

    def head_shape(self, x: str, heads: int, size: int, how: str) -> str:
        """[batch, seq, heads, head_size]: a constant [0, 0, h, d] (`constant`), the exporter's Concat
        of the run-time batch and sequence dims with constants (`concat`), or every dim computed at run
        time (`runtime`: the head size read from the shape of a [d] tensor, heads as hidden / d), where
        no graph reader can see the heads."""
        if how == "constant":
            return self.const(np.array([0, 0, heads, size], dtype=np.int64), "shape")
        dims = []
        for axis in (0, 1):
            gathered = self.op("Gather", self.op("Shape", x), self.const(np.int64(axis)), axis=0)
            dims.append(self.op("Unsqueeze", gathered, self.const(np.array([0], dtype=np.int64))))
        if how == "concat":
            heads_c = self.const(np.array([heads], dtype=np.int64), "heads")
            size_c = self.const(np.array([size], dtype=np.int64), "size")
            return self.op("Concat", *dims, heads_c, size_c, axis=0)
        probe = self.op("Shape", self.op("Identity", self.const(np.zeros(size, dtype=np.float32), "probe")))
        width = self.op("Gather", self.op("Shape", x), self.const(np.array([2], dtype=np.int64)), axis=0)
        return self.op("Concat", *dims, self.op("Div", width, probe), probe, axis=0)

    def attention(
        self,
        x: str,
        hidden: int,
        heads: int,
        *,
        mask: str | None = None,
        causal: str | None = None,
        head_shape: str = "constant",
        fused_qkv: bool = False,
    ) -> str:
        size = hidden // heads
        if fused_qkv:  # GPT-2's c_attn: one [hidden, 3·hidden] projection split in three
            qkv = self.linear(x, hidden, 3 * hidden)
            split = self.const(np.array([hidden] * 3, dtype=np.int64))
            names = [self.name("q"), self.name("k"), self.name("v")]
            self.nodes.append(helper.make_node("Split", [qkv, split], names, name=self.name("split"), axis=2))
            q, k, v = names
        else:
            q, k, v = (self.linear(x, hidden, hidden) for _ in range(3))

        def split_heads(tensor: str, perm: list[int]) -> str:
            shape = self.head_shape(tensor, heads, size, head_shape)
            return self.op("Transpose", self.op("Reshape", tensor, shape), perm=perm)

        key = split_heads(k, [0, 2, 3, 1])
        value = split_heads(v, [0, 2, 1, 3])
        query = split_heads(q, [0, 2, 1, 3])
        scores = self.op("Div", self.op("MatMul", query, key), self.const(np.float32(math.sqrt(size))))
        if causal is not None:
            scores = self.op("Where", causal, scores, self.const(np.float32(-3.4028234663852886e38)))
        if mask is not None:
            scores = self.op("Add", scores, mask)
        context = self.op("MatMul", self.op("Softmax", scores, axis=-1), value)
        merged = self.op(
            "Reshape",
            self.op("Transpose", context, perm=[0, 2, 1, 3]),
            self.const(np.array([0, 0, hidden], dtype=np.int64), "shape"),
        )
        return self.linear(merged, hidden, hidden)

    def save(
        self,
        path: Path,
        inputs: list[onnx.ValueInfoProto],
        output: str,
        output_shape: list[str | int],
        name: str,
    ) -> Path:
        graph = helper.make_graph(
            self.nodes,
            name,
            inputs,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        model.producer_name = "pytorch"  # the exporter ONNX Runtime's bert and gpt2 fusions expect
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        return path


def bert_encoder(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    vocab: int = 100,
    max_positions: int = 64,
    intermediate: int = 64,
    head_shape: str = "concat",
    padding_where: bool = False,
    seed: int = 0,
) -> Path:
    """A BERT encoder: int64 input_ids, attention_mask and token_type_ids [batch, sequence], the
    last hidden state out; `head_shape` as `_Builder.head_shape` takes it. `padding_where`: the
    padding mask applied by a Where on the scores (DistilBERT's masked_fill) rather than added."""
    b = _Builder(seed)
    ids, mask_in, types = "input_ids", "attention_mask", "token_type_ids"
    words = b.op("Gather", b.weight(vocab, hidden, scale=0.5, hint="word_embeddings"), ids)
    token_types = b.op("Gather", b.weight(2, hidden, scale=0.5, hint="token_type_embeddings"), types)
    length = b.op("Gather", b.op("Shape", ids), b.const(np.int64(1)), axis=0)
    positions = b.op(
        "Slice",
        b.const(np.arange(max_positions, dtype=np.int64)[None, :], "position_ids"),
        b.const(np.array([0], dtype=np.int64)),
        b.op("Unsqueeze", length, b.const(np.array([0], dtype=np.int64))),
        b.const(np.array([1], dtype=np.int64)),
        b.const(np.array([1], dtype=np.int64)),
    )
    position = b.op(
        "Gather", b.weight(max_positions, hidden, scale=0.5, hint="position_embeddings"), positions
    )
    x = b.layer_norm(b.op("Add", b.op("Add", words, token_types), position), hidden)
    unsqueezed = b.op(
        "Unsqueeze",
        b.op("Unsqueeze", mask_in, b.const(np.array([1], dtype=np.int64))),
        b.const(np.array([2], dtype=np.int64)),
    )
    if padding_where:  # Where(kept, scores, min): the Builder's `causal` argument applies it
        masks = {"causal": b.op("Cast", unsqueezed, to=TensorProto.BOOL)}
    else:
        inverted = b.op("Sub", b.const(np.float32(1.0)), b.op("Cast", unsqueezed, to=TensorProto.FLOAT))
        masks = {"mask": b.op("Mul", inverted, b.const(np.float32(-3.4028234663852886e38)))}
    for _ in range(layers):
        attended = b.layer_norm(
            b.op("Add", b.attention(x, hidden, heads, head_shape=head_shape, **masks), x), hidden
        )
        feed = b.linear(b.gelu_erf(b.linear(attended, hidden, intermediate)), intermediate, hidden)
        x = b.layer_norm(b.op("Add", feed, attended), hidden)
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in (ids, mask_in, types)
    ]
    return b.save(path, inputs, x, ["batch", "sequence", hidden], "bert")


def vit_encoder(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    image: int = 32,
    patch: int = 8,
    seed: int = 1,
) -> Path:
    """A ViT: pixel_values [batch, 3, image, image], a patch-embedding convolution (stride = kernel),
    pre-LayerNorm blocks without a mask, the last hidden state out."""
    b = _Builder(seed)
    patches = (image // patch) ** 2
    kernel = b.weight(hidden, 3, patch, patch, scale=0.1)
    conv = b.op(
        "Conv",
        "pixel_values",
        kernel,
        b.weight(hidden, scale=0.05),
        kernel_shape=[patch] * 2,
        strides=[patch] * 2,
    )
    flat = b.op("Reshape", conv, b.const(np.array([0, hidden, -1], dtype=np.int64), "shape"))
    x = b.op(
        "Add", b.op("Transpose", flat, perm=[0, 2, 1]), b.weight(1, patches, hidden, scale=0.5, hint="pos")
    )
    for _ in range(layers):
        x = b.op("Add", b.attention(b.layer_norm(x, hidden), hidden, heads), x)
        x = b.op(
            "Add",
            b.linear(b.gelu_erf(b.linear(b.layer_norm(x, hidden), hidden, 2 * hidden)), 2 * hidden, hidden),
            x,
        )
    x = b.layer_norm(x, hidden)
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, image, image])]
    return b.save(path, inputs, x, ["batch", patches, hidden], "vit")


def gpt2_decoder(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    vocab: int = 100,
    max_positions: int = 64,
    seed: int = 2,
) -> Path:
    """A GPT-2 decoder without past state: input_ids [batch, sequence], token and position
    embeddings, pre-LayerNorm blocks with one fused QKV projection and a causal mask (a Where over a
    slice of a lower-triangular buffer), tanh-GELU, the last hidden state out."""
    b = _Builder(seed)
    words = b.op("Gather", b.weight(vocab, hidden, scale=0.5, hint="wte"), "input_ids")
    length = b.op("Gather", b.op("Shape", "input_ids"), b.const(np.int64(1)), axis=0)
    positions = b.op("Range", b.const(np.int64(0)), length, b.const(np.int64(1)))
    x = b.op("Add", words, b.op("Gather", b.weight(max_positions, hidden, scale=0.5, hint="wpe"), positions))
    end = b.op("Unsqueeze", length, b.const(np.array([0], dtype=np.int64)))
    ends = b.op("Concat", end, end, axis=0)
    causal = b.op(
        "Slice",
        b.const(np.tril(np.ones((max_positions, max_positions), dtype=bool))[None, None], "bias"),
        b.const(np.array([0, 0], dtype=np.int64)),
        ends,
        b.const(np.array([2, 3], dtype=np.int64)),
    )
    for _ in range(layers):
        x = b.op("Add", b.attention(b.layer_norm(x, hidden), hidden, heads, causal=causal, fused_qkv=True), x)
        x = b.op(
            "Add",
            b.linear(b.gelu_tanh(b.linear(b.layer_norm(x, hidden), hidden, 4 * hidden)), 4 * hidden, hidden),
            x,
        )
    x = b.layer_norm(x, hidden)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    return b.save(path, inputs, x, ["batch", "sequence", hidden], "gpt2")


class _Llama:
    """The parts of a Llama decoder, written as PyTorch's exporter writes them (opset 17)."""

    def __init__(self, b: _Builder, hidden: int, heads: int, kv_heads: int):
        self.b, self.hidden, self.heads, self.kv_heads = b, hidden, heads, kv_heads
        self.size = hidden // heads

    def ints(self, *values: int) -> str:
        return self.b.const(np.array(values, dtype=np.int64))

    def dim(self, x: str, axis: int) -> str:
        """One run-time dim of `x` as a one-element int64 list (Shape, Gather, Unsqueeze)."""
        b = self.b
        return b.op(
            "Unsqueeze", b.op("Gather", b.op("Shape", x), b.const(np.int64(axis)), axis=0), self.ints(0)
        )

    def rms_norm(self, x: str) -> str:
        """weight · x / √(mean(x²) + ε): no mean subtracted."""
        b = self.b
        variance = b.op("ReduceMean", b.op("Pow", x, b.const(np.float32(2.0))), axes=[-1], keepdims=1)
        root = b.op("Sqrt", b.op("Add", variance, b.const(np.float32(1e-5))))
        normed = b.op("Mul", x, b.op("Div", b.const(np.float32(1.0)), root))
        gamma = b.const((1 + 0.1 * b.rng.standard_normal(self.hidden)).astype(np.float32), "gamma")
        return b.op("Mul", gamma, normed)

    def rotary(self, length: str) -> tuple[str, str]:
        """cos and sin [1, 1, sequence, head_size] of positions × inverse frequencies."""
        b = self.b
        positions = b.op(
            "Range",
            b.const(np.float32(0.0)),
            b.op("Cast", length, to=TensorProto.FLOAT),
            b.const(np.float32(1.0)),
        )
        inverse = 1.0 / (10000.0 ** (np.arange(0, self.size, 2, dtype=np.float32) / self.size))
        angles = b.op("Mul", b.op("Unsqueeze", positions, self.ints(1)), b.const(inverse[None], "inv_freq"))
        both = b.op("Concat", angles, angles, axis=-1)
        return tuple(b.op("Unsqueeze", b.op(op, both), self.ints(0, 1)) for op in ("Cos", "Sin"))  # type: ignore[return-value]

    def causal_mask(self, length: str, mask: str, how: str) -> tuple[str | None, bool]:
        """(the mask, whether it is a condition for a Where): an additive mask from a Trilu of ones
        times the padding mask (`trilu`, LlamaDecoder's), a boolean j <= i from two position ranges
        and the padding mask, applied by a Where (`range`, newer transformers' exports), or none at all
        (`none`: bidirectional, as an encoder with RMSNorm and rotary positions would be)."""
        b = self.b
        if how == "none":
            return None, False
        end = b.op("Unsqueeze", length, self.ints(0))
        padding = b.op("Unsqueeze", mask, self.ints(1, 2))  # [batch, 1, 1, sequence]
        if how == "trilu":
            ones = b.op(
                "ConstantOfShape",
                b.op("Concat", end, end, axis=0),
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
            )
            triangle = b.op("Trilu", ones, upper=0)  # [None, None] is two Unsqueezes in the export
            causal = b.op("Unsqueeze", b.op("Unsqueeze", triangle, self.ints(0)), self.ints(1))
            allowed = b.op("Mul", causal, b.op("Cast", padding, to=TensorProto.FLOAT))
            inverted = b.op("Sub", b.const(np.float32(1.0)), allowed)
            return b.op("Mul", inverted, b.const(np.float32(-3.4028234663852886e38))), False
        positions = b.op("Range", b.const(np.int64(0)), length, b.const(np.int64(1)))
        earlier = b.op(
            "LessOrEqual",
            b.op("Unsqueeze", positions, self.ints(0)),
            b.op("Unsqueeze", positions, self.ints(1)),
        )
        causal = b.op("Unsqueeze", earlier, self.ints(0, 1))
        return b.op("And", causal, b.op("Cast", padding, to=TensorProto.BOOL)), True

    def split_heads(self, x: str, heads: int) -> str:
        """[batch, sequence, heads · d] -> [batch, heads, sequence, d], d left to the exporter's -1."""
        b = self.b
        shape = b.op("Concat", self.dim(x, 0), self.dim(x, 1), self.ints(heads), self.ints(-1), axis=0)
        return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def rotate(self, x: str, cos: str, sin: str) -> str:
        """x·cos + rotate_half(x)·sin."""
        b, half = self.b, self.size // 2
        first = b.op("Slice", x, self.ints(0), self.ints(half), self.ints(3))
        second = b.op("Slice", x, self.ints(half), self.ints(self.size), self.ints(3))
        rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))

    def repeat(self, x: str) -> str:
        """Grouped-query attention: each K/V head repeated for its query heads."""
        b, repeat = self.b, self.heads // self.kv_heads
        if repeat == 1:
            return x
        batch, length = self.dim(x, 0), self.dim(x, 2)
        expand = b.op(
            "Concat", batch, self.ints(self.kv_heads), self.ints(repeat), length, self.ints(self.size), axis=0
        )
        expanded = b.op("Expand", b.op("Unsqueeze", x, self.ints(2)), expand)
        merged = b.op("Concat", batch, self.ints(self.heads), length, self.ints(self.size), axis=0)
        return b.op("Reshape", expanded, merged)

    def attention(self, x: str, cos: str, sin: str, mask: str | None, where: bool) -> str:
        b, hidden, kv_width = self.b, self.hidden, self.kv_heads * self.size
        query = self.rotate(
            self.split_heads(b.op("MatMul", x, b.weight(hidden, hidden)), self.heads), cos, sin
        )
        key = self.rotate(
            self.split_heads(b.op("MatMul", x, b.weight(hidden, kv_width)), self.kv_heads), cos, sin
        )
        value = self.split_heads(b.op("MatMul", x, b.weight(hidden, kv_width)), self.kv_heads)
        key, value = self.repeat(key), self.repeat(value)
        scores = b.op(
            "Div",
            b.op("MatMul", query, b.op("Transpose", key, perm=[0, 1, 3, 2])),
            b.const(np.float32(math.sqrt(self.size))),
        )
        if mask is not None and where:
            scores = b.op("Where", mask, scores, b.const(np.float32(-3.4028234663852886e38)))
        elif mask is not None:
            scores = b.op("Add", scores, mask)
        context = b.op("MatMul", b.op("Softmax", scores, axis=-1), value)
        merged = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), self.ints(0, 0, hidden))
        return b.op("MatMul", merged, b.weight(hidden, hidden))

    def mlp(self, x: str, intermediate: int) -> str:
        """down(silu(gate(x)) · up(x))."""
        b = self.b
        gate = b.op("MatMul", x, b.weight(self.hidden, intermediate))
        silu = b.op("Mul", gate, b.op("Sigmoid", gate))
        up = b.op("MatMul", x, b.weight(self.hidden, intermediate))
        return b.op("MatMul", b.op("Mul", silu, up), b.weight(intermediate, self.hidden))


def llama_decoder(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 100,
    intermediate: int = 64,
    mask: str = "trilu",
    seed: int = 4,
) -> Path:
    """A Llama decoder without past state: input_ids and attention_mask [batch, sequence], logits
    [batch, sequence, vocab] out; `mask` as `_Llama.causal_mask` takes it (this module's docstring)."""
    b = _Builder(seed)
    llama = _Llama(b, hidden, heads, kv_heads)
    table = (b.rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float32)
    x = b.op("Gather", b.const(table, "embed_tokens"), "input_ids")
    length = b.op("Gather", b.op("Shape", "input_ids"), b.const(np.int64(1)), axis=0)
    cos, sin = llama.rotary(length)
    causal, where = llama.causal_mask(length, "attention_mask", mask)
    for _ in range(layers):
        x = b.op("Add", x, llama.attention(llama.rms_norm(x), cos, sin, causal, where))
        x = b.op("Add", x, llama.mlp(llama.rms_norm(x), intermediate))
    logits = b.op("MatMul", llama.rms_norm(x), b.const(np.ascontiguousarray(table.T), "lm_head"))
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask")
    ]
    return b.save(path, inputs, logits, ["batch", "sequence", vocab], "llama")


def small_cnn(path: Path, *, seed: int = 3) -> Path:
    """Conv, ReLU, global pooling, a classifier: no attention anywhere."""
    b = _Builder(seed)
    x = b.op("Relu", b.op("Conv", "input", b.weight(8, 3, 3, 3), b.weight(8, scale=0.05), pads=[1, 1, 1, 1]))
    x = b.op("Flatten", b.op("GlobalAveragePool", x))
    logits = b.op("Gemm", x, b.weight(10, 8), b.weight(10, scale=0.05), transB=1)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])]
    return b.save(path, inputs, logits, ["batch", 10], "cnn")
