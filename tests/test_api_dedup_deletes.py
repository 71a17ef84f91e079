"""Uploads deduplicated by content within a project, and deletes that refuse (409) what is in use
unless forced (issue 23, item 5; app.services.uploads_dedup, app.services.deletes).

In-process API on SQLite with its real artifact store: what is (not) stored is checked on disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.db import get_sessionmaker
from app.core.orm import DEFAULT_PROJECT, JobKind, JobRecord, JobStatus
from tests.conftest import LocalApi, stored_fp32_engine


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    """A one-node ONNX model ([N, 4] float) and a dataset for it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_path, data_path = tmp_path / "tiny.onnx", tmp_path / "tiny.npz"
    onnx.save(model, model_path)
    np.savez(data_path, input=np.ones((16, 4), np.float32))
    return model_path, data_path


def _post(client: TestClient, kind: str, path: Path, **data: str):
    with path.open("rb") as handle:
        return client.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data=data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stored(api: LocalApi, prefix: str) -> bool:
    try:
        return api.store.local_path(prefix).exists()
    except FileNotFoundError:
        return False


def test_the_same_model_twice_is_one_record_and_the_list_filters_by_sha256(
    local_api: LocalApi, tiny: tuple[Path, Path]
) -> None:
    client, (model_file, _) = local_api.client, tiny
    first = _post(client, "models", model_file, name="tiny")
    assert first.status_code == 201, first.text
    assert first.json()["deduplicated"] is False and first.json()["sha256"] == _sha256(model_file)
    again = _post(client, "models", model_file, name="another name")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["deduplicated"] is True
    assert again.json()["name"] == "tiny"  # the record as it is: the name labels it, no copy
    models_dir = local_api.settings.data_dir / "artifacts" / "models"
    assert len(list(models_dir.iterdir())) == 1  # nothing new stored
    # other options make another model: its stored signature differs
    stated = _post(client, "models", model_file, batch_axis='{"input": 0}')
    assert stated.status_code == 201, stated.text
    assert stated.json()["id"] != first.json()["id"]

    listed = client.get("/v1/models", params={"sha256": _sha256(model_file).upper()})
    assert listed.status_code == 200
    assert sorted(item["id"] for item in listed.json()) == sorted([first.json()["id"], stated.json()["id"]])
    assert client.get("/v1/models", params={"sha256": "0" * 64}).json() == []
    refused = client.get("/v1/models", params={"sha256": "not-a-hash"})
    assert refused.status_code == 422 and refused.json()["code"] == "validation_error"
    # a deleted model is not matched: the next upload stores it again
    assert client.delete(f"/v1/models/{first.json()['id']}").status_code == 204
    fresh = _post(client, "models", model_file)
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]


def test_the_same_dataset_twice_is_one_record_options_included(
    local_api: LocalApi, tiny: tuple[Path, Path]
) -> None:
    client, (_, data_file) = local_api.client, tiny
    first = _post(client, "datasets", data_file)
    assert first.status_code == 201, first.text
    again = _post(client, "datasets", data_file, name="renamed")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["deduplicated"] is True
    listed = client.get("/v1/datasets", params={"sha256": _sha256(data_file)}).json()
    assert [item["id"] for item in listed] == [first.json()["id"]]
    # the same bytes in another project are that project's own upload
    with get_sessionmaker(local_api.settings.resolved_database_url)() as session:
        from app.core.orm import DatasetRecord

        record = session.get(DatasetRecord, first.json()["id"])
        assert record is not None and record.dedup_key and record.project_id == DEFAULT_PROJECT


def _queued_job(api: LocalApi, model_id: str, dataset_id: str | None = None) -> str:
    """A queued optimize job row (no worker runs in this API): what a delete must not pull from under."""
    with get_sessionmaker(api.settings.resolved_database_url)() as session:
        job = JobRecord(
            project_id=DEFAULT_PROJECT,
            model_id=model_id,
            kind=JobKind.OPTIMIZE,
            evaluation_dataset_id=dataset_id,
            recipe={},
            messages=[],
            status=JobStatus.QUEUED,
        )
        session.add(job)
        session.commit()
        return job.id


def _model_and_engine(api: LocalApi, model_file: Path) -> tuple[str, str, str]:
    model = _post(api.client, "models", model_file)
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]
    job_id, engine_id = stored_fp32_engine(api.store, api.settings.resolved_database_url, model_id)
    return model_id, job_id, engine_id


