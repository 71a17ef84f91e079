"""Every API call once, as data: what to send and how to read the answer.

The sync and the async client only differ in how they send, so each call is written here once
and both clients execute it (see `client.py`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar

import httpx
import numpy as np

from optiforge_client import tensors
from optiforge_client.errors import error_from_response
from optiforge_client.models import Dataset, Engine, InferResult, Job, Model
from optiforge_client.torch_export import export_module

T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, IO[bytes]]] | None = None
    #: Run once the call is done, whatever its outcome (a temporary export removed).
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    #: A listing whose later pages the client fetches too (the server answers a page at a time).
    paged: bool = False

    def request_args(self) -> dict[str, Any]:
        args = {"method": self.method, "url": self.path, "params": self.params, "headers": self.headers}
        for name in ("json", "content", "data", "files"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        return args

    def close(self) -> None:
        """Close the files opened for an upload, then run the clean-ups."""
        for _name, handle in (self.files or {}).values():
            handle.close()
        while self.cleanup:
            self.cleanup.pop()()

    def next_page(self, response: httpx.Response) -> Call[T] | None:
        """The call for the page after `response`'s, if the listing has one (its `X-Next-Cursor`)."""
        cursor = response.headers.get(NEXT_CURSOR_HEADER) if self.paged else None
        if not cursor:
            return None
        return Call(self.method, self.path, self.parse, {**(self.params or {}), "cursor": cursor}, paged=True)

    def finish(self, response: httpx.Response) -> T:
        """Close uploaded files, raise the typed error of an error answer, else parse it."""
        self.close()
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise error_from_response(response.status_code, body, response.text)
        return self.parse(response)


def _as(model: type[T]) -> Callable[[httpx.Response], T]:
    return lambda response: model.model_validate(response.json())  # type: ignore[attr-defined]


def _list_of(model: type[T]) -> Callable[[httpx.Response], list[T]]:
    return lambda response: [model.model_validate(item) for item in response.json()]  # type: ignore[attr-defined]


#: The header of a listing's response naming where its next page starts (app.api.pagination).
NEXT_CURSOR_HEADER = "X-Next-Cursor"
#: Records a page the client asks for when it reads every page (the server's maximum).
PAGE_LIMIT = 1000


def _listing(path: str, model: type[T], limit: int | None, params: dict[str, Any]) -> Call[list[T]]:
    """A listing: every record, a page at a time (`limit` None), or the newest `limit` (one page)."""
    query = {key: value for key, value in params.items() if value is not None}
    query["limit"] = PAGE_LIMIT if limit is None else limit
    return Call("GET", path, _list_of(model), params=query, paged=limit is None)


def _nothing(_response: httpx.Response) -> None:
    return None


def _upload(path: str, file: str | Path, name: str | None, model: type[T]) -> Call[T]:
    file = Path(file)
    return Call(
        "POST",
        path,
        _as(model),
        data={"name": name} if name else None,
        files={"file": (file.name, file.open("rb"))},
    )


def capabilities() -> Call[dict[str, Any]]:
    """What the server can do: precisions, calibration methods, pruning criteria, backends, job kinds."""
    return Call("GET", "/v1/capabilities", lambda response: response.json())


