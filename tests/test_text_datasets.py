"""Text datasets: a JSONL of texts and a tokenizer.json become the arrays a transformer takes.

A real WordPiece tokenizer is trained here with the `tokenizers` library (no network), and small
hand-built BERT-like ONNX graphs (word, token-type and position tables read by Gathers, a masked
mean, a classifier) stand for the models. The stored arrays are compared with what the tokenizer
itself gives; each refusal is a 422 (413 for a size bound) with its code and line, and leaves
nothing stored.
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from optiforge_client import Client, ValidationFailed
from optiforge_client import cli as client_cli
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from app import cli as server_cli
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.orm import DatasetRecord, ModelRecord
from app.main import create_app
from app.services.text_checks import check_text_dataset
from engines.errors import InvalidDatasetError
from engines.ingest.embeddings import embedding_rows
from engines.ingest.limits import DatasetLimits
from engines.ingest.texts import (
    TextLimits,
    TextModel,
    TextTokenization,
    open_tokenizer,
    plan_text_dataset,
    write_text_npz,
)
from tests.conftest import QUICK_MEASURE, LocalApi, make_settings
from workers.job_runner import run_job_by_id

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a fast engine serves the model with low latency",
    "optimize the transformer and measure its accuracy",
    "every dataset holds texts and their labels",
    "the tokenizer splits words into pieces",
    "good service",
    "bad latency",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HIDDEN, POSITIONS, CLASSES = 8, 64, 3


# ---------------------------------------------------------------- the tokenizer and the models


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT-style WordPiece tokenizer trained on the sentences: [CLS] a [SEP] b [SEP], type ids."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        SENTENCES * 3, trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def vocab_size(tokenizer_json: Path) -> int:
    return Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)


def bert_like(
    rows: int,
    *,
    ids: str = "input_ids",
    mask: str = "attention_mask",
    types: str | None = "token_type_ids",
    dtype: int = TensorProto.INT64,
    type_rows: int = 2,
) -> bytes:
    """Embeddings (word + token type + position, each a table read by a Gather), masked sum, a
    classifier: what a BERT classifier does, at toy size."""
    rng = np.random.default_rng(0)

    def table(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        table("word_embeddings.weight", (rows, HIDDEN)),
        table("position_embeddings.weight", (POSITIONS, HIDDEN)),
        table("classifier.weight", (HIDDEN, CLASSES)),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sequence_axis"),
    ]
    nodes = [helper.make_node("Gather", ["word_embeddings.weight", ids], ["words"])]
    embedded = "words"
    if types is not None:
        inits.append(table("token_type_embeddings.weight", (type_rows, HIDDEN)))
        nodes += [
            helper.make_node("Gather", ["token_type_embeddings.weight", types], ["typed"]),
            helper.make_node("Add", ["words", "typed"], ["with_types"]),
        ]
        embedded = "with_types"
    nodes += [
        helper.make_node("Shape", [ids], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["length"], axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["positions"]),
        helper.make_node("Gather", ["position_embeddings.weight", "positions"], ["placed"]),
        helper.make_node("Add", [embedded, "placed"], ["embedded"]),
        helper.make_node("Cast", [mask], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["embedded", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "sequence_axis"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "classifier.weight"], ["logits"]),
    ]
    names = [ids, mask] + ([types] if types is not None else [])
    graph = helper.make_graph(
        nodes,
        "bert_like",
        [helper.make_tensor_value_info(name, dtype, ["batch", "sequence"]) for name in names],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def upload_model(api: LocalApi, content: bytes) -> str:
    answer = api.client.post("/v1/models", files={"file": ("bert.onnx", io.BytesIO(content))})
    assert answer.status_code in (200, 201), answer.text  # 200: the same file again (deduplicated)
    return str(answer.json()["id"])


def jsonl(*lines: Any) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def upload_texts(
    api: LocalApi,
    content: bytes,
    tokenizer: Path | bytes,
    spec: dict[str, Any] | None = None,
    **form: str,
) -> Any:
    data = dict(form)
    if spec is not None:
        data["tokenization"] = json.dumps(spec)
    tokenizer_bytes = tokenizer if isinstance(tokenizer, bytes) else tokenizer.read_bytes()
    return api.client.post(
        "/v1/datasets",
        files={
            "file": ("texts.jsonl", io.BytesIO(content)),
            "tokenizer": ("tokenizer.json", tokenizer_bytes),
        },
        data=data,
    )


def stored(api: LocalApi) -> list[Path]:
    root = api.settings.resolved_artifact_dir / "datasets"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def download(api: LocalApi, dataset_id: str) -> dict[str, np.ndarray]:
    answer = api.client.get(f"/v1/datasets/{dataset_id}/download")
    assert answer.status_code == 200
    with np.load(io.BytesIO(answer.content), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def expected_row(
    tokenizer_json: Path, text: str, pair: str | None, length: int, truncate: bool = True
) -> Any:
    """What the tokenizer itself gives, padded on the right to `length` with [PAD] (id 0)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if truncate:
        tokenizer.enable_truncation(length)
    encoding = tokenizer.encode(text, pair) if pair is not None else tokenizer.encode(text)
    pad = length - len(encoding.ids)
    return (
        encoding.ids + [0] * pad,
        encoding.attention_mask + [0] * pad,
        encoding.type_ids + [0] * pad,
    )


