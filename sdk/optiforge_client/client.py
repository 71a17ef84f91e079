"""The clients: `Client` (blocking) and `AsyncClient` (asyncio), with the same methods.

    from optiforge_client import Client
    with Client("http://127.0.0.1:8000") as client:
        model = client.upload_model("model.onnx")
        calib = client.upload_dataset("calib.npz")
        job = client.create_job(model.id, {"precision": "int8"}, calibration_dataset_id=calib.id)
        job = client.wait_for_job(job.id)
        result = client.infer(job.engine_ids[0], {"input": batch})

A PyTorch model goes up as an `nn.Module` with example inputs (exported here with torch.export;
torch is needed for that call only) and is converted to ONNX on the server:

        model = client.upload_model(module, example_inputs=(torch.randn(1, 3, 224, 224),))
        model = client.wait_for_model(model.id)  # ready, or ModelFailed with the exporter's code

Each method is a call of `optiforge_client.calls` sent by this client's transport; errors are
the typed exceptions of `optiforge_client.errors`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from optiforge_client import calls, dedup
from optiforge_client.errors import (
    DatasetFailed,
    DatasetTimeout,
    JobFailed,
    JobTimeout,
    ModelFailed,
    ModelTimeout,
)
from optiforge_client.models import Dataset, Job, Model

P = ParamSpec("P")
T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
ProgressCallback = Callable[[Job], None]


def default_url(url: str | None = None) -> str:
    """`url`, else $OPTIFORGE_URL, else the local default."""
    return (url or os.environ.get("OPTIFORGE_URL") or DEFAULT_URL).rstrip("/")


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """`Authorization: Bearer` with `api_key`, else $OPTIFORGE_API_KEY; none without a key (a
    server with no key yet answers loopback clients without one)."""
    key = api_key or os.environ.get("OPTIFORGE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _http_options(api_key: str | None, options: dict[str, Any]) -> dict[str, Any]:
    headers = {**auth_headers(api_key), **dict(options.pop("headers", None) or {})}
    return {**options, "headers": headers}


def _sync(build: Callable[P, calls.Call[T]]) -> Callable[Concatenate[Client, P], T]:
    @functools.wraps(build)
    def method(self: Client, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.send(build(*args, **kwargs))

    return method


def _async(build: Callable[P, calls.Call[T]]) -> Callable[Concatenate[AsyncClient, P], Awaitable[T]]:
    @functools.wraps(build)
    async def method(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.send(build(*args, **kwargs))

    return method


def _finished(job: Job, started: float, timeout: float | None) -> bool:
    """True once the job succeeded; raises if it failed, was cancelled, or the wait is over."""
    if job.status == "succeeded":
        return True
    if job.finished:
        raise JobFailed(job)
    if timeout is not None and time.monotonic() - started > timeout:
        raise JobTimeout(job, timeout)
    return False


def _dataset_ready(dataset: Dataset, started: float, timeout: float | None) -> bool:
    """True once the dataset is ready; raises if decoding its images failed, or the wait is over."""
    if dataset.status == "ready":
        return True
    if dataset.status == "failed":
        raise DatasetFailed(dataset)
    if timeout is not None and time.monotonic() - started > timeout:
        raise DatasetTimeout(dataset, timeout)
    return False


def _model_ready(model: Model, started: float, timeout: float | None) -> bool:
    """True once the model is ready; raises if its conversion failed, or the wait is over."""
    if model.status == "ready":
        return True
    if model.status == "failed":
        raise ModelFailed(model)
    if timeout is not None and time.monotonic() - started > timeout:
        raise ModelTimeout(model, timeout)
    return False


def _is_file(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike))


def _triton_call(engines: Sequence[str] | str) -> calls.Call[None]:
    """GET /v1/triton for these engines (ids or aliases). Its answer is a zip streamed to a file,
    so the call is sent with `stream` and only its errors go through `Call.finish`."""
    names = [engines] if isinstance(engines, str) else list(engines)
    if not names:
        raise ValueError("name one engine or more to export")
    return calls.Call("GET", "/v1/triton", lambda _response: None, params={"engine": names})


def _partial(path: Path) -> Path:
    """Where a download goes until it is complete: `path` never holds half a zip."""
    return path.with_name(path.name + ".part")


def _engine_download_call(engine_id: str) -> calls.Call[None]:
    """GET /v1/engines/{id}/download, streamed to a file like `_triton_call`."""
    return calls.Call("GET", f"/v1/engines/{engine_id}/download", lambda _response: None)


_FILENAME = re.compile(r"""filename\*?=(?:UTF-8'')?"?([^";]+)"?""", re.IGNORECASE)


