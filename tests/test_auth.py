"""API keys and projects: every route refuses a missing key and another project's key; scopes,
rate limits, foreign origins, revocation, the audit log, the server-side CLI and start-up rules.

Project A holds a real model, dataset, job and engine (the digits CNN, uploaded over the API; the
job and engine rows are written as a worker would, the engine file being the model, which is what
an fp32 ONNX Runtime engine is). Project B's key must not see or touch any of it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api.access_policy import ANY_KEY, DOC_PATHS, METRICS_PATH, OPEN_PATHS, AccessPolicy
from app.api.middleware.host import is_loopback_host
from app.core.db import get_sessionmaker
from app.core.migrate import upgrade
from app.main import create_app
from app.services import access
from tests.conftest import (
    DigitsArtifacts,
    LiveStack,
    _base_env,
    _start,
    _stop,
    _wait_ready,
    free_port,
    make_settings,
    stored_fp32_engine,
)
from tests.conftest import (
    _optiforge as optiforge_command,
)

# ---------------------------------------------------------------- a server with two projects


@dataclass
class TwoProjects:
    client: TestClient
    data_dir: Path
    keys: dict[str, str]  # role -> key
    ids: dict[str, str]  # what project A holds: model_id, dataset_id, job_id, engine_id, key_id
    database_url: str

    def headers(self, role: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"} if role else {}


def _make_key(database_url: str, project: str, scopes: list[str], **options: object) -> tuple[str, str]:
    with get_sessionmaker(database_url)() as session:
        record, key = access.create_key(session, project, name=f"{project}-test", scopes=scopes, **options)
        return record.id, key


@pytest.fixture(scope="module")
def two_projects(tmp_path_factory: pytest.TempPathFactory, digits: DigitsArtifacts) -> Iterator[TwoProjects]:
    data_dir = tmp_path_factory.mktemp("auth") / "data"
    # Every operation is tried with an unknown key, from one client address: not throttled here
    # (tests/test_access_hardening.py tests the throttle).
    settings = make_settings(data_dir, max_jobs_in_flight_per_project=1000, auth_failures_per_client=10_000)
    data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    url = settings.resolved_database_url
    with get_sessionmaker(url)() as session:
        access.create_project(session, "a")
        access.create_project(session, "b")
    keys, ids = {}, {}
    ids["key_id"], keys["a"] = _make_key(url, "a", ["read", "write", "infer"])
    _, keys["b"] = _make_key(url, "b", ["read", "write", "infer"])
    _, keys["b_admin"] = _make_key(url, "b", ["admin"])
    _, keys["a_infer"] = _make_key(url, "a", ["infer"])
    _, keys["a_read"] = _make_key(url, "a", ["read"])
    app = create_app(settings)
    with TestClient(app) as client:
        auth = {"Authorization": f"Bearer {keys['a']}"}
        with digits.onnx_path.open("rb") as handle:
            model = client.post("/v1/models", files={"file": ("digits.onnx", handle)}, headers=auth)
        assert model.status_code == 201, model.text
        with digits.eval_npz.open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("eval.npz", handle)}, headers=auth)
        assert dataset.status_code == 201, dataset.text
        ids["model_id"], ids["dataset_id"] = model.json()["id"], dataset.json()["id"]
        ids["job_id"], ids["engine_id"] = stored_fp32_engine(
            app.state.store,
            app.state.settings.resolved_database_url,
            ids["model_id"],
            project_id="a",
            evaluation_dataset_id=ids["dataset_id"],
            metrics={"latency": {"1": {}}},
        )
        yield TwoProjects(client, data_dir, keys, ids, url)


# ---------------------------------------------------------------- every route, walked


def _infer_body() -> dict:
    return {"inputs": {"input": np.zeros((1, 1, 32, 32), np.float32).tolist()}}


def _v2_body() -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]}


#: A valid request per operation, so that another project's key gets past validation to the
#: project check (a 422 would prove nothing). Every operation of the OpenAPI document must be here.
def _requests(ids: dict[str, str]) -> dict[tuple[str, str], dict]:
    model, dataset, engine = ids["model_id"], ids["dataset_id"], ids["engine_id"]
    recipe = {"precision": "fp16", "batch_sizes": [1], "measure": {"min_seconds": 0.01, "warmup_runs": 1}}
    return {
        ("get", "/v1/capabilities"): {},
        ("get", "/v1/models"): {},
        ("post", "/v1/models"): {"upload": "model"},
        ("get", "/v1/models/{model_id}"): {},
        ("delete", "/v1/models/{model_id}"): {},
        ("get", "/v1/models/{model_id}/download"): {},
        ("post", "/v1/models/{model_id}/sensitivity"): {"json": {"dataset_id": dataset}},
        ("post", "/v1/models/{model_id}/optimize"): {"json": {"evaluation_dataset_id": dataset}},
        ("get", "/v1/datasets"): {},
        ("post", "/v1/datasets"): {"upload": "dataset"},
        ("get", "/v1/datasets/{dataset_id}"): {},
        ("delete", "/v1/datasets/{dataset_id}"): {},
        ("get", "/v1/datasets/{dataset_id}/download"): {},
        ("post", "/v1/jobs"): {
            "json": {"model_id": model, "evaluation_dataset_id": dataset, "recipe": recipe}
        },
        ("get", "/v1/jobs"): {},
        ("get", "/v1/jobs/{job_id}"): {},
        ("delete", "/v1/jobs/{job_id}"): {},
        ("post", "/v1/jobs/{job_id}/cancel"): {},
        ("get", "/v1/jobs/{job_id}/report"): {},
        ("get", "/v1/jobs/{job_id}/sensitivity"): {},
        ("get", "/v1/jobs/{job_id}/autotune"): {},
        ("get", "/v1/engines"): {},
        ("get", "/v1/engines/{engine_id}"): {},
        ("delete", "/v1/engines/{engine_id}"): {},
        ("get", "/v1/engines/{engine_id}/download"): {},
        ("get", "/v1/engines/{engine_id}/layer-errors"): {},
        ("put", "/v1/engines/{engine_id}/alias"): {"json": {"alias": "prod"}},
        ("delete", "/v1/engines/{engine_id}/alias"): {},
        ("put", "/v1/engines/{engine_id}/batching"): {"json": {"max_batch_size": 8, "max_queue_delay_ms": 1}},
        ("delete", "/v1/engines/{engine_id}/batching"): {},
        ("post", "/v1/engines/{engine_id}/infer"): {"json": _infer_body()},
        ("get", "/v1/engines/{engine_id}/triton"): {},
        ("get", "/v1/triton"): {"params": {"engine": engine}},
        ("get", "/v2"): {},
        ("get", "/v2/models/{name}"): {},
        ("get", "/v2/models/{name}/versions/{version}"): {},
        ("get", "/v2/models/{name}/ready"): {},
        ("get", "/v2/models/{name}/versions/{version}/ready"): {},
        ("post", "/v2/models/{name}/infer"): {"json": _v2_body()},
        ("post", "/v2/models/{name}/versions/{version}/infer"): {"json": _v2_body()},
        ("get", "/v1/admin/projects"): {},
        ("post", "/v1/admin/projects"): {"json": {"id": "walked"}},
        ("delete", "/v1/admin/projects/{project_id}"): {},
        ("get", "/v1/admin/keys"): {},
        ("post", "/v1/admin/keys"): {"json": {"project": "a", "name": "walked", "scopes": ["read"]}},
        ("delete", "/v1/admin/keys/{key_id}"): {},
        ("get", "/v1/auth/me"): {},
        ("get", "/metrics"): {},
    }


def _path_values(ids: dict[str, str]) -> dict[str, str]:
    return {
        "model_id": ids["model_id"],
        "dataset_id": ids["dataset_id"],
        "job_id": ids["job_id"],
        "engine_id": ids["engine_id"],
        "name": ids["engine_id"],
        "version": ids["engine_id"],
        "key_id": ids["key_id"],
        "project_id": "a",
    }


def _send(
    api: TwoProjects, method: str, template: str, spec: dict, role: str | None, digits: DigitsArtifacts
):
    path = template.format(**_path_values(api.ids))
    kwargs: dict = {"headers": api.headers(role), "params": spec.get("params")}
    if "json" in spec:
        kwargs["json"] = spec["json"]
    if spec.get("upload") == "model":
        kwargs["files"] = {"file": ("digits.onnx", digits.onnx_path.read_bytes())}
    elif spec.get("upload") == "dataset":
        kwargs["files"] = {"file": ("eval.npz", digits.eval_npz.read_bytes())}
    return api.client.request(method.upper(), path, **kwargs)


def _operations(api: TwoProjects) -> list[tuple[str, str]]:
    operations = []
    for template, items in api.client.app.openapi()["paths"].items():
        operations += [(method, template) for method in items]
    return operations


def test_every_operation_is_walked(two_projects: TwoProjects) -> None:
    """A new route must join the walk below (and so say what another project's key gets)."""
    policy = AccessPolicy()
    guarded = [
        (method, template)
        for method, template in _operations(two_projects)
        if policy.required_scope(method.upper(), template) is not None
    ]
    missing = sorted(set(guarded) - set(_requests(two_projects.ids)))
    assert not missing, f"add these operations to tests/test_auth.py::_requests: {missing}"


def test_every_operation_refuses_a_missing_or_unknown_key(
    two_projects: TwoProjects, digits: DigitsArtifacts
) -> None:
    policy = AccessPolicy()
    for (method, template), spec in _requests(two_projects.ids).items():
        assert policy.required_scope(method.upper(), template) is not None
        response = _send(two_projects, method, template, spec, None, digits)
        assert response.status_code == 401, (method, template, response.text)
        body = response.json()
        assert body.get("code") == "api_key_required", (method, template, body)
        assert response.headers["www-authenticate"].startswith("Bearer")
        two_projects.keys["bogus"] = "ofk_not-a-real-key"
        response = _send(two_projects, method, template, spec, "bogus", digits)
        assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"


def test_another_projects_key_finds_nothing(two_projects: TwoProjects, digits: DigitsArtifacts) -> None:
    """Project B's key: a 404 for every id of project A (not 403: it learns nothing), lists that
    show none of A's records, creations that land in B, and admin routes it lacks the scope for."""
    a_ids = set(two_projects.ids.values())
    for (method, template), spec in _requests(two_projects.ids).items():
        response = _send(two_projects, method, template, spec, "b", digits)
        where = (method, template, response.status_code, response.text[:300])
        if template.startswith("/v1/admin") or template in ("/v1/auth/me", "/metrics"):
            expected = {200} if template == "/v1/auth/me" else {403}
            assert response.status_code in expected, where
            if template == "/v1/auth/me":
                assert response.json()["project"] == "b"
            continue
        names_a_record = (
            "{" in template
            or template == "/v1/triton"
            or any(value in json.dumps(spec.get("json")) for value in a_ids)
        )
        if names_a_record:
            assert response.status_code == 404, where
        else:
            assert response.status_code in (200, 201, 202), where
            assert not a_ids & _ids_in(response), where
    # A still has everything, and its key still reaches it.
    own = two_projects.client.get(
        f"/v1/models/{two_projects.ids['model_id']}", headers=two_projects.headers("a")
    )
    assert own.status_code == 200
    listed = two_projects.client.get("/v1/models", headers=two_projects.headers("b")).json()
    assert listed and all(model["id"] not in a_ids for model in listed)  # B's own upload, only


def _ids_in(response) -> set[str]:
    try:
        text = json.dumps(response.json())
    except ValueError:
        return set()
    return {word.strip('"') for word in text.replace(",", " ").split() if word.strip('"').count("_") >= 1}


def test_inference_with_the_owning_projects_key(two_projects: TwoProjects) -> None:
    engine = two_projects.ids["engine_id"]
    for role in ("a", "a_infer"):
        v1 = two_projects.client.post(
            f"/v1/engines/{engine}/infer", json=_infer_body(), headers=two_projects.headers(role)
        )
        assert v1.status_code == 200, v1.text
        v2 = two_projects.client.post(
            f"/v2/models/{engine}/infer", json=_v2_body(), headers={"X-API-Key": two_projects.keys[role]}
        )
        assert v2.status_code == 200, v2.text


def test_scopes(two_projects: TwoProjects) -> None:
    client, ids = two_projects.client, two_projects.ids
    infer_only = two_projects.headers("a_infer")
    refused = client.get("/v1/models", headers=infer_only)
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    read_only = two_projects.headers("a_read")
    assert client.get(f"/v1/models/{ids['model_id']}", headers=read_only).status_code == 200
    assert client.delete(f"/v1/engines/{ids['engine_id']}/alias", headers=read_only).status_code == 403
    assert (
        client.post(f"/v2/models/{ids['engine_id']}/infer", json=_v2_body(), headers=read_only).status_code
        == 403
    )
    me = client.get("/v1/auth/me", headers=infer_only).json()
    assert me["project"] == "a" and me["scopes"] == ["infer"]


def test_open_paths_need_no_key(two_projects: TwoProjects) -> None:
    for path in [*sorted(OPEN_PATHS), "/openapi.json", "/docs"]:
        assert two_projects.client.get(path).status_code in (200, 503), path
    assert two_projects.client.get(METRICS_PATH).status_code == 401
    assert two_projects.client.get(METRICS_PATH, headers=two_projects.headers("a_read")).status_code == 403
    assert two_projects.client.get(METRICS_PATH, headers=two_projects.headers("b_admin")).status_code == 200
    assert AccessPolicy(public_docs=False).required_scope("GET", "/openapi.json") == "read"
    assert all(AccessPolicy(public_docs=False).required_scope("GET", path) for path in DOC_PATHS)
    assert AccessPolicy().required_scope("GET", "/v1/auth/me") == ANY_KEY


def test_admin_api_manages_projects_and_keys(
    two_projects: TwoProjects, caplog: pytest.LogCaptureFixture
) -> None:
    client, admin = two_projects.client, two_projects.headers("b_admin")
    caplog.set_level(logging.INFO, logger="optiforge.audit")
    assert client.post("/v1/admin/projects", json={"id": "team-x"}, headers=admin).status_code == 201
    assert (
        client.post("/v1/admin/projects", json={"id": "team-x"}, headers=admin).json()["code"]
        == "project_exists"
    )
    assert client.post("/v1/admin/projects", json={"id": "Bad Name"}, headers=admin).status_code == 422
    created = client.post(
        "/v1/admin/keys", json={"project": "team-x", "name": "svc", "scopes": ["infer"]}, headers=admin
    )
    assert created.status_code == 201, created.text
    key, key_id = created.json()["key"], created.json()["id"]
    assert key.startswith("ofk_") and created.json()["prefix"] == key[:10]
    listed = client.get("/v1/admin/keys", params={"project": "team-x"}, headers=admin).json()
    assert [item["id"] for item in listed] == [key_id] and "key" not in listed[0]
    assert client.get("/v1/auth/me", headers={"Authorization": f"Bearer {key}"}).json()["project"] == "team-x"
    assert client.delete(f"/v1/admin/keys/{key_id}", headers=admin).json()["revoked_at"]
    assert client.get("/v1/auth/me", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert client.delete("/v1/admin/projects/team-x", headers=admin).status_code == 204
    assert client.delete("/v1/admin/projects/a", headers=admin).json()["code"] == "project_in_use"
    lines = [record for record in caplog.records if record.name == "optiforge.audit"]
    actions = [record.action for record in lines]
    assert actions == ["project.create", "key.create", "key.revoke", "project.delete"]
    assert all(record.key_id.startswith("key_") for record in lines)
    assert all(key not in record.getMessage() and key not in str(vars(record)) for record in lines)


def test_audit_lines_for_changes_name_the_key_never_the_key(
    two_projects: TwoProjects, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="optiforge.audit")
    engine = two_projects.ids["engine_id"]
    assert (
        two_projects.client.put(
            f"/v1/engines/{engine}/alias", json={"alias": "audited"}, headers=two_projects.headers("a")
        ).status_code
        == 200
    )
    (line,) = [record for record in caplog.records if getattr(record, "action", None) == "alias.set"]
    assert (
        line.key_id == two_projects.ids["key_id"]
        and line.project_id == "a"
        and line.details == {"alias": "audited"}
    )
    assert two_projects.keys["a"] not in str(vars(line))


def test_inference_rate_limit_per_key(two_projects: TwoProjects) -> None:
    _, key = _make_key(two_projects.database_url, "a", ["infer"], infer_rps=1.0)
    headers, engine = {"Authorization": f"Bearer {key}"}, two_projects.ids["engine_id"]
    first = two_projects.client.post(f"/v2/models/{engine}/infer", json=_v2_body(), headers=headers)
    second = two_projects.client.post(f"/v2/models/{engine}/infer", json=_v2_body(), headers=headers)
    assert first.status_code == 200
    assert second.status_code == 429 and second.json()["code"] == "rate_limited"
    assert int(second.headers["retry-after"]) >= 1
    # Other keys are not slowed by this one's limit.
    assert (
        two_projects.client.post(
            f"/v2/models/{engine}/infer", json=_v2_body(), headers=two_projects.headers("a_infer")
        ).status_code
        == 200
    )


def test_foreign_origin_cannot_change_anything(two_projects: TwoProjects) -> None:
    client, ids = two_projects.client, two_projects.ids
    headers = {**two_projects.headers("a"), "Origin": "https://evil.example"}
    refused = client.delete(f"/v1/engines/{ids['engine_id']}/batching", headers=headers)
    assert refused.status_code == 403 and refused.json()["code"] == "foreign_origin"
    assert client.get("/v1/models", headers=headers).status_code == 200  # reading: CORS decides
    same = {**two_projects.headers("a"), "Origin": "http://testserver"}
    assert client.delete(f"/v1/engines/{ids['engine_id']}/batching", headers=same).status_code == 200
    cross_site = {**two_projects.headers("a"), "Sec-Fetch-Site": "cross-site"}
    assert client.delete(f"/v1/engines/{ids['engine_id']}/batching", headers=cross_site).status_code == 403


def test_clients_send_keys_over_http(two_projects: TwoProjects, digits: DigitsArtifacts) -> None:
    """tritonclient (headers=…), the SDK (api_key= and $OPTIFORGE_API_KEY) and the CLI (--api-key)
    against a real `optiforge serve` on the same database: keyed, and scoped to their project."""
    import tritonclient.http as triton
    from optiforge_client import Client, NotFound, Unauthorized
    from tritonclient.utils import InferenceServerException

    port = free_port()
    env = _base_env(two_projects.data_dir)
    log = two_projects.data_dir.parent / "serve-keys.log"
    process = _start([*optiforge_command(), "serve", "--no-worker", "--port", str(port)], env, log)
    stack = LiveStack("keys", f"http://127.0.0.1:{port}", env, two_projects.data_dir, [process], [log])
    engine, x = two_projects.ids["engine_id"], digits.split.test_x[:2]
    try:
        _wait_ready(stack)
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        keyed = {"Authorization": f"Bearer {two_projects.keys['a_infer']}"}
        assert client.infer(engine, [tensor], headers=keyed).as_numpy("logits").shape == (2, 10)
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer(engine, [tensor])
        with pytest.raises(InferenceServerException, match="no engine"):
            client.infer(engine, [tensor], headers={"Authorization": f"Bearer {two_projects.keys['b']}"})

        with Client(stack.base_url, api_key=two_projects.keys["a"]) as sdk:
            assert sdk.infer(engine, {"input": x}).outputs["logits"].shape == (2, 10)
        with Client(stack.base_url) as sdk, pytest.raises(Unauthorized):
            sdk.list_models()
        with Client(stack.base_url, api_key=two_projects.keys["b"]) as sdk, pytest.raises(NotFound):
            sdk.get_model(two_projects.ids["model_id"])

        cli_env = {**env, "OPTIFORGE_URL": stack.base_url}
        listed = subprocess.run(
            [*optiforge_command(), "models", "list", "--api-key", two_projects.keys["a_read"]],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0 and two_projects.ids["model_id"] in listed.stdout, listed.stderr
        from_env = subprocess.run(
            [*optiforge_command(), "models", "list"],
            env={**cli_env, "OPTIFORGE_API_KEY": two_projects.keys["b"]},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert from_env.returncode == 0 and two_projects.ids["model_id"] not in from_env.stdout
        refused = subprocess.run(
            [*optiforge_command(), "models", "list"], env=cli_env, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and "api_key_required" in refused.stderr
    finally:
        _stop(stack)


# ---------------------------------------------------------------- a server with no key yet


def test_a_server_without_keys_is_open_to_loopback_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", open_hosts="")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        me = client.get("/v1/auth/me").json()
        assert me == {
            "key_id": None,
            "project": "default",
            "scopes": ["admin", "infer", "read", "write"],
            "infer_rps": None,
        }
        rebound = client.get("/v1/models", headers={"Host": "attacker.example:8000"})
        assert rebound.status_code == 403 and rebound.json()["code"] == "host_not_allowed"
        # The first key ends open mode at once on this process.
        created = client.post(
            "/v1/admin/keys", json={"project": "default", "name": "first", "scopes": ["admin"]}
        )
        assert created.status_code == 201
        assert client.get("/v1/models").status_code == 401
        key = created.json()["key"]
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_cors_only_for_configured_origins(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", cors_origins="https://console.example")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        preflight = client.options(
            "/v1/models",
            headers={
                "Origin": "https://console.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://console.example"
        allowed = client.post(
            "/v1/admin/projects", json={"id": "cors"}, headers={"Origin": "https://console.example"}
        )
        assert allowed.status_code == 201
        other = client.options(
            "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_jobs_in_flight_per_project(tmp_path: Path, digits: DigitsArtifacts) -> None:
    settings = make_settings(tmp_path / "data", max_jobs_in_flight_per_project=1)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:  # no worker: jobs stay queued
        with digits.onnx_path.open("rb") as handle:
            model = client.post("/v1/models", files={"file": ("d.onnx", handle)}).json()
        with digits.eval_npz.open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("e.npz", handle)}).json()
        body = {
            "model_id": model["id"],
            "evaluation_dataset_id": dataset["id"],
            "recipe": {"precision": "fp16"},
        }
        assert client.post("/v1/jobs", json=body).status_code == 202
        refused = client.post("/v1/jobs", json=body)
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_jobs"
        assert refused.headers["retry-after"] == "30"


# ---------------------------------------------------------------- the server-side CLI


def _optiforge(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OPTIFORGE_DATA_DIR": str(data_dir), **env}
    for name in ("OPTIFORGE_DATABASE_URL", "OPTIFORGE_BROKER_URL", "REDIS_URL", "OPTIFORGE_API_KEY"):
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=environment, capture_output=True, text=True, timeout=120
    )


def test_cli_keys_and_projects(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert _optiforge(["projects", "create", "vision"], data).returncode == 0
    made = _optiforge(
        ["keys", "create", "--project", "vision", "--scopes", "read,infer", "--name", "svc"], data
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("ofk_") and "shown once" in made.stderr
    listed = _optiforge(["keys", "list"], data).stdout
    assert "project=vision" in listed and "scopes=read,infer" in listed and key not in listed
    key_id = listed.split()[0]
    assert _optiforge(["keys", "revoke", key_id], data).returncode == 0
    assert "revoked" in _optiforge(["keys", "list"], data).stdout
    bad = _optiforge(["keys", "create", "--project", "nope"], data)
    assert bad.returncode == 1 and "project_not_found" in bad.stderr
    assert "vision  models=0" in _optiforge(["projects", "list"], data).stdout


def test_serve_refuses_other_addresses_without_a_key(tmp_path: Path) -> None:
    refused = _optiforge(["serve", "--host", "0.0.0.0", "--no-worker"], tmp_path / "data")
    assert refused.returncode != 0
    assert "no API key" in refused.stderr and "optiforge keys create" in refused.stderr


def test_bootstrap_key_from_the_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    weak = _optiforge(["migrate"], data, OPTIFORGE_BOOTSTRAP_API_KEY="short")
    assert weak.returncode != 0 and "at least 32" in weak.stderr
    key = "k" * 40
    assert _optiforge(["migrate"], data, OPTIFORGE_BOOTSTRAP_API_KEY=key).returncode == 0
    assert _optiforge(["migrate"], data, OPTIFORGE_BOOTSTRAP_API_KEY=key).returncode == 0  # idempotent
    listed = _optiforge(["keys", "list"], data).stdout.splitlines()
    assert len(listed) == 1 and "scopes=admin" in listed[0] and "project=default" in listed[0]


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8000", "127.0.0.1:8000", "127.8.9.1", "[::1]:8000", "console.localhost:8000"],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1.attacker.example",  # a public name its owner points at 127.0.0.1 (DNS rebinding)
        "127.attacker.example:8000",
        "[::1].evil.com",
        "[::1]evil.com:80",
        "localhost:80@evil",
        "127.0.0.1:8000:9",
        "localhost.evil.com",
        "",
        "10.0.0.5:8000",
    ],
)
def test_names_that_only_look_local_are_not(host: str) -> None:
    assert not is_loopback_host(host)


def test_dns_rebinding_cannot_reach_a_server_without_keys(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", open_hosts="")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings), base_url="http://127.0.0.1.attacker.example:8000") as client:
        origin = {"Origin": "http://127.0.0.1.attacker.example:8000"}
        minted = client.post(
            "/v1/admin/keys", json={"project": "default", "name": "x", "scopes": ["admin"]}, headers=origin
        )
        assert minted.status_code == 403 and minted.json()["code"] == "host_not_allowed"
        assert client.get("/v1/models").status_code == 403


def test_the_policy_reads_the_path_under_a_root_path(two_projects: TwoProjects) -> None:
    """Behind a proxy that mounts the app under a prefix, /x/v1/admin/keys is still an admin route."""
    with TestClient(two_projects.client.app, root_path="/x") as client:
        read_only = two_projects.headers("a_read")
        assert client.get("/x/v1/admin/keys", headers=read_only).status_code == 403
        assert client.get("/x/metrics", headers=read_only).status_code == 403
        assert client.get("/x/v1/models", headers=read_only).status_code == 200
        infer = two_projects.headers("a_infer")
        engine = two_projects.ids["engine_id"]
        assert client.post(f"/x/v2/models/{engine}/infer", json=_v2_body(), headers=infer).status_code == 200


def test_console_pages_take_record_ids_only(two_projects: TwoProjects) -> None:
    """An id from the page's URL goes into API paths: one that could walk to another path is refused."""
    client = two_projects.client
    assert client.get("/ui/engines/eng_0123456789abcdef").status_code == 200
    assert client.get("/ui/engines/..%5Cmodels%5Cmdl_0123456789abcdef%3F").status_code == 422
    assert client.get("/ui/jobs/job_1%3F").status_code == 422