# ---------------------------------------------------------------- over the API


def test_texts_become_the_arrays_the_tokenizer_gives(local_api: LocalApi, tokenizer_json: Path) -> None:
    lines = [
        {"text": SENTENCES[0], "label": "positive", "id": 7},  # other keys are ignored
        {"text": SENTENCES[1], "text_pair": SENTENCES[5], "label": "negative"},
        "",  # a blank line: skipped
        {"text": " ".join(SENTENCES), "label": "neutral"},  # over max_length: truncated
        {"text": SENTENCES[6], "label": "positive"},
    ]
    answer = upload_texts(local_api, jsonl(*lines), tokenizer_json, {"max_length": 16}, name="reviews")
    assert answer.status_code == 201, answer.text
    dataset = answer.json()
    assert dataset["samples"] == 4 and dataset["has_labels"] and dataset["classes"] == 3
    assert dataset["arrays"] == {
        name: {"shape": [4, 16], "dtype": "int64"}
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    text = dataset["text"]
    assert text["tokenization"] == {
        "max_length": 16,
        "truncation": True,
        "padding": "max_length",
        "padding_side": "right",
        "add_special_tokens": True,
        "input_names": {name: name for name in ("input_ids", "attention_mask", "token_type_ids")},
        "dtype": "int64",
    }
    assert text["class_names"] == ["negative", "neutral", "positive"]  # sorted, as image folders
    assert text["truncated_lines"] == 1 and text["text_pairs"] == 1 and text["sequence_length"] == 16
    assert (
        text["vocab_size"] == vocab_size(tokenizer_json) and text["pad_id"] == 0 and text["max_type_id"] == 1
    )
    assert local_api.client.get(f"/v1/datasets/{dataset['id']}").json()["text"] == text

    arrays = download(local_api, dataset["id"])
    assert arrays["labels"].tolist() == [2, 0, 1, 2] and arrays["labels"].dtype == np.int64
    texts = [
        (SENTENCES[0], None),
        (SENTENCES[1], SENTENCES[5]),
        (" ".join(SENTENCES), None),
        (SENTENCES[6], None),
    ]
    for row, (first, second) in enumerate(texts):
        ids, mask, types = expected_row(tokenizer_json, first, second, 16)
        assert arrays["input_ids"][row].tolist() == ids
        assert arrays["attention_mask"][row].tolist() == mask
        assert arrays["token_type_ids"][row].tolist() == types
    assert arrays["input_ids"][2, -1] == Tokenizer.from_file(str(tokenizer_json)).token_to_id("[SEP]")
    assert 1 in arrays["token_type_ids"][1]  # the pair's second text
    assert sorted(path.name for path in stored(local_api)) == ["dataset.npz", "tokenizer.json"]


def test_a_dataset_for_a_model_takes_its_names_and_dtypes(local_api: LocalApi, tokenizer_json: Path) -> None:
    """`ids`/`input_mask` in int32 and no token types: the arrays follow; the job scores the model."""
    model_id = upload_model(
        local_api,
        bert_like(
            vocab_size(tokenizer_json), ids="ids", mask="input_mask", types=None, dtype=TensorProto.INT32
        ),
    )
    lines = [{"text": sentence, "label": index % CLASSES} for index, sentence in enumerate(SENTENCES)]
    answer = upload_texts(local_api, jsonl(*lines), tokenizer_json, {"padding": "longest"}, model_id=model_id)
    assert answer.status_code == 201, answer.text
    dataset = answer.json()
    longest = max(len(Tokenizer.from_file(str(tokenizer_json)).encode(s).ids) for s in SENTENCES)
    assert dataset["arrays"] == {
        "ids": {"shape": [7, longest], "dtype": "int32"},
        "input_mask": {"shape": [7, longest], "dtype": "int32"},
    }
    text = dataset["text"]
    assert text["tokenization"]["input_names"] == {"input_ids": "ids", "attention_mask": "input_mask"}
    assert text["tokenization"]["max_length"] == 64  # 128 capped by the model's 64 positions
    assert text["model_id"] == model_id and text["embedding_rows"] == {"ids": vocab_size(tokenizer_json)}

    job = local_api.client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "evaluation_dataset_id": dataset["id"],
            "recipe": {"batch_sizes": [2], "measure": QUICK_MEASURE},
        },
    )
    assert job.status_code == 202, job.text
    run_job_by_id(local_api.settings, job.json()["id"])
    done = local_api.client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done


