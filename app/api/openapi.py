"""The OpenAPI document, with every error status and body the API really answers.

FastAPI documents what it sees in a route's signature: the success response, and a 422 with its
own `HTTPValidationError` body. It cannot see what the middleware answers (400 for control
characters, 413 for a body over a limit), what services and serving raise (404 for an unknown id,
409 for a conflict, 503 for a broker that is down), nor that our handlers (`app.api.errors`)
answer `{"code", "detail", "errors"}`, and `{"error", "code"}` under `/v2`. Generated clients and
schemathesis (in CI) take the document as the contract, so it is completed here, in one place,
once FastAPI has generated it:

- `ErrorBody` and `ProtocolErrorBody` (with `ValidationIssue`) are component schemas, and every
  error response refers to the one its path answers with (the rule of `app.api.errors.error_body`);
- `RULES` says which operations answer which error status, by path and method patterns, with the
  codes and the reason, which become the response's description;
- the readiness probes' 503 (not an error body: the same body as their 200, saying what is down);
- the direct `/v2` infer routes (`app.api.direct_route`) lose what FastAPI documents but they never
  do (request validation, a 422; query parameters they do not read) and gain the header of Triton's
  binary tensors, `Inference-Header-Content-Length`, which they do read.

A 405 is no operation's response (it answers a method the path has no operation for):
`app.api.errors` names the allowed methods in its `Allow` header. `tests/test_openapi_contract.py`
checks the rules against the statuses the routes and what they call raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from optiforge_client.tensors import HEADER_LENGTH

from app.api.access_policy import AccessPolicy
from app.api.direct_route import DirectRoute
from app.api.errors import PROTOCOL_PREFIX

ERROR_BODY = "ErrorBody"
PROTOCOL_ERROR_BODY = "ProtocolErrorBody"
VALIDATION_ISSUE = "ValidationIssue"
METHODS = frozenset({"get", "put", "post", "delete", "patch"})

#: Who needs a key for what: the same table the API-key middleware enforces.
POLICY = AccessPolicy()
#: How a key is sent, for the document's `securitySchemes` (Swagger UI's "Authorize" button).
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key: `Authorization: Bearer <key>`",
    },
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "an API key"},
}
#: Readiness probes, and the body of their 200 and 503 alike.
READINESS = {
    "/readyz": "Readiness",
    "/v2/health/ready": "ProtocolReadiness",
    "/v2/models/{name}/ready": "ModelReadiness",
    "/v2/models/{name}/versions/{version}/ready": "ModelReadiness",
}
_UPLOADS = r"^/v1/(models|datasets)$"
_MODEL_UPLOAD = r"^/v1/models$"
_NOT_READY = "the model is still converting from PyTorch, or its conversion failed"
_V1_INFER = r"^/v1/engines/\{engine_id\}/infer$"
_V2_INFER = r"^/v2/models/\{name\}(/versions/\{version\})?/infer$"
_JOB_CREATING = r"^/v1/jobs$|^/v1/models/\{model_id\}/(sensitivity|optimize)$"
_TRITON = r"^/v1/(engines/\{engine_id\}/)?triton$"
#: What a direct infer route reads besides its path: the length of the JSON before binary tensors.
BINARY_HEADER = {
    "name": HEADER_LENGTH,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]*$"},  # empty: as if absent (a JSON body)
    "description": "binary tensors: the body is this many bytes of JSON, then each tensor's raw bytes",
}
_INFER = f"{_V1_INFER}|{_V2_INFER}"
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
_CONNECTION_CLOSE = {"Connection": {"description": "`close`", "schema": {"type": "string"}}}


@dataclass(frozen=True)
class Rule:
    """Operations whose path template matches `path` (a regex; empty: all) and whose method is in
    `methods` answer `status` with one of `codes`, because `why`."""

    status: int
    codes: tuple[str, ...]
    why: str
    path: str = ""
    methods: frozenset[str] = METHODS
    with_input: bool = False  # only operations that take parameters or a body (a 422 needs input)
    closed: bool = False  # only operations that need a key (the API keys' statuses)
    headers: dict[str, Any] = field(default_factory=dict)

    def applies(self, path: str, method: str, operation: dict[str, Any]) -> bool:
        if method not in self.methods or not re.search(self.path, path):
            return False
        if self.with_input and not (operation.get("parameters") or "requestBody" in operation):
            return False
        return not (self.closed and is_open(path, method))


def is_open(path: str, method: str) -> bool:
    """Whether the operation answers without an API key (probes, the document itself)."""
    return POLICY.required_scope(method.upper(), path) is None


def _on(methods: str) -> frozenset[str]:
    return frozenset(methods.split())


#: Methods whose requests carry a body (over a limit, any of them is a 413, documented body or not).
_BODIES = _on("post put patch")


#: Which operations answer which error status, and why: read from the middleware
#: (app.api.middleware.control_chars, body limits, upload slots, API keys), the handlers (app.api.errors), the
#: routes, and the services and serving they call (`ApiError(...)`, `not_found(...)`,
#: `from_engine_error(...)`). Several rules for one status make one response.
# fmt: off
RULES: tuple[Rule, ...] = (
    # every operation
    Rule(400, ("control_characters",), "a control character (NUL…) in the path or query string"),
    Rule(400, ("duplicate_host",), "more than one Host header"),
    Rule(400, ("malformed_request",), "a request line or header the HTTP parser cannot read (e.g. a "
         "Content-Length that is not a number)"),
    Rule(500, ("internal_error",), "a bug: logged with the request id; the body holds no traceback"),
    Rule(503, ("database_unavailable",), "the database is unreachable or locked for now (app.core.outages); "
         "retry after Retry-After", headers=_RETRY_AFTER),
    Rule(507, ("insufficient_storage",), "the server's disk is full (ENOSPC/EDQUOT): nothing was stored; "
         "deletes still work"),
    Rule(503, ("artifact_store_unavailable", "artifact_integrity_error"), "the artifact store (S3) cannot be "
         "reached or refuses this server, or a file downloaded from it failed its sha256 twice "
         "(app.core.artifacts): retry after Retry-After", headers=_RETRY_AFTER),
    Rule(422, ("validation_error", "repeated_query_parameter"),
         "the request does not match this document: `errors` lists each problem (a one-value query "
         "parameter sent more than once: `repeated_query_parameter`)", with_input=True),
    Rule(413, ("upload_too_large", "json_tensors_too_large"),
         "the body is over the request limit, the upload limit or the JSON-tensor cap", methods=_BODIES),
    Rule(408, ("body_too_slow",), "the body arrived below the minimum rate (OPTIFORGE_BODY_MIN_RATE_BYTES_S) "
         "for a whole window (OPTIFORGE_BODY_RATE_WINDOW_S)", methods=_BODIES, headers=_CONNECTION_CLOSE),
    Rule(404, ("…_not_found",), "an id in the path names nothing in the key's project", r"\{[a-z_]*id\}"),
    Rule(400, ("invalid_json",), "a body that cannot be read as JSON (nested too deep, not UTF-8)",
         methods=_BODIES, with_input=True),
    Rule(409, ("unrenderable_record",), "the record holds text stored before such text was refused (an "
         "unpaired surrogate) and cannot be shown; listings leave it out",
         r"^/v1/(models|datasets|jobs|engines)"),
    # API keys and projects: every operation but the probes
    Rule(401, ("api_key_required", "invalid_api_key"), "no API key, or not a valid one", closed=True,
         headers=_WWW_AUTHENTICATE),
    Rule(403, ("insufficient_scope", "foreign_origin", "host_not_allowed", "client_not_allowed"),
         "the key lacks the scope; a state-changing request from a foreign Origin; a server that has never "
         "had a key, asked by another name than a loopback one or from another machine", closed=True),
    Rule(429, ("rate_limited",), "over the key's rate limit", closed=True, headers=_RETRY_AFTER),
    Rule(503, ("auth_unavailable",), "the API key cannot be checked now (the database is unreachable): "
         "retry after Retry-After", closed=True, headers=_RETRY_AFTER),
    Rule(429, ("too_many_failed_keys",), "this client address sent too many unknown keys lately "
         "(OPTIFORGE_AUTH_FAILURES_PER_CLIENT per OPTIFORGE_AUTH_FAILURE_WINDOW_S)", closed=True,
         headers=_RETRY_AFTER),
    Rule(409, ("last_admin_key",), "it would leave the server without an active admin key: create another "
         "first", r"^/v1/admin/(keys/\{key_id\}|projects/\{project_id\})$", _on("delete")),
    Rule(404, ("project_not_found",), "the key's project does not exist", r"^/v1/admin/keys$", _on("post")),
    Rule(409, ("project_exists",), "a project of that name exists", r"^/v1/admin/projects$", _on("post")),
    Rule(409, ("project_in_use",), "the default project, or one that still holds records",
         r"^/v1/admin/projects/\{project_id\}$", _on("delete")),
    Rule(422, ("invalid_scopes", "invalid_rate_limit", "weak_api_key"), "a key that cannot be made",
         r"^/v1/admin/keys$", _on("post")),
    # uploads
    Rule(400, ("invalid_multipart",), "a multipart body that cannot be parsed (a part's header line over "
         "4 KB, such as a very long file name)", _UPLOADS, _on("post")),
    Rule(422, ("invalid_model", "onnx_check_failed", "invalid_bundle", "empty_file", "archive_path_traversal",
               "external_data_missing", "external_data_outside_upload", "input_too_large",
               "unsupported_io_type", "invalid_torch_program", "unsupported_op", "pickle_refused",
               "invalid_opset"),
         "not a valid, self-contained model (ONNX, or a torch.export program of built-in operators)",
         _MODEL_UPLOAD, _on("post")),
    Rule(422, ("invalid_dataset", "empty_file", "pickle_refused", "invalid_labels", "non_finite_values",
               "too_many_arrays", "archive_path_traversal", "not_an_image", "image_decode_failed",
               "image_size_mismatch", "image_too_large", "mixed_layout", "too_many_images",
               "invalid_preprocessing", "invalid_json_line", "missing_text", "invalid_text", "invalid_label",
               "line_too_long", "text_too_long", "tokenization_failed", "tokenizer_required",
               "invalid_tokenizer", "invalid_tokenization", "unknown_input_name", "input_names_required",
               "sequence_too_long", "vocab_exceeds_embedding", "type_ids_exceed_embedding",
               "dataset_mismatch", "tokenizer_too_slow", "tokenizer_out_of_memory"),
         "not a safe, consistent dataset (an .npz of arrays, a .zip of images, or a JSONL of texts with a "
         "tokenizer.json: a bad line's `line` is in the body; a tokenizer that takes more than the server's "
         "time or memory to load or tokenize is stopped)", r"^/v1/datasets$", _on("post")),
    Rule(422, ("invalid_batch_axis",), "a stated batch_axis that is not a JSON object of the model's input "
         "names to an axis in range (or null), or one sent with a .pt2", _MODEL_UPLOAD, _on("post")),
    Rule(429, ("too_many_jobs",), "a .pt2 is converted by a job, and the project has as many jobs queued or "
         "running as it may", _MODEL_UPLOAD, _on("post"), headers=_RETRY_AFTER),
    Rule(503, ("broker_unavailable",), "a .pt2's convert job cannot be queued (the model and its job are "
         "kept, failed)", _MODEL_UPLOAD, _on("post")),
    Rule(503, ("too_many_uploads",), "the server is receiving as many uploads as it takes at once",
         _UPLOADS, _on("post"), headers=_RETRY_AFTER),
    Rule(413, ("dataset_too_large", "too_many_samples", "tokenizer_too_large"), "the dataset's arrays once "
         "decoded, its samples, or its tokenizer.json are over the server's limits (the numbers are in the "
         "body)", r"^/v1/datasets$", _on("post")),
    Rule(404, ("model_not_found",), "texts uploaded for a `model_id` that names no model in the key's "
         "project", r"^/v1/datasets$", _on("post")),
    Rule(409, ("model_not_ready",), _NOT_READY, r"^/v1/datasets$", _on("post")),
    Rule(429, ("too_many_jobs",), "a large image folder (or a long JSONL of texts) is decoded by a job, and "
         "the project has as many jobs queued or running as it may", r"^/v1/datasets$", _on("post"),
         headers=_RETRY_AFTER),
    Rule(503, ("broker_unavailable",), "a large image folder's decode_images job, or a long JSONL's "
         "tokenize_texts job, cannot be queued (the dataset and its job are kept, failed)", r"^/v1/datasets$",
         _on("post")),
    Rule(409, ("dataset_not_ready",), "the dataset's images are still being decoded, or decoding failed",
         r"^/v1/datasets/\{dataset_id\}/download$", _on("get")),
    Rule(409, ("dataset_not_ready",), "a dataset's images are still being decoded, or decoding failed",
         _JOB_CREATING, _on("post")),
    Rule(409, ("model_in_use", "dataset_in_use"), "a queued or running job still uses it (a dataset: "
         "unless force=true, which cancels those jobs)", r"^/v1/(models|datasets)/\{[a-z_]+\}$",
         _on("delete")),
    Rule(409, ("model_serving",), "an engine of the model holds an alias; force=true deletes it anyway",
         r"^/v1/models/\{model_id\}$", _on("delete")),
    Rule(409, ("engine_holds_alias",), "the engine (or one of the job's engines) holds an alias, named in "
         "the body; force=true deletes it with its alias", r"^/v1/(engines/\{engine_id\}|jobs/\{job_id\})$",
         _on("delete")),
    Rule(409, ("job_active",), "the job is queued or running: cancel it first", r"^/v1/jobs/\{job_id\}$",
         _on("delete")),
    # jobs
    Rule(404, ("model_not_found", "dataset_not_found", "job_not_found"), "an id in the body names nothing",
         _JOB_CREATING, _on("post")),
    Rule(409, ("sensitivity_not_available",), "the sensitivity analysis the recipe names has not succeeded",
         r"^/v1/jobs$", _on("post")),
    Rule(409, ("model_not_ready",), _NOT_READY, _JOB_CREATING, _on("post")),
    Rule(409, ("model_not_ready",), _NOT_READY, r"^/v1/models/\{model_id\}/download$", _on("get")),
    Rule(422, ("invalid_recipe", "dataset_mismatch", "…"),
         "the recipe or the datasets do not fit the model or the machine", _JOB_CREATING, _on("post")),
    Rule(422, ("no_sequence_axis", "invalid_sequence_length", "sequence_too_long"),
         "a sequence length (`sequence_lengths`, `objective.sequence_length`) the model's inputs cannot "
         "take: no dynamic sequence dim, or longer than the position table",
         _JOB_CREATING, _on("post")),
    Rule(422, ("graph_optimization_mismatch", "attention_heads_unknown"),
         "a stated transformer `graph_optimization` (model type, heads, hidden size) the graph does not "
         "hold", _JOB_CREATING, _on("post")),
    Rule(422, ("budget_out_of_range",), "an accuracy budget's max_drop over 0.5 (a unit mistake: 1 for 1 "
         "point): the body gives the value it probably meant", _JOB_CREATING, _on("post")),
    Rule(422, ("time_budget_too_long",), "the time budget is over the server's `max_time_budget_minutes`",
         r"^/v1/models/\{model_id\}/optimize$", _on("post")),
    Rule(429, ("too_many_jobs",), "the project has as many jobs queued or running as it may",
         _JOB_CREATING, _on("post"), headers=_RETRY_AFTER),
    Rule(503, ("broker_unavailable",), "the job queue is unreachable (the job is kept, failed)",
         _JOB_CREATING, _on("post")),
    Rule(409, ("job_not_cancellable",), "the job has finished", r"/cancel$"),
    Rule(409, ("not_an_optimization_job", "job_not_succeeded", "sensitivity_not_available",
               "autotune_not_available"), "the job is not of that kind, or has not succeeded",
         r"^/v1/jobs/\{job_id\}/(report|sensitivity|autotune)$"),
    # engines
    Rule(404, ("layer_errors_not_available",), "not an INT8 engine: no per-layer errors", r"/layer-errors$"),
    Rule(503, ("engine_file_missing",), "the engine's file is not in the artifact store",
         r"^/v1/engines/\{engine_id\}/download$", _on("get")),
    Rule(409, ("alias_conflict",), "another request took the alias at that moment", r"/alias$", _on("put")),
    Rule(422, ("not_batchable",), "a tensor without a dynamic dim 0", r"/batching$", _on("put")),
    Rule(404, ("engine_not_found",), "a name in the query is no engine id or alias", r"^/v1/triton$"),
    Rule(422, ("not_exportable", "no_engines", "duplicate_model_name", "invalid_model_name"),
         "the engines cannot make one Triton repository", _TRITON),
    Rule(503, ("engine_file_missing",), "an engine's file is not in the artifact store", _TRITON),
    # inference
    Rule(404, ("model_not_found", "version_not_found"),
         "no engine, alias or model of that name, or no such version", r"^/v2/models/\{name\}"),
    Rule(422, ("invalid_input", "inference_failed"), "tensors that do not fit the engine", _V1_INFER),
    Rule(409, ("backend_unavailable", "engine_incompatible"), "this node cannot run the engine", _V1_INFER),
    Rule(400, ("invalid_request", "invalid_input", "inference_failed", "not_batchable"),
         "a request or tensor that does not fit the protocol or the model", _V2_INFER),
    Rule(400, ("body_incomplete",), "the client closed before its body was complete", _INFER),
    Rule(408, ("body_timeout",), "the body did not arrive within the read timeout", _INFER,
         headers=_CONNECTION_CLOSE),
    Rule(503, ("server_busy",), "every inference slot, the memory for bodies, or the activation budget is "
         "taken: retry shortly", _INFER, headers=_RETRY_AFTER),
    Rule(413, ("batch_too_large",), "a batch over the engine's largest (`max_batch` in the body; /v2 model "
         "metadata's `parameters.max_batch_size`)", _INFER),
    Rule(503, ("backend_unavailable", "engine_incompatible", "engine_file_missing"),
         "this node cannot run the engine", _V2_INFER),
)
# fmt: on


def error_schema(path: str) -> str:
    """The component an error at `path` answers with (the rule of `app.api.errors.error_body`)."""
    protocol = path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")
    return PROTOCOL_ERROR_BODY if protocol else ERROR_BODY


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def component_schemas() -> dict[str, dict[str, Any]]:
    """The error bodies, and the readiness bodies (their 503 is no error body)."""
    issues = {"type": "array", "items": _ref(VALIDATION_ISSUE), "description": "422: each problem"}
    checks = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": '"ok" or the error',
    }
    return {
        VALIDATION_ISSUE: {
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"type": "string"},
                "type": {"type": "string"},
            },
        },
        ERROR_BODY: {
            "type": "object",
            "description": "An error under /v1 and the probes: a machine-readable `code` and a sentence; "
            "some add fields (`job_id`, `mismatches`).",
            "required": ["code", "detail"],
            "properties": {"code": {"type": "string"}, "detail": {"type": "string"}, "errors": issues},
        },
        PROTOCOL_ERROR_BODY: {
            "type": "object",
            "description": "An error under /v2, as the Open Inference Protocol's clients read it: `error`, "
            "plus optiforge's `code`.",
            "required": ["error", "code"],
            "properties": {"error": {"type": "string"}, "code": {"type": "string"}, "errors": issues},
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {"status": {"enum": ["ready", "not_ready"]}, "checks": checks},
        },
        "ProtocolReadiness": {
            "type": "object",
            "required": ["ready", "checks"],
            "properties": {"ready": {"type": "boolean"}, "checks": checks},
        },
        "ModelReadiness": {
            "type": "object",
            "required": ["name", "ready"],
            "properties": {
                "name": {"type": "string"},
                "ready": {"type": "boolean"},
                "error": {"type": "string", "description": "why this node cannot serve it"},
            },
        },
    }


def _response(rules: list[Rule], schema: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": "; ".join(f"`{'`, `'.join(rule.codes)}`: {rule.why}" for rule in rules),
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    headers = {name: spec for rule in rules for name, spec in rule.headers.items()}
    if headers:
        response["headers"] = headers
    return response


def declare_errors(
    document: dict[str, Any], direct: set[tuple[str, str]], rules: tuple[Rule, ...] = RULES
) -> dict[str, Any]:
    """Complete `document` (in place, and returned): the error bodies, and on each operation every
    error status its rules give. `direct`: the (path, method) of DirectRoute operations."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(component_schemas())
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in METHODS:
                continue
            responses = operation.setdefault("responses", {})
            operation["security"] = [] if is_open(path, method) else [{"bearer": []}, {"apiKeyHeader": []}]
            if (path, method) in direct:  # no validation; path parameters and the binary header
                path_parameters = [p for p in operation.get("parameters", []) if p["in"] == "path"]
                operation["parameters"] = [*path_parameters, BINARY_HEADER]
                responses.pop("422", None)
            matching: dict[int, list[Rule]] = {}
            for rule in rules:
                if rule.applies(path, method, operation) and not (
                    rule.status == 422 and (path, method) in direct
                ):
                    matching.setdefault(rule.status, []).append(rule)
            for status, found in sorted(matching.items()):
                responses[str(status)] = _response(found, error_schema(path))
            if path in READINESS:
                body = {"application/json": {"schema": _ref(READINESS[path])}}
                responses["200"]["content"] = body
                responses["503"] = {"description": "not ready: `checks` or `error` says why", "content": body}
    if _ref("HTTPValidationError")["$ref"] not in str(document.get("paths")):  # FastAPI's, replaced
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    return document


