"""The /v2 infer routes: served first and without dependency solving, documented like the rest."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from app.api.direct_route import DirectRoute
from app.api.routes import inference_v2


async def _echo(request: Request, name: str, version: str | None = None) -> Response:
    return Response(f"{name}:{version}:{request.method}")


def test_direct_route_passes_the_request_and_path_parameters():
    app = FastAPI()
    app.router.routes.append(DirectRoute("/m/{name}", _echo, methods=["POST"]))
    app.router.routes.append(DirectRoute("/m/{name}/v/{version}", _echo, methods=["POST"]))
    with TestClient(app) as client:
        assert client.post("/m/a").text == "a:None:POST"
        assert client.post("/m/a/v/7").text == "a:7:POST"
        assert client.get("/m/a").status_code == 405


def test_a_sync_endpoint_is_refused():
    def sync(request: Request, name: str) -> Response:
        return Response()

    with pytest.raises(TypeError, match="async def"):
        DirectRoute("/m/{name}", sync)


def test_a_parameter_it_cannot_supply_is_refused_at_start_up():
    async def takes_a_query(request: Request, name: str, limit: int) -> Response:
        return Response()

    async def no_request(name: str) -> Response:
        return Response()

    with pytest.raises(TypeError, match="'limit' is not a path parameter"):
        DirectRoute("/m/{name}", takes_a_query)
    with pytest.raises(TypeError, match="Request first"):
        DirectRoute("/m/{name}", no_request)


def test_infer_routes_come_first_and_are_documented(local_api):
    app = local_api.client.app
    assert app.router.routes[: len(inference_v2.hot_routes)] == inference_v2.hot_routes
    operation = app.openapi()["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]
    documented = {parameter["name"] for parameter in operation["parameters"]}
    assert documented == {"name", "version", "Inference-Header-Content-Length"}
    assert operation["tags"] == inference_v2.router.tags
    assert "application/json" in operation["requestBody"]["content"]