BAD_LINES = [
    (jsonl({"text": "fine"}, "{not json"), "invalid_json_line", 2),
    (jsonl({"text": "fine"}, "", "[1, 2]"), "invalid_json_line", 3),
    (b'{"text": "fine"}\n\xff\xfe{"text": "x"}\n', "invalid_json_line", 2),
    (jsonl({"text": "fine"}, {"label": 1}), "missing_text", 2),
    (jsonl({"text": ""}), "missing_text", 1),
    (jsonl({"text": "fine"}, {"text": 3}), "missing_text", 2),
    (jsonl({"text": "fine", "text_pair": 5}), "invalid_text", 1),
    (b'{"text": "lone \\ud800 surrogate"}\n', "invalid_text", 1),
    (jsonl({"text": "a", "label": 0}, {"text": "b"}), "invalid_label", 2),
    (jsonl({"text": "a", "label": 0}, {"text": "b", "label": "cat"}), "invalid_label", 2),
    (jsonl({"text": "a", "label": -1}), "invalid_label", 1),
    (jsonl({"text": "a", "label": 1.5}), "invalid_label", 1),
    (jsonl({"text": "a", "label": True}), "invalid_label", 1),
]


def test_a_bad_line_is_a_422_naming_it(local_api: LocalApi, tokenizer_json: Path) -> None:
    for content, code, line in BAD_LINES:
        answer = upload_texts(local_api, content, tokenizer_json, {"max_length": 8})
        assert answer.status_code == 422, (content, answer.text)
        body = answer.json()
        assert (body["code"], body["line"]) == (code, line), (content, body)
        assert f"line {line}" in body["detail"]
    assert stored(local_api) == []


def test_truncation_off_refuses_a_long_line(local_api: LocalApi, tokenizer_json: Path) -> None:
    content = jsonl({"text": "short"}, {"text": SENTENCES[0]})
    answer = upload_texts(local_api, content, tokenizer_json, {"max_length": 6, "truncation": False})
    assert answer.status_code == 422
    body = answer.json()
    assert body["code"] == "text_too_long" and body["line"] == 2 and body["max_length"] == 6
    assert stored(local_api) == []


