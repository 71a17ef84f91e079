"""`/v1/engines/{id}/infer`'s JSON: the raw body in, arrays out, and the response body back.

The route reads its body itself (app.api.body_reader) instead of letting the framework parse it
into an `InferRequest` on the event loop: JSON tensors take about 11× their text once parsed, and
a parse of megabytes would stall every other request. These functions run on a worker thread,
in the JSON gate's turn (app.serving.admission.JsonGate), and give the same answers the
framework did: 422 `validation_error` with its `errors` for a body that is not an
`InferRequest`, 422 `invalid_input` for values that are not a rectangular array of numbers.
The Python lists live only inside `parse_request`: it returns arrays (float64 for floats, as
numpy reads them), cast to the engine's input types once the engine is known (`cast_inputs`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from optiforge_client.tensors import json_values
from pydantic import TypeAdapter, ValidationError

from app.api.schemas import InferRequest, InferResponse
from app.core.errors import ApiError
from engines.backends.batching import InferResult

#: The request body as the OpenAPI document shows it: the route reads raw bytes, so FastAPI
#: cannot see its model (`openapi_extra` of the route).
OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": InferRequest.model_json_schema()}},
    }
}
_RESPONSE = TypeAdapter(InferResponse)


def parse_request(body: bytes | bytearray) -> dict[str, np.ndarray]:
    """The inputs of an `InferRequest` body, as arrays (RequestValidationError or ApiError 422).

    Parsed and validated in one pass by pydantic-core (several times faster than `json.loads`,
    which matters while the parse holds the GIL); bare NaN and Infinity are read, as before."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        request = InferRequest.model_validate_json(body)
    except ValidationError as exc:
        issues = [
            {"type": issue["type"], "loc": ("body", *issue["loc"]), "msg": issue["msg"]}
            for issue in exc.errors(include_url=False, include_input=False)
        ]
        raise RequestValidationError(issues) from None
    arrays = {}
    for name in list(request.inputs):
        value = request.inputs.pop(name)  # drop each list once it is an array: peak memory
        try:
            arrays[name] = np.asarray(value)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise _invalid(name, exc) from None
    return arrays


def cast_inputs(arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Each input in its engine input's type (inputs the engine lacks are left to its validation)."""
    feeds = {}
    for name, array in arrays.items():
        try:
            feeds[name] = array.astype(dtypes[name], copy=False) if name in dtypes else array
        except (ValueError, TypeError, OverflowError) as exc:
            raise _invalid(name, exc) from None
    return feeds


def write_response(engine_id: str, result: InferResult) -> bytes:
    """The `InferResponse` as strict JSON: NaN and ±infinity as the strings "NaN", "Infinity" and
    "-Infinity", as in `/v2` JSON tensors (optiforge_client.tensors)."""
    response = InferResponse(
        engine_id=engine_id,
        outputs={name: json_values(np.asarray(array)) for name, array in result.outputs.items()},
        compute_ms=result.compute_ms,
        queue_ms=result.queue_ms,
        batch_size=result.batch_size,
    )
    return _RESPONSE.dump_json(response)


def _invalid(name: str, exc: Exception) -> ApiError:
    return ApiError(422, "invalid_input", f"input '{name}' is not a rectangular array of numbers: {exc}")