def test_an_engine_that_holds_an_alias_is_409_unless_forced(
    local_api: LocalApi, tiny: tuple[Path, Path]
) -> None:
    client = local_api.client
    _, job_id, engine_id = _model_and_engine(local_api, tiny[0])
    assert client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "tiny-prod"}).status_code == 200
    assert client.post("/v2/models/tiny-prod/infer", json=_infer_body()).status_code == 200

    refused = client.delete(f"/v1/engines/{engine_id}")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["code"] == "engine_holds_alias" and body["alias"] == "tiny-prod"
    assert "tiny-prod" in body["detail"] and "force=true" in body["detail"]
    assert client.get(f"/v1/engines/{engine_id}").status_code == 200

    prefix = f"jobs/{job_id}/engines/eng"
    assert _stored(local_api, prefix)
    assert client.delete(f"/v1/engines/{engine_id}", params={"force": "true"}).status_code == 204
    assert client.get(f"/v1/engines/{engine_id}").status_code == 404
    assert (
        client.post("/v2/models/tiny-prod/infer", json=_infer_body()).status_code == 404
    )  # forgotten at once
    assert not _stored(local_api, prefix)  # through the artifact store


def _infer_body() -> dict:
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, -1, 2, -2]}]}


def test_delete_job_removes_its_engines_and_report_and_refuses_active_or_serving_jobs(
    local_api: LocalApi, tiny: tuple[Path, Path]
) -> None:
    client = local_api.client
    model_id, job_id, engine_id = _model_and_engine(local_api, tiny[0])

    queued = _queued_job(local_api, model_id)
    active = client.delete(f"/v1/jobs/{queued}")
    assert active.status_code == 409 and active.json()["code"] == "job_active", active.text
    assert f"/v1/jobs/{queued}/cancel" in active.json()["detail"]
    assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 200
    assert client.delete(f"/v1/jobs/{queued}").status_code == 204
    assert client.get(f"/v1/jobs/{queued}").status_code == 404

    assert client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "served"}).status_code == 200
    serving = client.delete(f"/v1/jobs/{job_id}")
    assert serving.status_code == 409 and serving.json()["code"] == "engine_holds_alias", serving.text
    assert serving.json()["aliases"] == ["served"]
    assert _stored(local_api, f"jobs/{job_id}")
    assert client.delete(f"/v1/jobs/{job_id}", params={"force": True}).status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/engines/{engine_id}").status_code == 404
    assert not _stored(local_api, f"jobs/{job_id}")
    assert client.get(f"/v1/models/{model_id}").status_code == 200  # the model stays
    assert client.delete("/v1/jobs/job_missing").status_code == 404


def test_a_dataset_in_use_is_409_unless_forced_which_cancels_its_jobs(
    local_api: LocalApi, tiny: tuple[Path, Path]
) -> None:
    client = local_api.client
    model = _post(client, "models", tiny[0]).json()
    dataset = _post(client, "datasets", tiny[1]).json()
    job_id = _queued_job(local_api, model["id"], dataset["id"])
    refused = client.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and refused.json()["code"] == "dataset_in_use", refused.text
    assert refused.json()["job_ids"] == [job_id] and "force=true" in refused.json()["detail"]
    assert client.delete(f"/v1/datasets/{dataset['id']}", params={"force": "true"}).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert not _stored(local_api, f"datasets/{dataset['id']}")


def test_a_model_whose_engine_serves_is_409_unless_forced(
    local_api: LocalApi, tiny: tuple[Path, Path]
) -> None:
    client = local_api.client
    model_id, job_id, engine_id = _model_and_engine(local_api, tiny[0])
    assert client.put(f"/v1/engines/{engine_id}/alias", json={"alias": "front"}).status_code == 200
    refused = client.delete(f"/v1/models/{model_id}")
    assert refused.status_code == 409 and refused.json()["code"] == "model_serving", refused.text
    assert "front" in refused.json()["detail"] and refused.json()["aliases"] == ["front"]
    # a job still queued on it is refused forced or not: cancel it first
    queued = _queued_job(local_api, model_id)
    in_use = client.delete(f"/v1/models/{model_id}", params={"force": "true"})
    assert in_use.status_code == 409 and in_use.json()["code"] == "model_in_use"
    assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 200
    assert client.delete(f"/v1/models/{model_id}", params={"force": "true"}).status_code == 204
    for path in (f"/v1/models/{model_id}", f"/v1/jobs/{job_id}", f"/v1/engines/{engine_id}"):
        assert client.get(path).status_code == 404
    assert not _stored(local_api, f"models/{model_id}") and not _stored(local_api, f"jobs/{job_id}")