def test_tokenizer_and_model_refusals(local_api: LocalApi, tokenizer_json: Path) -> None:
    content = jsonl({"text": SENTENCES[0]}, {"text": SENTENCES[1], "text_pair": SENTENCES[2]})
    vocab = vocab_size(tokenizer_json)

    def refused(answer: Any, code: str, status: int = 422) -> dict[str, Any]:
        assert answer.status_code == status, answer.text
        assert answer.json()["code"] == code, answer.json()
        return dict(answer.json())

    refused(upload_texts(local_api, content, b'{"model": "none of it"}'), "invalid_tokenizer")
    refused(upload_texts(local_api, content, b"\x00\x01 not json"), "invalid_tokenizer")
    refused(upload_texts(local_api, content, b""), "invalid_tokenizer")
    refused(upload_texts(local_api, content, tokenizer_json, {"padding": "sideways"}), "invalid_tokenization")
    refused(upload_texts(local_api, content, tokenizer_json, {"max_len": 8}), "invalid_tokenization")
    refused(
        upload_texts(local_api, content, tokenizer_json, {"input_names": ["input_ids", "labels"]}),
        "invalid_tokenization",
    )
    refused(
        upload_texts(local_api, content, tokenizer_json, preprocessing=json.dumps({"size": 8})),
        "invalid_tokenization",
    )
    no_tokenizer = local_api.client.post("/v1/datasets", files={"file": ("texts.jsonl", content)})
    refused(no_tokenizer, "tokenizer_required")
    with_spec_only = local_api.client.post(
        "/v1/datasets", files={"file": ("texts.jsonl", content)}, data={"tokenization": "{}"}
    )
    refused(with_spec_only, "invalid_tokenization")
    refused(upload_texts(local_api, content, tokenizer_json, model_id="mdl_missing"), "model_not_found", 404)

    small = upload_model(local_api, bert_like(vocab - 10))
    body = refused(
        upload_texts(local_api, content, tokenizer_json, model_id=small), "vocab_exceeds_embedding"
    )
    assert (
        body["vocab_size"] == vocab
        and body["embedding_rows"] == vocab - 10
        and body["input_name"] == "input_ids"
    )

    model_id = upload_model(local_api, bert_like(vocab))
    body = refused(
        upload_texts(
            local_api, content, tokenizer_json, {"input_names": {"input_ids": "tokens"}}, model_id=model_id
        ),
        "unknown_input_name",
    )
    assert body["input_name"] == "tokens" and "input_ids" in body["model_inputs"]
    body = refused(
        upload_texts(local_api, content, tokenizer_json, {"max_length": 100}, model_id=model_id),
        "sequence_too_long",
    )
    assert body["max_positions"] == POSITIONS
    refused(
        upload_texts(
            local_api,
            content,
            tokenizer_json,
            {"input_names": ["input_ids", "attention_mask"]},
            model_id=model_id,
        ),
        "dataset_mismatch",  # the model's token_type_ids would get no array
    )
    refused(
        upload_texts(local_api, content, tokenizer_json, {"dtype": "int32"}, model_id=model_id),
        "invalid_tokenization",
    )

    unnamed = upload_model(local_api, bert_like(vocab, ids="x", mask="y", types=None))
    refused(upload_texts(local_api, content, tokenizer_json, model_id=unnamed), "input_names_required")
    named = upload_texts(
        local_api,
        content[: content.index(b"\n") + 1],
        tokenizer_json,
        {"input_names": {"input_ids": "x", "attention_mask": "y"}},
        model_id=unnamed,
    )
    assert named.status_code == 201, named.text
    assert sorted(named.json()["arrays"]) == ["x", "y"]

    one_type = upload_model(local_api, bert_like(vocab, type_rows=1))  # RoBERTa: no second segment
    body = refused(
        upload_texts(local_api, content, tokenizer_json, model_id=one_type), "type_ids_exceed_embedding"
    )
    assert body["type_id"] == 1 and body["embedding_rows"] == 1
    assert sorted(path.name for path in stored(local_api)) == ["dataset.npz", "tokenizer.json"]  # `named`


