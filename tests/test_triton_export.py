"""Engines exported as a Triton Inference Server model repository.

Every config is parsed with Triton's own `ModelConfig` schema (a misspelt field fails that check,
proved below), so "Triton reads it" is checked without a Triton server. The library is tested on
hand-made descriptions (a TensorRT plan included: there is no TensorRT here); the routes, the SDK
and the CLI on real engines built by the worker's own entry point from the digits CNN.

Triton's schema is loaded from tritonclient's generated `model_config_pb2.py` by file path:
importing it as `tritonclient.grpc.model_config_pb2` runs `tritonclient/grpc/__init__.py`, which
raises without grpcio, and grpcio (a native wheel) would be a dev dependency for a transport these
tests never use. The file needs only protobuf, which onnx already brings.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import io
import json
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient
from fastapi.testclient import TestClient
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from optiforge_client import AsyncClient, Client, NotFound, ValidationFailed
from optiforge_client import cli as client_cli

from app import cli as server_cli
from app.api.routes.triton import TemporaryFileResponse
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.orm import EngineRecord
from app.core.scratch import EXPORT_KIND, claim_folder
from app.core.settings import Settings
from app.main import create_app
from engines.errors import EngineError
from engines.export.triton import (
    GpuTarget,
    TritonEngine,
    plan_repository,
    render_config,
    write_repository,
    write_repository_zip,
)
from engines.ingest.signature import TensorSpec
from tests.conftest import QUICK_MEASURE, DigitsArtifacts, make_settings
from workers.job_runner import run_job_by_id

# ---------------------------------------------------------------- Triton's schema


@functools.cache
def triton_schema() -> ModuleType:
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(text: str) -> Any:
    """The config as Triton reads it: text_format.Parse raises on any field or value it lacks."""
    return text_format.Parse(text, triton_schema().ModelConfig())


def tensors(config: Any, kind: str) -> dict[str, tuple[str, list[int]]]:
    schema = triton_schema()
    return {t.name: (schema.DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, kind)}


def instance_kinds(config: Any) -> list[str]:
    kind = triton_schema().ModelInstanceGroup.Kind
    return [kind.Name(group.kind) for group in config.instance_group]


def zip_members(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def configs_of(members: dict[str, bytes]) -> dict[str, Any]:
    """Every config.pbtxt of a repository, parsed, by model name."""
    return {
        name.split("/")[0]: parse_config(content.decode())
        for name, content in members.items()
        if name.endswith("/config.pbtxt")
    }


# ---------------------------------------------------------------- hand-made descriptions


def spec(name: str, shape: tuple, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, shape)


def described(tmp_path: Path, **fields: Any) -> TritonEngine:
    """An ONNX Runtime engine description with a dynamic batch; its file is alone in its directory,
    as an engine without external data is, so its content is never read."""
    engine_path = tmp_path / "described" / "engine.onnx"
    if not engine_path.exists():
        engine_path.parent.mkdir()
        engine_path.write_bytes(b"onnx bytes")
    base = TritonEngine(
        name="m",
        engine_id="eng_0000000000000001",
        backend="onnxruntime-cpu",
        precision="fp32",
        engine_path=engine_path,
        inputs=(spec("x", ("batch", 3, 224, 224)),),
        outputs=(spec("y", ("batch", 1000)),),
        max_batch_size=8,
        built_with="onnxruntime 1.32.0",
    )
    return replace(base, **fields)


def test_a_misspelt_field_or_value_fails_the_schema_check(tmp_path: Path) -> None:
    """The check has teeth: Triton's parser refuses what it does not know, at any depth."""
    text = render_config(described(tmp_path, dynamic_batching_delay_ms=1.0))
    parse_config(text)
    for right, wrong in [
        ("max_batch_size:", "max_batch_sise:"),
        ("data_type: TYPE_FP32", "data_type: TYPE_FP33"),
        ("kind: KIND_CPU", "kind: KIND_CPUS"),
        ("max_queue_delay_microseconds", "max_queue_delay_microsecond"),
        ("dims: [ 3, 224, 224 ]", "dim: [ 3, 224, 224 ]"),
    ]:
        assert right in text
        with pytest.raises(text_format.ParseError):
            parse_config(text.replace(right, wrong, 1))