def forms_without_null(document: dict[str, Any]) -> dict[str, Any]:
    """Optional fields of multipart forms (`document`'s, in place, and returned) lose their `null`.

    FastAPI writes an optional form field as `anyOf: [<its type>, null]`, but a form has no null:
    an optional field is left out, and one that is sent is text (an `opset` of "null" is no
    integer). Generated clients and schemathesis sent "null"; the document now says what is read."""
    schemas = document.get("components", {}).get("schemas", {})
    for operations in document.get("paths", {}).values():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {}) if method in METHODS else {}
            form = content.get("multipart/form-data", {}).get("schema", {})
            form = schemas.get(form.get("$ref", "").rpartition("/")[2], form)
            for name, spec in form.get("properties", {}).items():
                kinds = [kind for kind in spec.get("anyOf", ()) if kind != {"type": "null"}]
                if len(kinds) == 1 and len(spec["anyOf"]) == 2:
                    rest = {key: value for key, value in spec.items() if key not in ("anyOf", "default")}
                    form["properties"][name] = {**kinds[0], **rest}
    return document


def direct_operations(app: FastAPI) -> set[tuple[str, str]]:
    """(path, method) of the app's DirectRoutes."""
    return {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, DirectRoute)
        for method in route.methods or ()
    }


def install_openapi(app: FastAPI) -> None:
    """`app.openapi()` (what /openapi.json, /docs and the 405s' Allow read) returns the completed
    document, generated once."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = forms_without_null(declare_errors(generate(), direct_operations(app)))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
