"""The per-layer INT8 report as people act on it (issue 23, item 9; app.services.layer_report):
each node's own error next to the accumulated one, sorted by the own error, nodes named as in the
model (not `onnx::Conv_39`), a legend, and the "keep these in float" recipe field that takes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.services.layer_report import LEGEND, layer_view, relative_error
from tests.conftest import QUICK_MEASURE, LocalApi
from tests.test_engine_download_lineage import small_cnn
from workers.job_runner import run_job_by_id


def _upload(api: LocalApi, path: Path, kind: str) -> str:
    with path.open("rb") as handle:
        response = api.client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _int8_engine(api: LocalApi, model_id: str, calibration_id: str, exclude: list[str]) -> str:
    recipe = {
        "precision": "int8",
        "batch_sizes": [1],
        "measure": QUICK_MEASURE,
        "quantize": {"nodes_to_exclude": exclude},
    }
    body = {"model_id": model_id, "calibration_dataset_id": calibration_id, "recipe": recipe}
    job = api.client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    run_job_by_id(api.settings, job.json()["id"])
    done = api.client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done
    return done["engine_ids"][0]


def test_rows_carry_their_own_error_sorted_by_it_with_model_names_and_a_legend(
    local_api: LocalApi, tmp_path: Path
) -> None:
    model_id = _upload(local_api, small_cnn(tmp_path / "small.onnx"), "models")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", input=rng.normal(size=(32, 1, 8, 8)).astype(np.float32))
    calibration_id = _upload(local_api, tmp_path / "calib.npz", "datasets")
    engine_id = _int8_engine(local_api, model_id, calibration_id, [])

    response = local_api.client.get(f"/v1/engines/{engine_id}/layer-errors")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["sorted_by"] == "own_error" and report["legend"] == LEGEND and "—" in report["legend"]
    for column in ("own_error", "accumulated_error", "node"):
        assert column in report["legend"]
    rows = report["activations"]
    assert rows and all(
        {"own_error", "accumulated_error", "node", "model_sqnr_db", "local_sqnr_db"} <= set(row)
        for row in rows
    )
    own = [row["own_error"] for row in rows if row["own_error"] is not None]
    assert own == sorted(own, reverse=True)  # by each node's own error, not the accumulated one
    assert all(row["own_error"] is None for row in rows[len(own) :])  # unmeasured last
    # the folded Relu's own error is measured (the activation applied first), not left blank
    relu = next(row for row in rows if row["op_type"] == "Relu")
    assert relu["own_error"] is not None and relu["quantized_node"] == "/features/conv/Conv"
    model_nodes = {"/features/conv/Conv", "/features/relu/Relu", "/Flatten", "/classifier/Gemm"}
    assert {row["node"] for row in rows if row["node"] != "input"} <= model_nodes
    weights = {row["weight"]: row for row in report["weights"]}
    assert weights["onnx::Conv_39"]["node"] == "/features/conv/Conv"  # the node, not the initializer
    assert weights["onnx::Conv_39"]["own_error"] == relative_error(weights["onnx::Conv_39"]["sqnr_db"])

    # "keep these in float": the worst node by its own error, excluded by name, stays float
    worst = next(
        row["quantized_node"] for row in rows if row["own_error"] is not None and row["quantized_node"]
    )
    kept = _int8_engine(local_api, model_id, calibration_id, [worst])
    engine = local_api.client.get(f"/v1/engines/{kept}").json()
    assert worst in engine["build_info"]["nodes_kept_float"] and engine["lineage"]["fallback_nodes"] == 1


def test_a_report_stored_before_own_errors_is_read_too() -> None:
    old = {
        "samples": 4,
        "activations": [
            {"tensor": "logits", "node": "/fc/Gemm", "op_type": "Gemm", "local_sqnr_db": 40.0,
             "model_sqnr_db": 20.0, "quantized_node": "/fc/Gemm"},
            {"tensor": "relu_out", "node": "/relu/Relu", "op_type": "Relu", "local_sqnr_db": None,
             "model_sqnr_db": 35.0, "quantized_node": "/conv/Conv"},
            {"tensor": "x", "node": "", "op_type": "graph input", "local_sqnr_db": 20.0,
             "model_sqnr_db": 20.0, "quantized_node": ""},
        ],
        "weights": [{"weight": "onnx::Conv_39", "sqnr_db": 30.0, "nodes": ["/conv/Conv"]}],
        "unavailable": [],
    }  # fmt: skip
    view = layer_view(old)
    assert [row["node"] for row in view["activations"]] == ["x", "/fc/Gemm", "/relu/Relu"]
    assert view["activations"][0]["own_error"] == 0.1 and view["activations"][1]["own_error"] == 0.01
    assert view["activations"][1]["accumulated_error"] == 0.1  # the logits' accumulated error is the worst
    assert view["activations"][2]["own_error"] is None  # "—", explained by the legend
    assert view["weights"][0]["node"] == "/conv/Conv"
