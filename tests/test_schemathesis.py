"""schemathesis over the OpenAPI document, on both kinds of live stack, with an API key and without.

The promise: no request the document allows, nor the malformed ones schemathesis derives from it
(negative data, NUL and other odd characters, undocumented methods), gets a 5xx, and every
response has a documented status, content type, headers and body (`CHECKS`), and a request the
document allows is not refused as malformed (`positive_data_acceptance`): whatever the document can
say (minimums, lengths, patterns, enums from the registries) it says. What it cannot (an empty file,
a recipe that does not fit the model, a Triton export of a project with no engine) is a refusal
with a code the operation declares for that status (`_declared_refusal`); `validation_error`, the
code of a request that does not match the document, never is.

Up to four stacks: the shared open ones (`live_stack`: embedded; PostgreSQL + Redis), fuzzed
without a key, and stacks of their own started with an admin key (`keyed_stack`, `API_KEY`: an
embedded one, and a PostgreSQL + Redis one too on a deeper run), fuzzed with it: a key closes a
stack for good, so the shared ones never get one (and making a key is left out there,
`CLOSES_AN_OPEN_STACK`). With a key every request also passes its look-up and scopes,
and the admin operations (keys, projects) run too.

Bounded for CI (about half a minute of requests a stack on 2 cores): `MAX_EXAMPLES` per operation
without a key and `KEYED_EXAMPLES` with one (the same server code behind a different door), besides
the coverage phase's cases, no shrinking, a timeout per request. OPTIFORGE_FUZZ_EXAMPLES runs
both deeper. Ids in paths and bodies often name real records (a model, datasets, a succeeded job,
engines and an alias that `_seeded` makes on each stack), and inference bodies often hold tensors
that fit, so success paths and their bodies are checked too, not only 404s and 422s. A DELETE
takes spare records, so the others live through the run; a job the fuzzer starts is cancelled at
once, and batching it turns on is turned off again (its queue delay would slow every later
inference). Every request carries the target's headers (the key, on a keyed stack). The stacks
of a kind get the same cases; each run draws new ones, and its seed is in its summary line
(OPTIFORGE_FUZZ_SEED replays it).
"""

from __future__ import annotations

import copy
import itertools
import os
import secrets
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
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi import checks as openapi_checks

from app.main import create_app
from tests.conftest import (
    QUICK_MEASURE,
    DigitsArtifacts,
    LiveStack,
    make_settings,
    start_stack,
    wait_for_job,
)

#: Examples per operation (besides the coverage phase's); OPTIFORGE_FUZZ_EXAMPLES for a deeper run.
DEEPER = os.environ.get("OPTIFORGE_FUZZ_EXAMPLES")
MAX_EXAMPLES = int(DEEPER or "25")
#: ... with a key: fewer by default (the key only changes the door), as many in a deeper run.
KEYED_EXAMPLES = int(DEEPER or "8")
#: The admin key of the keyed stacks (`keyed_stack`), made at their start (a bootstrap key).
API_KEY = "fuzz_" + secrets.token_urlsafe(32)
REQUEST_TIMEOUT_S = 30


def _declared_refusal(case: schemathesis.Case, response: Any) -> bool:
    """Whether `response` refuses for a reason the operation declares (its code is named in the
    description of that status in the document), other than not matching the document."""
    try:
        code = response.json().get("code")
    except ValueError:
        return False
    declared = case.operation.definition.raw.get("responses", {}).get(str(response.status_code), {})
    return code not in (None, "validation_error") and f"`{code}`" in declared.get("description", "")


@schemathesis.check
def positive_data_accepted(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """schemathesis's `positive_data_acceptance`, but for the refusals the document declares."""
    try:
        return openapi_checks.positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if _declared_refusal(case, response):
            return None
        raise


CHECKS = [
    not_a_server_error,
    positive_data_accepted,
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
    "/v1/jobs/{job_id}": "job",
}
#: Left out on the shared open stacks: the first API key made on a stack would close it to every
#: test that shares it (the keyed stacks run it).
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


#: Keyed stacks: the embedded one by default (the same server code as the open PostgreSQL + Redis
#: stack's, behind a key: the database-specific paths are fuzzed there), both on a deeper run.
KEYED_KINDS = ["embedded", "postgres-redis"] if DEEPER else ["embedded"]


@pytest.fixture(scope="session", params=KEYED_KINDS)
def keyed_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    """A stack of the kind of its own, closed from the start: its admin key is `API_KEY`."""
    root = tmp_path_factory.mktemp(f"keyed-{request.param}")
    with start_stack(request.param, root, OPTIFORGE_BOOTSTRAP_API_KEY=API_KEY) as stack:
        yield stack


@dataclass
class FuzzTarget:
    """One live stack and its seeded records (role -> id), with what the run did to it."""

    stack: LiveStack
    headers: dict[str, str]  # what every request carries: the key, if any
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
        negative_body = case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)
        if case.body == TENSORS and negative_body:
            case.body = {}  # a negative body stays one (no `inputs`), not tensors that fit
            case.media_type = "application/json"
        elif case.body == TENSORS:
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