def test_a_job_checks_the_vocabulary_of_a_dataset_made_for_no_model(
    local_api: LocalApi, tokenizer_json: Path
) -> None:
    """The dataset fits the small model's inputs by name, but its ids reach past its table."""
    content = jsonl({"text": SENTENCES[0]})
    dataset = upload_texts(local_api, content, tokenizer_json, {"max_length": 8}).json()
    vocab = vocab_size(tokenizer_json)
    small, fitting = upload_model(local_api, bert_like(vocab - 1)), upload_model(local_api, bert_like(vocab))
    with session_scope(local_api.settings.resolved_database_url) as session:
        record = session.get(DatasetRecord, dataset["id"])
        assert record is not None
        info = record.info
        check_text_dataset(local_api.store, session.get(ModelRecord, fitting), info)
        with pytest.raises(InvalidDatasetError) as refused:
            check_text_dataset(local_api.store, session.get(ModelRecord, small), info)
    assert refused.value.code == "vocab_exceeds_embedding"


# ---------------------------------------------------------------- the engine: padding, limits


def plan_and_write(
    tmp_path: Path,
    tokenizer_json: Path,
    content: bytes,
    spec: dict[str, Any],
    *,
    limits: DatasetLimits | None = None,
    text_limits: TextLimits | None = None,
    model: TextModel | None = None,
) -> dict[str, np.ndarray]:
    source = tmp_path / "texts.jsonl"
    source.write_bytes(content)
    text_limits = text_limits or TextLimits()
    out = tmp_path / "out" / "dataset.npz"
    with open_tokenizer(tokenizer_json, text_limits) as tokenizer:
        plan = plan_text_dataset(
            source,
            tokenizer,
            TextTokenization.from_dict(spec),
            limits=limits or DatasetLimits(),
            text_limits=text_limits,
            model=model,
        )
        write_text_npz(source, tokenizer, plan, out, max_line_bytes=text_limits.max_line_bytes)
    with np.load(out) as npz:
        return {key: npz[key] for key in npz.files}


def test_left_padding_longest_and_int32(tmp_path: Path, tokenizer_json: Path) -> None:
    content = jsonl({"text": "good service"}, {"text": SENTENCES[0]})
    spec = {
        "padding": "longest",
        "padding_side": "left",
        "dtype": "int32",
        "input_names": ["input_ids", "attention_mask"],
    }
    arrays = plan_and_write(tmp_path, tokenizer_json, content, spec)
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    short, long = (tokenizer.encode(line).ids for line in ("good service", SENTENCES[0]))
    assert arrays["input_ids"].shape == (2, len(long)) and arrays["input_ids"].dtype == np.int32
    assert arrays["input_ids"][0].tolist() == [0] * (len(long) - len(short)) + short
    assert arrays["attention_mask"][0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    assert arrays["input_ids"][1].tolist() == long
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["dataset.npz"]  # no .npy left


def test_without_special_tokens(tmp_path: Path, tokenizer_json: Path) -> None:
    arrays = plan_and_write(
        tmp_path,
        tokenizer_json,
        jsonl({"text": "good service"}),
        {"max_length": 4, "add_special_tokens": False},
    )
    expected = Tokenizer.from_file(str(tokenizer_json)).encode("good service", add_special_tokens=False).ids
    assert arrays["input_ids"][0].tolist() == (expected + [0] * 4)[:4]


def test_limits_refuse_before_the_work_and_leave_nothing(tmp_path: Path, tokenizer_json: Path) -> None:
    content = jsonl(*({"text": sentence} for sentence in SENTENCES))

    def refusal(**kwargs: Any) -> InvalidDatasetError:
        with pytest.raises(InvalidDatasetError) as refused:
            plan_and_write(
                tmp_path, tokenizer_json, content, kwargs.pop("spec", {"max_length": 16}), **kwargs
            )
        assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
        return refused.value

    too_many = refusal(limits=DatasetLimits(max_samples=5))
    assert too_many.code == "too_many_samples" and too_many.extra["limit"] == 5
    too_long = refusal(text_limits=TextLimits(max_line_bytes=40))
    assert too_long.code == "line_too_long" and too_long.extra["line"] == 1
    too_big = refusal(limits=DatasetLimits(max_bytes=7 * 16 * 8 * 3 - 1))
    assert too_big.code == "dataset_too_large"
    assert refusal(text_limits=TextLimits(max_tokenizer_bytes=100)).code == "tokenizer_too_large"
    assert plan_and_write(
        tmp_path, tokenizer_json, content, {"max_length": 16}, limits=DatasetLimits(max_samples=7)
    )


def test_special_tokens_over_max_length_are_refused(tmp_path: Path, tokenizer_json: Path) -> None:
    """Truncation keeps a pair's three special tokens: a max_length of 2 cannot hold them."""
    content = jsonl({"text": "good"}, {"text": "good", "text_pair": "bad"})
    with pytest.raises(InvalidDatasetError) as refused:
        plan_and_write(tmp_path, tokenizer_json, content, {"max_length": 2})
    assert refused.value.code == "text_too_long" and refused.value.extra["line"] == 2


def test_embedding_rows_from_the_graph(tokenizer_json: Path) -> None:
    model = onnx.load_from_string(bert_like(50, dtype=TensorProto.INT32))
    assert embedding_rows(model) == {"input_ids": 50, "token_type_ids": 2}
    fused = helper.make_graph(  # ONNX Runtime's fused embeddings: found by their inputs
        [
            helper.make_node(
                "EmbedLayerNormalization",
                ["ids", "segments", "word", "position", "segment", "gamma", "beta"],
                ["out", "mask_index"],
                domain="com.microsoft",
            )
        ],
        "fused",
        [helper.make_tensor_value_info(n, TensorProto.INT32, ["b", "s"]) for n in ("ids", "segments")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.zeros(shape, np.float32), name)
            for name, shape in (
                ("word", (30, 4)),
                ("position", (16, 4)),
                ("segment", (2, 4)),
                ("gamma", (4,)),
                ("beta", (4,)),
            )
        ],
    )
    assert embedding_rows(helper.make_model(fused)) == {"ids": 30, "segments": 2}


