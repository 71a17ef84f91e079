"""NaN and ±infinity: strict JSON on the wire, and counted in the job report.

JSON has no such numbers. `/v2` JSON tensors and `/v1` outputs carry them as the strings "NaN",
"Infinity" and "-Infinity" (the canonical JSON of the protocol's gRPC float fields), which a strict
parser accepts and the SDK, numpy and tritonclient read back as floats; binary tensors are raw
IEEE 754 and unchanged. The engine is a hand-built graph that really computes them (Log of
negatives and of zero, Exp of large values) in ONNX Runtime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, save_model
from optiforge_client import tensors

from app.core.migrate import upgrade
from app.main import create_app
from engines.backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OnnxRuntimeLoadOptions
from engines.ingest.datasets import Dataset
from engines.measure.accuracy import accuracy_report, count_non_finite, run_dataset
from tests.conftest import QUICK_MEASURE, make_settings
from workers.job_runner import run_job_by_id

#: One sample per kind of value: log gives NaN (x < 0), -inf (x = 0) or a number; exp gives +inf (x > 89).
X = np.array([[-1.0, 0.0, 1.0, 100.0], [2.0, 3.0, -5.0, 0.5]], dtype=np.float32)


def strict_loads(text: str | bytes) -> object:
    """json.loads that refuses NaN and Infinity tokens, as JavaScript's JSON.parse and Go do."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def log_exp_graph(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["log"]), helper.make_node("Exp", ["x"], ["exp"])],
        "nonfinite",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("log", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("exp", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def expected(onnx_path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return dict(zip(["log", "exp"], session.run(None, {"x": x}), strict=True))


# ---------------------------------------------------------------- the codec, shared by server and SDK


def test_the_codec_writes_strict_json_and_reads_it_back() -> None:
    values = np.array([1.5, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    body, length = tensors.encode({"id": "1"}, "outputs", {"y": values, "n": np.arange(3)}, binary=False)
    assert length is None
    entry = strict_loads(body)["outputs"][0]
    assert entry["data"] == [1.5, "NaN", "Infinity", "-Infinity", 0.0]
    message, tail = tensors.split(body, None)
    decoded = tensors.decode(message["outputs"], tail, what="output")
    np.testing.assert_array_equal(decoded["y"], values)  # NaN == NaN here
    assert decoded["y"].dtype == np.float32 and decoded["n"].tolist() == [0, 1, 2]

    # Triton's own bare tokens are read too; strings in an integer tensor are not numbers.
    bare = {"name": "y", "datatype": "FP64", "shape": [3], "data": [math.nan, math.inf, -math.inf]}
    again = tensors.decode(json.loads(json.dumps([bare])), memoryview(b""), what="output")
    assert np.isnan(again["y"][0]) and again["y"][1] == np.inf and again["y"][2] == -np.inf
    with pytest.raises(tensors.ProtocolError):
        tensors.decode([{**bare, "datatype": "INT32", "data": ["NaN", 1, 2]}], memoryview(b""))

    nested = tensors.json_values(np.array([[np.nan, 1.0], [np.inf, -np.inf]], dtype=np.float16))
    assert nested == [["NaN", 1.0], ["Infinity", "-Infinity"]]
    assert tensors.json_values(np.array(np.nan)) == "NaN"
    # tritonclient reads JSON outputs with numpy, which parses the strings
    assert np.isnan(np.array(["NaN", 1.0], dtype=np.float32)[0])

    binary, header = tensors.encode({}, "outputs", {"y": values}, binary=True)
    message, tail = tensors.split(binary, header)
    np.testing.assert_array_equal(tensors.decode(message["outputs"], tail, what="output")["y"], values)


# ---------------------------------------------------------------- served, and measured by a job


@dataclass
class NonFinite:
    client: TestClient
    onnx_path: Path
    engine_id: str
    engine: dict  # its record, with the job's metrics


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NonFinite]:
    root = tmp_path_factory.mktemp("nonfinite")
    onnx_path = log_exp_graph(root / "log_exp.onnx")
    evaluation = root / "eval.npz"
    np.savez(evaluation, x=X)  # finite inputs whose outputs are not
    settings = make_settings(root / "data")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        with onnx_path.open("rb") as handle:
            model = client.post("/v1/models", files={"file": ("log_exp.onnx", handle)}).json()
        with evaluation.open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("eval.npz", handle)})
        assert dataset.status_code == 201, dataset.text
        recipe = {"batch_sizes": [2], "measure": QUICK_MEASURE}
        body = {"model_id": model["id"], "recipe": recipe, "evaluation_dataset_id": dataset.json()["id"]}
        job = client.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        run_job_by_id(settings, job.json()["id"])
        job = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert job["status"] == "succeeded", job  # a diagnostic never fails the job it diagnoses
        engine_id = job["engine_ids"][0]
        yield NonFinite(client, onnx_path, engine_id, client.get(f"/v1/engines/{engine_id}").json())


def test_v2_json_outputs_are_strict_json_with_non_finite_strings(nonfinite: NonFinite) -> None:
    want = expected(nonfinite.onnx_path, X)
    assert np.isnan(want["log"][0, 0]) and want["log"][0, 1] == -np.inf and want["exp"][0, 3] == np.inf
    for flavour in ("json", "binary in, json out"):
        if flavour == "json":
            body, length = tensors.encode({}, "inputs", {"x": X}, binary=False)
            headers = {"content-type": "application/json"}
        else:
            body, length = tensors.encode({}, "inputs", {"x": X}, binary=True)
            headers = {tensors.HEADER_LENGTH: str(length)}
        response = nonfinite.client.post(
            f"/v2/models/{nonfinite.engine_id}/infer", content=body, headers=headers
        )
        assert response.status_code == 200, response.text
        document = strict_loads(response.content)  # no bare NaN or Infinity anywhere
        by_name = {entry["name"]: entry["data"] for entry in document["outputs"]}
        assert by_name["log"][:3] == ["NaN", "-Infinity", 0.0] and by_name["exp"][3] == "Infinity"
        message, tail = tensors.split(response.content, None)
        decoded = tensors.decode(message["outputs"], tail, what="output")
        for name in ("log", "exp"):
            np.testing.assert_allclose(decoded[name], want[name], rtol=1e-6, equal_nan=True)

    binary, length = tensors.encode(
        {"parameters": {"binary_data_output": True}}, "inputs", {"x": X}, binary=True
    )
    response = nonfinite.client.post(
        f"/v2/models/{nonfinite.engine_id}/infer",
        content=binary,
        headers={tensors.HEADER_LENGTH: str(length)},
    )
    message, tail = tensors.split(response.content, response.headers[tensors.HEADER_LENGTH])
    raw = tensors.decode(message["outputs"], tail, what="output")  # raw IEEE 754: unchanged
    np.testing.assert_array_equal(raw["log"], want["log"])


def test_v1_outputs_are_strict_json_too(nonfinite: NonFinite) -> None:
    want = expected(nonfinite.onnx_path, X)
    response = nonfinite.client.post(
        f"/v1/engines/{nonfinite.engine_id}/infer", json={"inputs": {"x": X.tolist()}}
    )
    assert response.status_code == 200, response.text
    document = strict_loads(response.content)
    assert document["outputs"]["log"][0][:2] == ["NaN", "-Infinity"]
    assert document["outputs"]["exp"][0][3] == "Infinity"
    for name in ("log", "exp"):
        np.testing.assert_allclose(
            np.asarray(document["outputs"][name], dtype=np.float32), want[name], rtol=1e-6, equal_nan=True
        )
    # the strings are accepted as inputs, as JSON has no other way to send them
    inputs = {"x": [["NaN", "Infinity", "-Infinity", 1.0]]}
    echoed = strict_loads(
        nonfinite.client.post(f"/v1/engines/{nonfinite.engine_id}/infer", json={"inputs": inputs}).content
    )
    assert echoed["outputs"]["exp"][0][:3] == ["NaN", "Infinity", 0.0]


def test_the_job_report_counts_non_finite_outputs(nonfinite: NonFinite) -> None:
    want = expected(nonfinite.onnx_path, X)["log"]  # the scored output: the first float output
    count = int(np.count_nonzero(~np.isfinite(want)))
    assert count == 3
    accuracy = nonfinite.engine["metrics"]["accuracy"]
    assert accuracy["samples"] == len(X) and accuracy["non_finite_outputs"] == count
    assert accuracy["fidelity"]["cosine_similarity"] is None  # undefined, reported as null


def test_the_count_never_fails_the_measurement(tmp_path: Path) -> None:
    """Integer, boolean and string outputs: a count of 0 or null, metrics that do not apply named
    under `unavailable`, never an exception."""
    runner = OnnxRuntimeCpuBackend().load(
        log_exp_graph(tmp_path / "m.onnx"), OnnxRuntimeLoadOptions(threads=1)
    )
    with np.errstate(all="ignore"):
        outputs = run_dataset(runner, Dataset({"x": X}, None), batch_size=1)
    report = accuracy_report(outputs, None, outputs)
    assert report["non_finite_outputs"] == 3 and report["samples"] == 2

    finite = accuracy_report(np.ones((2, 4), np.float32), np.array([0, 1]), np.ones((2, 4), np.float32))
    assert finite["non_finite_outputs"] == 0 and finite["fidelity"]["cosine_similarity"] == 1.0
    assert count_non_finite(np.arange(4)) == 0 and count_non_finite(np.array([True])) == 0

    graph = helper.make_graph(  # text outputs, six "classes": top-5 cannot negate strings
        [helper.make_node("Cast", ["x"], ["text"], to=TensorProto.STRING)],
        "strings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 6])],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    strings = OnnxRuntimeCpuBackend().load(tmp_path / "s.onnx", OnnxRuntimeLoadOptions(threads=1))
    six = np.arange(12, dtype=np.float32).reshape(2, 6)
    text = run_dataset(strings, Dataset({"x": six}, None), batch_size=2)
    assert text.dtype == object
    report = accuracy_report(text, np.array([0, 1]), text)
    assert report["non_finite_outputs"] is None and "TypeError" in report["unavailable"]
