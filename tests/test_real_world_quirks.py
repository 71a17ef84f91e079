"""Each quirk real exported models showed (bench/zoo.py), on a small graph that reproduces it.

Library-level tests run the pipeline as a worker does; the API tests go through upload, dataset
binding, job creation and serving in process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from optiforge_client import tensors

from engines.errors import (
    DatasetMismatchError,
    EngineError,
    InvalidDatasetError,
    InvalidInputError,
    InvalidRecipeError,
    scrub_paths,
)
from engines.ingest.datasets import Dataset, DatasetInfo, check_fits_model, inspect_arrays
from engines.ingest.model import inspect_model
from engines.ingest.signature import TensorSpec, assign_batch_axes, validate_feeds
from engines.pipeline import run_recipe, validate_recipe
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8
from engines.quantize.layer_errors import layer_errors
from engines.recipe import Recipe
from tests import quirk_graphs
from tests.conftest import LiveStack, LocalApi, wait_for_job
from workers.job_runner import run_job_by_id

QUICK = {"warmup_runs": 1, "timed_runs": 3, "min_seconds": 0.0}


def _recipe(**fields: object) -> Recipe:
    return Recipe.from_dict({"measure": QUICK, **fields})


def _dataset(path: Path, samples: int = 16, seed: int = 0) -> Dataset:
    """Random rows for every input of the model, laid out as the service lays datasets out."""
    inputs = inspect_model(path).inputs
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        row = [dim if isinstance(dim, int) else 8 for dim in spec.sample_shape()]
        kind = np.dtype(spec.dtype).kind
        arrays[spec.name] = (
            rng.random((samples, *row)).astype(spec.dtype)
            if kind == "f"
            else np.full((samples, *row), 16000, dtype=spec.dtype)
        )
    return Dataset(arrays, None, {spec.name: spec.batch_axis for spec in inputs})


# ---------------------------------------------------------------- the batch axis rule


def test_minus_one_dims_are_dynamic(tmp_path: Path) -> None:
    info = inspect_model(quirk_graphs.minus_one_batch(tmp_path / "m.onnx"))
    assert info.inputs[0].shape == (None, 3, 8, 8)
    assert info.inputs[0].batch_axis == 0 and not info.inputs[0].has_static_batch()
    assert info.outputs[0].shape == (None, 5)
    validate_recipe(list(info.inputs), _recipe(batch_sizes=[1, 4]))  # no "static batch dim of -1"


def test_batch_axis_rule() -> None:
    def axes(*shapes: tuple) -> list[int | None]:
        specs = [TensorSpec(f"t{i}", "float32", shape) for i, shape in enumerate(shapes)]
        return [spec.batch_axis for spec in assign_batch_axes(specs)]

    assert axes(("batch", 4), (2, "batch", 8)) == [0, 1]  # recurrent state: named like the batch
    assert axes((None, 4), (2, None, 8)) == [0, 1]  # unnamed: each input's first dynamic dim
    assert axes(("batch", 16), ()) == [0, None]  # a scalar has none
    assert axes(("batch", 16), (1,)) == [0, None]  # a static tensor beside a batched one: shared
    assert axes(
        (1, 3, 416, 416),
    ) == [0]  # an all-static model: a fixed batch in dim 0
    assert axes(("unk__330", 21), ("unk__331", 21)) == [0, 0]  # tf2onnx names each input's batch anew
    assert axes(("batch", "seq"), ("batch", "seq"), ("seq",)) == [0, 0, None]  # a length, not a batch
    assert axes(("seq", "batch", 8), ("batch",)) == [1, 0]  # ties go to the name more inputs have
    assert axes((1, 512), (2, 1, 128), ()) == [0, None, None]  # static: only dims equal to the batch


def test_ambiguous_batch_axis_is_refused_with_the_fix() -> None:
    specs = assign_batch_axes(
        [
            TensorSpec("x", "float32", ("batch", 4)),
            TensorSpec("y", "float32", ("batch", 2)),
            TensorSpec("h", "float32", (None, None, 8)),
        ]
    )
    with pytest.raises(InvalidRecipeError, match=r"input 'h'.*batch axis cannot be decided.*named 'batch'"):
        validate_recipe(specs, _recipe(batch_sizes=[1]))
    # tf2onnx names every input's dims anew: no shared name, so each input's first dynamic dim
    tf2onnx = assign_batch_axes(
        [
            TensorSpec("a", "float32", ("unk__1", "unk__2")),
            TensorSpec("b", "float32", ("unk__3", "unk__4", 8)),
        ]
    )
    assert [spec.batch_axis for spec in tf2onnx] == [0, 0]
    validate_recipe(tf2onnx, _recipe(batch_sizes=[1]), evaluation_samples=8)


@pytest.mark.parametrize("named", [True, False])
def test_recurrent_state_with_batch_in_dim_1(tmp_path: Path, named: bool) -> None:
    path = quirk_graphs.recurrent_state(tmp_path / "rnn.onnx", named=named)
    info = inspect_model(path)
    assert [spec.batch_axis for spec in info.inputs] == [0, 1]
    assert [spec.batch_axis for spec in info.outputs] == [0, 1]
    data = _dataset(path)
    assert data.inputs["h"].shape == (16, 2, 8)  # one row per sample: the state without its batch axis
    assert data.batch(0, 4)["h"].shape == (2, 4, 8)  # stacked along dim 1
    check_fits_model(inspect_arrays(dict(data.inputs)), list(info.inputs))
    result = run_recipe(
        path, _recipe(precision="int8", batch_sizes=[1, 4]), tmp_path / "w", evaluation=data, calibration=data
    )
    assert [engine.artifact.precision for engine in result.engines] == ["int8"]
    assert result.engines[0].measurement.accuracy["fidelity"]["cosine_similarity"] > 0.99


def test_dataset_rows_in_model_layout_are_refused_with_the_layout(tmp_path: Path) -> None:
    info = inspect_model(quirk_graphs.recurrent_state(tmp_path / "rnn.onnx"))
    laid_out_as_model = {"x": np.zeros((16, 4), np.float32), "h": np.zeros((2, 16, 8), np.float32)}
    with pytest.raises(InvalidDatasetError, match=r"samples first.*np.moveaxis"):
        inspect_arrays(laid_out_as_model)
    flattened = {"x": np.zeros((16, 4), np.float32), "h": np.zeros((16, 16), np.float32)}
    with pytest.raises(DatasetMismatchError) as caught:
        check_fits_model(inspect_arrays(flattened), list(info.inputs))
    assert any("one row per sample shaped [2, 8]" in problem for problem in caught.value.mismatches)


def test_feeds_are_validated_along_each_inputs_batch_axis(tmp_path: Path) -> None:
    specs = list(inspect_model(quirk_graphs.recurrent_state(tmp_path / "rnn.onnx")).inputs)
    validate_feeds({"x": np.zeros((3, 4), np.float32), "h": np.zeros((2, 3, 8), np.float32)}, specs)
    with pytest.raises(InvalidInputError, match="disagree on the batch size"):
        validate_feeds({"x": np.zeros((3, 4), np.float32), "h": np.zeros((2, 5, 8), np.float32)}, specs)
    with pytest.raises(InvalidInputError, match=r"'h': dim 0 is 3, model expects 2"):
        validate_feeds({"x": np.zeros((3, 4), np.float32), "h": np.zeros((3, 3, 8), np.float32)}, specs)


def test_scalar_input_shares_one_value_per_batch(tmp_path: Path) -> None:
    path = quirk_graphs.scalar_input(tmp_path / "audio.onnx")
    info = inspect_model(path)
    assert [spec.batch_axis for spec in info.inputs] == [0, None]
    data = _dataset(path)  # sr: 16000 in every row
    assert data.batch(0, 4)["sr"].shape == ()
    assert check_fits_model(inspect_arrays(dict(data.inputs)), list(info.inputs)) == []
    result = run_recipe(
        path, _recipe(precision="int8", batch_sizes=[1, 4]), tmp_path / "w", evaluation=data, calibration=data
    )
    assert result.engines and result.engines[0].measurement.latency.keys() == {"1", "4"}

    varying = {**data.inputs, "sr": np.arange(16, dtype=np.int64) + 8000}
    varying_info = DatasetInfo.from_dict(inspect_arrays(varying).to_dict())
    assert check_fits_model(varying_info, list(info.inputs)) == ["sr"]
    with pytest.raises(InvalidRecipeError, match=r"'sr' has no batch axis.*only batch size 1"):
        validate_recipe(list(info.inputs), _recipe(batch_sizes=[1, 4]), varying_unbatched=["sr"])
    validate_recipe(list(info.inputs), _recipe(batch_sizes=[1]), varying_unbatched=["sr"])


# ---------------------------------------------------------------- quantization and its report


def test_scalar_weights_have_a_layer_report(tmp_path: Path) -> None:
    path = quirk_graphs.scalar_weight(tmp_path / "scalar.onnx")
    data = _dataset(path)
    float_path, _ = prepare_float_model(path, tmp_path, "cpu")
    quantized = quantize_int8(
        float_path, tmp_path / "q.onnx", data, QuantizeConfig(), profile="cpu", batch_size=4, cpu_features=[]
    )
    report = layer_errors(float_path, quantized.path, data, batch_size=4, workdir=tmp_path)
    assert report["unavailable"] == []
    weights = {row["weight"]: row for row in report["weights"]}
    assert {"scale", "offset"} <= set(weights)  # the 0-d ones included, not a TypeError
    assert all(row["sqnr_db"] is None or row["sqnr_db"] > 0 for row in report["weights"])
    assert report["activations"]


def test_row_vector_bias_keeps_a_loadable_debug_model(tmp_path: Path) -> None:
    path = quirk_graphs.row_vector_bias(tmp_path / "dense.onnx")
    data = _dataset(path)
    result = run_recipe(
        path, _recipe(precision="int8", batch_sizes=[1, 4]), tmp_path / "w", evaluation=data, calibration=data
    )
    (engine,) = result.engines
    report = json.loads((engine.artifact.path.parent / "layer_errors.json").read_text())
    assert report["unavailable"] == [] and report["activations"], report


def test_opset11_conv_batchnorm_gets_an_int8_engine_and_its_report(tmp_path: Path) -> None:
    path = quirk_graphs.fused_batchnorm_opset11(tmp_path / "bn11.onnx")
    data = _dataset(path)
    result = run_recipe(
        path, _recipe(precision="int8", batch_sizes=[1]), tmp_path / "w", evaluation=data, calibration=data
    )
    assert any("converted to 13" in message for message in result.messages), result.messages
    (engine,) = result.engines
    assert engine.artifact.metadata["per_channel"] is True
    report = (engine.artifact.path.parent / "layer_errors.json").read_text()
    assert '"unavailable": []' in report


def test_budget_on_an_opset11_graph_ends_with_an_engine(tmp_path: Path) -> None:
    path = quirk_graphs.fused_batchnorm_opset11(tmp_path / "bn11.onnx")
    data = _dataset(path)
    recipe = _recipe(
        precision="int8", batch_sizes=[1], accuracy_budget={"metric": "fidelity", "max_drop": 0.0}
    )
    result = run_recipe(path, recipe, tmp_path / "w", evaluation=data, calibration=data)
    (engine,) = result.engines
    budget = engine.artifact.metadata["accuracy_budget"]
    assert len(budget["steps"]) > 1  # the ranking worked, the search ran


def test_outputs_whose_size_depends_on_the_data_do_not_fail_the_job(tmp_path: Path) -> None:
    path = quirk_graphs.data_dependent_output(tmp_path / "det.onnx")
    rng = np.random.default_rng(0)
    rows = rng.random((16, 8), dtype=np.float32) * np.linspace(0.3, 2.5, 16, dtype=np.float32)[:, None]
    data = Dataset({"x": rows}, None)  # batches of 4 peak at about 0.6 to 2.5: 1 to 7 boxes
    recipe = _recipe(
        precision="int8", batch_sizes=[1, 4], accuracy_budget={"metric": "fidelity", "max_drop": 0.01}
    )
    result = run_recipe(path, recipe, tmp_path / "w", evaluation=data, calibration=data)
    assert any("accuracy not measured" in message for message in result.messages), result.messages
    (engine,) = result.engines
    assert "unavailable" in engine.measurement.accuracy and engine.measurement.latency["4"]["runs"] > 0


def test_declared_output_shape_that_lies(tmp_path: Path) -> None:
    path = quirk_graphs.wrong_declared_output(tmp_path / "lies.onnx")
    assert "declared shapes disagree" in inspect_model(path).warnings[0]  # accepted, as ONNX Runtime does
    data = _dataset(path)
    result = run_recipe(
        path, _recipe(precision="int8", batch_sizes=[1, 4]), tmp_path / "w", evaluation=data, calibration=data
    )
    (engine,) = result.engines
    assert engine.measurement.accuracy["fidelity"]["cosine_similarity"] > 0.99, engine.measurement.accuracy


def test_error_texts_never_show_server_paths() -> None:
    detail = EngineError("Load model from /srv/optiforge/jobs/job_1/int8/model.onnx failed: bad graph").detail
    assert detail == "Load model from model.onnx failed: bad graph"
    assert scrub_paths("ratio 1/2, b=1/8, http://host/x") == "ratio 1/2, b=1/8, http://host/x"


def test_layer_report_never_fails_the_job(tmp_path: Path) -> None:
    """A QDQ model the debug tooling cannot load: the report says why, and returns."""
    path = quirk_graphs.scalar_weight(tmp_path / "scalar.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    report = layer_errors(path, broken, _dataset(path), batch_size=4, workdir=tmp_path)
    assert {item["part"] for item in report["unavailable"]} == {"activations", "weights"}
    assert all(str(tmp_path) not in item["reason"] for item in report["unavailable"])


def test_conflicting_batch_names_fail_symbolic_inference_but_not_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnx import TensorProto, helper, numpy_helper, save_model

    weight = numpy_helper.from_array(np.random.default_rng(0).random((8, 6), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])],
        "tf2onnx_style",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__1", 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["unk__2", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__3", 6])],
        [weight],
    )
    path = tmp_path / "names.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    data = _dataset(path)
    recipe = _recipe(
        precision="int8", batch_sizes=[1, 4], accuracy_budget={"metric": "fidelity", "max_drop": 0.01}
    )
    result = run_recipe(path, recipe, tmp_path / "w", evaluation=data, calibration=data)
    assert any("symbolic shape inference failed" in message for message in result.messages)
    assert result.engines[0].comparison["verdict"] != "unfaithful"


def test_unfaithful_int8_is_flagged_with_the_budgeted_recipe(tmp_path: Path) -> None:
    """Outputs that sum to nearly zero make INT8 error dominate: the verdict says so, and the job
    message carries the exact recipe to send with an accuracy budget."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    rng = np.random.default_rng(0)
    big = numpy_helper.from_array((rng.standard_normal((8, 64)) * 100).astype(np.float32), "big")
    cancel = numpy_helper.from_array(-numpy_helper.to_array(big).copy(), "cancel")
    small = numpy_helper.from_array((rng.standard_normal((8, 64)) * 0.01).astype(np.float32), "small")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["a"]),
            helper.make_node("MatMul", ["x", "cancel"], ["b"]),
            helper.make_node("MatMul", ["x", "small"], ["c"]),
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "c"], ["y"]),
        ],
        "cancelling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [big, cancel, small],
    )
    path = tmp_path / "cancel.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    data = _dataset(path, samples=32)
    result = run_recipe(
        path, _recipe(precision="int8", batch_sizes=[1]), tmp_path / "w", evaluation=data, calibration=data
    )
    (engine,) = result.engines
    assert engine.comparison["verdict"] == "unfaithful", engine.measurement.accuracy
    message = next(m for m in result.messages if "unfaithful" in m)
    assert '"accuracy_budget":{"metric":"fidelity","max_drop":0.01}' in message

    suggested = Recipe.from_dict(json.loads(message.split("recipe: ", 1)[1]))  # send what it says
    budgeted = run_recipe(path, suggested, tmp_path / "w2", evaluation=data, calibration=data)
    (engine,) = budgeted.engines
    assert engine.comparison["verdict"] != "unfaithful", engine.measurement.accuracy
    assert engine.artifact.metadata["accuracy_budget"]["met"]