def _download_target(path: str | Path | None, response: httpx.Response, fallback: str) -> Path:
    """Where a download goes: `path`, or inside it when it is a folder (an existing one, or one
    written with a trailing `/`; None: the working folder) under the server's file name
    (Content-Disposition), else `fallback`."""
    match = _FILENAME.search(response.headers.get("content-disposition", ""))
    name = Path(match.group(1)).name if match else fallback
    if path is None:
        return Path.cwd() / name
    target = Path(path)
    if target.is_dir() or str(path).endswith(("/", os.sep)):  # a folder, made if it is not there
        target.mkdir(parents=True, exist_ok=True)
        return target / name
    return target


class Client:
    """Blocking client. `url` defaults to $OPTIFORGE_URL, `api_key` to $OPTIFORGE_API_KEY;
    `transport` lets tests pass an ASGI app."""

    def __init__(
        self, url: str | None = None, timeout: float = 300.0, api_key: str | None = None, **httpx_options: Any
    ):
        self.url = default_url(url)
        options = _http_options(api_key, httpx_options)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, **options)

    def send(self, call: calls.Call[T]) -> T:
        try:
            response = self._http.request(**call.request_args())
        except BaseException:
            call.close()
            raise
        result = call.finish(response)
        while (call := call.next_page(response)) is not None:  # a listing's later pages
            response = self._http.request(**call.request_args())
            result += call.finish(response)  # type: ignore[operator]
        return result

    upload_model = _sync(calls.upload_model)
    capabilities = _sync(calls.capabilities)
    list_models = _sync(calls.list_models)
    get_model = _sync(calls.get_model)
    delete_model = _sync(calls.delete_model)
    list_datasets = _sync(calls.list_datasets)
    get_dataset = _sync(calls.get_dataset)
    delete_dataset = _sync(calls.delete_dataset)

    def find_or_upload_model(
        self, path: str | Path, name: str | None = None, *, opset: int | None = None
    ) -> Model:
        """The stored model of this file's bytes (`deduplicated` True), else `upload_model`: an
        ONNX file is looked up by its sha256 first (dedup.py), so it crosses the network once."""
        if dedup.model_lookup(path, opset):
            digest = dedup.file_sha256(path)
            found = dedup.reusable_model(self.list_models(dedup.LOOKUP_LIMIT, sha256=digest), digest)
            if found is not None:
                return found
        return self.upload_model(path, name, opset=opset)

    def find_or_upload_dataset(self, path: str | Path, name: str | None = None, **options: Any) -> Dataset:
        """The stored dataset of this .npz's bytes (`deduplicated` True), else `upload_dataset`
        with `options` (an image folder or texts go up: the server matches them with their spec)."""
        decoding = {key: value for key, value in options.items() if key not in ("wait", "timeout")}
        if dedup.dataset_lookup(path, decoding):
            digest = dedup.file_sha256(path)
            found = dedup.reusable_dataset(self.list_datasets(dedup.LOOKUP_LIMIT, sha256=digest), digest)
            if found is not None:
                return found
        return self.upload_dataset(path, name, **options)

    def upload_dataset(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        preprocessing: Mapping[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        input_name: str | None = None,
        tokenizer: str | Path | None = None,
        tokenization: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Dataset:
        """Upload a dataset (calls.upload_dataset: an .npz, a .zip of images, or a JSONL of texts
        with its `tokenizer` and `tokenization` spec, for `model_id`); a large image folder is
        decoded by a job: with `wait` (the default) this returns it ready (DatasetFailed,
        DatasetTimeout), without, as it is (`status` `processing`; `wait_for_dataset` later)."""
        call = calls.upload_dataset(
            path,
            name,
            preprocessing=preprocessing,
            classes=classes,
            input_name=input_name,
            tokenizer=tokenizer,
            tokenization=tokenization,
            model_id=model_id,
        )
        dataset = self.send(call)
        return self.wait_for_dataset(dataset.id, timeout) if wait and dataset.status != "ready" else dataset

    def wait_for_dataset(self, dataset_id: str, timeout: float | None = None, poll_s: float = 0.5) -> Dataset:
        """Poll until the dataset is ready (returned): a large image folder is `processing` until
        its decode_images job ends. Decoding failed: DatasetFailed; still processing: DatasetTimeout."""
        started = time.monotonic()
        while True:
            dataset = self.get_dataset(dataset_id)
            if _dataset_ready(dataset, started, timeout):
                return dataset
            time.sleep(poll_s)

    create_job = _sync(calls.create_job)
    optimize = _sync(calls.optimize)
    autotune_report = _sync(calls.autotune_report)
    get_job = _sync(calls.get_job)
    list_jobs = _sync(calls.list_jobs)
    cancel_job = _sync(calls.cancel_job)
    delete_job = _sync(calls.delete_job)
    job_report = _sync(calls.job_report)
    list_engines = _sync(calls.list_engines)
    get_engine = _sync(calls.get_engine)
    delete_engine = _sync(calls.delete_engine)
    set_alias = _sync(calls.set_alias)
    set_batching = _sync(calls.set_batching)
    clear_batching = _sync(calls.clear_batching)
    delete_alias = _sync(calls.delete_alias)
    model_metadata = _sync(calls.model_metadata)
    infer = _sync(calls.infer)

    def wait_for_job(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Poll until the job succeeds (returned), fails or is cancelled (JobFailed) or times out."""
        started = time.monotonic()
        while True:
            job = self.get_job(job_id)
            if on_progress:
                on_progress(job)
            if _finished(job, started, timeout):
                return job
            time.sleep(poll_s)

    def wait_for_model(self, model_id: str, timeout: float | None = None, poll_s: float = 0.5) -> Model:
        """Poll until the model is ready (returned): a PyTorch upload is `converting` until its
        convert job ends. Its conversion failed: ModelFailed (`code`, e.g. `unsupported_op`);
        still converting after `timeout` seconds: ModelTimeout."""
        started = time.monotonic()
        while True:
            model = self.get_model(model_id)
            if _model_ready(model, started, timeout):
                return model
            time.sleep(poll_s)

    def triton_repository(self, engines: Sequence[str] | str, path: str | Path) -> Path:
        """Download engines (ids or aliases) as one Triton model repository, a zip written to
        `path`: unpack it and serve it with `tritonserver --model-repository=DIR`. Each engine is a
        model named by its alias, else its id. Streamed to disk (engines can be gigabytes)."""
        return self._stream_to(_triton_call(engines), path, "triton.zip")

    def download_engine(self, engine_id: str, path: str | Path | None = None) -> Path:
        """Download an engine, any backend: its file (`.onnx`, `.plan`), or a zip of its files
        (OpenVINO's IR). Written to `path`, or into it when it is a folder (default: the working
        folder), under the server's name `<engine id>-<backend>.<ext>`; streamed to disk."""
        return self._stream_to(_engine_download_call(engine_id), path, f"{engine_id}.bin")

    def _stream_to(self, call: calls.Call[None], path: str | Path | None, fallback: str) -> Path:
        """Send `call` and write its answer to a file (`_download_target`), whole or not at all;
        an error answer raises its typed error."""
        with self._http.stream(**call.request_args()) as response:
            if response.status_code >= 400:
                response.read()
                call.finish(response)  # raises the typed error
            target = _download_target(path, response, fallback)
            partial = _partial(target)
            try:
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
        return target

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncClient:
    """The same methods as `Client`, awaitable."""

    def __init__(
        self, url: str | None = None, timeout: float = 300.0, api_key: str | None = None, **httpx_options: Any
    ):
        self.url = default_url(url)
        options = _http_options(api_key, httpx_options)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, **options)

    async def send(self, call: calls.Call[T]) -> T:
        try:
            response = await self._http.request(**call.request_args())
        except BaseException:
            call.close()
            raise
        result = call.finish(response)
        while (call := call.next_page(response)) is not None:  # a listing's later pages
            response = await self._http.request(**call.request_args())
            result += call.finish(response)  # type: ignore[operator]
        return result

    @functools.wraps(calls.upload_model)
    async def upload_model(self, path: Any, name: str | None = None, **options: Any) -> Model:
        if _is_file(path):
            return await self.send(calls.upload_model(path, name, **options))
        # An nn.Module is exported first (torch.export: seconds of CPU), off the event loop.
        call = await asyncio.to_thread(calls.upload_model, path, name, **options)
        return await self.send(call)

    capabilities = _async(calls.capabilities)
    list_models = _async(calls.list_models)
    get_model = _async(calls.get_model)
    delete_model = _async(calls.delete_model)
    list_datasets = _async(calls.list_datasets)
    get_dataset = _async(calls.get_dataset)
    delete_dataset = _async(calls.delete_dataset)

    async def find_or_upload_model(
        self, path: str | Path, name: str | None = None, *, opset: int | None = None
    ) -> Model:
        """As `Client.find_or_upload_model` (the file hashed off the event loop)."""
        if dedup.model_lookup(path, opset):
            digest = await asyncio.to_thread(dedup.file_sha256, path)
            found = dedup.reusable_model(await self.list_models(dedup.LOOKUP_LIMIT, sha256=digest), digest)
            if found is not None:
                return found
        return await self.upload_model(path, name, opset=opset)

    async def find_or_upload_dataset(
        self, path: str | Path, name: str | None = None, **options: Any
    ) -> Dataset:
        """As `Client.find_or_upload_dataset`."""
        decoding = {key: value for key, value in options.items() if key not in ("wait", "timeout")}
        if dedup.dataset_lookup(path, decoding):
            digest = await asyncio.to_thread(dedup.file_sha256, path)
            found = dedup.reusable_dataset(
                await self.list_datasets(dedup.LOOKUP_LIMIT, sha256=digest), digest
            )
            if found is not None:
                return found
        return await self.upload_dataset(path, name, **options)

    async def upload_dataset(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        preprocessing: Mapping[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        input_name: str | None = None,
        tokenizer: str | Path | None = None,
        tokenization: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Dataset:
        """As `Client.upload_dataset`."""
        call = calls.upload_dataset(
            path,
            name,
            preprocessing=preprocessing,
            classes=classes,
            input_name=input_name,
            tokenizer=tokenizer,
            tokenization=tokenization,
            model_id=model_id,
        )
        dataset = await self.send(call)
        if wait and dataset.status != "ready":
            return await self.wait_for_dataset(dataset.id, timeout)
        return dataset

    async def wait_for_dataset(
        self, dataset_id: str, timeout: float | None = None, poll_s: float = 0.5
    ) -> Dataset:
        """As `Client.wait_for_dataset`."""
        started = time.monotonic()
        while True:
            dataset = await self.get_dataset(dataset_id)
            if _dataset_ready(dataset, started, timeout):
                return dataset
            await asyncio.sleep(poll_s)

    create_job = _async(calls.create_job)
    optimize = _async(calls.optimize)
    autotune_report = _async(calls.autotune_report)
    get_job = _async(calls.get_job)
    list_jobs = _async(calls.list_jobs)
    cancel_job = _async(calls.cancel_job)
    delete_job = _async(calls.delete_job)
    job_report = _async(calls.job_report)
    list_engines = _async(calls.list_engines)
    get_engine = _async(calls.get_engine)
    delete_engine = _async(calls.delete_engine)
    set_alias = _async(calls.set_alias)
    set_batching = _async(calls.set_batching)
    clear_batching = _async(calls.clear_batching)
    delete_alias = _async(calls.delete_alias)
    model_metadata = _async(calls.model_metadata)
    infer = _async(calls.infer)

    async def wait_for_job(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Poll until the job succeeds (returned), fails or is cancelled (JobFailed) or times out."""
        started = time.monotonic()
        while True:
            job = await self.get_job(job_id)
            if on_progress:
                on_progress(job)
            if _finished(job, started, timeout):
                return job
            await asyncio.sleep(poll_s)

    async def wait_for_model(self, model_id: str, timeout: float | None = None, poll_s: float = 0.5) -> Model:
        """Poll until the model is ready (returned); ModelFailed, ModelTimeout as `Client`'s."""
        started = time.monotonic()
        while True:
            model = await self.get_model(model_id)
            if _model_ready(model, started, timeout):
                return model
            await asyncio.sleep(poll_s)

    async def triton_repository(self, engines: Sequence[str] | str, path: str | Path) -> Path:
        """Download engines (ids or aliases) as one Triton model repository zip to `path`."""
        return await self._stream_to(_triton_call(engines), path, "triton.zip")

    async def download_engine(self, engine_id: str, path: str | Path | None = None) -> Path:
        """As `Client.download_engine`."""
        return await self._stream_to(_engine_download_call(engine_id), path, f"{engine_id}.bin")

    async def _stream_to(self, call: calls.Call[None], path: str | Path | None, fallback: str) -> Path:
        """As `Client._stream_to`."""
        async with self._http.stream(**call.request_args()) as response:
            if response.status_code >= 400:
                await response.aread()
                call.finish(response)  # raises the typed error
            target = _download_target(path, response, fallback)
            partial = _partial(target)
            try:
                with partial.open("wb") as handle:
                    async for chunk in response.aiter_bytes():
                        handle.write(chunk)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
        return target

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()
