"""Serving in-process: the Open Inference Protocol, aliases, versions, dynamic batching, the engine
pool, bad input, metrics and request ids. Engines are built by the worker's own entry point.

The same protocol over real HTTP, with tritonclient and with the SDK, is in test_protocol_clients.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from optiforge_client import tensors

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.orm import EngineRecord
from app.core.settings import Settings
from app.main import create_app
from app.serving.pool import EnginePool
from engines.backends.batching import BatchingConfig, DynamicBatcher
from tests.conftest import QUICK_MEASURE, DigitsArtifacts, make_settings
from workers.job_runner import run_job_by_id

MAX_REQUEST_BYTES = 1024 * 1024
MAX_JSON_BYTES = 256 * 1024


@dataclass
class Served:
    client: TestClient
    settings: Settings
    model_id: str
    engine_ids: list[str]  # two fp32 engines of the digits CNN, oldest first
    static_engine_id: str  # an engine of the static-batch export
    reference: ort.InferenceSession  # the uploaded model, run in-process

    def expected(self, x: np.ndarray) -> np.ndarray:
        return self.reference.run(None, {"input": x})[0]


def _engine_of(client: TestClient, settings: Settings, model_id: str) -> str:
    job = client.post(
        "/v1/jobs", json={"model_id": model_id, "recipe": {"batch_sizes": [1], "measure": QUICK_MEASURE}}
    )
    run_job_by_id(settings, job.json()["id"])
    return client.get(f"/v1/jobs/{job.json()['id']}").json()["engine_ids"][0]


@pytest.fixture(scope="module")
def served(digits: DigitsArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("serving") / "data",
        max_request_bytes=MAX_REQUEST_BYTES,
        max_json_tensor_bytes=MAX_JSON_BYTES,
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:

        def upload(path: Path) -> str:
            with path.open("rb") as handle:
                return client.post("/v1/models", files={"file": (path.name, handle)}).json()["id"]

        model_id, static_id = upload(digits.onnx_path), upload(digits.static_batch_onnx_path)
        engines = [_engine_of(client, settings, model_id) for _ in range(2)]
        yield Served(
            client,
            settings,
            model_id,
            engines,
            _engine_of(client, settings, static_id),
            ort.InferenceSession(str(digits.onnx_path), providers=["CPUExecutionProvider"]),
        )


def infer_binary(client: TestClient, name: str, x: np.ndarray, binary_out: bool = True, **extra) -> tuple:
    header = {"id": "req-1", "outputs": [{"name": "logits", "parameters": {"binary_data": binary_out}}]}
    body, length = tensors.encode(header, "inputs", {"input": x}, binary=True)
    response = client.post(
        f"/v2/models/{name}/infer", content=body, headers={tensors.HEADER_LENGTH: str(length), **extra}
    )
    return response, response.headers.get(tensors.HEADER_LENGTH)


def decode_response(response, header_length) -> tuple[dict, dict[str, np.ndarray]]:
    message, tail = tensors.split(response.content, header_length)
    return message, tensors.decode(message["outputs"], tail, what="output")


def expect_protocol_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and isinstance(body["error"], str) and body["error"], body
    return body


# ---------------------------------------------------------------- the protocol


def test_health_and_metadata(served: Served) -> None:
    client = served.client
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get(f"/v2/models/{served.engine_ids[0]}").json()
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["versions"] == [served.engine_ids[0]]  # an engine's one version is itself
    assert client.get(f"/v2/models/{served.model_id}").json()["versions"] == served.engine_ids
    assert client.get(f"/v2/models/{served.engine_ids[0]}/ready").json() == {
        "name": served.engine_ids[0],
        "ready": True,
    }


def test_json_and_binary_inference_match_the_model(served: Served, digits: DigitsArtifacts) -> None:
    x = digits.split.test_x[:5]
    expected = served.expected(x)
    request = {
        "id": "a",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
    }
    response = served.client.post(f"/v2/models/{served.engine_ids[0]}/infer", json=request)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["id"] == "a" and body["model_version"] == served.engine_ids[0]
    (output,) = body["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32" and output["shape"] == [5, 10]
    np.testing.assert_allclose(np.reshape(output["data"], (5, 10)), expected, rtol=1e-5, atol=1e-5)
    assert body["parameters"]["compute_ms"] > 0 and body["parameters"]["batch_size"] == 5

    for binary_out in (True, False):
        response, length = infer_binary(served.client, served.engine_ids[0], x, binary_out)
        assert response.status_code == 200
        assert (length is not None) == binary_out
        _message, outputs = decode_response(response, length)
        np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
        assert "compute" in response.headers["server-timing"]


def test_aliases_and_versions(served: Served, digits: DigitsArtifacts) -> None:
    first, second = served.engine_ids
    client = served.client
    assert (
        client.put(f"/v1/engines/{first}/alias", json={"alias": "digits-prod"}).json()["alias"]
        == "digits-prod"
    )
    response, length = infer_binary(client, "digits-prod", digits.split.test_x[:1])
    assert decode_response(response, length)[0]["model_version"] == first
    # Moving the alias switches clients on their next request, with no change on their side.
    client.put(f"/v1/engines/{second}/alias", json={"alias": "digits-prod"})
    response, length = infer_binary(client, "digits-prod", digits.split.test_x[:1])
    assert decode_response(response, length)[0]["model_version"] == second
    assert client.get(f"/v1/engines/{first}").json()["alias"] is None
    # A model id names its engines: versions/{engine id}, or the newest without a version.
    for path, version in ((f"{served.model_id}/versions/{first}", first), (served.model_id, second)):
        x = digits.split.test_x[:2]
        body, length = tensors.encode({}, "inputs", {"input": x})
        response = client.post(
            f"/v2/models/{path}/infer", content=body, headers={tensors.HEADER_LENGTH: str(length)}
        )
        assert response.status_code == 200 and response.json()["model_version"] == version
    expect_protocol_error(
        client.get(f"/v2/models/{served.model_id}/versions/eng_nope"), 404, "version_not_found"
    )
    bad = client.put(f"/v1/engines/{first}/alias", json={"alias": "eng_sneaky"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
    client.delete(f"/v1/engines/{second}/alias")


# ---------------------------------------------------------------- bad input: 4xx, never 500


def test_bad_requests_get_protocol_errors_and_the_server_keeps_serving(
    served: Served, digits: DigitsArtifacts
) -> None:
    client, name = served.client, served.engine_ids[0]
    url = f"/v2/models/{name}/infer"
    x = digits.split.test_x[:2]

    def json_request(**tensor) -> dict:
        entry = {
            "name": "input",
            "datatype": "FP32",
            "shape": [2, 1, 32, 32],
            "data": x.ravel().tolist(),
            **tensor,
        }
        return {"inputs": [entry]}

    cases = {
        "wrong name": client.post(url, json=json_request(name="pixels")),
        "wrong shape": client.post(url, json=json_request(shape=[2, 1, 16, 64])),
        "data vs shape": client.post(url, json=json_request(shape=[3, 1, 8, 8])),
        "wrong datatype": client.post(url, json=json_request(datatype="FP64")),
        "unknown datatype": client.post(url, json=json_request(datatype="COMPLEX")),
        "not json": client.post(url, content=b"{not json"),
        "no inputs": client.post(url, json={}),
        "nested too deep": client.post(url, content=b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    }
    codes = {
        "wrong name": "invalid_input",
        "wrong shape": "invalid_input",
        "data vs shape": "invalid_request",
        "wrong datatype": "invalid_input",
        "unknown datatype": "invalid_request",
        "not json": "invalid_request",
        "no inputs": "invalid_request",
        "nested too deep": "invalid_request",
    }
    for case, response in cases.items():
        body = expect_protocol_error(response, 400, codes[case])
        assert body["error"], case
    assert "pixels" in cases["wrong name"].json()["error"]
    assert "float64" in cases["wrong datatype"].json()["error"]

    body, length = tensors.encode({}, "inputs", {"input": x})
    headers = {tensors.HEADER_LENGTH: str(length)}
    short = client.post(url, content=body[:-4], headers=headers)  # binary part 4 bytes short
    assert "binary" in expect_protocol_error(short, 400, "invalid_request")["error"]
    extra = client.post(url, content=body + b"\0" * 8, headers=headers)  # 8 bytes belong to no tensor
    expect_protocol_error(extra, 400, "invalid_request")
    lying = client.post(url, content=body, headers={tensors.HEADER_LENGTH: str(len(body) + 100)})
    expect_protocol_error(lying, 400, "invalid_request")
    cut = client.post(url, content=body, headers={tensors.HEADER_LENGTH: str(length - 5)})  # JSON cut short
    expect_protocol_error(cut, 400, "invalid_request")
    wrong_size = json.loads(body[:length])
    wrong_size["inputs"][0]["parameters"]["binary_data_size"] = 12
    head = json.dumps(wrong_size).encode()
    response = client.post(url, content=head + body[length:], headers={tensors.HEADER_LENGTH: str(len(head))})
    assert "binary_data_size" in expect_protocol_error(response, 400, "invalid_request")["error"]

    expect_protocol_error(client.post("/v2/models/nope/infer", json=json_request()), 404, "model_not_found")
    expect_protocol_error(client.post("/v2/models/nope/infer", content=b"{}"), 404, "model_not_found")
    expect_protocol_error(client.get("/v2/models/nope"), 404, "model_not_found")
    huge = client.post(url, content=b"\0" * (MAX_REQUEST_BYTES + 1), headers={tensors.HEADER_LENGTH: "2"})
    expect_protocol_error(huge, 413, "upload_too_large")
    unknown_output = client.post(url, json={**json_request(), "outputs": [{"name": "nope"}]})
    expect_protocol_error(unknown_output, 400, "invalid_request")
    for hostile in (
        {"shape": [2**62] * 10_000},  # big-integer math on a huge rank: refused before any of it
        {"shape": [2**62, 2**62]},
        {"shape": [0] * 70, "data": []},
        {"shape": [0, 2**39, 2**39], "data": []},
        {"shape": [2, True, 32, 32]},
        {"parameters": [1]},
    ):
        started = time.monotonic()
        expect_protocol_error(client.post(url, json=json_request(**hostile)), 400, "invalid_request")
        assert time.monotonic() - started < 2
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**62] * 4_000}]}).encode()
    started = time.monotonic()  # the same through the binary path, which parses on the event loop
    response = client.post(url, content=head, headers={tensors.HEADER_LENGTH: str(len(head))})
    expect_protocol_error(response, 400, "invalid_request")
    assert time.monotonic() - started < 2
    for outputs in (
        [{"name": "logits", "parameters": [1]}],
        [{"name": "logits", "parameters": {"binary_data": "no"}}],
    ):
        expect_protocol_error(
            client.post(url, json={**json_request(), "outputs": outputs}), 400, "invalid_request"
        )
    flag = client.post(url, json={**json_request(), "parameters": {"binary_data_output": "false"}})
    expect_protocol_error(flag, 400, "invalid_request")
    big_json = client.post(
        url, content=b" " * (MAX_JSON_BYTES + 1), headers={"content-type": "application/json"}
    )
    assert "binary" in expect_protocol_error(big_json, 413, "json_tensors_too_large")["error"]
    every_output = client.post(url, json={**json_request(), "outputs": []})
    assert [o["name"] for o in every_output.json()["outputs"]] == ["logits"]
    overflow = client.post(f"/v1/engines/{name}/infer", json={"inputs": {"input": [[[[10**400]]]]}})
    assert overflow.status_code == 422 and overflow.json()["code"] == "invalid_input"

    response, length = infer_binary(client, name, x)  # still serving, still right
    np.testing.assert_allclose(
        decode_response(response, length)[1]["logits"], served.expected(x), rtol=1e-5, atol=1e-5
    )


def test_one_json_tensor_cap_for_v1_and_v2_whatever_the_headers_say(served: Served) -> None:
    """A JSON body over the cap is refused before it is parsed: on /v1 (parsed whole by the
    framework) at the middleware, on /v2 even when its header length claims the whole body."""
    client, name = served.client, served.engine_ids[0]
    body = b'{"inputs": [' + b" " * (MAX_JSON_BYTES + 1) + b"]}"
    v2 = client.post(
        f"/v2/models/{name}/infer", content=body, headers={tensors.HEADER_LENGTH: str(len(body))}
    )
    assert v2.status_code == 413 and v2.json()["code"] == "json_tensors_too_large"
    v1 = client.post(f"/v1/engines/{name}/infer", content=body, headers={"content-type": "application/json"})
    assert v1.status_code == 413 and v1.json()["code"] == "json_tensors_too_large"
    assert "binary tensors" in v1.json()["detail"]
    small = client.post(
        f"/v1/engines/{name}/infer", json={"inputs": {"input": np.zeros((1, 1, 32, 32)).tolist()}}
    )
    assert small.status_code == 200, small.text


def test_an_engine_this_node_cannot_run_says_why(served: Served) -> None:
    with session_scope(served.settings.resolved_database_url) as session:
        source = session.get(EngineRecord, served.engine_ids[0])
        columns = {c.key: getattr(source, c.key) for c in EngineRecord.__table__.columns}
        fake = {
            "id": "eng_tensorrt0001",
            "backend": "tensorrt",
            "alias": None,
            "artifact_prefix": "elsewhere/trt",
        }
        session.add(
            EngineRecord(**{**columns, **fake})
        )  # its own prefix: deleting it must not touch the real one
    ready = served.client.get("/v2/models/eng_tensorrt0001/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "NVIDIA" in ready.json()["error"] and "onnxruntime-cpu" in ready.json()["error"]
    body = expect_protocol_error(
        served.client.post("/v2/models/eng_tensorrt0001/infer", json={"inputs": []}),
        503,
        "backend_unavailable",
    )
    assert "tensorrt" in body["error"]
    assert served.client.get("/v2/models/eng_tensorrt0001").json()["platform"] == "tensorrt_plan"
    served.client.delete("/v1/engines/eng_tensorrt0001")

    with session_scope(served.settings.resolved_database_url) as session:  # a file the store lost
        session.add(
            EngineRecord(**{**columns, "id": "eng_lostfile0001", "alias": None, "artifact_prefix": "gone"})
        )
    lost = served.client.post("/v2/models/eng_lostfile0001/infer", json={"inputs": []})
    assert "not in the artifact store" in expect_protocol_error(lost, 503, "engine_file_missing")["error"]
    served.client.delete("/v1/engines/eng_lostfile0001")


# ---------------------------------------------------------------- dynamic batching


def test_dynamic_batching_groups_concurrent_requests_and_keeps_them_apart(
    served: Served, digits: DigitsArtifacts
) -> None:
    client, name = served.client, served.engine_ids[1]
    refused = client.put(f"/v1/engines/{served.static_engine_id}/batching", json={"max_batch_size": 8})
    assert refused.status_code == 422 and refused.json()["code"] == "not_batchable"
    engine = client.put(
        f"/v1/engines/{name}/batching", json={"max_batch_size": 8, "max_queue_delay_ms": 20}
    ).json()
    assert engine["batching"] == {"max_batch_size": 8, "max_queue_delay_ms": 20.0}
    samples = digits.split.test_x[:48]
    expected = served.expected(samples)

    def one(i: int) -> tuple[np.ndarray, int]:
        response, length = infer_binary(client, name, samples[i : i + 1])
        message, outputs = decode_response(response, length)
        return outputs["logits"][0], message["parameters"]["batch_size"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(len(samples))))
    for i, (logits, _) in enumerate(results):  # every request got its own sample's answer
        np.testing.assert_allclose(logits, expected[i], rtol=1e-5, atol=1e-5)
    batch_sizes = [size for _, size in results]
    assert max(batch_sizes) > 1 and max(batch_sizes) <= 8
    client.delete(f"/v1/engines/{name}/batching")
    response, length = infer_binary(client, name, samples[:1])
    assert decode_response(response, length)[0]["parameters"]["batch_size"] == 1


def test_batcher_respects_its_limits_and_shapes(digits: DigitsArtifacts) -> None:
    from engines.backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OnnxRuntimeLoadOptions

    runner = OnnxRuntimeCpuBackend().load(digits.onnx_path, OnnxRuntimeLoadOptions(threads=1))
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=5, max_queue_delay_ms=50))
    try:
        x = digits.split.test_x
        futures = [batcher.submit({"input": x[i : i + 2]}) for i in range(0, 12, 2)]
        results = [future.result(timeout=30) for future in futures]
        assert all(result.batch_size <= 5 for result in results)  # 2+2 fit, a third pair waits
        assert any(result.batch_size == 4 for result in results)
        for i, result in enumerate(results):
            np.testing.assert_allclose(
                result.outputs["logits"],
                runner.infer({"input": x[2 * i : 2 * i + 2]})["logits"],
                rtol=1e-5,
                atol=1e-5,
            )
        big = batcher.submit({"input": x[:9]}).result(timeout=30)  # over the limit: runs alone
        assert big.batch_size == 9 and big.outputs["logits"].shape == (9, 10)
    finally:
        batcher.close()


# ---------------------------------------------------------------- the pool


def test_pool_evicts_least_recently_used_by_count_and_bytes(served: Served) -> None:
    store = served.client.app.state.store
    with session_scope(served.settings.resolved_database_url) as session:
        paths = {
            engine_id: store.local_path(f"{record.artifact_prefix}/{record.engine_file}")
            for engine_id in served.engine_ids
            if (record := session.get(EngineRecord, engine_id))
        }
    first, second = served.engine_ids
    pool = EnginePool(max_engines=1)
    pool.get(first, "onnxruntime-cpu", paths[first])
    pool.get(second, "onnxruntime-cpu", paths[second])
    assert pool.loaded_ids() == [second] and pool.evictions == 1
    by_bytes = EnginePool(max_engines=8, max_bytes=paths[first].stat().st_size + 1)
    by_bytes.get(first, "onnxruntime-cpu", paths[first])
    by_bytes.get(second, "onnxruntime-cpu", paths[second])
    assert by_bytes.loaded_ids() == [second]
    concurrent = EnginePool(max_engines=8)
    with ThreadPoolExecutor(8) as threads:
        loaded = list(
            threads.map(lambda _: concurrent.get(first, "onnxruntime-cpu", paths[first]), range(16))
        )
    assert concurrent.loads == 1 and all(engine is loaded[0] for engine in loaded)


# ---------------------------------------------------------------- observability


def test_metrics_and_request_ids(served: Served, digits: DigitsArtifacts) -> None:
    client, name = served.client, served.engine_ids[0]
    response, _ = infer_binary(client, name, digits.split.test_x[:3], **{"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/healthz").headers["x-request-id"])
    client.post(
        f"/v2/models/{name}/infer",
        json={"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0]}]},
    )
    client.post(f"/v2/models/{name}/infer", content=b"{")
    text = client.get("/metrics").text
    assert f'optiforge_inference_requests_total{{engine="{name}",protocol="v2"}}' in text
    assert f'optiforge_inference_compute_seconds_bucket{{engine="{name}",le="0.005"}}' in text
    assert f'optiforge_inference_errors_total{{code="invalid_input",engine="{name}"}}' in text
    assert f'optiforge_inference_errors_total{{code="invalid_request",engine="{name}"}}' in text
    assert 'optiforge_jobs{state="succeeded"} 3.0' in text
    assert re.search(r"^optiforge_engine_pool_engines [1-9]", text, re.M)
    assert 'optiforge_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in text


def test_structured_log_lines_carry_the_request_id(served: Served) -> None:
    import io
    import logging

    from app.api.middleware.request_log import JsonFormatter, RequestIdFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("optiforge.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        served.client.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
    finally:
        access.removeHandler(handler)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["request_id"] == "abc-123" and line["logger"] == "optiforge.access"
    assert line["path"] == "/v2/health/live" and line["route"] == "/v2/health/live"
    assert line["status"] == 200 and line["duration_ms"] >= 0 and line["level"] == "info"


def test_concurrent_requests_to_one_engine_are_correct(served: Served, digits: DigitsArtifacts) -> None:
    name, samples = served.engine_ids[0], digits.split.test_x[:64]
    expected = served.expected(samples)

    def one(i: int) -> np.ndarray:
        response, length = infer_binary(served.client, name, samples[i : i + 4])
        return decode_response(response, length)[1]["logits"]

    with ThreadPoolExecutor(8) as pool:
        for i, logits in zip(range(0, 60, 4), pool.map(one, range(0, 60, 4)), strict=True):
            np.testing.assert_allclose(logits, expected[i : i + 4], rtol=1e-5, atol=1e-5)
    assert threading.active_count() < 100


def test_a_closed_batcher_still_answers(digits: DigitsArtifacts) -> None:
    """A request that got the batcher just before its engine was evicted is answered, not stranded."""
    from engines.backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OnnxRuntimeLoadOptions

    runner = OnnxRuntimeCpuBackend().load(digits.onnx_path, OnnxRuntimeLoadOptions(threads=1))
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, max_queue_delay_ms=1))
    batcher.close()
    result = batcher.submit({"input": digits.split.test_x[:2]}).result(timeout=30)
    assert result.batch_size == 2 and result.outputs["logits"].shape == (2, 10)


def test_a_cancelled_request_does_not_stop_the_batcher(digits: DigitsArtifacts) -> None:
    """A caller that gives up (its future cancelled, as asyncio does on disconnect or shutdown)
    is skipped; the batcher keeps serving everyone else."""
    from engines.backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OnnxRuntimeLoadOptions

    runner = OnnxRuntimeCpuBackend().load(digits.onnx_path, OnnxRuntimeLoadOptions(threads=1))
    batcher = DynamicBatcher(runner, BatchingConfig(max_batch_size=4, max_queue_delay_ms=100))
    try:
        abandoned = batcher.submit({"input": digits.split.test_x[:1]})
        kept = batcher.submit({"input": digits.split.test_x[1:2]})
        assert abandoned.cancel()
        assert kept.result(timeout=30).outputs["logits"].shape == (1, 10)
        later = batcher.submit({"input": digits.split.test_x[:3]}).result(timeout=30)
        assert later.outputs["logits"].shape == (3, 10)
    finally:
        batcher.close()


def test_inflight_limit_answers_503_when_full() -> None:
    from app.api.errors import ApiError
    from app.serving.inference import InflightLimit

    limit = InflightLimit(2)
    with limit.slot(), limit.slot():
        with pytest.raises(ApiError) as busy, limit.slot():
            pass
        assert busy.value.status == 503 and busy.value.code == "server_busy"
    with limit.slot():  # slots come back
        pass