# ---------------------------------------------------------------- through the API, as a user meets them


@pytest.fixture
def api(local_api: LocalApi) -> LocalApi:
    return local_api


def _upload(client: TestClient, kind: str, path: Path) -> dict:
    with path.open("rb") as handle:
        response = client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
    return response.json()


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _job(api: LocalApi, body: dict) -> dict:
    response = api.client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    run_job_by_id(api.settings, response.json()["id"])
    return api.client.get(f"/v1/jobs/{response.json()['id']}").json()


def test_recurrent_model_over_http(api: LocalApi, tmp_path: Path) -> None:
    """-1 dims and state with its batch in dim 1: upload, rows-per-sample dataset, budgeted INT8,
    /v2 metadata with -1, JSON and binary inference, and batching refused with the reason."""
    model = _upload(api.client, "models", quirk_graphs.recurrent_state(tmp_path / "rnn.onnx", named=False))
    assert [spec["shape"] for spec in model["inputs"]] == [[None, 4], [2, None, 8]]
    assert [spec["batch_axis"] for spec in model["inputs"]] == [0, 1]
    rng = np.random.default_rng(0)
    rows = {"x": rng.random((32, 4), dtype=np.float32), "h": rng.random((32, 2, 8), dtype=np.float32)}
    dataset = _upload(api.client, "datasets", _npz(tmp_path / "rows.npz", **rows))
    job = _job(
        api,
        {
            "model_id": model["id"],
            "calibration_dataset_id": dataset["id"],
            "evaluation_dataset_id": dataset["id"],
            "recipe": {
                "precision": "int8",
                "batch_sizes": [1, 4],
                "accuracy_budget": {"metric": "fidelity", "max_drop": 0.01},
                "measure": QUICK,
            },
        },
    )
    assert job["status"] == "succeeded", job
    engine_id = job["engine_ids"][0]
    assert api.client.get(f"/v1/engines/{engine_id}/layer-errors").json()["unavailable"] == []
    metadata = api.client.get(f"/v2/models/{engine_id}").json()
    assert [tensor["shape"] for tensor in metadata["inputs"]] == [[-1, 4], [2, -1, 8]]

    x, h = rows["x"][:3], np.ascontiguousarray(np.moveaxis(rows["h"][:3], 0, 1))
    body, length = tensors.encode({"inputs": []}, "inputs", {"x": x, "h": h}, binary=True)
    response = api.client.post(
        f"/v2/models/{engine_id}/infer", content=body, headers={tensors.HEADER_LENGTH: str(length)}
    )
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["batch_size"] == 3
    shapes = {output["name"]: output["shape"] for output in response.json()["outputs"]}
    assert shapes == {"y": [3, 8], "h_out": [2, 3, 8]}
    v1 = api.client.post(
        f"/v1/engines/{engine_id}/infer", json={"inputs": {"x": x.tolist(), "h": h.tolist()}}
    )
    assert v1.status_code == 200 and v1.json()["batch_size"] == 3, v1.text
    wrong = api.client.post(
        f"/v1/engines/{engine_id}/infer", json={"inputs": {"x": x.tolist(), "h": h[:, :2].tolist()}}
    )
    assert wrong.status_code in (400, 422) and "disagree on the batch size" in wrong.text
    batching = api.client.put(f"/v1/engines/{engine_id}/batching", json={"max_batch_size": 8})
    assert batching.status_code == 422 and batching.json()["code"] == "not_batchable"


