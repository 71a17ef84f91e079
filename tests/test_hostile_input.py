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