def _upload(client: httpx.Client, kind: str, path: Path, **options: str) -> str:
    with path.open("rb") as handle:
        response = client.post(
            f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": "fuzz", **options}
        )
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
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
def open_target(
    live_stack: LiveStack, digits: DigitsArtifacts, request: pytest.FixtureRequest
) -> Iterator[FuzzTarget]:
    """The shared open stack, seeded; no key."""
    yield from _seeded(live_stack, {}, digits, request)


@pytest.fixture(scope="session")
def keyed_target(
    keyed_stack: LiveStack, digits: DigitsArtifacts, request: pytest.FixtureRequest
) -> Iterator[FuzzTarget]:
    """A keyed stack, seeded with its key; every request sends it (both ways a key is sent, so
    that any schemathesis makes up for the security schemes is replaced)."""
    yield from _seeded(
        keyed_stack, {"Authorization": f"Bearer {API_KEY}", "X-API-Key": API_KEY}, digits, request
    )


def _seeded(
    live_stack: LiveStack, headers: dict[str, str], digits: DigitsArtifacts, request: pytest.FixtureRequest
) -> Iterator[FuzzTarget]:
    """Seed the stack with real records; afterwards, cancel what is left and print what the run did."""
    with httpx.Client(base_url=live_stack.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        model = _upload(client, "models", digits.onnx_path)
        job, engine = _engine(client, model)
        _job, spare_engine = _engine(client, model)
        spare_job, _engine_of_spare_job = _engine(client, model)  # DELETE /v1/jobs/{id} takes it
        alias = f"fuzz-{engine}"
        assert client.put(f"/v1/engines/{engine}/alias", json={"alias": alias}).status_code == 200
        records = {
            "model": model,
            # another record: the same file with the same options would be `model` (deduplicated)
            "spare_model": _upload(client, "models", digits.onnx_path, batch_axis='{"input": 0}'),
            "dataset": _upload(client, "datasets", digits.eval_npz),
            "spare_dataset": _upload(client, "datasets", digits.calib_npz),
            "job": job,
            "engine": engine,
            "spare_engine": spare_engine,
            "spare_job": spare_job,
            "alias": alias,
        }
        target = FuzzTarget(live_stack, headers, client, records)
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
        f"schemathesis on {live_stack.name} {'with' if headers else 'without'} a key: "
        f"{sum(target.statuses.values())} requests in {elapsed:.0f} s "
        f"({summary}); {target.jobs_cancelled} jobs started and cancelled; "
        f"OPTIFORGE_FUZZ_SEED={schema.config.seed}"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


def test_each_stack_serves_the_document_under_test(live_stack: LiveStack) -> None:
    """The tests below are made from the in-process document: the one each stack serves."""
    response = httpx.get(f"{live_stack.base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200
    assert response.json() == DOCUMENT


#: How the fuzz runs, with a key or without.
FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,  # a shared 2-core machine: the request timeout bounds a call instead
    "database": None,  # no example database: each run draws afresh (the seed in its summary replays it)
    "phases": [Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    "suppress_health_check": list(HealthCheck),
}


def _fuzz(case: schemathesis.Case, target: FuzzTarget) -> None:
    target.fill(case)
    response = case.call_and_validate(
        base_url=target.stack.base_url, headers=target.headers, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
    )
    target.settle(case, response)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, **FUZZ_SETTINGS)
def test_api_conforms_to_its_document(case: schemathesis.Case, open_target: FuzzTarget) -> None:
    if case.operation.label in CLOSES_AN_OPEN_STACK:
        pytest.skip("would make the first API key, closing the shared open stack to the other tests")
    _fuzz(case, open_target)


@schema.parametrize()
@settings(max_examples=KEYED_EXAMPLES, **FUZZ_SETTINGS)
def test_api_with_a_key_conforms_to_its_document(case: schemathesis.Case, keyed_target: FuzzTarget) -> None:
    _fuzz(case, keyed_target)