# ---------------------------------------------------------------- SDK, CLI, Swagger


def through(client: TestClient) -> httpx.MockTransport:
    """An httpx transport that hands each request to the in-process app."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = client.request(
            request.method, str(request.url), headers=dict(request.headers), content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.MockTransport(handle)


def test_sdk_and_cli_upload_texts(
    local_api: LocalApi,
    tokenizer_json: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(jsonl({"text": SENTENCES[0], "label": 1}, {"text": SENTENCES[1], "label": 0}))
    model_id = upload_model(local_api, bert_like(vocab_size(tokenizer_json)))
    with Client("http://testserver", transport=through(local_api.client)) as client:
        dataset = client.upload_dataset(
            texts, tokenizer=tokenizer_json, tokenization={"max_length": 12}, model_id=model_id
        )
        assert dataset.samples == 2 and dataset.has_labels
        assert dataset.text["tokenization"]["max_length"] == 12 and dataset.text["model_id"] == model_id  # type: ignore[attr-defined]
        with pytest.raises(ValidationFailed) as refused:
            client.upload_dataset(
                texts, tokenizer=tokenizer_json, tokenization={"max_length": 100}, model_id=model_id
            )
        assert refused.value.code == "sequence_too_long"

    monkeypatch.setattr(client_cli, "Client", functools.partial(Client, transport=through(local_api.client)))
    status = server_cli.main(
        [
            "datasets",
            "upload",
            str(texts),
            "--tokenizer",
            str(tokenizer_json),
            "--max-length",
            "10",
            "--padding",
            "longest",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    shown = json.loads(captured.out)
    assert shown["text"]["tokenization"]["padding"] == "longest" and shown["samples"] == 2
    assert shown["arrays"]["input_ids"]["shape"][1] <= 10


def test_swagger_shows_the_text_form_fields(local_api: LocalApi) -> None:
    document = local_api.client.get("/openapi.json").json()
    body = document["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"
    ]
    schema = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
    fields = schema["properties"]
    assert {"tokenizer", "tokenization", "model_id", "file"} <= set(fields)
    assert "max_length" in fields["tokenization"]["description"]
    tokenizer = json.dumps(fields["tokenizer"])
    assert "application/octet-stream" in tokenizer or "binary" in tokenizer  # a file part


def test_a_job_refuses_a_text_dataset_whose_ids_reach_past_the_model(
    local_api: LocalApi, tokenizer_json: Path
) -> None:
    """Made for no model, the dataset's arrays fit the small model by name; its ids do not."""
    dataset = upload_texts(local_api, jsonl({"text": SENTENCES[0]}), tokenizer_json, {"max_length": 8}).json()
    small = upload_model(local_api, bert_like(vocab_size(tokenizer_json) - 1))
    recipe = {"batch_sizes": [1], "measure": QUICK_MEASURE}
    for route, body in (
        ("/v1/jobs", {"model_id": small, "evaluation_dataset_id": dataset["id"], "recipe": recipe}),
        (
            f"/v1/models/{small}/optimize",
            {
                "evaluation_dataset_id": dataset["id"],
                "accuracy_budget": {"metric": "fidelity", "max_drop": 0.01},
            },
        ),
    ):
        answer = local_api.client.post(route, json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["code"] == "vocab_exceeds_embedding"


# ---------------------------------------------------------------- a long JSONL: a tokenize_texts job


@pytest.fixture
def jobs_api(tmp_path: Path) -> Iterator[LocalApi]:
    """An API that tokenizes at most 3 lines at upload: longer JSONLs go to a job."""
    settings = make_settings(tmp_path / "data", max_upload_bytes=4 * 1024 * 1024, text_inline_max_lines=3)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield LocalApi(client, settings, app.state.store)


def test_a_long_jsonl_is_tokenized_by_a_job(jobs_api: LocalApi, tokenizer_json: Path) -> None:
    model_id = upload_model(jobs_api, bert_like(vocab_size(tokenizer_json)))
    lines = [{"text": text, "label": ["good", "bad"][index % 2]} for index, text in enumerate(SENTENCES)]
    answer = upload_texts(jobs_api, jsonl(*lines), tokenizer_json, {"padding": "longest"}, model_id=model_id)
    assert answer.status_code == 202, answer.text
    pending = answer.json()
    assert pending["status"] == "processing" and pending["samples"] == 7 and pending["classes"] == 2
    assert pending["arrays"]["input_ids"] == {"shape": [7, 64], "dtype": "int64"}  # at most max_length
    assert pending["text"]["class_names"] == ["bad", "good"] and pending["text"]["sequence_length"] is None
    refused = jobs_api.client.post(
        "/v1/jobs", json={"model_id": model_id, "evaluation_dataset_id": pending["id"]}
    )
    assert refused.status_code == 409 and refused.json()["code"] == "dataset_not_ready"

    run_job_by_id(jobs_api.settings, pending["processing_job_id"])
    ready = jobs_api.client.get(f"/v1/datasets/{pending['id']}").json()
    assert ready["status"] == "ready", ready
    longest = max(len(Tokenizer.from_file(str(tokenizer_json)).encode(s).ids) for s in SENTENCES)
    assert ready["arrays"]["input_ids"] == {"shape": [7, longest], "dtype": "int64"}
    assert ready["text"]["sequence_length"] == longest and ready["text"]["model_id"] == model_id
    arrays = download(jobs_api, pending["id"])
    assert arrays["labels"].tolist() == [1, 0, 1, 0, 1, 0, 1]
    ids, mask, types = expected_row(tokenizer_json, SENTENCES[0], None, longest)
    assert [arrays[name][0].tolist() for name in ("input_ids", "attention_mask", "token_type_ids")] == [
        ids,
        mask,
        types,
    ]
    assert sorted(path.name for path in stored(jobs_api)) == ["dataset.npz", "tokenizer.json"]  # source gone

    # every line is still checked at upload: a bad one is a 422 now, not a failed job
    bad = upload_texts(jobs_api, jsonl(*lines, {"label": "good"}), tokenizer_json, model_id=model_id)
    assert bad.status_code == 422 and (bad.json()["code"], bad.json()["line"]) == ("missing_text", 8)


# ---------------------------------------------------------------- a hostile tokenizer.json: bounded

#: A regex the library runs by backtracking: each run of twenty "a"s not followed by "b" costs tens
#: of milliseconds, so this line alone takes about a minute, in Rust code Python cannot interrupt.
BACKTRACKING = "(a+)+b"
SLOW_LINE = {"text": ("a" * 20 + " ") * 2000}


def hostile_tokenizer(tmp_path: Path, part: str) -> bytes:
    """A word-level tokenizer whose pre-tokenizer `Split`, or normalizer `Replace`, backtracks."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    if part == "split":
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(BACKTRACKING), behavior="isolated")
    else:
        tokenizer.normalizer = normalizers.Replace(Regex(BACKTRACKING), "b")
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / f"{part}.json"
    tokenizer.save(str(path))
    return path.read_bytes()


@pytest.fixture
def bounded_api(tmp_path: Path) -> Iterator[LocalApi]:
    """An API whose tokenizer may take 2 s (to load, to tokenize an upload, each chunk of a job's),
    and that tokenizes one line at upload: two lines go to a job."""
    settings = make_settings(
        tmp_path / "data", max_upload_bytes=4 * 1024 * 1024, text_inline_max_lines=1, tokenize_timeout_s=2.0
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield LocalApi(client, settings, app.state.store)


@pytest.mark.parametrize("part", ["split", "replace"])
def test_a_backtracking_regex_is_stopped_at_upload(
    bounded_api: LocalApi, tokenizer_json: Path, tmp_path: Path, part: str
) -> None:
    """The tokenizer's process is killed at the deadline: a 422 that says what to do, nothing stored;
    a normal tokenizer under the same deadline is tokenized as ever."""
    started = time.monotonic()
    answer = upload_texts(bounded_api, jsonl(SLOW_LINE), hostile_tokenizer(tmp_path, part))
    elapsed = time.monotonic() - started
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["code"] == "tokenizer_too_slow" and body["timeout_s"] == 2.0, body
    assert "Split or normalizer Replace" in body["detail"]
    assert elapsed < 10, elapsed
    assert stored(bounded_api) == []

    fine = upload_texts(bounded_api, jsonl({"text": SENTENCES[0]}), tokenizer_json, {"max_length": 16})
    assert fine.status_code == 201, fine.text
    ids, _, _ = expected_row(tokenizer_json, SENTENCES[0], None, 16)
    assert download(bounded_api, fine.json()["id"])["input_ids"][0].tolist() == ids


def test_a_backtracking_regex_fails_its_job(bounded_api: LocalApi, tmp_path: Path) -> None:
    """Two lines: the upload loads the tokenizer (fast) and queues a job; the job's tokenizing is
    stopped at the deadline of its chunk, and the job and the dataset fail with the code."""
    answer = upload_texts(bounded_api, jsonl(SLOW_LINE, SLOW_LINE), hostile_tokenizer(tmp_path, "split"))
    assert answer.status_code == 202, answer.text
    pending = answer.json()
    started = time.monotonic()
    run_job_by_id(bounded_api.settings, pending["processing_job_id"])
    assert time.monotonic() - started < 10
    failed = bounded_api.client.get(f"/v1/datasets/{pending['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "tokenizer_too_slow", failed
    job = bounded_api.client.get(f"/v1/jobs/{pending['processing_job_id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "tokenizer_too_slow", job
    assert "dataset.npz" not in [path.name for path in stored(bounded_api)]


def test_a_tokenizer_over_its_memory_is_stopped(tmp_path: Path) -> None:
    """A normalizer that makes 10,000 characters of each "a": the line needs gigabytes (the library
    keeps an alignment per byte); the process's address space is capped, so it is refused at once."""
    bomb = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    bomb.normalizer = normalizers.Replace("a", "x" * 10_000)
    path = tmp_path / "bomb.json"
    bomb.save(str(path))
    started = time.monotonic()
    with pytest.raises(InvalidDatasetError) as refused:
        plan_and_write(
            tmp_path,
            path,
            jsonl({"text": "a" * 20_000}),
            {"max_length": 8},
            text_limits=TextLimits(tokenizer_memory_bytes=512 * 1024 * 1024),
        )
    assert refused.value.code == "tokenizer_out_of_memory" and "512 MiB" in refused.value.detail
    assert time.monotonic() - started < 10
    assert list((tmp_path / "out").iterdir()) == []
