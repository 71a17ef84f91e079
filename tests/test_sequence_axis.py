"""Issue 21 item 3: sequence length is a measured axis.

A small transformer-like graph (BERT's embeddings: word, token-type and a 64-row position table read
at Range(0, sequence length), a masked single-head self-attention, mean pooling) with dynamic
[batch, sequence] int64 inputs. Latency is keyed per (batch, sequence length); a length past the
position table, or sequence lengths on a CNN, are a 422 at job creation; generated token ids stay
within the vocabulary; a job over the API reports per-(batch, sequence) latency; the auto-optimize
objective may name a sequence length.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from optiforge_client import cli
from optiforge_client.client import Client

from engines.errors import InvalidRecipeError
from engines.ingest.sequence import IDS, MASK, POSITIONS, TOKEN_TYPES, profile_from_specs, read_profile
from engines.ingest.signature import TensorSpec
from engines.measure.latency import make_batch, measured_batch_sizes, parse_latency_key
from engines.measure.report import render_markdown, report_row
from engines.pipeline import run_recipe, validate_recipe
from engines.recipe import Recipe
from tests import quirk_graphs
from tests.conftest import LocalApi
from tests.test_real_world_quirks import QUICK, _npz, _upload
from workers.job_runner import run_job_by_id

VOCAB, POSITIONS_ROWS, HIDDEN = 100, 64, 16


def transformer_like(
    path: Path,
    *,
    vocab: int = VOCAB,
    positions: int = POSITIONS_ROWS,
    table: str = "embeddings.position_embeddings.weight",
    roberta: bool = False,
) -> Path:
    """input_ids, attention_mask, token_type_ids [batch, sequence] int64 -> embedding [batch, 16].

    `table`: the position table's name (exporters that fold constants rename it); `roberta`: position
    ids counted RoBERTa's way, CumSum(mask) * mask + padding_idx (1), instead of Range(0, L)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    inits = [
        numpy_helper.from_array(weight(vocab, HIDDEN), "embeddings.word_embeddings.weight"),
        numpy_helper.from_array(weight(positions, HIDDEN), table),
        numpy_helper.from_array(weight(2, HIDDEN), "embeddings.token_type_embeddings.weight"),
        numpy_helper.from_array(weight(HIDDEN, HIDDEN), "attention.query.weight"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "key_axis"),
        numpy_helper.from_array(np.array(-1e4, dtype=np.float32), "masked"),
    ]
    nodes = [
        helper.make_node("Gather", ["embeddings.word_embeddings.weight", "input_ids"], ["words"]),
        helper.make_node("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"], ["types"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["length"]),
        *(
            [
                helper.make_node("CumSum", ["attention_mask", "one"], ["counted"]),
                helper.make_node("Mul", ["counted", "attention_mask"], ["kept_counts"]),
                helper.make_node("Add", ["kept_counts", "one"], ["position_ids"]),  # [b, s]
            ]
            if roberta
            else [helper.make_node("Range", ["zero", "length", "one"], ["position_ids"])]
        ),
        helper.make_node("Gather", [table, "position_ids"], ["positions"]),
        helper.make_node("Add", ["words", "types"], ["summed"]),
        helper.make_node("Add", ["summed", "positions"], ["hidden"]),  # [b, s, 16]
        helper.make_node("MatMul", ["hidden", "attention.query.weight"], ["query"]),
        helper.make_node("Transpose", ["hidden"], ["keys"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["query", "keys"], ["scores"]),  # [b, s, s]
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "key_axis"], ["mask_keys"]),  # [b, 1, s]
        helper.make_node("Sub", ["one_float", "mask_keys"], ["unmasked"]),
        helper.make_node("Mul", ["unmasked", "masked"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "hidden"], ["context"]),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_rows"]),  # [b, s, 1]
        helper.make_node("Mul", ["context", "mask_rows"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "key_axis"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_rows", "key_axis"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["embedding"]),
    ]
    inits.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one_float"))
    token = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
             for name in ("input_ids", "attention_mask", "token_type_ids")]  # fmt: skip
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", HIDDEN])
    graph = helper.make_graph(nodes, "tiny-bert", token, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return transformer_like(tmp_path_factory.mktemp("sequence") / "tiny-bert.onnx")


def _inputs(path: Path) -> list[TensorSpec]:
    from engines.ingest.model import inspect_model

    return list(inspect_model(path).inputs)


def test_the_graph_gives_axes_roles_vocabulary_and_position_limit(model_path: Path) -> None:
    profile = read_profile(model_path)
    assert profile.axes == {"input_ids": 1, "attention_mask": 1, "token_type_ids": 1}
    assert profile.roles == {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": TOKEN_TYPES}
    assert profile.vocab_size == VOCAB and profile.max_positions == POSITIONS_ROWS
    assert "embeddings.position_embeddings.weight" in (profile.limit_source or "")
    # a CNN has no sequence axis; a token model with a fixed batch of 1 has one after it
    cnn = [TensorSpec("x", "float32", ("N", 3, 8, 8))]
    assert not profile_from_specs(cnn).has_axis


def test_position_limit_under_other_names_and_roberta_offsets(tmp_path: Path) -> None:
    """A folded (renamed) position table is the one table of the hidden width read at computed
    indices; RoBERTa's positions start past the padding index, so 2 of its rows are not lengths."""
    folded = read_profile(transformer_like(tmp_path / "folded.onnx", table="onnx::Gather_42"))
    assert folded.max_positions == POSITIONS_ROWS and "onnx::Gather_42" in (folded.limit_source or "")
    roberta = read_profile(transformer_like(tmp_path / "roberta.onnx", positions=66, roberta=True))
    assert roberta.max_positions == 64 and "padding" in (roberta.limit_source or "")


def test_static_batch_token_model_has_its_sequence_axis(tmp_path: Path) -> None:
    path = quirk_graphs.static_batch_dynamic_sequence(tmp_path / "static.onnx")
    profile = read_profile(path)
    assert profile.axes == {"input_ids": 2} and profile.vocab_size == 32 and profile.max_positions is None


def test_generated_tokens_stay_within_the_vocabulary_and_padding_masks_them(model_path: Path) -> None:
    specs, profile = _inputs(model_path), read_profile(model_path)
    feeds = make_batch(specs, 4, None, sequence_length=48, sequence=profile)
    assert {name: array.shape for name, array in feeds.items()} == {
        "input_ids": (4, 48), "attention_mask": (4, 48), "token_type_ids": (4, 48)
    }  # fmt: skip
    assert feeds["input_ids"].min() >= 1 and feeds["input_ids"].max() < VOCAB
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    padded = make_batch(specs, 8, None, sequence_length=48, sequence=profile, padding=0.3)
    mask, ids = padded["attention_mask"], padded["input_ids"]
    real = mask.sum(axis=1)
    assert real[0] == 48 and real.min() >= 1 and real.min() < 48  # a batch padded to its longest row
    assert ((ids == 0) == (mask == 0)).all() and ids.max() < VOCAB  # pad id 0 exactly where masked
    assert ((mask[:, :-1] - mask[:, 1:]) >= 0).all()  # real tokens first, padding after
    # a dataset's own tokens are cut or padded (pad id 0, mask 0) to the length
    from engines.ingest.datasets import Dataset

    rows = {
        "input_ids": np.arange(1, 25, dtype=np.int64).reshape(2, 12),
        "attention_mask": np.ones((2, 12), dtype=np.int64),
        "token_type_ids": np.zeros((2, 12), dtype=np.int64),
    }
    cut = make_batch(specs, 2, Dataset(rows, None), sequence_length=8, sequence=profile)
    assert cut["input_ids"].tolist() == rows["input_ids"][:, :8].tolist()
    longer = make_batch(specs, 2, Dataset(rows, None), sequence_length=16, sequence=profile)
    assert longer["input_ids"].shape == (2, 16) and (longer["input_ids"][:, 12:] == 0).all()
    assert longer["attention_mask"].sum(axis=1).tolist() == [12, 12]
    # position ids, where a model takes them, count 0..L-1
    with_positions = [*specs, TensorSpec("position_ids", "int64", ("batch", "sequence"))]
    by_names = profile_from_specs(with_positions)
    assert by_names.roles["position_ids"] == POSITIONS and by_names.vocab_size is None
    feeds = make_batch(with_positions, 2, None, sequence_length=5, sequence=by_names)
    assert feeds["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2


def test_latency_is_keyed_per_batch_and_sequence_length(model_path: Path, tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"batch_sizes": [1, 2], "sequence_lengths": [16, 32], "measure": QUICK})
    result = run_recipe(model_path, recipe, tmp_path / "work")
    keys = {"1x16", "1x32", "2x16", "2x32"}
    assert set(result.baseline.latency) == keys
    for key, stats in result.baseline.latency.items():
        assert (stats["batch_size"], stats["sequence_length"]) == parse_latency_key(key)
        assert stats["tokens_per_s"] == pytest.approx(stats["throughput_per_s"] * stats["sequence_length"])
    assert measured_batch_sizes(result.baseline.latency) == [1, 2]  # what serving's batch limit reads
    assert measured_batch_sizes({"1": {}, "8": {}, "odd": {}}) == [1, 8]
    engine = result.engines[0]
    assert set(engine.measurement.latency) == keys and set(engine.comparison["speedup"]) == keys
    rows = [
        report_row("tiny-bert", "original", result.baseline.to_dict(), None),
        report_row("tiny-bert", "engine", engine.measurement.to_dict(), engine.comparison),
    ]
    table = render_markdown(rows)
    assert "p50 (b=1 s=16) ms" in table and "Speedup (b=2 s=32)" in table
    assert table.index("b=1 s=32") < table.index("b=2 s=16")  # by batch, then length


def test_recipe_checks_name_the_limit_and_the_missing_axis(model_path: Path) -> None:
    inputs, profile = _inputs(model_path), read_profile(model_path)
    validate_recipe(inputs, Recipe(sequence_lengths=(16, 64)), sequence=profile)
    with pytest.raises(InvalidRecipeError) as raised:
        validate_recipe(inputs, Recipe(sequence_lengths=(16, 65)), sequence=profile)
    assert raised.value.code == "sequence_too_long" and "64" in raised.value.detail
    assert raised.value.extra == {"max_sequence_length": 64}
    with pytest.raises(InvalidRecipeError) as raised:
        validate_recipe(inputs, Recipe(sequence_lengths=(0,)), sequence=profile)
    assert raised.value.code == "invalid_sequence_length"
    # without lengths nor data, a token model cannot be timed, and the message says what to ask
    with pytest.raises(InvalidRecipeError, match="sequence_lengths"):
        validate_recipe(inputs, Recipe(), sequence=profile)
    cnn = [TensorSpec("x", "float32", ("N", 3, 8, 8))]
    with pytest.raises(InvalidRecipeError) as raised:
        validate_recipe(cnn, Recipe(sequence_lengths=(16,)))
    assert raised.value.code == "no_sequence_axis"
    # a recipe without the field stores as before it existed
    assert "sequence_lengths" not in Recipe().to_dict() and "padding" not in Recipe().to_dict()["measure"]
    assert Recipe.from_dict(Recipe(sequence_lengths=(8,)).to_dict()).sequence_lengths == (8,)


class _InProcess(httpx.BaseTransport):
    """The SDK's client over the in-process app (the TestClient's own transport streams otherwise)."""

    def __init__(self, client: TestClient):
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.client.request(
            request.method, str(request.url), headers=request.headers, content=request.read()
        )
        headers = {k: v for k, v in answer.headers.items() if k not in ("content-encoding", "content-length")}
        return httpx.Response(answer.status_code, headers=headers, content=answer.content)


def _cli_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_client_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_objective_names_batch_and_sequence() -> None:
    assert cli.parse_objective_at("latency@1x128") == ("latency", 1, 128)
    assert cli.parse_objective_at("throughput@8") == ("throughput", 8, None)
    assert cli.parse_objective("latency@1x128") == ("latency", 1)
    args = _cli_args(["optimize", "m.onnx", "--budget", "1%", "--objective", "latency@2x64"])
    assert cli.parse_objective_at(args.objective) == ("latency", 2, 64)
    from optiforge_client import calls

    body = calls.optimize("mdl_x", "ds_x", objective="latency", batch_size=2, sequence_length=64).json
    assert body["objective"] == {"metric": "latency", "batch_size": 2, "sequence_length": 64}
    assert calls.optimize("mdl_x", "ds_x").json["objective"] == {"metric": "latency", "batch_size": 1}


def test_job_over_the_api_reports_latency_per_batch_and_sequence(
    local_api: LocalApi, model_path: Path, tmp_path: Path
) -> None:
    api = local_api
    model = _upload(api.client, "models", model_path)
    cnn = _upload(api.client, "models", quirk_graphs.minus_one_batch(tmp_path / "cnn.onnx"))

    def create(model_id: str, **recipe: object):
        body = {"model_id": model_id, "recipe": {"measure": QUICK, **recipe}}
        return api.client.post("/v1/jobs", json=body)

    too_long = create(model["id"], batch_sizes=[1], sequence_lengths=[16, 65])
    assert too_long.status_code == 422, too_long.text
    error = too_long.json()
    assert error["code"] == "sequence_too_long" and "64" in error["detail"], error
    assert error["max_sequence_length"] == 64
    on_cnn = create(cnn["id"], batch_sizes=[1], sequence_lengths=[16])
    assert on_cnn.status_code == 422 and on_cnn.json()["code"] == "no_sequence_axis", on_cnn.text
    assert create(model["id"], sequence_lengths=[0]).status_code == 422  # the schema's bound

    # the SDK's CLI options make the recipe, the SDK sends it, and prints the report the server renders
    args = _cli_args(["jobs", "create", model["id"], "--batch-sizes", "2,1", "--sequence-lengths", "32,16"])
    recipe = {**cli._recipe(args), "measure": QUICK}
    assert recipe["sequence_lengths"] == [32, 16]
    sdk = Client("http://testserver", transport=_InProcess(api.client))
    created = sdk.create_job(model["id"], recipe)
    run_job_by_id(api.settings, created.id)
    job = api.client.get(f"/v1/jobs/{created.id}").json()
    assert job["status"] == "succeeded", job
    assert job["recipe"]["sequence_lengths"] == [16, 32]
    report = sdk.job_report(job["id"])
    keys = {"1x16", "1x32", "2x16", "2x32"}
    for row in report["rows"]:
        assert set(row["latency"]) == keys, row
        assert {(cell["batch_size"], cell["sequence_length"]) for cell in row["latency"].values()} == {
            (1, 16), (1, 32), (2, 16), (2, 32)
        }  # fmt: skip
    assert set(report["rows"][1]["speedup"]) == keys
    table = sdk.job_report(job["id"], format="md")
    assert "p50 (b=2 s=32) ms" in table and "Speedup (b=1 s=16)" in table
    engine = api.client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
    assert set(engine["metrics"]["latency"]) == keys


def test_autotune_objective_names_a_sequence_length(model_path: Path, tmp_path: Path) -> None:
    from engines.ingest.datasets import Dataset
    from engines.search.autotune import AutotuneRequest, autotune
    from engines.search.report import markdown
    from engines.search.space import Budget, Objective, SearchSpace

    rng = np.random.default_rng(1)
    rows = 8
    data = Dataset(
        {
            "input_ids": rng.integers(1, VOCAB, (rows, 24)),
            "attention_mask": np.ones((rows, 24), dtype=np.int64),
            "token_type_ids": np.zeros((rows, 24), dtype=np.int64),
        },
        None,
    )
    space = SearchSpace(
        backends=("onnxruntime-cpu",),
        precisions=("fp32",),
        calibrations=(),
        prune_ratios=(),
        float_fallback=False,
    )
    request = AutotuneRequest(Objective("latency", 2, 48), Budget("fidelity", 0.01), 60.0, space)
    assert AutotuneRequest.from_dict(request.to_dict()).objective.sequence_length == 48
    result = autotune(model_path, request, tmp_path / "search", evaluation=data)
    assert set(result.baseline.latency) == {"2x48"}
    assert result.baseline.latency["2x48"]["sequence_length"] == 48
    report = result.report(request.objective, request.budget)
    assert report["objective"] == {"metric": "latency", "batch_size": 2, "sequence_length": 48}
    assert "at batch 2, sequence 48" in markdown(report)
    # an objective past the position table is refused before any work
    too_long = AutotuneRequest(Objective("latency", 1, 65), Budget("fidelity", 0.01), 60.0, space)
    with pytest.raises(InvalidRecipeError, match="64"):
        autotune(model_path, too_long, tmp_path / "search-too-long", evaluation=data)
    # and a CNN objective without a length keeps the report's old shape
    assert Objective("latency", 4).to_report() == {"metric": "latency", "batch_size": 4}


def test_autotune_objective_is_checked_at_creation(
    local_api: LocalApi, model_path: Path, tmp_path: Path
) -> None:
    api = local_api
    model = _upload(api.client, "models", model_path)
    rng = np.random.default_rng(2)
    dataset = _upload(
        api.client,
        "datasets",
        _npz(
            tmp_path / "tokens.npz",
            input_ids=rng.integers(1, VOCAB, (8, 24)),
            attention_mask=np.ones((8, 24), dtype=np.int64),
            token_type_ids=np.zeros((8, 24), dtype=np.int64),
        ),
    )
    body = {
        "evaluation_dataset_id": dataset["id"],
        "accuracy_budget": {"metric": "fidelity", "max_drop": 0.01},
        "time_budget_minutes": 1,
        "objective": {"metric": "latency", "batch_size": 1, "sequence_length": 65},
    }
    refused = api.client.post(f"/v1/models/{model['id']}/optimize", json=body)
    assert refused.status_code == 422 and refused.json()["code"] == "sequence_too_long", refused.text
    body["objective"]["sequence_length"] = 32
    accepted = api.client.post(f"/v1/models/{model['id']}/optimize", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["recipe"]["objective"]["sequence_length"] == 32
