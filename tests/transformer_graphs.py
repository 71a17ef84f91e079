"""Small transformer graphs, written node by node in the layouts PyTorch's exporter gives Hugging
Face models (the ones ONNX Runtime's transformer optimizer was written against): a BERT encoder, a
ViT image encoder, a GPT-2 decoder, and a CNN that is no transformer at all.

Built with onnx.helper rather than exported from torch here: the tests then run in a second without
torch or transformers, and the layout does not move with the installed exporter's version. The BERT
graph mirrors, node for node, the blocks of sentence-transformers' paraphrase-MiniLM-L3-v2 export
(bench.zoo_corpus `minilm-l3`): Q/K/V MatMul + Add, Reshape into heads (a Concat of run-time dims and
constants, as the exporter writes it, or a constant target), Transpose, Q·Kᵀ / √d + the additive
padding mask, Softmax, ·V, the output projection, residual Add + LayerNorm, GELU via Erf.
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
    seed: int = 0,
) -> Path:
    """A BERT encoder: int64 input_ids, attention_mask and token_type_ids [batch, sequence], the
    last hidden state out; `head_shape` as `_Builder.head_shape` takes it."""
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
    inverted = b.op("Sub", b.const(np.float32(1.0)), b.op("Cast", unsqueezed, to=TensorProto.FLOAT))
    mask = b.op("Mul", inverted, b.const(np.float32(-3.4028234663852886e38)))
    for _ in range(layers):
        attended = b.layer_norm(
            b.op("Add", b.attention(x, hidden, heads, mask=mask, head_shape=head_shape), x), hidden
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


def small_cnn(path: Path, *, seed: int = 3) -> Path:
    """Conv, ReLU, global pooling, a classifier: no attention anywhere."""
    b = _Builder(seed)
    x = b.op("Relu", b.op("Conv", "input", b.weight(8, 3, 3, 3), b.weight(8, scale=0.05), pads=[1, 1, 1, 1]))
    x = b.op("Flatten", b.op("GlobalAveragePool", x))
    logits = b.op("Gemm", x, b.weight(10, 8), b.weight(10, scale=0.05), transB=1)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])]
    return b.save(path, inputs, logits, ["batch", 10], "cnn")