def upload_model(
    path: str | os.PathLike[str] | Any,
    name: str | None = None,
    *,
    example_inputs: Any = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Call[Model]:
    """Upload a model: `path` is a file (`.onnx`, a `.zip` of one `.onnx` and its external data, or a
    torch.export program `.pt2`) or a `torch.nn.Module`, with `example_inputs` (the positional
    arguments of one call), exported here by `torch_export.export_module` into a temporary `.pt2`
    (only this needs torch; `dynamic_batch`: dim 0 of every input is one dynamic `batch` dim).

    A PyTorch upload answers at once with status `converting` while a worker converts it to ONNX:
    `wait_for_model(model.id)` returns it `ready`. `opset` (18 or later): the ONNX opset to convert
    a PyTorch program to (default: the exporter's)."""
    if isinstance(path, (str, os.PathLike)):
        if example_inputs is not None:
            raise TypeError("example_inputs goes with an nn.Module; a file is uploaded as it is")
        call = _upload("/v1/models", path, name, Model)
    else:
        if example_inputs is None:
            raise TypeError(
                f"upload_model takes a file path, or an nn.Module with example_inputs=(...), "
                f"not a {type(path).__name__} alone"
            )
        folder = Path(tempfile.mkdtemp(prefix="optiforge-export-"))
        try:
            stem = re.sub(r"[^A-Za-z0-9._-]", "_", type(path).__name__)[:100] or "model"
            target = folder / f"{stem}.pt2"
            exported = export_module(path, example_inputs, target, dynamic_batch=dynamic_batch)
            call = _upload("/v1/models", exported, name, Model)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        call.cleanup.append(lambda: shutil.rmtree(folder, ignore_errors=True))
    if opset is not None:
        call.data = {**(call.data or {}), "opset": str(opset)}
    return call


def list_models(limit: int | None = None, *, sha256: str | None = None) -> Call[list[Model]]:
    """Newest first: every model, or the newest `limit` (at most 1000); with `sha256`, those
    uploaded from a file of that content (`file_sha256`)."""
    return _listing("/v1/models", Model, limit, {"sha256": sha256})


def get_model(model_id: str) -> Call[Model]:
    return Call("GET", f"/v1/models/{model_id}", _as(Model))


def _delete(path: str, force: bool) -> Call[None]:
    return Call("DELETE", path, _nothing, params={"force": "true"} if force else None)


def delete_model(model_id: str, *, force: bool = False) -> Call[None]:
    """Delete a model with its jobs and engines. Conflict `model_serving` while one of its
    engines holds an alias, unless `force` (the aliases go too)."""
    return _delete(f"/v1/models/{model_id}", force)


def upload_dataset(
    path: str | Path,
    name: str | None = None,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    input_name: str | None = None,
    tokenizer: str | Path | None = None,
    tokenization: Mapping[str, Any] | None = None,
    model_id: str | None = None,
) -> Call[Dataset]:
    """Upload a .npz of the model's inputs by name (and optional `labels`; never pickled), or a
    .zip of images with a `preprocessing` spec (size, resize, mean, std, channel_order, layout,
    dtype), the model's `classes` in output order and the array's `input_name`. A large image
    folder answers `processing` while a worker decodes it: `Client.upload_dataset` waits for it
    by default, `wait_for_dataset(dataset.id)` does on demand.

    A JSONL of texts (`{"text": ..., "text_pair": ..., "label": ...}` per line) goes with its
    `tokenizer` (a tokenizer.json) and a `tokenization` spec (max_length, truncation, padding
    `max_length` or `longest`, padding_side, add_special_tokens, input_names, dtype); with
    `model_id` its arrays take that model's input names and dtypes, checked against it."""
    call = _upload("/v1/datasets", path, name, Dataset)
    form = dict(call.data or {})
    if preprocessing is not None:
        form["preprocessing"] = json.dumps(dict(preprocessing))
    if classes is not None:
        form["classes"] = json.dumps(list(classes))
    if input_name is not None:
        form["input_name"] = input_name
    if tokenization is not None:
        form["tokenization"] = json.dumps(dict(tokenization))
    if model_id is not None:
        form["model_id"] = model_id
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        call.files = {**(call.files or {}), "tokenizer": (tokenizer.name, tokenizer.open("rb"))}
    call.data = form or None
    return call


def get_dataset(dataset_id: str) -> Call[Dataset]:
    return Call("GET", f"/v1/datasets/{dataset_id}", _as(Dataset))


def list_datasets(limit: int | None = None, *, sha256: str | None = None) -> Call[list[Dataset]]:
    """Newest first: every dataset, or the newest `limit` (at most 1000); with `sha256`, those
    uploaded from a file of that content (`file_sha256`)."""
    return _listing("/v1/datasets", Dataset, limit, {"sha256": sha256})


def delete_dataset(dataset_id: str, *, force: bool = False) -> Call[None]:
    """Delete a dataset. Conflict `dataset_in_use` while a queued or running job uses it,
    unless `force`."""
    return _delete(f"/v1/datasets/{dataset_id}", force)


def create_job(
    model_id: str,
    recipe: Mapping[str, Any] | None = None,
    calibration_dataset_id: str | None = None,
    evaluation_dataset_id: str | None = None,
) -> Call[Job]:
    """Start an optimization job; `recipe` is the JSON recipe of the API (precision, prune, …)."""
    body = {
        "model_id": model_id,
        "recipe": dict(recipe or {}),
        "calibration_dataset_id": calibration_dataset_id,
        "evaluation_dataset_id": evaluation_dataset_id,
    }
    return Call("POST", "/v1/jobs", _as(Job), json=body)


def optimize(
    model_id: str,
    evaluation_dataset_id: str,
    calibration_dataset_id: str | None = None,
    *,
    objective: str = "latency",
    batch_size: int = 1,
    sequence_length: int | None = None,
    max_drop: float = 0.01,
    budget_metric: str = "top1",
    relative: bool = False,
    time_budget_minutes: float = 30.0,
    space: Mapping[str, Any] | None = None,
    alias: str | None = None,
) -> Call[Job]:
    """Auto-optimize: the fastest engine (or the smallest, objective="size") whose accuracy drop
    stays within `max_drop` (0.01 = 1 point of `budget_metric`), searched in `time_budget_minutes`.
    Follow it with `wait_for_job`, then `autotune_report(job_id)`; `space` narrows the search
    (`backends`, `precisions`, `calibrations`, `prune_ratios`, …); `sequence_length` times a model
    with token inputs of dynamic length at that length."""
    at: dict[str, Any] = {"metric": objective, "batch_size": batch_size}
    if sequence_length is not None:  # only when asked: a server before it refuses unknown fields
        at["sequence_length"] = sequence_length
    body = {
        "evaluation_dataset_id": evaluation_dataset_id,
        "calibration_dataset_id": calibration_dataset_id,
        "objective": at,
        "accuracy_budget": {"metric": budget_metric, "max_drop": max_drop, "relative": relative},
        "time_budget_minutes": time_budget_minutes,
        "space": dict(space or {}),
        "alias": alias,
    }
    return Call("POST", f"/v1/models/{model_id}/optimize", _as(Job), json=body)


def autotune_report(job_id: str, format: Literal["json", "md", "png"] = "json") -> Call[Any]:
    """An autotune job's report: every candidate with lineage, outcome and figures (JSON), the
    markdown table (`md`), or the plot's PNG bytes (`png`)."""
    parsers: dict[str, Callable[[httpx.Response], Any]] = {
        "json": lambda r: r.json(),
        "md": lambda r: r.text,
        "png": lambda r: r.content,
    }
    return Call("GET", f"/v1/jobs/{job_id}/autotune", parsers[format], params={"format": format})


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{job_id}", _as(Job))


def list_jobs(
    status: str | Sequence[str] | None = None,
    limit: int | None = None,
    *,
    kind: str | None = None,
    model_id: str | None = None,
) -> Call[list[Job]]:
    """Newest first: every job (of that status or those statuses, that kind, that model), or the
    newest `limit` (at most 1000)."""
    statuses = [status] if isinstance(status, str) else list(status or [])
    return _listing(
        "/v1/jobs",
        Job,
        limit,
        {"status": statuses or None, "kind": kind or None, "model_id": model_id or None},
    )


def cancel_job(job_id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{job_id}/cancel", _as(Job))


def delete_job(job_id: str, *, force: bool = False) -> Call[None]:
    """Delete a finished job with its engines and report. Conflict `job_active` while it is
    queued or running (cancel it first); `engine_holds_alias` when one of its engines holds an
    alias, unless `force` (the alias goes too)."""
    return _delete(f"/v1/jobs/{job_id}", force)


def job_report(job_id: str, format: Literal["json", "md"] = "json") -> Call[Any]:
    """The job's report: rows per engine vs the baseline (JSON), or the markdown table (`md`)."""
    parse = (lambda r: r.text) if format == "md" else (lambda r: r.json())
    return Call("GET", f"/v1/jobs/{job_id}/report", parse, params={"format": format})


def list_engines(
    model_id: str | None = None, job_id: str | None = None, limit: int | None = None
) -> Call[list[Engine]]:
    """Newest first: every engine (of that model or job), or the newest `limit` (at most 1000)."""
    return _listing("/v1/engines", Engine, limit, {"model_id": model_id or None, "job_id": job_id or None})


def get_engine(engine_id: str) -> Call[Engine]:
    return Call("GET", f"/v1/engines/{engine_id}", _as(Engine))


def delete_engine(engine_id: str, *, force: bool = False) -> Call[None]:
    """Delete an engine. Conflict `engine_holds_alias` while it holds an alias (the error names
    it), unless `force` (the alias goes too)."""
    return _delete(f"/v1/engines/{engine_id}", force)


def set_alias(engine_id: str, alias: str) -> Call[Engine]:
    """Point `alias` at this engine: clients inferring with the alias switch to it."""
    return Call("PUT", f"/v1/engines/{engine_id}/alias", _as(Engine), json={"alias": alias})


def set_batching(engine_id: str, max_batch_size: int = 16, max_queue_delay_ms: float = 2.0) -> Call[Engine]:
    """Turn on dynamic batching of concurrent requests for this engine."""
    body = {"max_batch_size": max_batch_size, "max_queue_delay_ms": max_queue_delay_ms}
    return Call("PUT", f"/v1/engines/{engine_id}/batching", _as(Engine), json=body)


def clear_batching(engine_id: str) -> Call[Engine]:
    """Turn dynamic batching off: one engine call per request."""
    return Call("DELETE", f"/v1/engines/{engine_id}/batching", _as(Engine))


def delete_alias(engine_id: str) -> Call[Engine]:
    return Call("DELETE", f"/v1/engines/{engine_id}/alias", _as(Engine))


def model_metadata(name: str) -> Call[dict[str, Any]]:
    """Open Inference Protocol metadata: inputs and outputs with datatype and shape."""
    return Call("GET", f"/v2/models/{name}", lambda r: r.json())


def infer(
    name: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    binary: bool = True,
    version: str | None = None,
) -> Call[InferResult]:
    """Run inference on an engine id, alias or model id, over the Open Inference Protocol.

    Binary tensors (raw bytes after a JSON header) by default; `binary=False` sends JSON.
    """
    header: dict[str, Any] = {"parameters": {"binary_data_output": binary}}
    if outputs is not None:
        header["outputs"] = [{"name": output, "parameters": {"binary_data": binary}} for output in outputs]
    body, json_length = tensors.encode(header, "inputs", inputs, binary=binary)
    headers = {"Content-Type": "application/json"}
    if json_length is not None:
        headers = {"Content-Type": tensors.BINARY_CONTENT_TYPE, tensors.HEADER_LENGTH: str(json_length)}
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    return Call("POST", path, _infer_result, content=body, headers=headers)


def _infer_result(response: httpx.Response) -> InferResult:
    message, tail = tensors.split(response.content, response.headers.get(tensors.HEADER_LENGTH))
    parameters = message.get("parameters") or {}
    return InferResult(
        outputs=tensors.decode(message.get("outputs", []), tail, what="output"),
        model_name=message.get("model_name", ""),
        model_version=message.get("model_version", ""),
        compute_ms=parameters.get("compute_ms"),
        queue_ms=parameters.get("queue_ms"),
        batch_size=parameters.get("batch_size"),
    )
