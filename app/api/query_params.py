"""A query parameter that takes one value may be sent once.

`?project=a&project=b` is valid HTTP, and the framework quietly keeps the last value: a client that
meant a list, or a proxy that appended a parameter, gets an answer to a question it did not ask.
So a scalar query parameter sent more than once is a 422 `repeated_query_parameter`, checked by a
dependency every route has (`refuse_repeated_scalars`), from the parameters FastAPI itself reads
for the route and its dependencies; parameters declared as lists (`GET /v1/triton?engine=a&engine=b`)
repeat freely.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import field_annotation_is_sequence

from app.core.errors import ApiError

CODE = "repeated_query_parameter"

#: Route dependant (by id: routes live as long as the app) -> its scalar query parameter names.
_SCALARS: dict[int, frozenset[str]] = {}


def scalar_query_names(dependant: Dependant) -> frozenset[str]:
    """The names of the query parameters that take one value, the dependencies' included."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        names |= {
            field.alias
            for field in current.query_params
            if not field_annotation_is_sequence(field.field_info.annotation)
        }
        pending += current.dependencies
    return frozenset(names)


async def refuse_repeated_scalars(request: Request) -> None:
    """422 `repeated_query_parameter` when a query parameter that takes one value came more than once."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not request.query_params:
        return
    names = _SCALARS.get(id(dependant))
    if names is None:
        names = _SCALARS[id(dependant)] = scalar_query_names(dependant)
    for name in sorted(names):
        count = len(request.query_params.getlist(name))
        if count > 1:
            raise ApiError(
                422,
                CODE,
                f"the query parameter '{name}' takes one value and was sent {count} times; send it once",
                parameter=name,
            )
