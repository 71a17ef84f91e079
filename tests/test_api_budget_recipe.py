"""Budgets that cannot be misread, recipe errors that say what was meant, and Swagger examples that
run as given (issue 23, items 3 and 11; app.api.schemas, app.api.body_errors)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api.schemas import AUTOTUNE_EXAMPLE, JOB_EXAMPLE
from tests.conftest import LocalApi


@pytest.fixture
def uploaded(local_api: LocalApi, tmp_path: Path) -> dict[str, str]:
    """A one-node model, a labelled and an unlabelled evaluation set for it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
    )
    model_path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    inputs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    np.savez(tmp_path / "labelled.npz", input=inputs, labels=np.arange(32) % 4)
    np.savez(tmp_path / "unlabelled.npz", input=inputs)
    ids = {}
    for key, path, kind in (
        ("model", model_path, "models"),
        ("labelled", tmp_path / "labelled.npz", "datasets"),
        ("unlabelled", tmp_path / "unlabelled.npz", "datasets"),
    ):
        with path.open("rb") as handle:
            response = local_api.client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
        assert response.status_code == 201, response.text
        ids[key] = response.json()["id"]
    return ids


def _job(client: TestClient, model_id: str, recipe: dict, **datasets: str):
    return client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe, **datasets})


@pytest.mark.parametrize(
    ("max_drop", "relative", "reading"),
    [
        (1, False, "max_drop 1 would allow a 100-point drop; for 1 point send 0.01"),
        (50, False, "max_drop 50 would allow a 5000-point drop; for 50 points send 0.5"),
        (0.6, True, "max_drop 0.6 would allow a drop of 60 % of the original's score; for 0.6 % send 0.006"),
    ],
)
def test_a_budget_over_half_is_422_with_its_probable_reading(
    local_api: LocalApi, uploaded: dict[str, str], max_drop: float, relative: bool, reading: str
) -> None:
    client = local_api.client
    budget = {"metric": "top1", "max_drop": max_drop, "relative": relative}
    searched = client.post(
        f"/v1/models/{uploaded['model']}/optimize",
        json={"evaluation_dataset_id": uploaded["labelled"], "accuracy_budget": budget},
    )
    assert searched.status_code == 422, searched.text
    assert searched.json()["code"] == "budget_out_of_range"
    assert reading in searched.json()["detail"]
    if not relative:
        recipe = {"precision": "int8", "accuracy_budget": {"metric": "fidelity", "max_drop": max_drop}}
        fixed = _job(client, uploaded["model"], recipe, evaluation_dataset_id=uploaded["labelled"])
        assert fixed.status_code == 422 and fixed.json()["code"] == "budget_out_of_range", fixed.text
        assert reading in fixed.json()["detail"]
    # the largest budget taken as meant
    at_limit = client.post(
        f"/v1/models/{uploaded['model']}/optimize",
        json={"evaluation_dataset_id": uploaded["labelled"], "accuracy_budget": {**budget, "max_drop": 0.5}},
    )
    assert at_limit.status_code == 202, at_limit.text


def test_unlabelled_evaluation_data_without_a_metric_measures_fidelity(
    local_api: LocalApi, uploaded: dict[str, str]
) -> None:
    client = local_api.client
    searched = client.post(
        f"/v1/models/{uploaded['model']}/optimize",
        json={"evaluation_dataset_id": uploaded["unlabelled"], "accuracy_budget": {"max_drop": 0.02}},
    )
    assert searched.status_code == 202, searched.text
    assert searched.json()["recipe"]["budget"]["metric"] == "fidelity"
    assert searched.json()["kind_label"] == "auto-optimize" and searched.json()["time_budget_s"] == 1800
    labelled = client.post(
        f"/v1/models/{uploaded['model']}/optimize", json={"evaluation_dataset_id": uploaded["labelled"]}
    )
    assert labelled.status_code == 202 and labelled.json()["recipe"]["budget"]["metric"] == "top1"
    # stated, top1 without labels is still refused, with what to send instead
    stated = client.post(
        f"/v1/models/{uploaded['model']}/optimize",
        json={"evaluation_dataset_id": uploaded["unlabelled"], "accuracy_budget": {"metric": "top1"}},
    )
    assert stated.status_code == 422 and "fidelity" in stated.json()["detail"], stated.text

    recipe = {"precision": "int8", "accuracy_budget": {"max_drop": 0.02}, "measure": {"min_seconds": 0}}
    fixed = _job(
        client,
        uploaded["model"],
        recipe,
        evaluation_dataset_id=uploaded["unlabelled"],
        calibration_dataset_id=uploaded["unlabelled"],
    )
    assert fixed.status_code == 202, fixed.text
    assert fixed.json()["recipe"]["accuracy_budget"]["metric"] == "fidelity"
    assert fixed.json()["kind_label"] == "recipe"


