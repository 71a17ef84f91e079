"""Extension points are registries, and everything that lists their members reads them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update

from app.core.db import session_scope
from app.core.orm import JobKind, JobRecord
from engines.prune.criteria import CRITERIA
from engines.quantize.int8 import CALIBRATION_METHODS
from engines.variants import PRECISIONS
from tests.conftest import LocalApi
from tests.quirk_graphs import scalar_weight
from workers.job_runner import run_job_by_id


def _upload_small_model(local_api: LocalApi, tmp_path: Path) -> dict:
    path = scalar_weight(tmp_path / "small.onnx")
    with path.open("rb") as handle:
        return local_api.client.post("/v1/models", files={"file": (path.name, handle)}).json()


def test_capabilities_and_openapi_enums_come_from_the_registries(local_api: LocalApi) -> None:
    capabilities = local_api.client.get("/v1/capabilities").json()
    assert capabilities["precisions"] == list(PRECISIONS)
    assert capabilities["calibration_methods"] == list(CALIBRATION_METHODS)
    assert {"nncf", "nncf-smoothquant", "cle"} <= set(CALIBRATION_METHODS)
    methods = capabilities["quantization_methods"]
    assert [method["name"] for method in methods] == list(CALIBRATION_METHODS)
    assert all(method["description"] and method["family"] and method["profiles"] for method in methods)
    assert [item["name"] for item in capabilities["prune_methods"]] == list(CRITERIA)
    assert capabilities["job_kinds"] == list(JobKind.ALL)
    ort = {
        "name": "onnxruntime-cpu",
        "queue": "cpu",
        "precisions": ["fp32", "fp16", "int8", "int8-dynamic", "int4-weight", "int8-weight"],
        "available_here": True,
    }
    assert ort in capabilities["backends"]
    schemas = local_api.client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["PruneIn"]["properties"]["method"]["enum"] == list(CRITERIA)
    assert schemas["QuantizeIn"]["properties"]["calibration"]["enum"] == list(CALIBRATION_METHODS)
    assert schemas["RecipeIn"]["properties"]["precision"]["enum"] == list(PRECISIONS)
    in_sensitivity = [name for name, item in CRITERIA.items() if item.in_sensitivity]
    assert schemas["SensitivityCreate"]["properties"]["method"]["enum"] == in_sensitivity


def test_a_criterion_s_needs_are_its_rules(local_api: LocalApi, tmp_path: Path) -> None:
    """taylor needs data: the rule comes from the criterion's flag, and the message names it."""
    model = _upload_small_model(local_api, tmp_path)
    response = local_api.client.post(
        "/v1/jobs", json={"model_id": model["id"], "recipe": {"prune": {"method": "taylor", "ratio": 0.5}}}
    )
    assert response.status_code == 422
    assert "taylor criterion needs a calibration dataset" in response.json()["detail"]


def test_a_job_of_a_kind_this_worker_cannot_run_fails_with_the_reason(
    local_api: LocalApi, tmp_path: Path
) -> None:
    model = _upload_small_model(local_api, tmp_path)
    job = local_api.client.post(
        "/v1/jobs", json={"model_id": model["id"], "recipe": {"batch_sizes": [1]}}
    ).json()
    assert job["kind"] == "optimize"
    with session_scope(local_api.settings.resolved_database_url) as session:
        session.execute(
            update(JobRecord).where(JobRecord.id == job["id"]).values(kind="retrain")
        )  # a kind of a newer API
    run_job_by_id(local_api.settings, job["id"])
    failed = local_api.client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "job_kind_unsupported"
    assert "autotune" in failed["error"]["detail"]
