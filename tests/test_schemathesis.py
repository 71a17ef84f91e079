"""schemathesis over the OpenAPI document, on both live stacks (embedded; PostgreSQL + Redis).

The promise: no request the document allows, nor the malformed ones schemathesis derives from it
(negative data, NUL and other odd characters, undocumented methods), gets a 5xx, and every
response has a documented status, content type, headers and body (`CHECKS`). Schema-valid data may
still be refused (an empty file, a recipe that does not fit the model): the document describes
shapes, not meaning, so `positive_data_acceptance` is not among the checks.

Bounded for CI (about a minute a stack on 2 cores): `MAX_EXAMPLES` per operation besides the
coverage phase's cases, no shrinking, a timeout per request. Ids in paths and bodies often name
real records (a model, datasets, a succeeded job, engines and an alias that `fuzz_target` makes on
each stack), and inference bodies often hold tensors that fit, so success paths and their bodies
are checked too, not only 404s and 422s. A DELETE takes spare records, so the others live through
the run; a job the fuzzer starts is cancelled at once, and batching it turns on is turned off
again (its queue delay would slow every later inference). Every request carries `api_headers`,
where an API key goes. Both stacks get the same cases; each run draws new ones, and its seed is in
its summary line (OPTIFORGE_FUZZ_SEED replays it).
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks

from app.main import create_app
from tests.conftest import QUICK_MEASURE, DigitsArtifacts, LiveStack, make_settings, wait_for_job

#: Examples per operation (besides the coverage phase's); OPTIFORGE_FUZZ_EXAMPLES for a deeper run.
MAX_EXAMPLES = int(os.environ.get("OPTIFORGE_FUZZ_EXAMPLES", "25"))
REQUEST_TIMEOUT_S = 30
CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.unsupported_method,
]
#: A generated value standing for a seeded record (`SEEDED_<role>`), filled in by the test.
PLACEHOLDER = "SEEDED_"
#: The records a path parameter may name.
PATH_ROLES = {
    "model_id": ("model",),
    "dataset_id": ("dataset",),
    "job_id": ("job",),
    "engine_id": ("engine",),
    "name": ("engine", "alias", "model"),  # /v2: an engine id, an alias or a model id
    "version": ("engine",),
}
#: Body fields that hold the id of a record.
BODY_ROLES = {
    "model_id": "model",
    "dataset_id": "dataset",
    "evaluation_dataset_id": "dataset",
    "calibration_dataset_id": "dataset",
}
#: DELETEs take a spare record of the role, so the others live through the run.
SPARES = {
    "/v1/models/{model_id}": "model",
    "/v1/datasets/{dataset_id}": "dataset",
    "/v1/engines/{engine_id}": "engine",
}
#: Left out while the stacks run open (`api_headers` empty): the first API key made on a stack would
#: close it to every test that shares it.
CLOSES_AN_OPEN_STACK = {"POST /v1/admin/keys"}
#: Bodies that run the digits engine: a placeholder for the tensors of its one input.
TENSORS = PLACEHOLDER + "tensors"
V1_TENSORS = {"inputs": {"input": [[[[0.0] * 32] * 32]]}}
V2_TENSORS = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]
}


def _document() -> dict[str, Any]:
    """The document the app serves, generated in-process: schemathesis makes its tests, one per
    operation, when this module is collected, before a stack runs (each stack's own document is
    compared with it below)."""
    with tempfile.TemporaryDirectory() as tmp:
        return create_app(make_settings(Path(tmp) / "data")).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))
if os.environ.get("OPTIFORGE_FUZZ_SEED"):  # replay a run: its seed is in its summary line
    schema.config.seed = int(os.environ["OPTIFORGE_FUZZ_SEED"])
pytestmark = pytest.mark.schemathesis


@schema.hook("flatmap_path_parameters")
def _ids_of_seeded_records(context: Any, path_parameters: Any) -> st.SearchStrategy:
    """The generated values, or placeholders for seeded records of every role they may name."""
    if not isinstance(path_parameters, dict) or not set(path_parameters) <= set(PATH_ROLES):
        return st.just(path_parameters)
    names = sorted(path_parameters)
    seeded = [
        {name: PLACEHOLDER + role for name, role in zip(names, roles, strict=True)}
        for roles in itertools.product(*(PATH_ROLES[name] for name in names))
    ]
    return st.sampled_from([path_parameters, *seeded])


@schema.hook("flatmap_body")
def _bodies_naming_seeded_records(context: Any, body: Any) -> st.SearchStrategy:
    """The generated body, or one whose ids are placeholders (tensors that fit, for inference)."""
    if context.operation is not None and context.operation.path.endswith("/infer"):
        return st.sampled_from([body, TENSORS])
    if not isinstance(body, dict) or not any(isinstance(body.get(key), str) for key in BODY_ROLES):
        return st.just(body)
    seeded = {
        key: PLACEHOLDER + BODY_ROLES[key] if key in BODY_ROLES and isinstance(value, str) else value
        for key, value in body.items()
    }
    return st.sampled_from([body, seeded])


@pytest.fixture(scope="session")
def api_headers() -> dict[str, str]:
    """Headers every fuzzed request carries: none while the API runs open (a loopback client and
    no key configured). With API keys, a key with every scope: {"Authorization": "Bearer …"}."""
    return {}


@dataclass
class FuzzTarget:
    """One live stack and its seeded records (role -> id), with what the run did to it."""

    stack: LiveStack
    client: httpx.Client
    records: dict[str, str]
    statuses: Counter[int] = field(default_factory=Counter)
    jobs_cancelled: int = 0

    def fill(self, case: schemathesis.Case) -> None:
        """Placeholders in the case become ids of seeded records (spares for a DELETE)."""
        for name, value in (case.path_parameters or {}).items():
            if isinstance(value, str) and value.startswith(PLACEHOLDER):
                role = value.removeprefix(PLACEHOLDER)
                spare = case.method.upper() == "DELETE" and SPARES.get(case.operation.path) == role
                case.path_parameters[name] = self.records["spare_" + role if spare else role]
        if case.body == TENSORS:
            case.body = V2_TENSORS if case.operation.path.startswith("/v2/") else V1_TENSORS
            case.media_type = "application/json"
        elif isinstance(case.body, dict):
            case.body = {key: self._record(value) for key, value in case.body.items()}

    def _record(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PLACEHOLDER):
            return self.records[value.removeprefix(PLACEHOLDER)]
        return value

    def settle(self, case: schemathesis.Case, response: Any) -> None:
        """Count the response, and undo what would slow the run down or outlive it: cancel a job
        the fuzzer started (no worker runs it), turn off batching it turned on, delete a project it
        made."""
        self.statuses[response.status_code] += 1
        if response.status_code == 202:
            job_id = response.json()["id"]
            assert self.client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 409)
            self.jobs_cancelled += 1
        elif response.status_code == 200 and case.operation.label == "PUT /v1/engines/{engine_id}/batching":
            assert self.client.delete(case.formatted_path).status_code == 200
        elif response.status_code == 201 and case.operation.label == "POST /v1/admin/projects":
            assert self.client.delete(f"/v1/admin/projects/{response.json()['id']}").status_code == 204


def _upload(client: httpx.Client, kind: str, path: Path) -> str:
    with path.open("rb") as handle:
        response = client.post(f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": "fuzz"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _engine(client: httpx.Client, model_id: str) -> tuple[str, str]:
    """A quick fp32 job on the stack's worker: (job id, engine id)."""
    recipe = {"targets": ["onnxruntime-cpu"], "batch_sizes": [1], "measure": QUICK_MEASURE}
    response = client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job["id"], job["engine_ids"][0]


