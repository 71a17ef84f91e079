"""Hostile inputs the API answers cleanly: NUL and other control characters in ids, names and
filters (a 4xx on both stacks: PostgreSQL refuses NUL in text, which used to surface as a 500, and
nothing is stored), and 405s that name every allowed method."""

from __future__ import annotations

from tests.conftest import DigitsArtifacts, LiveStack


def test_control_characters_are_refused_before_the_database(
    live_stack: LiveStack, digits: DigitsArtifacts
) -> None:
    with live_stack.client() as client:
        for path in ("/v1/models/a%00b", "/v1/jobs/job%01x", "/v1/engines/eng%7f", "/v1/datasets/%00"):
            response = client.get(path)
            assert response.status_code == 400, (path, response.text)
            assert response.json()["code"] == "control_characters"
        assert client.get("/v1/engines", params={"model_id": "a\x00b"}).status_code == 400
        assert client.get("/v1/jobs", params={"model_id": "a\x00b"}).status_code == 400
        v2 = client.post("/v2/models/a%00b/infer", json={"inputs": []})
        assert v2.status_code == 400 and v2.json()["code"] == "control_characters" and "error" in v2.json()

        job = client.post("/v1/jobs", json={"model_id": "a\u0000b"})
        assert job.status_code == 422 and "control characters" in job.text
        recipe = client.post(
            "/v1/jobs", json={"model_id": "m", "recipe": {"targets": ["onnxruntime-cpu\x00"]}}
        )
        assert recipe.status_code == 422
        search = client.post("/v1/models/m/optimize", json={"evaluation_dataset_id": "ds\x00"})
        assert search.status_code == 422
        before = client.get("/v1/models").json()
        with digits.onnx_path.open("rb") as handle:
            upload = client.post("/v1/models", files={"file": ("m.onnx", handle)}, data={"name": "a\x00b"})
        assert upload.status_code == 422
        assert client.get("/v1/models").json() == before  # nothing half-stored
        infer = client.post("/v1/engines/eng_x/infer", json={"inputs": {"in\x00put": [1.0]}})
        assert infer.status_code == 422


def test_405_lists_every_method_the_path_takes(local_api) -> None:
    """The framework's Allow names the first matching route's methods only; ours names them all."""
    client = local_api.client
    for method, path, allowed in (
        ("DELETE", "/v1/models", "GET, POST"),
        ("POST", "/v1/models/mdl_x", "DELETE, GET"),
        ("GET", "/v2/models/x/infer", "POST"),
    ):
        response = client.request(method, path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (method, path)
        assert response.json()["code"] == "method_not_allowed"


def test_limits_that_match_the_machine(local_api, tmp_path) -> None:
    """More threads than the machine's cores, timing that would hold a worker for hours, and an
    input declared absurdly large are refused when they arrive, naming what to change."""
    import onnx
    from onnx import TensorProto, helper

    from app.core.presence import beat

    client = local_api.client
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    small = tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(small))
    with small.open("rb") as handle:
        model = client.post("/v1/models", files={"file": ("small.onnx", handle)}).json()
    beat(local_api.settings, "w1", ["cpu"], {"logical_cores": 2})
    many = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"measure": {"threads": 64}}})
    assert many.status_code == 422 and "at most 2" in many.json()["detail"]
    hours = {"batch_sizes": [1, 2, 4, 8, 16, 32], "measure": {"min_seconds": 600}}
    long = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": hours})
    assert long.status_code == 422 and "over the limit of 900 s" in long.json()["detail"]
    fine = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"measure": {"threads": 2}}})
    assert fine.status_code == 202, fine.text

    huge = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2**20, 2**20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2**20, 2**20])],
    )
    absurd = tmp_path / "absurd.onnx"
    onnx.save(helper.make_model(huge, opset_imports=[helper.make_opsetid("", 17)]), str(absurd))
    before = client.get("/v1/models").json()
    with absurd.open("rb") as handle:
        refused = client.post("/v1/models", files={"file": ("absurd.onnx", handle)})
    assert refused.status_code == 422 and refused.json()["code"] == "input_too_large"
    assert "'x'" in refused.json()["detail"] and client.get("/v1/models").json() == before


def test_a_starting_worker_removes_scratch_no_live_attempt_owns(local_api) -> None:
    """Folders of killed attempts are removed at start-up; a running job's with a fresh lease stays."""
    from datetime import timedelta

    from app.core.db import session_scope
    from app.core.orm import JobRecord, JobStatus, utcnow
    from tests.conftest import placeholder_model
    from workers.recovery import remove_orphaned_scratch

    settings = local_api.settings
    with session_scope(settings.resolved_database_url) as session:
        model = placeholder_model(session, artifact_prefix="m")
        running = JobRecord(
            project_id="default",
            model_id=model.id,
            recipe={},
            messages=[],
            status=JobStatus.RUNNING,
            heartbeat_at=utcnow(),
        )
        stale = JobRecord(
            project_id="default",
            model_id=model.id,
            recipe={},
            messages=[],
            status=JobStatus.RUNNING,
            heartbeat_at=utcnow() - timedelta(seconds=10 * settings.job_lease_s),
        )
        done = JobRecord(
            project_id="default", model_id=model.id, recipe={}, messages=[], status=JobStatus.SUCCEEDED
        )
        session.add_all([running, stale, done])
        session.flush()
        ids = {"running": running.id, "stale": stale.id, "done": done.id, "gone": "job_0000000000000000"}
    for job_id in ids.values():
        (settings.scratch_dir / f"job-{job_id}-abc123").mkdir(parents=True)
    removed = remove_orphaned_scratch(settings)
    assert sorted(removed) == sorted([ids["stale"], ids["done"], ids["gone"]])
    assert [folder.name for folder in settings.scratch_dir.iterdir()] == [f"job-{ids['running']}-abc123"]
