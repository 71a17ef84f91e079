"""Clients nobody here wrote, and our own SDK and CLI, against a live `optiforge serve` over HTTP.

- tritonclient (NVIDIA's Triton client) reads metadata and runs inference, JSON and binary, and
  gets what the model gives in-process;
- the SDK (sync and async) and the `optiforge` CLI drive the whole flow: upload, optimize with a
  progress bar, report, alias, infer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
from optiforge_client import AsyncClient, Client, JobFailed, NotFound, ValidationFailed

from tests.conftest import QUICK_MEASURE, REPO_ROOT, DigitsArtifacts, LiveStack


@dataclass(frozen=True)
class LiveEngine:
    stack: LiveStack
    engine_id: str
    model_id: str


def _engine_on(stack: LiveStack, digits: DigitsArtifacts) -> LiveEngine:
    """An fp32 engine of the digits CNN on a live server, made through the SDK."""
    with Client(stack.base_url) as client:
        model = client.upload_model(digits.onnx_path, name="digits")
        job = client.create_job(model.id, {"batch_sizes": [1], "measure": QUICK_MEASURE})
        job = client.wait_for_job(job.id, timeout=180)
    return LiveEngine(stack, job.engine_ids[0], model.id)


@pytest.fixture(scope="module")
def live_engine(embedded_stack: LiveStack, digits: DigitsArtifacts) -> LiveEngine:
    return _engine_on(embedded_stack, digits)


@pytest.fixture(scope="module")
def engine_on_each_stack(live_stack: LiveStack, digits: DigitsArtifacts) -> LiveEngine:
    """The same, on the embedded stack and on PostgreSQL + Redis."""
    return _engine_on(live_stack, digits)


def reference(digits: DigitsArtifacts, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(digits.onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_tritonclient_metadata_and_inference(
    engine_on_each_stack: LiveEngine, digits: DigitsArtifacts
) -> None:
    import tritonclient.http as triton

    live_engine = engine_on_each_stack
    client = triton.InferenceServerClient(url=live_engine.stack.base_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(live_engine.engine_id)
    metadata = client.get_model_metadata(live_engine.engine_id)
    assert metadata["inputs"][0]["name"] == "input" and metadata["inputs"][0]["datatype"] == "FP32"
    x = digits.split.test_x[:7]
    expected = reference(digits, x)
    for binary in (False, True):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = triton.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer(live_engine.engine_id, [tensor], outputs=[wanted], request_id="t-1")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
        assert result.get_response()["id"] == "t-1"
    default_outputs = triton.InferInput("input", list(x.shape), "FP32")
    default_outputs.set_data_from_numpy(x)  # no outputs named: tritonclient asks for binary ones
    result = client.infer(live_engine.engine_id, [default_outputs])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(triton.InferenceServerException, match="no engine, alias or model"):
        client.get_model_metadata("not-a-model")


def test_sdk_flow_sync_and_async(live_engine: LiveEngine, digits: DigitsArtifacts) -> None:
    x = digits.split.test_x[:4]
    expected = reference(digits, x)
    with Client(live_engine.stack.base_url) as client:
        engine = client.set_alias(live_engine.engine_id, "digits-sdk")
        assert engine.alias == "digits-sdk"
        for binary in (True, False):
            result = client.infer("digits-sdk", {"input": x}, binary=binary)
            np.testing.assert_allclose(result.outputs["logits"], expected, rtol=1e-5, atol=1e-5)
            assert result.model_version == live_engine.engine_id and result.compute_ms > 0
        # uploads are deduplicated by content: other tests' engines of the same digits model may be listed too
        of_model = client.list_engines(model_id=live_engine.model_id)
        assert live_engine.engine_id in [e.id for e in of_model]
        assert {e.model_id for e in of_model} == {live_engine.model_id}
        with pytest.raises(NotFound) as missing:
            client.get_model("mdl_missing")
        assert missing.value.code == "model_not_found" and missing.value.status == 404
        with pytest.raises(ValidationFailed) as mismatch:
            calib = client.upload_dataset(digits.calib_npz)
            bad = client.upload_model(digits.static_batch_onnx_path)
            client.create_job(bad.id, {"batch_sizes": [1, 4]}, calibration_dataset_id=calib.id)
        assert mismatch.value.code == "invalid_recipe"
        cancelled = client.create_job(live_engine.model_id, {"batch_sizes": [1], "measure": QUICK_MEASURE})
        client.cancel_job(cancelled.id)
        with pytest.raises(JobFailed) as failed:
            client.wait_for_job(cancelled.id, timeout=60)
        assert failed.value.job.status == "cancelled"

    async def use_async() -> None:
        async with AsyncClient(live_engine.stack.base_url) as client:
            results = await asyncio.gather(
                *(client.infer("digits-sdk", {"input": x[i : i + 1]}) for i in range(4))
            )
            for i, result in enumerate(results):
                np.testing.assert_allclose(result.outputs["logits"][0], expected[i], rtol=1e-5, atol=1e-5)
            assert (await client.get_engine(live_engine.engine_id)).alias == "digits-sdk"
            with pytest.raises(NotFound):
                await client.infer("no-such-alias", {"input": x})

    asyncio.run(use_async())


def optiforge(stack: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "OPTIFORGE_URL": stack.base_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_optimize_wait_report_alias_infer(
    live_engine: LiveEngine, digits: DigitsArtifacts, tmp_path
) -> None:
    stack = live_engine.stack
    run = optiforge(
        stack,
        "optimize", str(digits.onnx_path), "--calib", str(digits.calib_npz), "--eval", str(digits.eval_npz),
        "--precision", "int8", "--batch-sizes", "1", "--wait",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| digits |" in run.stdout and "int8" in run.stdout  # the report table
    assert "100.0% succeeded" in run.stderr  # the progress bar's last state
    listing = optiforge(stack, "engines", "list")
    int8_id = next(line.split()[0] for line in listing.stdout.splitlines() if " int8 " in line)
    assert optiforge(stack, "engines", "alias", int8_id, "digits-int8").returncode == 0
    np.save(tmp_path / "x.npy", digits.split.test_x[:3])
    out = optiforge(
        stack,
        "infer",
        "digits-int8",
        "--input",
        f"input={tmp_path / 'x.npy'}",
        "--out",
        str(tmp_path / "y.npz"),
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["model_version"] == int8_id and summary["outputs"]["logits"]["shape"] == [3, 10]
    assert np.load(tmp_path / "y.npz")["logits"].shape == (3, 10)
    missing = optiforge(stack, "models", "get", "mdl_missing")
    assert missing.returncode == 1 and "error: model_not_found" in missing.stderr
    # choices come from the server's registries (GET /v1/capabilities), not from a copy in the SDK
    capabilities = json.loads(optiforge(stack, "capabilities").stdout)
    assert "int8" in capabilities["precisions"] and "taylor" in {
        m["name"] for m in capabilities["prune_methods"]
    }
    unknown = optiforge(stack, "jobs", "create", "mdl_missing", "--precision", "int4")
    assert unknown.returncode != 0 and "the server offers fp32, fp16, bf16, int8" in unknown.stderr


def test_sdk_imports_no_server_or_torch() -> None:
    """The SDK is for other services: importing it (and its CLI) pulls in no server or ML stack."""
    code = (
        "import sys, optiforge_client, optiforge_client.cli; "
        "heavy = {'torch', 'fastapi', 'sqlalchemy', 'onnx', 'onnxruntime', 'celery', 'app', 'engines'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
