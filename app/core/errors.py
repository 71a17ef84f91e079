"""The service's error: an HTTP status, a machine-readable `code` and a sentence, raised by services
and serving and turned into JSON by the API's handlers (app.api.errors)."""

from __future__ import annotations

from typing import Any

from engines.errors import EngineError

#: HTTP status for engine errors raised at request time.
_ENGINE_ERROR_STATUS = {
    "upload_too_large": 413,
    "backend_unavailable": 409,
    "engine_incompatible": 409,  # a TensorRT plan from another GPU architecture or TensorRT version
    "engine_file_missing": 503,
}


class ApiError(Exception):
    """`extra` goes into the JSON body beside code and detail; `headers` into the response
    (`Retry-After` on a 429 or 503)."""

    def __init__(
        self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
    ):
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra
        self.headers = headers


def not_found(kind: str, item_id: str) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"no {kind} with id '{item_id}'")


def from_engine_error(error: EngineError, status: int = 422) -> ApiError:
    extra = {key: value for key, value in error.extra.items() if key not in ("code", "detail")}
    return ApiError(_ENGINE_ERROR_STATUS.get(error.code, status), error.code, error.detail, **extra)