def test_dynamic_batch_leaves_the_batch_dim_out(tmp_path: Path) -> None:
    config = parse_config(render_config(described(tmp_path)))
    assert config.name == "m" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert tensors(config, "input") == {"x": ("TYPE_FP32", [3, 224, 224])}
    assert tensors(config, "output") == {"y": ("TYPE_FP32", [1000])}
    assert instance_kinds(config) == ["KIND_CPU"]
    assert not config.HasField("dynamic_batching")  # off unless the engine has it on
    # a batched input of scalars (shape [batch]) is dims [1] reshaped to [], as Triton wants
    scalars = parse_config(render_config(described(tmp_path, outputs=(spec("score", ("batch",)),))))
    assert scalars.max_batch_size == 8 and list(scalars.output[0].dims) == [1]
    assert scalars.output[0].HasField("reshape") and list(scalars.output[0].reshape.shape) == []


@pytest.mark.parametrize(
    ("inputs", "outputs", "dims"),
    [
        # a static batch: the model takes batch 1 only
        ((spec("x", (1, 3, 8, 8)),), (spec("y", (1, 10)),), {"x": [1, 3, 8, 8], "y": [1, 10]}),
        # recurrent state carries its batch in dim 1: Triton batches dim 0 only
        (
            (spec("x", ("batch", 16)), spec("state", (2, "batch", 64))),
            (spec("y", ("batch", 4)),),
            {"x": [-1, 16], "state": [2, -1, 64], "y": [-1, 4]},
        ),
        # a scalar sample rate has no batch at all
        (
            (spec("audio", ("batch", None)), spec("sr", (), "int64")),
            (spec("y", ("batch", "frames")),),
            {"audio": [-1, -1], "sr": [1], "y": [-1, -1]},
        ),
    ],
    ids=["static-batch", "batch-in-dim-1", "scalar-input"],
)
def test_engines_triton_cannot_batch_get_max_batch_size_0_and_full_dims(
    tmp_path: Path, inputs: tuple, outputs: tuple, dims: dict[str, list[int]]
) -> None:
    config = parse_config(render_config(described(tmp_path, inputs=inputs, outputs=outputs)))
    assert config.max_batch_size == 0
    found = {
        name: shape
        for name, (_type, shape) in {**tensors(config, "input"), **tensors(config, "output")}.items()
    }
    assert found == dims
    with pytest.raises(EngineError) as refused:  # Triton's dynamic batcher needs dim-0 batches too
        render_config(described(tmp_path, inputs=inputs, outputs=outputs, dynamic_batching_delay_ms=2.0))
    assert refused.value.code == "not_batchable"


def test_dynamic_batching_settings(tmp_path: Path) -> None:
    config = parse_config(
        render_config(described(tmp_path, max_batch_size=16, dynamic_batching_delay_ms=2.5))
    )
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert list(config.dynamic_batching.preferred_batch_size) == [16]
    zero = parse_config(render_config(described(tmp_path, dynamic_batching_delay_ms=0.0)))
    assert zero.HasField("dynamic_batching") and zero.dynamic_batching.max_queue_delay_microseconds == 0


def test_datatypes_and_awkward_names(tmp_path: Path) -> None:
    inputs = (
        spec('in"put\\ \n ü', ("batch", 2)),
        spec("half", ("batch", 2), "float16"),
        spec("ids", ("batch", 2), "int64"),
        spec("mask", ("batch", 2), "bool"),
        spec("pixels", ("batch", 2), "uint8"),
        spec("text", ("batch", 2), "object"),
    )
    config = parse_config(render_config(described(tmp_path, inputs=inputs)))
    assert {name: datatype for name, (datatype, _dims) in tensors(config, "input").items()} == {
        'in"put\\ \n ü': "TYPE_FP32",
        "half": "TYPE_FP16",
        "ids": "TYPE_INT64",
        "mask": "TYPE_BOOL",
        "pixels": "TYPE_UINT8",
        "text": "TYPE_STRING",
    }
    with pytest.raises(EngineError) as refused:
        render_config(described(tmp_path, inputs=(spec("z", ("batch", 2), "complex64"),)))
    assert refused.value.code == "not_exportable" and "'z'" in refused.value.detail