@pytest.mark.parametrize(
    ("body", "location", "suggestion"),
    [
        ({"recipe": {"precison": "int8"}}, ["body", "recipe", "precison"], "did you mean 'precision'?"),
        (
            {"recipe": {"quantize": {"calibraton": "minmax"}}},
            ["body", "recipe", "quantize", "calibraton"],
            "did you mean 'calibration'?",
        ),
        (
            {"recipe": {"accuracy_budget": {"max_dorp": 0.01}}},
            ["body", "recipe", "accuracy_budget", "max_dorp"],
            "did you mean 'max_drop'?",
        ),
        ({"modle_id": "x"}, ["body", "modle_id"], "did you mean 'model_id'?"),
        ({"recipe": {"zzz": 1}}, ["body", "recipe", "zzz"], "the fields here are: targets, precision"),
    ],
)
def test_an_unknown_recipe_field_says_what_was_meant_at_any_depth(
    local_api: LocalApi, body: dict, location: list[str], suggestion: str
) -> None:
    response = local_api.client.post("/v1/jobs", json={"model_id": "mdl_x", **body})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    issue = next(item for item in response.json()["errors"] if item["loc"] == location)
    assert suggestion in issue["msg"] and suggestion in response.json()["detail"]


def test_an_unknown_search_field_says_what_was_meant(local_api: LocalApi) -> None:
    response = local_api.client.post(
        "/v1/models/mdl_x/optimize",
        json={"evaluation_dataset_id": "ds_x", "space": {"prune_ratio": [0.3]}},
    )
    assert response.status_code == 422, response.text
    assert "did you mean 'prune_ratios'?" in response.json()["detail"]


def test_swagger_examples_run_as_given(local_api: LocalApi, uploaded: dict[str, str], tmp_path: Path) -> None:
    client = local_api.client
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert schemas["JobCreate"]["examples"] == [JOB_EXAMPLE]
    assert schemas["AutotuneCreate"]["examples"] == [AUTOTUNE_EXAMPLE]
    # the job example is a small valid recipe: with a model id of yours, it runs as given
    body = copy.deepcopy(JOB_EXAMPLE)
    body["model_id"] = uploaded["model"]
    started = client.post("/v1/jobs", json=body)
    assert started.status_code == 202, started.text
    searched = client.post(
        f"/v1/models/{uploaded['model']}/optimize",
        json={**AUTOTUNE_EXAMPLE, "evaluation_dataset_id": uploaded["labelled"]},
    )
    assert searched.status_code == 202, searched.text

    # every optional form field of the uploads is pre-filled empty, which is read as left out
    for path in ("/v1/datasets", "/v1/models"):
        form = document["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        form = schemas.get(form.get("$ref", "").rpartition("/")[2], form)
        optional = [name for name in form["properties"] if name not in form.get("required", [])]
        assert optional and all(
            form["properties"][name].get("examples") == [""] for name in optional if name != "tokenizer"
        ), form["properties"]
    np.savez(tmp_path / "again.npz", input=np.zeros((4, 4), np.float32))
    fields = {
        name: "" for name in ("name", "preprocessing", "classes", "input_name", "tokenization", "model_id")
    }
    with (tmp_path / "again.npz").open("rb") as handle:
        response = client.post("/v1/datasets", files={"file": ("again.npz", handle)}, data=fields)
    assert response.status_code == 201, response.text
