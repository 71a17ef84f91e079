"""The OpenAPI document declares the error statuses and bodies the API answers (app.api.openapi).

Two halves: a static one (every `ApiError(<status>, …)` a route can raise, in its own code or in
the app code it calls, is a documented status of its operation), and a live one (errors of every
kind, made on the in-process API, have a documented status and a body that validates against the
declared schema). schemathesis does the same at random, over HTTP (tests/test_schemathesis.py).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.api.openapi import ERROR_BODY, PROTOCOL_ERROR_BODY, READINESS, error_schema
from app.core.errors import ApiError, from_engine_error
from tests.conftest import LocalApi


@pytest.fixture
def document(local_api: LocalApi) -> dict[str, Any]:
    return local_api.client.app.openapi()


# ---------------------------------------------------------------- static: what the code raises


def _resolve(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """What a called name means in the function's module (`name`, `module.name`); None if unknown."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, namespace)
        return getattr(owner, node.attr, None) if isinstance(owner, types.ModuleType | type) else None
    return None


def _catches_api_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in ("ApiError", "Exception") for name in names)


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    """Every call, but those in a `try` body whose handlers catch ApiError (caught, not answered)."""
    if isinstance(tree, ast.Try) and any(_catches_api_error(handler) for handler in tree.handlers):
        children: list[ast.AST] = [*tree.handlers, *tree.orelse, *tree.finalbody]
    else:
        children = list(ast.iter_child_nodes(tree))
    if isinstance(tree, ast.Call):
        yield tree
    for child in children:
        yield from _calls(child)


def raised_statuses(function: Callable[..., Any], seen: set[Callable[..., Any]] | None = None) -> set[int]:
    """Statuses of the `ApiError(<int>, …)` that `function` raises, or the app functions it calls by
    name do, transitively (a rough static reading: calls through objects are not followed, and
    `from_engine_error` counts as its default, 422)."""
    seen = set() if seen is None else seen
    function = inspect.unwrap(function)
    if function in seen or not inspect.isfunction(function):
        return set()
    seen.add(function)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError):
        return set()
    statuses: set[int] = set()
    for call in _calls(tree):
        callee = _resolve(call.func, function.__globals__)
        if callee is ApiError and call.args and isinstance(call.args[0], ast.Constant):
            statuses.add(call.args[0].value)
        elif callee is from_engine_error:
            statuses.add(422)
        elif inspect.isfunction(callee) and callee.__module__.startswith("app."):
            statuses |= raised_statuses(callee, seen)
    return statuses


def _dependency_calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from _dependency_calls(dependency)


def route_module_routes() -> Iterator[APIRoute]:
    """Every route of the modules in app/api/routes: their routers' and module-level lists of
    routes (the app keeps included routers unflattened, so its own list would not show them)."""
    import app.api.routes as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            routes = (
                value.routes if isinstance(value, APIRouter) else value if isinstance(value, list) else []
            )
            yield from (route for route in routes if isinstance(route, APIRoute) and route.include_in_schema)


def test_every_status_a_route_raises_is_documented(document: dict[str, Any]) -> None:
    undocumented, checked = [], 0
    for route in route_module_routes():
        if route.path not in document["paths"]:
            continue  # a router the app does not include
        checked += 1
        statuses: set[int] = set()
        for function in (route.endpoint, *_dependency_calls(route.dependant)):
            statuses |= raised_statuses(function)
        for method in route.methods:
            declared = document["paths"][route.path][method.lower()]["responses"]
            missing = sorted(status for status in statuses if str(status) not in declared)
            if missing:
                undocumented.append(f"{method} {route.path}: {missing}")
    assert checked >= 40, checked  # every route was seen
    assert not undocumented, (
        "statuses raised but not in the OpenAPI document (app/api/openapi.py RULES):\n"
        + ("\n".join(undocumented))
    )


def test_the_static_reading_sees_through_services() -> None:
    """The reading above is not vacuous: it finds the 409 a service raises for a route."""
    from app.api.routes import jobs, models

    assert {404, 409} <= raised_statuses(jobs.cancel_job)
    assert {404, 409} <= raised_statuses(models.delete_model)