@pytest.fixture(scope="session")
def fuzz_target(
    live_stack: LiveStack,
    digits: DigitsArtifacts,
    api_headers: dict[str, str],
    request: pytest.FixtureRequest,
) -> Iterator[FuzzTarget]:
    """Seed the stack with real records; afterwards, cancel what is left and print what the run did."""
    with httpx.Client(base_url=live_stack.base_url, headers=api_headers, timeout=REQUEST_TIMEOUT_S) as client:
        model = _upload(client, "models", digits.onnx_path)
        job, engine = _engine(client, model)
        _job, spare_engine = _engine(client, model)
        alias = f"fuzz-{engine}"
        assert client.put(f"/v1/engines/{engine}/alias", json={"alias": alias}).status_code == 200
        records = {
            "model": model,
            "spare_model": _upload(client, "models", digits.onnx_path),
            "dataset": _upload(client, "datasets", digits.eval_npz),
            "spare_dataset": _upload(client, "datasets", digits.calib_npz),
            "job": job,
            "engine": engine,
            "spare_engine": spare_engine,
            "alias": alias,
        }
        target = FuzzTarget(live_stack, client, records)
        started = time.monotonic()
        yield target
        elapsed = time.monotonic() - started
        for state in ("queued", "running"):  # nothing left for the workers
            left = client.get("/v1/jobs", params={"status": state, "model_id": model})
            assert left.status_code == 200, left.text
            for item in left.json():
                client.post(f"/v1/jobs/{item['id']}/cancel")
    summary = ", ".join(f"{status}: {count}" for status, count in sorted(target.statuses.items()))
    line = (
        f"schemathesis on {live_stack.name}: {sum(target.statuses.values())} requests in {elapsed:.0f} s "
        f"({summary}); {target.jobs_cancelled} jobs started and cancelled; "
        f"OPTIFORGE_FUZZ_SEED={schema.config.seed}"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


def test_each_stack_serves_the_document_under_test(
    live_stack: LiveStack, api_headers: dict[str, str]
) -> None:
    """The tests below are made from the in-process document: the one each stack serves."""
    response = httpx.get(
        f"{live_stack.base_url}/openapi.json", headers=api_headers, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code == 200
    assert response.json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # a shared 2-core machine: the request timeout bounds a call instead
    database=None,  # no example database: each run draws afresh (the seed in its summary replays it)
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document(
    case: schemathesis.Case, fuzz_target: FuzzTarget, api_headers: dict[str, str]
) -> None:
    if not api_headers and case.operation.label in CLOSES_AN_OPEN_STACK:
        pytest.skip("would make the first API key, closing the shared open stack to the other tests")
    fuzz_target.fill(case)
    response = case.call_and_validate(
        base_url=fuzz_target.stack.base_url, headers=api_headers, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
    )
    fuzz_target.settle(case, response)
