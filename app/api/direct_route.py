"""A route documented like any other but served without FastAPI's per-request dependency solving.

FastAPI resolves an endpoint's parameters on every request: path and query values validated
through pydantic, dependencies called, a `Request` built for them. That is about a tenth of a
millisecond, nothing for a job endpoint and a measurable share of a fast model's inference
(bench/serve.py compares `/v2` against the engine in-process). A `DirectRoute` keeps the
endpoint's signature for the OpenAPI document and calls it with the request and its path
parameters as strings, which is all an endpoint on the hot path may take: its signature is
checked when the route is made, so a parameter it could not supply is an error at start-up,
not a silent `None`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

Endpoint = Callable[..., Coroutine[Any, Any, Response]]


class DirectRoute(APIRoute):
    """For `async def endpoint(request: Request, <path params as str>) -> Response` only."""

    def __init__(self, path: str, endpoint: Endpoint, **kwargs: Any):
        _check_signature(path, endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request, **request.path_params)

        return handler


def _check_signature(path: str, endpoint: Endpoint) -> None:
    if not inspect.iscoroutinefunction(endpoint):
        raise TypeError(f"{endpoint.__name__}: a DirectRoute endpoint is `async def`")
    parameters = list(inspect.signature(endpoint, eval_str=True).parameters.values())
    if not parameters or parameters[0].annotation is not Request:
        raise TypeError(f"{endpoint.__name__}: a DirectRoute endpoint takes the Request first")
    in_path = {part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")}
    for parameter in parameters[1:]:
        in_this_path = parameter.name in in_path
        optional_elsewhere = parameter.default is None  # a path param of a sibling route
        if not (in_this_path or optional_elsewhere) or parameter.annotation not in (str, str | None):
            raise TypeError(
                f"{endpoint.__name__}: '{parameter.name}' is not a path parameter of {path} "
                "(a DirectRoute supplies only the request and path parameters, as strings)"
            )