def test_tensorrt_plan_from_a_hand_made_description(tmp_path: Path) -> None:
    """No TensorRT here: a description as the TensorRT backend's rows give it."""
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"serialized plan")
    (tmp_path / "tensorrt_plan.json").write_text("{}")  # written beside a plan; not part of the export
    engine = described(
        tmp_path,
        name="resnet-trt",
        backend="tensorrt",
        precision="fp16",
        engine_path=plan,
        built_with="tensorrt 10.3.0",
        gpu=GpuTarget("8.9", "NVIDIA L4"),
        dynamic_batching_delay_ms=0.5,
    )
    out = tmp_path / "repo"
    written = write_repository([engine], out)
    assert [path.relative_to(out).as_posix() for path in written] == [
        "resnet-trt/1/model.plan",
        "resnet-trt/config.pbtxt",
    ]
    assert (out / "resnet-trt/1/model.plan").read_bytes() == b"serialized plan"
    text = (out / "resnet-trt/config.pbtxt").read_text()
    config = parse_config(text)
    assert config.platform == "tensorrt_plan" and instance_kinds(config) == ["KIND_GPU"]
    assert dict(config.cc_model_filenames) == {"8.9": "model.plan"}  # what Triton itself reads
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert "NVIDIA L4" in text and "compute capability 8.9" in text and "tensorrt 10.3.0" in text
    unrecorded = parse_config(render_config(replace(engine, gpu=None)))
    assert not unrecorded.cc_model_filenames
    with pytest.raises(EngineError) as refused:
        plan_repository([replace(engine, gpu=GpuTarget("sm_89"))])
    assert refused.value.code == "not_exportable"


