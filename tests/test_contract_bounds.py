"""Issue 19 items 2, 3 and 7 (listings): what the API takes in can be stored and shown, what it
answers is bounded, and every listing comes a page at a time.

- Text no UTF-8 can hold (a lone surrogate, `"\\ud800"`, a valid JSON escape) is a 422 before
  anything is stored, on both stacks (it used to be stored, and then every listing 500ed).
- A row holding such text (written straight into the database, as older releases did) never takes
  a listing down: the listing leaves it out; asked for alone, it is a 409 `unrenderable_record`.
- A 422 lists a bounded number of problems; deep JSON and an oversized multipart header get a
  documented code of their own.
- `GET /v1/models|datasets|jobs|engines` answer `limit` records at a time, newest first, with the
  next page in `Link` and `X-Next-Cursor`, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from optiforge_client import Client

from app.api.schemas import TEXT_PATTERN
from app.core.db import session_scope
from app.core.orm import DEFAULT_PROJECT, DatasetRecord, EngineRecord, JobRecord, ModelRecord
from tests.conftest import LiveStack, LocalApi, make_settings, placeholder_model
from tests.test_image_datasets import make_zip, png
from tests.test_openapi_contract import _tiny_model

SURROGATE = "\ud800"


def _json(body: Any) -> bytes:
    """JSON with lone surrogates escaped, as a client that sends them writes it."""
    return json.dumps(body).encode()


def _post_json(client: httpx.Client | Any, url: str, body: Any, method: str = "POST") -> Any:
    return client.request(method, url, content=_json(body), headers={"content-type": "application/json"})


def _database_url(stack: LiveStack) -> str:
    url = stack.env.get("OPTIFORGE_DATABASE_URL")
    return url or make_settings(stack.data_dir).resolved_database_url


def _upload_model(client: httpx.Client | Any) -> str:
    response = client.post("/v1/models", files={"file": ("m.onnx", _tiny_model())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


# ---------------------------------------------------------------- item 2: refused at the door


def test_unpaired_surrogates_are_refused_before_anything_is_stored(live_stack: LiveStack) -> None:
    with live_stack.client() as client:
        model = _upload_model(client)
        bodies = [
            ("/v1/jobs", {"model_id": model, "recipe": {"quantize": {"nodes_to_exclude": [SURROGATE]}}}),
            ("/v1/jobs", {"model_id": SURROGATE}),  # was a 500 UnicodeEncodeError
            ("/v1/jobs", {"model_id": model, "recipe": {"prune": {"ignore": ["a" + SURROGATE]}}}),
            ("/v1/jobs", {"model_id": model, "recipe": {SURROGATE: 1}}),  # a key
            (f"/v1/models/{model}/sensitivity", {"dataset_id": "\udfff"}),
        ]
        for url, body in bodies:
            response = _post_json(client, url, body)
            assert response.status_code == 422, (url, body, response.text)
            assert response.json()["code"] == "validation_error"
            assert "surrogate" in response.json()["detail"]
        alias = _post_json(client, "/v1/engines/eng_nothing/alias", {"alias": SURROGATE}, "PUT")
        assert alias.status_code == 422, alias.text
        jobs = client.get("/v1/jobs", params={"model_id": model})
        assert jobs.status_code == 200 and jobs.json() == [], jobs.text  # nothing half-stored
        assert client.get("/v1/engines").status_code == 200


def test_surrogates_in_form_fields_and_names_are_never_stored(local_api: LocalApi) -> None:
    """Multipart text is decoded from bytes (no surrogate survives), and upload names are
    reduced to safe characters: what such an upload stores can be shown."""
    client = local_api.client
    encoded = SURROGATE.encode("utf-8", "surrogatepass")  # the bytes a careless client sends
    response = client.post(
        "/v1/models",
        files={"file": (b"m\xed\xa0\x80.onnx".decode("latin-1"), _tiny_model())},
        data={"name": encoded},
    )
    assert response.status_code == 201, response.text
    assert client.get("/v1/models").status_code == 200
    assert client.get(f"/v1/models/{response.json()['id']}").status_code == 200


def test_inference_names_with_surrogates_are_refused(local_api: LocalApi) -> None:
    response = _post_json(local_api.client, "/v1/engines/eng_x/infer", {"inputs": {SURROGATE: [1.0]}})
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text


def test_json_in_form_fields_holds_only_storable_text(live_stack: LiveStack, tmp_path: Path) -> None:
    """A form field read as JSON (`classes`, `preprocessing` of an image upload) can carry
    `"\\ud800"` or a control character as an escape, which multipart decoding never sees: the
    same rule as a JSON body, a 422 before anything is stored (it used to reach the dataset)."""
    archive = make_zip(tmp_path / "images.zip", {"cat/a.png": png()})
    with live_stack.client() as client:
        before = client.get("/v1/datasets", params={"limit": 1000}).json()
        for field, value in [
            ("classes", json.dumps(["cat", SURROGATE])),
            ("classes", json.dumps(["cat", "d\u0001g"])),
            ("preprocessing", json.dumps({"layout": "NCHW\u0000"})),
            ("classes", "[" * 100_000),  # deeper than the JSON parser goes: it was a 500
        ]:
            response = client.post(
                "/v1/datasets", files={"file": ("images.zip", archive.read_bytes())}, data={field: value}
            )
            assert response.status_code == 422, (field, value[:80], response.text)
            assert response.json()["code"] == "invalid_preprocessing", response.text
            assert field in response.json()["detail"]
        assert client.get("/v1/datasets", params={"limit": 1000}).json() == before


def _pydantic_only_keywords(node: Any, where: str = "") -> Iterator[str]:
    """Where the document holds pydantic's names for bounds (`ge`, `le`…), which JSON Schema ignores."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("ge", "gt", "le", "lt", "min_length", "max_length") and not where.endswith(
                "properties"
            ):
                yield f"{where}/{key}"
            yield from _pydantic_only_keywords(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _pydantic_only_keywords(value, f"{where}/{index}")


def test_the_document_says_what_a_body_may_hold(local_api: LocalApi) -> None:
    """What schemathesis's `positive_data_acceptance` found the document not saying: control
    characters in text and names, the alias rule, bounds written as JSON Schema reads them, form
    fields that are left out rather than null; and whole numbers such as `8.0` are integers."""
    document = local_api.client.app.openapi()
    schemas = document["components"]["schemas"]
    assert not list(_pydantic_only_keywords(document))
    text = {"pattern": TEXT_PATTERN, "type": "string"}
    assert schemas["QuantizeIn"]["properties"]["nodes_to_exclude"]["items"] == text
    assert schemas["JobCreate"]["properties"]["model_id"]["pattern"] == TEXT_PATTERN
    infer = document["paths"]["/v1/engines/{engine_id}/infer"]["post"]["requestBody"]["content"]
    inputs = infer["application/json"]["schema"]["properties"]["inputs"]
    assert inputs["propertyNames"] == {"pattern": TEXT_PATTERN}
    alias = schemas["AliasIn"]["properties"]["alias"]["pattern"]
    assert re.fullmatch(alias, "digits-prod") and not re.fullmatch(alias, "eng_digits")
    assert not re.fullmatch(TEXT_PATTERN, "a\u0001b") and re.fullmatch(TEXT_PATTERN, "a\tb\n")
    for form in ("Body_upload_model_v1_models_post", "Body_upload_dataset_v1_datasets_post"):
        for name, spec in schemas[form]["properties"].items():
            assert '"null"' not in json.dumps(spec), (form, name, spec)  # a form has no null: left out
    client = local_api.client
    recipe = {"batch_sizes": [8.0, 1], "measure": {"timed_runs": 3.0}, "finetune": {"epochs": 1.0}}
    whole = _post_json(client, "/v1/jobs", {"model_id": "mdl_none", "recipe": recipe})
    assert (whole.status_code, whole.json()["code"]) == (404, "model_not_found"), whole.text
    for bad in (True, "8", 8.5):
        response = _post_json(client, "/v1/jobs", {"model_id": "mdl_none", "recipe": {"batch_sizes": [bad]}})
        assert response.status_code == 422, (bad, response.text)
    space = {"finetune_epochs": 2.0, "max_full_evaluations": 5.0}
    body = {"evaluation_dataset_id": "dst_none", "space": space}
    optimize = _post_json(client, "/v1/models/mdl_none/optimize", body)
    assert optimize.status_code == 404, optimize.text
    opset = client.post("/v1/models", files={"file": ("m.onnx", _tiny_model())}, data={"opset": "18"})
    assert (opset.status_code, opset.json()["code"]) == (422, "invalid_opset"), opset.text


# ---------------------------------------------------------------- item 2: rows that cannot be shown


@pytest.fixture
def unrenderable_rows(live_stack: LiveStack) -> Iterator[dict[str, str]]:
    """One model, dataset, job and engine whose JSON columns hold a lone surrogate, written straight
    into the stack's database (what the API stored before it refused such text). Text columns cannot
    hold one on either database (the drivers refuse to encode it); JSON columns store it escaped,
    PostgreSQL's `json` type included. Removed afterwards."""
    url = _database_url(live_stack)
    with session_scope(url) as session:
        model = placeholder_model(session, "models/unrenderable")
        model.info = {"producer": "exporter " + SURROGATE}
        dataset = DatasetRecord(
            project_id=DEFAULT_PROJECT,
            name="d",
            filename="d.npz",
            sha256="0" * 64,
            size_bytes=1,
            artifact_key="datasets/unrenderable.npz",
            info={"samples": 1, "arrays": {}, "has_labels": False, "classes": None,
                  "image_folder": {"class_names": [SURROGATE]}},
        )  # fmt: skip
        job = JobRecord(
            project_id=DEFAULT_PROJECT,
            model_id=model.id,
            status="failed",
            recipe={"quantize": {"nodes_to_exclude": [SURROGATE]}},
        )
        session.add_all([dataset, job])
        session.flush()
        engine = EngineRecord(
            project_id=DEFAULT_PROJECT,
            job_id=job.id,
            model_id=model.id,
            backend="onnxruntime-cpu",
            precision="fp32",
            artifact_prefix="engines/unrenderable",
            engine_file="model.onnx",
            size_bytes=1,
            build_seconds=0.0,
            hardware={},
            metrics={"note": SURROGATE},
            build_info={},
        )
        session.add(engine)
        session.commit()
        rows = {"models": model.id, "datasets": dataset.id, "jobs": job.id, "engines": engine.id}
    try:
        yield rows
    finally:
        with session_scope(url) as session:
            for record_type, key in ((EngineRecord, "engines"), (JobRecord, "jobs"),
                                     (DatasetRecord, "datasets"), (ModelRecord, "models")):  # fmt: skip
                row = session.get(record_type, rows[key])
                if row is not None:
                    session.delete(row)
                    session.commit()


def test_a_row_that_cannot_be_shown_never_takes_a_listing_down(
    live_stack: LiveStack, unrenderable_rows: dict[str, str]
) -> None:
    with live_stack.client() as client:
        good_model = _upload_model(client)
        for kind, record_id in unrenderable_rows.items():
            listing = client.get(f"/v1/{kind}")
            assert listing.status_code == 200, (kind, listing.text)
            assert record_id not in {item["id"] for item in listing.json()}, kind
            single = client.get(f"/v1/{kind}/{record_id}")
            assert single.status_code == 409, (kind, single.text)
            assert single.json()["code"] == "unrenderable_record"
            assert record_id in single.json()["detail"]
        assert good_model in {item["id"] for item in client.get("/v1/models").json()}
        by_model = client.get("/v1/jobs", params={"model_id": unrenderable_rows["models"]})
        assert (by_model.status_code, by_model.json()) == (200, [])


# ---------------------------------------------------------------- item 3: bounded, documented errors


def test_a_422_lists_a_bounded_number_of_problems(local_api: LocalApi) -> None:
    """300 000 unknown keys got a 45.7 MB 422; 50 000 show the same thing at a tenth of the time."""
    recipe = {f"unknown_option_{index}": index for index in range(50_000)}
    response = _post_json(local_api.client, "/v1/jobs", {"model_id": "mdl_x", "recipe": recipe})
    assert response.status_code == 422
    body = response.json()
    assert len(response.content) < 16_000, len(response.content)
    assert len(body["errors"]) == 20
    assert "49980 more problems" in body["detail"]


def test_a_long_message_or_key_is_cut(local_api: LocalApi) -> None:
    response = _post_json(local_api.client, "/v1/jobs", {"model_id": "m", "recipe": {"x" * 100_000: 1}})
    assert response.status_code == 422
    assert len(response.content) < 4_000


def _declared_codes(document: dict[str, Any], path: str, method: str, status: int) -> str:
    return document["paths"][path][method]["responses"][str(status)]["description"]


def test_deep_json_and_a_huge_part_header_have_documented_codes(local_api: LocalApi) -> None:
    client = local_api.client
    document = client.app.openapi()
    deep = b"[" * 100_000 + b"]" * 100_000  # the parser's recursion limit bounds its stack
    response = client.post("/v1/jobs", content=deep, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_json"), response.text
    assert "`invalid_json`" in _declared_codes(document, "/v1/jobs", "post", 400)
    nested = (
        b'{"model_id": "m", "recipe": {"quantize": {"nodes_to_exclude": ' + b"[" * 900 + b"]" * 900 + b"}}}"
    )
    response = client.post("/v1/jobs", content=nested, headers={"content-type": "application/json"})
    assert response.status_code == 422, (
        response.text
    )  # deep, but parsed: the checks walk it without recursion
    response = client.post("/v1/models", files={"file": ("a" * 10_000 + ".onnx", _tiny_model())})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_multipart"), response.text
    assert "`invalid_multipart`" in _declared_codes(document, "/v1/models", "post", 400)
    assert "http_error" not in json.dumps(document)


# ---------------------------------------------------------------- item 7: listings in pages


def _all_pages(client: httpx.Client | Any, url: str, limit: int) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    params: dict[str, Any] = {"limit": limit}
    while True:
        response = client.get(url, params=params)
        assert response.status_code == 200, response.text
        pages += 1
        assert len(response.json()) <= limit
        ids += [item["id"] for item in response.json()]
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in response.headers
            return ids, pages
        assert response.headers["link"].endswith('>; rel="next"') and cursor in response.headers["link"]
        params = {"limit": limit, "cursor": cursor}


def test_listings_come_in_pages_newest_first(live_stack: LiveStack) -> None:
    with live_stack.client() as client:
        mine = [_upload_model(client) for _ in range(3)]
        ids, pages = _all_pages(client, "/v1/models", limit=2)  # other tests' models too
        assert len(ids) == len(set(ids)), "a record came twice"
        assert [record for record in ids if record in mine] == mine[::-1]
        assert pages >= len(ids) / 2
        first = client.get("/v1/models", params={"limit": 1})
        assert first.json()[0]["id"] == mine[-1]
        assert client.get("/v1/models", params={"limit": 0}).status_code == 422
        assert client.get("/v1/models", params={"limit": 1001}).status_code == 422
        assert client.get("/v1/models", params={"cursor": "not a cursor"}).status_code == 422
        for kind in ("datasets", "jobs", "engines"):
            assert client.get(f"/v1/{kind}", params={"limit": 1}).status_code == 200
    with Client(live_stack.base_url) as sdk:  # the SDK reads every page, or the newest `limit`
        assert [model.id for model in sdk.list_models()] == ids
        assert [model.id for model in sdk.list_models(limit=2)] == ids[:2]


def test_the_sdk_follows_pages(live_stack: LiveStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of 2, the SDK's listing is still every record, in one order."""
    from optiforge_client import calls

    with live_stack.client() as client:
        _upload_model(client)
        everything = [item["id"] for item in client.get("/v1/models", params={"limit": 1000}).json()]
    monkeypatch.setattr(calls, "PAGE_LIMIT", 2)
    with Client(live_stack.base_url) as sdk:
        assert [model.id for model in sdk.list_models()] == everything


def test_the_default_page_is_bounded(local_api: LocalApi) -> None:
    """No listing answers more than `DEFAULT_LIMIT` records unless asked (it was unbounded)."""
    from app.api.pagination import DEFAULT_LIMIT

    with session_scope(local_api.settings.resolved_database_url) as session:
        for index in range(DEFAULT_LIMIT + 5):
            placeholder_model(session, f"models/m{index}")
        session.commit()
    response = local_api.client.get("/v1/models")
    assert len(response.json()) == DEFAULT_LIMIT
    assert "x-next-cursor" in response.headers
    ids, _pages = _all_pages(local_api.client, "/v1/models", limit=1000)
    assert len(ids) == len(set(ids)) == DEFAULT_LIMIT + 5


def test_a_one_value_query_parameter_sent_twice_is_a_422(local_api: LocalApi) -> None:
    """The framework would keep the last value (`?project=a&project=b` listed b's keys); list
    parameters still repeat."""
    client = local_api.client
    for url, name in [
        ("/v1/admin/keys?project=a&project=b", "project"),
        ("/v1/models?limit=1&limit=2", "limit"),  # a dependency's parameter (pagination)
        ("/v1/jobs?model_id=a&model_id=b", "model_id"),  # `status` and `kind` may repeat: lists
    ]:
        refused = client.get(url)
        assert refused.status_code == 422, (url, refused.text)
        assert refused.json()["code"] == "repeated_query_parameter" and refused.json()["parameter"] == name
    assert client.get("/v1/models?limit=2").status_code == 200
    listed = client.get("/v1/triton?engine=a&engine=b")  # `engine` is a list: it may repeat
    assert listed.json()["code"] != "repeated_query_parameter"