def test_every_error_response_refers_to_the_body_its_path_answers(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert {ERROR_BODY, PROTOCOL_ERROR_BODY} <= set(schemas)
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body, which the API never sends
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400 or (status == "503" and path in READINESS):
                    continue
                where = f"{method.upper()} {path} {status}"
                expected = {"$ref": f"#/components/schemas/{error_schema(path)}"}
                assert response["content"]["application/json"]["schema"] == expected, where


# ---------------------------------------------------------------- live: what the API answers


def _tiny_model() -> bytes:
    """A graph of one Relu: an upload that takes no time. Each call's bytes differ (a random doc
    string), so each upload is a new model: the same bytes again would be the same model (uploads
    are deduplicated by content within a project, app.services.uploads_dedup)."""
    import secrets

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=secrets.token_hex(8)
    )
    return model.SerializeToString()


def test_error_answers_are_documented_and_match_their_schema(local_api: LocalApi) -> None:
    """One request per kind of error (middleware, validation, services, the protocol), each checked
    by schemathesis against its operation in the document: the status is declared, the body fits."""
    client = local_api.client
    schema = schemathesis.openapi.from_dict(client.app.openapi())
    model = client.post("/v1/models", files={"file": ("m.onnx", _tiny_model())}).json()["id"]
    job = client.post("/v1/jobs", json={"model_id": model}).json()["id"]  # stays queued: no worker runs
    big = {"file": ("m.onnx", b"\0" * (local_api.settings.max_upload_bytes + 1))}
    requests: list[tuple[str, str, str, dict[str, Any], int, str]] = [
        ("GET", "/v1/models/{model_id}", "/v1/models/a%00b", {}, 400, "control_characters"),
        ("GET", "/v1/models/{model_id}", "/v1/models/mdl_nothing", {}, 404, "model_not_found"),
        ("GET", "/v1/jobs", "/v1/jobs?status=lost", {}, 422, "validation_error"),
        ("POST", "/v1/jobs", "/v1/jobs", {"json": {"model_id": 1}}, 422, "validation_error"),
        ("POST", "/v1/jobs", "/v1/jobs", {"json": {"model_id": "mdl_nothing"}}, 404, "model_not_found"),
        ("POST", "/v1/models", "/v1/models", {"files": {"file": ("m.onnx", b"")}}, 422, "empty_file"),
        ("POST", "/v1/models", "/v1/models", {"files": big}, 413, "upload_too_large"),
        ("PUT", "/v1/engines/{engine_id}/batching", "/v1/engines/e/batching",
         {"json": {"max_batch_size": True}}, 422, "validation_error"),
        ("DELETE", "/v1/models/{model_id}", f"/v1/models/{model}", {}, 409, "model_in_use"),
        ("GET", "/v1/jobs/{job_id}/report", f"/v1/jobs/{job}/report", {}, 409, "job_not_succeeded"),
        ("GET", "/v1/triton", "/v1/triton", {}, 422, "no_engines"),
        ("POST", "/v2/models/{name}/infer", "/v2/models/nothing/infer", {"json": {}}, 404, "model_not_found"),
        ("GET", "/v2/models/{name}", "/v2/models/a%01b", {}, 400, "control_characters"),
    ]  # fmt: skip
    for method, template, url, kwargs, status, code in requests:
        response = client.request(method, url, **kwargs)
        assert (response.status_code, response.json()["code"]) == (status, code), (method, url, response.text)
        operation = schema[template][method]
        assert str(status) in operation.definition.raw["responses"], (method, template, status)
        operation.validate_response(response)  # raises when the body does not fit the declared schema
    cancelled = client.post(f"/v1/jobs/{job}/cancel")
    again = client.post(f"/v1/jobs/{job}/cancel")
    assert (cancelled.status_code, again.status_code) == (200, 409)
    schema["/v1/jobs/{job_id}/cancel"]["POST"].validate_response(again)