def _two_weight_model(path: Path, *, one_file: bool) -> np.ndarray:
    """y = (x @ W1) @ W2, saved with its weights in external data; returns W1 @ W2."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location=path.name + ".data" if one_file else None,
        size_threshold=0,
    )
    return w1 @ w2


@pytest.mark.parametrize("one_file", [True, False], ids=["one-data-file", "a-file-per-tensor"])
def test_external_data_is_copied_under_its_own_names(tmp_path: Path, one_file: bool) -> None:
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    weights = _two_weight_model(engine_dir / "engine.onnx", one_file=one_file)
    (engine_dir / "layer_errors.json").write_text("{}")  # a report stored beside engines: not exported
    data_files = sorted(
        path.name for path in engine_dir.iterdir() if path.name not in ("engine.onnx", "layer_errors.json")
    )
    assert data_files == (["engine.onnx.data"] if one_file else ["W1", "W2"])
    engine = described(
        tmp_path,
        engine_path=engine_dir / "engine.onnx",
        inputs=(spec("x", ("batch", 4)),),
        outputs=(spec("y", ("batch", 3)),),
    )
    zipped = write_repository_zip([engine], tmp_path / "repo.zip")
    members = zip_members(zipped.read_bytes())
    assert list(members) == sorted(
        ["m/1/model.onnx", "m/config.pbtxt", *(f"m/1/{name}" for name in data_files)]
    )
    for name in data_files:
        assert members[f"m/1/{name}"] == (engine_dir / name).read_bytes()
    out = tmp_path / "unpacked"
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(out)
    session = ort.InferenceSession(str(out / "m/1/model.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weights, rtol=1e-5)
    (engine_dir / data_files[0]).unlink()  # an engine that lost a weights file is refused, not half-exported
    with pytest.raises(EngineError) as missing:
        write_repository_zip([engine], tmp_path / "broken.zip")
    assert missing.value.code == "engine_file_missing" and not (tmp_path / "broken.zip").exists()


def test_what_is_refused(tmp_path: Path) -> None:
    engine = described(tmp_path)

    def code(engines: list[TritonEngine]) -> EngineError:
        with pytest.raises(EngineError) as refused:
            plan_repository(engines)
        return refused.value

    torch = code([engine, replace(engine, name="t", engine_id="eng_torch", backend="torch-cpu")])
    assert torch.code == "not_exportable" and torch.extra == {"engines": ["eng_torch"]}
    assert "'eng_torch' (torch-cpu)" in torch.detail
    assert "onnxruntime-cpu" in torch.detail and "tensorrt" in torch.detail  # says which can
    assert code([engine, replace(engine, engine_id="eng_other")]).code == "duplicate_model_name"
    for name in ("../up", "a/b", ".hidden", "", "x" * 129):
        assert code([replace(engine, name=name)]).code == "invalid_model_name"
    assert code([]).code == "no_engines"
    missing = code([replace(engine, engine_path=tmp_path / "gone" / "engine.onnx")])
    assert missing.code == "engine_file_missing" and str(tmp_path) not in missing.detail


def test_the_zip_is_deterministic_and_sorted(tmp_path: Path) -> None:
    engines = [described(tmp_path, name="b"), described(tmp_path, name="a", engine_id="eng_a")]
    first = write_repository_zip(engines, tmp_path / "first.zip").read_bytes()
    (tmp_path / "described" / "engine.onnx").touch()  # a new modification time changes nothing
    second = write_repository_zip(list(reversed(engines)), tmp_path / "second.zip").read_bytes()
    assert first == second
    assert list(zip_members(first)) == [
        "a/1/model.onnx",
        "a/config.pbtxt",
        "b/1/model.onnx",
        "b/config.pbtxt",
    ]


# ---------------------------------------------------------------- the API, on real engines


@dataclass
class Exported:
    client: TestClient
    settings: Settings
    dynamic_id: str  # the digits CNN (dynamic batch), alias "digits", dynamic batching on
    static_id: str  # its static-batch export (batch 1)
    reference: ort.InferenceSession

    def engine_file(self, engine_id: str) -> bytes:
        with session_scope(self.settings.resolved_database_url) as session:
            record = session.get(EngineRecord, engine_id)
            key = f"{record.artifact_prefix}/{record.engine_file}"
        return (self.settings.resolved_artifact_dir / key).read_bytes()

    def add_row(self, engine_id: str, **changes: Any) -> None:
        """A row copied from the dynamic engine's, with changes (for backends this node lacks), and
        a copy of its files under a prefix of its own: deleting the row must not touch the original."""
        prefix = f"test-rows/{engine_id}"
        with session_scope(self.settings.resolved_database_url) as session:
            source = session.get(EngineRecord, self.dynamic_id)
            columns = {c.key: getattr(source, c.key) for c in EngineRecord.__table__.columns}
            if "artifact_prefix" not in changes:
                store = self.client.app.state.store  # type: ignore[attr-defined]
                store.put_dir(prefix, self.settings.resolved_artifact_dir / source.artifact_prefix)
            row = {**columns, "id": engine_id, "alias": None, "artifact_prefix": prefix, **changes}
            session.add(EngineRecord(**row))


def _build_engine(client: TestClient, settings: Settings, model_path: Path, batch_sizes: list[int]) -> str:
    with model_path.open("rb") as handle:
        model_id = client.post("/v1/models", files={"file": (model_path.name, handle)}).json()["id"]
    recipe = {"batch_sizes": batch_sizes, "measure": QUICK_MEASURE}
    job = client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe}).json()
    run_job_by_id(settings, job["id"])
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    return done["engine_ids"][0]


@pytest.fixture(scope="module")
def exported(digits: DigitsArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    settings = make_settings(tmp_path_factory.mktemp("triton") / "data")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        dynamic_id = _build_engine(client, settings, digits.onnx_path, [1, 4])
        static_id = _build_engine(client, settings, digits.static_batch_onnx_path, [1])
        assert client.put(f"/v1/engines/{dynamic_id}/alias", json={"alias": "digits"}).status_code == 200
        batching = {"max_batch_size": 8, "max_queue_delay_ms": 2}
        assert client.put(f"/v1/engines/{dynamic_id}/batching", json=batching).status_code == 200
        yield Exported(
            client,
            settings,
            dynamic_id,
            static_id,
            ort.InferenceSession(str(digits.onnx_path), providers=["CPUExecutionProvider"]),
        )


def expect_error(response: httpx.Response, status: int, code: str, exported: Exported) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["detail"], body
    assert str(exported.settings.data_dir) not in response.text and tempfile.gettempdir() not in response.text
    return body


def test_one_engine_by_id_or_alias(exported: Exported, digits: DigitsArtifacts, tmp_path: Path) -> None:
    response = exported.client.get(f"/v1/engines/{exported.dynamic_id}/triton")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == 'attachment; filename="digits.triton.zip"'
    members = zip_members(response.content)
    assert list(members) == ["digits/1/model.onnx", "digits/config.pbtxt"]  # named by its alias
    assert members["digits/1/model.onnx"] == exported.engine_file(exported.dynamic_id)
    config = configs_of(members)["digits"]
    assert config.name == "digits" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8  # the engine's dynamic batching
    assert tensors(config, "input") == {"input": ("TYPE_FP32", [1, 32, 32])}
    assert tensors(config, "output") == {"logits": ("TYPE_FP32", [10])}
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert instance_kinds(config) == ["KIND_CPU"]
    assert (
        "onnxruntime" in members["digits/config.pbtxt"].decode().splitlines()[1]
    )  # the runtime that saved it
    by_alias = exported.client.get("/v1/engines/digits/triton")
    assert by_alias.status_code == 200 and by_alias.content == response.content
    # what Triton would load runs, and gives what the uploaded model gives
    (tmp_path / "model.onnx").write_bytes(members["digits/1/model.onnx"])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = digits.split.test_x[:3]
    np.testing.assert_allclose(
        session.run(None, {"input": x})[0],
        exported.reference.run(None, {"input": x})[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_two_engines_in_one_repository(exported: Exported) -> None:
    response = exported.client.get("/v1/triton", params={"engine": ["digits", exported.static_id]})
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == 'attachment; filename="triton-model-repository.zip"'
    members = zip_members(response.content)
    assert list(members) == sorted(members)
    configs = configs_of(members)
    assert sorted(configs) == sorted(["digits", exported.static_id])
    static = configs[exported.static_id]  # no alias: named by its id
    assert static.max_batch_size == 0 and not static.HasField("dynamic_batching")
    assert tensors(static, "input") == {"input": ("TYPE_FP32", [1, 1, 32, 32])}
    assert tensors(static, "output") == {"logits": ("TYPE_FP32", [1, 10])}
    assert members[f"{exported.static_id}/1/model.onnx"] == exported.engine_file(exported.static_id)
    twice = exported.client.get("/v1/triton", params={"engine": ["digits", exported.dynamic_id]})
    assert "digits" in expect_error(twice, 422, "duplicate_model_name", exported)["detail"]
    expect_error(exported.client.get("/v1/triton"), 422, "no_engines", exported)


def test_unknown_engines_are_404(exported: Exported) -> None:
    for url in ("/v1/engines/eng_missing/triton", "/v1/triton?engine=digits&engine=eng_missing"):
        body = expect_error(exported.client.get(url), 404, "engine_not_found", exported)
        assert "eng_missing" in body["detail"]
    with session_scope(exported.settings.resolved_database_url) as session:
        model_id = session.get(EngineRecord, exported.dynamic_id).model_id
    # a model id names engines for inference (its newest), but an export names the engine it ships
    expect_error(exported.client.get(f"/v1/engines/{model_id}/triton"), 404, "engine_not_found", exported)


def test_engines_of_other_backends_are_refused(exported: Exported) -> None:
    exported.add_row("eng_torchcpu00001", backend="torch-cpu")
    try:
        response = exported.client.get("/v1/triton?engine=digits&engine=eng_torchcpu00001")
        body = expect_error(response, 422, "not_exportable", exported)
        assert "'eng_torchcpu00001' (torch-cpu)" in body["detail"] and body["engines"] == [
            "eng_torchcpu00001"
        ]
        assert "onnxruntime-cpu" in body["detail"] and "tensorrt" in body["detail"]
    finally:
        exported.client.delete("/v1/engines/eng_torchcpu00001")


def test_a_tensorrt_row_records_its_gpu(exported: Exported) -> None:
    """A row as the TensorRT backend writes it (hand-made: no TensorRT here; its file is the ONNX
    engine's, which the export copies as it is): the GPU goes to cc_model_filenames, and the batch
    stays within the plan's optimization profile even though dynamic batching asks for 8."""
    profile = {"input": [[1, 1, 32, 32], [4, 1, 32, 32], [4, 1, 32, 32]]}
    build_info = {
        "tensorrt": "10.3.0",
        "compute_capability": "9.0",
        "gpu_model": "NVIDIA H200",
        "optimization_profile": profile,
    }
    exported.add_row("eng_tensorrt00001", backend="tensorrt", precision="fp16", build_info=build_info)
    try:
        members = zip_members(exported.client.get("/v1/engines/eng_tensorrt00001/triton").content)
        assert list(members) == ["eng_tensorrt00001/1/model.plan", "eng_tensorrt00001/config.pbtxt"]
        config = configs_of(members)["eng_tensorrt00001"]
        assert config.platform == "tensorrt_plan" and instance_kinds(config) == ["KIND_GPU"]
        assert dict(config.cc_model_filenames) == {"9.0": "model.plan"}
        assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [4]
        assert "NVIDIA H200" in members["eng_tensorrt00001/config.pbtxt"].decode()
    finally:
        exported.client.delete("/v1/engines/eng_tensorrt00001")


def test_a_lost_engine_file_is_503_without_server_paths(exported: Exported) -> None:
    exported.add_row("eng_lostfile00001", artifact_prefix="gone")
    try:
        response = exported.client.get("/v1/engines/eng_lostfile00001/triton")
        assert (
            "not in the artifact store"
            in expect_error(response, 503, "engine_file_missing", exported)["detail"]
        )
    finally:
        exported.client.delete("/v1/engines/eng_lostfile00001")


def test_temporary_files_are_removed(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert exported.client.get("/v1/engines/digits/triton").status_code == 200
    assert exported.client.get("/v1/triton?engine=digits&engine=eng_missing").status_code == 404
    assert list(scratch.iterdir()) == []


def test_a_client_that_hangs_up_leaves_nothing_behind(tmp_path: Path) -> None:
    """FileResponse runs its background task only after a complete send; this response cleans up
    whatever happens to the send."""
    folder = claim_folder(tmp_path, EXPORT_KIND, "exp_test")
    directory = folder.path
    (directory / "repo.zip").write_bytes(b"zip" * 1000)
    response = TemporaryFileResponse(directory / "repo.zip", folder, "application/zip", "repo.zip")
    scope = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the client went away")

    with pytest.raises(OSError):
        asyncio.run(response(scope, receive, send))
    assert not directory.exists()


# ---------------------------------------------------------------- the SDK and the CLI


def through(client: TestClient) -> httpx.MockTransport:
    """An httpx transport that hands each request to the in-process app (public APIs only)."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = client.request(
            request.method, str(request.url), headers=dict(request.headers), content=request.read()
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    return httpx.MockTransport(handle)


def test_sdk_downloads_a_repository(exported: Exported, tmp_path: Path) -> None:
    transport = through(exported.client)
    with Client("http://testserver", transport=transport) as client:
        path = client.triton_repository(["digits", exported.static_id], tmp_path / "repo.zip")
        assert path == tmp_path / "repo.zip"
        assert sorted(configs_of(zip_members(path.read_bytes()))) == sorted(["digits", exported.static_id])
        single = client.triton_repository("digits", tmp_path / "one.zip")  # one name, not its letters
        assert list(configs_of(zip_members(single.read_bytes()))) == ["digits"]
        with pytest.raises(NotFound) as missing:
            client.triton_repository(["eng_missing"], tmp_path / "missing.zip")
        assert missing.value.code == "engine_not_found"
        with pytest.raises(ValidationFailed) as twice:
            client.triton_repository(["digits", exported.dynamic_id], tmp_path / "twice.zip")
        assert twice.value.code == "duplicate_model_name"
        with pytest.raises(ValueError):
            client.triton_repository([], tmp_path / "none.zip")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.zip", "repo.zip"]  # no partial files

    async def use_async() -> None:
        async with AsyncClient("http://testserver", transport=transport) as client:
            path = await client.triton_repository([exported.static_id], tmp_path / "async.zip")
            assert list(configs_of(zip_members(path.read_bytes()))) == [exported.static_id]
            with pytest.raises(NotFound):
                await client.triton_repository(["eng_missing"], tmp_path / "async-missing.zip")

    asyncio.run(use_async())
    assert not (tmp_path / "async-missing.zip").exists()


def test_cli_engines_triton(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(client_cli, "Client", functools.partial(Client, transport=through(exported.client)))
    out = tmp_path / "repo.zip"
    status = server_cli.main(["engines", "triton", "digits", exported.static_id, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["path"] == str(out) and summary["size_bytes"] == out.stat().st_size
    assert summary["models"] == sorted(["digits", exported.static_id])
    assert "tritonserver --model-repository" in captured.err
    assert client_cli.main(["engines", "triton", "eng_missing", "--out", str(tmp_path / "x.zip")]) == 1
    assert "error: engine_not_found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # at least one engine, and --out, are required
        client_cli.main(["engines", "triton", "--out", str(out)])
