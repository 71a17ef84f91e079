"""The service's error: an HTTP status, a machine-readable `code` and a sentence, raised by services
and serving and turned into JSON by the API's handlers (app.api.errors)."""

from __future__ import annotations

from collections.abc import Iterator
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


def error_chain(error: BaseException, wrapped: str) -> Iterator[BaseException]:
    """The error, what it was raised from (`__cause__`, `__context__`) and what it wraps in its
    attribute `wrapped` (SQLAlchemy's `orig`, boto3's `last_exception`), each once: where a
    library's own error says what really happened."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        inner = getattr(item, wrapped, None)
        pending += [item.__cause__, item.__context__, inner if isinstance(inner, BaseException) else None]