def test_scalar_input_over_http(api: LocalApi, tmp_path: Path) -> None:
    model = _upload(api.client, "models", quirk_graphs.scalar_input(tmp_path / "audio.onnx"))
    audio = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    varying = _upload(
        api.client, "datasets", _npz(tmp_path / "v.npz", audio=audio, sr=np.arange(16, dtype=np.int64) + 8000)
    )
    body = {
        "model_id": model["id"],
        "evaluation_dataset_id": varying["id"],
        "recipe": {"batch_sizes": [1, 4]},
    }
    refused = api.client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and "only batch size 1" in refused.json()["detail"], refused.text

    constant = _upload(
        api.client, "datasets", _npz(tmp_path / "c.npz", audio=audio, sr=np.full(16, 16000, dtype=np.int64))
    )
    assert constant["uniform_arrays"] == ["sr"] and varying["uniform_arrays"] == []
    job = _job(
        api,
        {
            "model_id": model["id"],
            "calibration_dataset_id": constant["id"],
            "evaluation_dataset_id": constant["id"],
            "recipe": {"precision": "int8", "batch_sizes": [1, 4], "measure": QUICK},
        },
    )
    assert job["status"] == "succeeded", job
    response = api.client.post(
        f"/v1/engines/{job['engine_ids'][0]}/infer",
        json={"inputs": {"audio": audio[:2].tolist(), "sr": 16000}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["batch_size"] == 2
    feeds = {"audio": audio[:3], "sr": np.array(16000, dtype=np.int64)}
    body, length = tensors.encode({"inputs": []}, "inputs", feeds, binary=True)
    v2 = api.client.post(
        f"/v2/models/{job['engine_ids'][0]}/infer", content=body, headers={tensors.HEADER_LENGTH: str(length)}
    )
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["shape"] == [3, 4] and v2.json()["parameters"]["batch_size"] == 3


# ---------------------------------------------------------------- issue 19: items 12 and 13


def test_static_batch_one_with_a_dynamic_sequence_over_http(api: LocalApi, tmp_path: Path) -> None:
    """`input_ids` [1, 2, "seq_len"]: the static leading 1 is the batch, the sequence is not; rows of
    [2, 64] fit, and the job builds and measures an engine (the previous release ran this model)."""
    model = _upload(api.client, "models", quirk_graphs.static_batch_dynamic_sequence(tmp_path / "seq.onnx"))
    assert [spec["batch_axis"] for spec in model["inputs"]] == [0]
    assert [spec["batch_axis"] for spec in model["outputs"]] == [0]
    ids = np.random.default_rng(0).integers(0, 32, size=(8, 2, 64), dtype=np.int64)
    dataset = _upload(api.client, "datasets", _npz(tmp_path / "ids.npz", input_ids=ids))
    body = {
        "model_id": model["id"],
        "evaluation_dataset_id": dataset["id"],
        "calibration_dataset_id": dataset["id"],
        "recipe": {"precision": "int8", "batch_sizes": [1], "measure": QUICK},
    }
    job = _job(api, body)
    assert job["status"] == "succeeded", job
    engine = api.client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
    assert engine["precision"] == "int8", engine
    response = api.client.post(
        f"/v1/engines/{engine['id']}/infer", json={"inputs": {"input_ids": ids[:1, :, :10].tolist()}}
    )
    assert response.status_code == 200, response.text
    assert np.asarray(response.json()["outputs"]["logits"]).shape == (1, 2, 5)


def test_batch_axis_rule_for_a_static_leading_one() -> None:
    def axes(*shapes: tuple) -> list[int | None]:
        specs = [TensorSpec(f"t{i}", "int64", shape) for i, shape in enumerate(shapes)]
        return [spec.batch_axis for spec in assign_batch_axes(specs)]

    assert axes((1, 2, "seq_len")) == [0]
    assert axes((1, "seq"), (1, "seq"), (1, "seq")) == [0, 0, 0]  # a static-batch BERT export
    assert axes(("batch", 4), (1, "batch", 8)) == [0, 1]  # one-layer recurrent state: named like the batch
    assert axes((1, "batch", 4), (1, "batch", 8)) == [1, 1]  # sequence-first, the batch named as one
    specs = [TensorSpec("ids", "int64", (1, 2, "seq_len"))]
    outputs = assign_batch_axes(specs, [TensorSpec("y", "float32", (1, "seq_len", 5))])
    assert [spec.batch_axis for spec in outputs] == [0]


def test_stated_batch_axis_at_upload(api: LocalApi, tmp_path: Path) -> None:
    """A user states an input's batch axis at upload: validated against the inputs (422 otherwise),
    stored and shown, and used to lay out datasets; a mismatch that another axis would fit says so."""
    path = quirk_graphs.recurrent_state(tmp_path / "rnn.onnx", named=False)

    def upload(batch_axis: str) -> object:
        with path.open("rb") as handle:
            return api.client.post(
                "/v1/models", files={"file": (path.name, handle)}, data={"batch_axis": batch_axis}
            )

    for wrong in ('{"nope": 0}', '{"h": 3}', '{"h": "one"}', "[1]", "not json"):
        refused = upload(wrong)
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_batch_axis", refused.text
    assert api.client.get("/v1/models").json() == []  # nothing half-stored

    stated = upload('{"h": null}')
    assert stated.status_code == 201, stated.text
    inputs = {spec["name"]: spec for spec in stated.json()["inputs"]}
    assert inputs["h"]["batch_axis"] is None and inputs["h"]["batch_axis_stated"] is True
    assert inputs["x"]["batch_axis"] == 0 and not inputs["x"].get("batch_axis_stated")
    assert api.client.get(f"/v1/models/{stated.json()['id']}").json()["inputs"] == stated.json()["inputs"]

    # rows shaped for another axis: the error names the axis that would fit and how to state it
    inferred = _upload(api.client, "models", path)
    rng = np.random.default_rng(0)
    rows = {"x": rng.random((8, 4), dtype=np.float32), "h": rng.random((8, 2, 8), dtype=np.float32)}
    stacked_on_dim_0 = {"x": rows["x"], "h": rng.random((8, 7, 8), dtype=np.float32)}  # h rows: [7, 8]
    dataset = _upload(api.client, "datasets", _npz(tmp_path / "d.npz", **stacked_on_dim_0))
    body = {
        "model_id": inferred["id"],
        "evaluation_dataset_id": dataset["id"],
        "recipe": {"batch_sizes": [1]},
    }
    refused = api.client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and refused.json()["code"] == "dataset_mismatch", refused.text
    assert 'batch_axis={"h": 0}' in refused.json()["detail"], refused.text


def test_float16_inside_int8_over_http(api: LocalApi, tmp_path: Path) -> None:
    """fp16 weights behind Cast nodes and a float16 Resize: INT8 quantizes the float32 parts only
    (no QuantizeLinear on a float16 tensor, which ONNX Runtime refuses) and says so."""
    model = _upload(api.client, "models", quirk_graphs.float16_islands(tmp_path / "unet.onnx"))
    x = np.random.default_rng(0).random((16, 3, 16, 16), dtype=np.float32)
    dataset = _upload(api.client, "datasets", _npz(tmp_path / "x.npz", x=x))
    job = _job(
        api,
        {
            "model_id": model["id"],
            "calibration_dataset_id": dataset["id"],
            "evaluation_dataset_id": dataset["id"],
            "recipe": {"precision": "int8", "batch_sizes": [1, 4], "measure": QUICK},
        },
    )
    assert job["status"] == "succeeded", job
    engines = [api.client.get(f"/v1/engines/{engine_id}").json() for engine_id in job["engine_ids"]]
    assert [engine["precision"] for engine in engines] == ["int8"], engines
    assert any("float16" in message for message in job["messages"]), job["messages"]
    kept = engines[0]["build_info"]["float16_nodes_kept_float"]
    assert any("Concat" in name for name in kept), kept


def test_int8_that_cannot_be_built_hands_over_the_float_engine(api: LocalApi, tmp_path: Path) -> None:
    """When INT8 cannot be built (here: ONNX Runtime's entropy calibration cannot histogram a
    calibration set with a 3e38 outlier), the job still succeeds with the faithful fp32 engine, and
    says why, with the failure's code, in its messages and the engine's build_info."""
    model = _upload(api.client, "models", quirk_graphs.minus_one_batch(tmp_path / "cnn.onnx"))
    rng = np.random.default_rng(0)
    clean = rng.random((16, 3, 8, 8), dtype=np.float32)
    outlier = clean.copy()
    outlier[0, 0, 0, 0] = 3e38
    evaluation = _upload(api.client, "datasets", _npz(tmp_path / "clean.npz", x=clean))
    calibration = _upload(api.client, "datasets", _npz(tmp_path / "outlier.npz", x=outlier))
    job = _job(
        api,
        {
            "model_id": model["id"],
            "calibration_dataset_id": calibration["id"],
            "evaluation_dataset_id": evaluation["id"],
            "recipe": {
                "precision": "int8",
                "quantize": {"calibration": "entropy"},
                "batch_sizes": [1],
                "measure": QUICK,
            },
        },
    )
    assert job["status"] == "succeeded", job
    engines = [api.client.get(f"/v1/engines/{engine_id}").json() for engine_id in job["engine_ids"]]
    assert [engine["precision"] for engine in engines] == ["fp32"], engines
    fallback = engines[0]["build_info"]["int8_fallback"]
    assert fallback["code"] == "quantization_failed" and "INT8 quantization failed" in fallback["reason"]
    assert any("int8 engine could not be built" in message for message in job["messages"]), job["messages"]
    fidelity = engines[0]["metrics"]["accuracy"]["fidelity"]
    assert fidelity["cosine_similarity"] > 0.999, fidelity


def test_static_batch_sequence_model_on_both_stacks(live_stack: LiveStack, tmp_path: Path) -> None:
    """Item 12 on SQLite + embedded broker and on PostgreSQL + Redis with a real worker: a stated
    batch axis is validated (nothing stored when refused), stored and shown; the job runs."""
    path = quirk_graphs.static_batch_dynamic_sequence(tmp_path / "seq.onnx")
    ids = np.random.default_rng(0).integers(0, 32, size=(8, 2, 64), dtype=np.int64)
    with live_stack.client() as client:
        before = client.get("/v1/models").json()
        with path.open("rb") as handle:
            refused = client.post(
                "/v1/models", files={"file": ("seq.onnx", handle)}, data={"batch_axis": '{"input_ids": 3}'}
            )
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_batch_axis", refused.text
        assert client.get("/v1/models").json() == before
        with path.open("rb") as handle:
            response = client.post(
                "/v1/models", files={"file": ("seq.onnx", handle)}, data={"batch_axis": '{"input_ids": 0}'}
            )
        assert response.status_code == 201, response.text
        model = client.get(f"/v1/models/{response.json()['id']}").json()
        assert model["inputs"][0]["batch_axis"] == 0 and model["inputs"][0]["batch_axis_stated"] is True
        np.savez(tmp_path / "ids.npz", input_ids=ids)
        with (tmp_path / "ids.npz").open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("ids.npz", handle)})
        assert dataset.status_code == 201, dataset.text
        body = {
            "model_id": model["id"],
            "evaluation_dataset_id": dataset.json()["id"],
            "recipe": {"batch_sizes": [1], "measure": QUICK},
        }
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"])
        assert job["status"] == "succeeded", job
