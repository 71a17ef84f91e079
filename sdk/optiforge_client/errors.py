"""Typed errors that carry the server's machine-readable `code` and its `detail`."""

from __future__ import annotations

from typing import Any

from optiforge_client.hints import sdk_hint


class OptiforgeError(Exception):
    """An error answer: `status` (HTTP), `code` (stable, for programs), `detail` (for people)."""

    def __init__(self, status: int, code: str, detail: str, body: Any = None, hint: str | None = None):
        super().__init__(f"{status} {code}: {detail}" + (f" ({hint})" if hint else ""))
        self.status, self.code, self.detail, self.body = status, code, detail, body
        #: What to do, where the server's sentence does not say (optiforge_client.hints).
        self.hint = hint


class BadRequest(OptiforgeError):
    """400: tensors or a message the server cannot take."""


class Unauthorized(OptiforgeError):
    """401: no API key, or one the server does not know (revoked); pass `api_key=` or set
    $OPTIFORGE_API_KEY."""


class Forbidden(OptiforgeError):
    """403: the key's scopes do not allow this (or a browser request from a foreign origin)."""


class RateLimited(OptiforgeError):
    """429: over the key's inference rate or the project's jobs in flight (the response's
    `Retry-After` says when to try again)."""


class NotFound(OptiforgeError):
    """404: no such model, dataset, job, engine or alias."""


class Conflict(OptiforgeError):
    """409: e.g. the engine's backend is not on that server, or an alias race."""


class PayloadTooLarge(OptiforgeError):
    """413: the body is over the server's limit."""


class ValidationFailed(OptiforgeError):
    """422: a request that does not fit (a dataset that does not match the model, a bad recipe)."""


class Unavailable(OptiforgeError):
    """503: the server cannot do it now (broker down, engine this node cannot run)."""


class ServerError(OptiforgeError):
    """5xx: a fault on the server's side."""


class JobFailed(OptiforgeError):
    """The job ended failed or cancelled; `job` is its last state, `code`/`detail` its error."""

    def __init__(self, job: Any):
        error = job.error or {}
        super().__init__(
            0, error.get("code", job.status), error.get("detail", f"job {job.id} {job.status}"), job
        )
        self.job = job


class JobTimeout(OptiforgeError):
    """The job was still running when the wait gave up; `job` is its last state."""

    def __init__(self, job: Any, seconds: float):
        super().__init__(0, "timeout", f"job {job.id} still {job.status} after {seconds:.0f} s", job)
        self.job = job


class ModelFailed(OptiforgeError):
    """The model's conversion to ONNX failed (or was cancelled); `model` is its last state, `code`
    and `detail` its error (`unsupported_op`: `model.error["operators"]` names them)."""

    def __init__(self, model: Any):
        error = model.error or {}
        super().__init__(
            0, error.get("code", "conversion_failed"), error.get("detail", f"model {model.id} failed"), model
        )
        self.model = model


class ModelTimeout(OptiforgeError):
    """The model was still converting when the wait gave up; `model` is its last state."""

    def __init__(self, model: Any, seconds: float):
        super().__init__(0, "timeout", f"model {model.id} still {model.status} after {seconds:.0f} s", model)
        self.model = model


class DatasetFailed(OptiforgeError):
    """Decoding the dataset's images failed (or was cancelled); `dataset` is its last state, `code`
    and `detail` its error (e.g. `image_decode_failed`, with `dataset.error["member"]`)."""

    def __init__(self, dataset: Any):
        error = dataset.error or {}
        detail = error.get("detail", f"dataset {dataset.id} failed")
        super().__init__(0, error.get("code", "decoding_failed"), detail, dataset)
        self.dataset = dataset


class DatasetTimeout(OptiforgeError):
    """The dataset was still processing when the wait gave up; `dataset` is its last state."""

    def __init__(self, dataset: Any, seconds: float):
        detail = f"dataset {dataset.id} still {dataset.status} after {seconds:.0f} s"
        super().__init__(0, "timeout", detail, dataset)
        self.dataset = dataset


_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    503: Unavailable,
}


def error_from_response(status: int, body: Any, text: str) -> OptiforgeError:
    """The typed error for an error response: `{"code", "detail"}` (/v1) or `{"error", "code"}` (/v2)."""
    if isinstance(body, dict):
        code = str(body.get("code") or "error")
        detail = str(body.get("detail") or body.get("error") or text)
    else:
        code, detail = "http_error", text or f"HTTP {status}"
    error_class = _BY_STATUS.get(status, ServerError if status >= 500 else OptiforgeError)
    return error_class(status, code, detail, body, hint=sdk_hint(detail) if status == 422 else None)
