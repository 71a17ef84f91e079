"""Job and engine pages with context (issue 23, items 2 and 7): each engine's lineage and real build
time, downloads for every backend, Triton export of OpenVINO engines, the job's model name, timing
and best engine, list filters, and search messages that speak of speedup and never contradict.

Real engines: an INT8 recipe and a small search run in process (workers.job_runner), an OpenVINO
engine compiled by its backend; Triton configs are parsed by Triton's own ModelConfig schema.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import zipfile
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tritonclient
from google.protobuf import text_format

from app.core.db import get_sessionmaker
from app.core.orm import DEFAULT_PROJECT, EngineRecord, JobKind, JobRecord, JobStatus, utcnow
from engines.backends.base import CompileOptions, EngineArtifact
from engines.backends.registry import get_backend
from engines.search.best import parse_best, searching_stage
from engines.search.lineage import engine_lineage
from tests.conftest import QUICK_MEASURE, LocalApi, stored_fp32_engine
from workers.handlers import build_seconds
from workers.job_runner import run_job_by_id


@functools.cache
def triton_schema() -> ModuleType:
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2_lineage", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_cnn(path: Path) -> Path:
    """Conv (named, its weight an `onnx::Conv_39` initializer) → Relu → Flatten → Gemm: 4 classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "onnx::Conv_39"),
        numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(rng.normal(size=(4, 4 * 6 * 6)).astype(np.float32) * 0.1, "fc.weight"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "onnx::Conv_39", "conv.bias"], ["conv_out"], name="/features/conv/Conv"
        ),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="/features/relu/Relu"),
        helper.make_node("Flatten", ["relu_out"], ["flat"], name="/Flatten"),
        helper.make_node(
            "Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="/classifier/Gemm", transB=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def uploaded(local_api: LocalApi, tmp_path: Path) -> dict[str, str]:
    model = small_cnn(tmp_path / "small.onnx")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    np.savez(tmp_path / "eval.npz", input=x[:32], labels=np.arange(32) % 4)
    ids = {"path": str(model)}
    for key, path, kind in (
        ("model", model, "models"),
        ("calibration", tmp_path / "calib.npz", "datasets"),
        ("evaluation", tmp_path / "eval.npz", "datasets"),
    ):
        with path.open("rb") as handle:
            response = local_api.client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
        assert response.status_code == 201, response.text
        ids[key] = response.json()["id"]
    return ids


def _int8_job(api: LocalApi, ids: dict[str, str], **recipe: object) -> dict:
    body = {
        "model_id": ids["model"],
        "calibration_dataset_id": ids["calibration"],
        "evaluation_dataset_id": ids["evaluation"],
        "recipe": {"precision": "int8", "batch_sizes": [1], "measure": QUICK_MEASURE, **recipe},
    }
    job = api.client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    run_job_by_id(api.settings, job.json()["id"])
    done = api.client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done
    return done


def test_build_seconds_include_quantization() -> None:
    """The compile step alone read 0.0 s for an ONNX Runtime engine whose INT8 model took 4.4 s."""
    artifact = EngineArtifact("onnxruntime-cpu", "int8", Path("engine.onnx"), 0.0, {"quantize_seconds": 4.4})
    assert build_seconds(artifact) == pytest.approx(4.4)
    nested = EngineArtifact(
        "onnxruntime-cpu", "int8-dynamic", Path("e"), 0.5, {"int8_dynamic": {"quantize_seconds": 2}}
    )
    assert build_seconds(nested) == pytest.approx(2.5)
    recorded = EngineArtifact(
        "onnxruntime-cpu", "int8", Path("e"), 0.1, {"build_seconds": 7.0, "quantize_seconds": 4.4}
    )
    assert build_seconds(recorded) == 7.0  # what the builder timed whole (a search candidate)


def test_an_int8_engine_has_its_real_build_time_lineage_and_best(
    local_api: LocalApi, uploaded: dict[str, str]
) -> None:
    client = local_api.client
    job = _int8_job(local_api, uploaded, quantize={"nodes_to_exclude": ["/classifier/Gemm"]})
    engine = client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
    assert engine["build_info"]["quantize_seconds"] > 0
    assert engine["build_seconds"] >= engine["build_info"]["quantize_seconds"]  # not the 0.0 s compile step
    lineage = engine["lineage"]
    assert lineage["backend"] == "onnxruntime-cpu" and lineage["precision"] == "int8"
    assert (
        lineage["calibration"] == "minmax" and lineage["fallback_nodes"] == 1 and lineage["pruning"] is None
    )
    assert lineage["qat"] is False
    assert lineage["label"] == "int8 onnxruntime-cpu · minmax · 1 in float"

    assert job["model_name"] == "small" and job["kind_label"] == "recipe"
    assert job["elapsed_s"] is not None and job["elapsed_s"] >= 0
    assert job["time_budget_s"] is None and job["remaining_s"] is None
    assert job["best"]["engine_id"] == engine["id"] and job["best"]["lineage"]["label"] == lineage["label"]
    assert job["best"]["speedup"] == pytest.approx(engine["metrics"]["vs_baseline"]["speedup"]["1"])

    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert [row["lineage"]["label"] for row in report["rows"]] == [
        "original (onnxruntime-cpu fp32)",
        lineage["label"],
    ]
    listed = client.get("/v1/jobs").json()
    assert listed[0]["id"] == job["id"] and listed[0]["best"]["label"] == lineage["label"]


def test_lineage_of_a_pruned_quantized_engine_reads_as_one_line() -> None:
    build_info = {
        "prune": {"method": "l1", "ratio": 0.3, "params_after": 10},
        "calibration": "minmax",
        "nodes_kept_float": ["a", "b", "c"],
    }
    lineage = engine_lineage("onnxruntime-cpu", "int8", build_info, {"prune": {"method": "l1", "ratio": 0.3}})
    assert lineage["label"] == "int8 onnxruntime-cpu · pruned 30 % (l1) · minmax · 3 in float"
    assert lineage["pruning"] == {"criterion": "l1", "ratio": 0.3} and lineage["fallback_nodes"] == 3
    unpruned = engine_lineage("onnxruntime-cpu", "fp32", {}, None)
    assert unpruned["label"] == "fp32 onnxruntime-cpu" and unpruned["pruning"] is None  # pruned ≠ unpruned
    searched = engine_lineage(
        "onnxruntime-cpu",
        "int8",
        {"lineage": {"backend": "onnxruntime-cpu", "precision": "int8", "calibration": "entropy",
                     "prune_ratio": 0.5, "layer_ratios": None, "float_fallback": True, "qat_epochs": 2},
         "nodes_kept_float": ["x"]},
        {"space": {"prune_method": "l2"}},
    )  # fmt: skip
    assert searched["label"] == "int8 onnxruntime-cpu · pruned 50 % (l2) · entropy · QAT · 1 in float"
    assert searched["qat"] is True and searched["prune_ratio"] == 0.5  # the candidate's own fields stay


def test_the_running_stage_speaks_of_speedup_and_reads_back_as_best() -> None:
    stage = searching_stage(3, 5, ("int8 onnxruntime-cpu · minmax", 0.5, 0.004))
    assert stage == (
        "searching: 3 tried, 5 left; best within budget: int8 onnxruntime-cpu · minmax "
        "(2.00× speedup, drop 0.40 pt)"
    )
    assert "cost" not in stage
    assert parse_best(stage) == {"label": "int8 onnxruntime-cpu · minmax", "speedup": 2.0, "drop": 0.004}
    assert parse_best(searching_stage(1, 2, None)) is None
    assert "4.00× smaller" in searching_stage(1, 0, ("fp16 onnxruntime-cpu", 0.25, 0.0), "size")
    source = (Path(__file__).parent.parent / "engines" / "search" / "autotune.py").read_text()
    assert "the original's cost" not in source.replace("of the original's cost", "")


def _job_row(api: LocalApi, model_id: str, **fields: object) -> str:
    with get_sessionmaker(api.settings.resolved_database_url)() as session:
        job = JobRecord(project_id=DEFAULT_PROJECT, model_id=model_id, recipe={}, messages=[], **fields)
        session.add(job)
        session.commit()
        return job.id


def test_a_running_search_shows_its_best_elapsed_and_remaining_time_and_lists_filter(
    local_api: LocalApi, uploaded: dict[str, str]
) -> None:
    client = local_api.client
    started = utcnow() - timedelta(seconds=100)
    running = _job_row(
        local_api,
        uploaded["model"],
        kind=JobKind.AUTOTUNE,
        status=JobStatus.RUNNING,
        started_at=started,
        stage=searching_stage(4, 2, ("fp16 onnxruntime-cpu", 0.8, 0.0)),
    )
    with get_sessionmaker(local_api.settings.resolved_database_url)() as session:
        session.get(JobRecord, running).recipe = {"time_budget_s": 600.0, "objective": {"batch_size": 1}}
        session.commit()
    job = client.get(f"/v1/jobs/{running}").json()
    assert job["kind_label"] == "auto-optimize" and job["time_budget_s"] == 600.0
    assert 99 <= job["elapsed_s"] < 160 and 440 < job["remaining_s"] <= 501
    assert job["best"]["label"] == "fp16 onnxruntime-cpu" and job["best"]["speedup"] == 1.25
    failed = _job_row(local_api, uploaded["model"], kind=JobKind.SENSITIVITY, status=JobStatus.FAILED)

    def ids(**params: object) -> set[str]:
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()}

    assert ids(status=["running", "failed"]) == {running, failed}
    assert ids(status="running") == {running}
    assert ids(kind="autotune") == {running}
    assert ids(kind=["autotune", "sensitivity"], status="failed") == {failed}
    assert ids(model_id=uploaded["model"]) == {running, failed}
    assert ids(model_id="mdl_other") == set()
    assert client.get("/v1/jobs", params={"kind": "nonsense"}).status_code == 422


def test_a_finished_search_never_says_both_chosen_and_no_candidate_beats_the_original(
    local_api: LocalApi, uploaded: dict[str, str]
) -> None:
    client = local_api.client
    body = {
        "evaluation_dataset_id": uploaded["evaluation"],
        "calibration_dataset_id": uploaded["calibration"],
        "accuracy_budget": {"metric": "fidelity", "max_drop": 0.05},
        "time_budget_minutes": 1,
        "space": {
            "backends": ["onnxruntime-cpu"],
            "precisions": ["fp32", "int8"],
            "calibrations": ["minmax"],
            "prune_ratios": [],
            "qat_epochs": 0,
            "graph_optimization": {"model_type": "off"},
        },
    }
    job = client.post(f"/v1/models/{uploaded['model']}/optimize", json=body)
    assert job.status_code == 202, job.text
    run_job_by_id(local_api.settings, job.json()["id"])
    done = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done
    messages = " ".join(done["messages"])
    beats = "no candidate beats the original" in messages or "no candidate met the budget" in messages
    assert not (beats and "chosen:" in messages), done["messages"]
    assert done["best"] is not None and done["time_budget_s"] == 60 and done["remaining_s"] is None
    report = client.get(f"/v1/jobs/{done['id']}/autotune").json()
    assert all(row["lineage"]["label"] for row in report["candidates"])
    if beats:
        assert done["best"]["label"] == "original (onnxruntime-cpu fp32)" and done["best"]["speedup"] == 1.0
    else:
        chosen = [row for row in report["candidates"] if row["chosen"]]
        assert done["best"]["lineage"]["label"] == chosen[0]["lineage"]["label"]
    for engine_id in done["engine_ids"]:
        engine = client.get(f"/v1/engines/{engine_id}").json()
        assert engine["lineage"]["label"] and engine["build_seconds"] > 0


def _unzip(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _openvino_engine(api: LocalApi, model_id: str, model_path: Path, tmp_path: Path) -> str:
    """An OpenVINO engine as a worker stores it: its backend's IR, beside a report that is no part of it."""
    pytest.importorskip("openvino")
    out = tmp_path / "openvino"
    artifact = get_backend("openvino-cpu").compile(
        model_path, out, CompileOptions(precision="fp32", batch_sizes=(1,))
    )
    (out / "layer_errors.json").write_text("{}")
    job_id, _ = stored_fp32_engine(api.store, api.settings.resolved_database_url, model_id)
    prefix = f"jobs/{job_id}/engines/ov"
    api.store.put_dir(prefix, out)
    with get_sessionmaker(api.settings.resolved_database_url)() as session:
        engine = EngineRecord(
            project_id=DEFAULT_PROJECT, job_id=job_id, model_id=model_id, backend="openvino-cpu",
            precision="fp32", artifact_prefix=prefix, engine_file=artifact.path.name, size_bytes=1,
            build_seconds=artifact.build_seconds, hardware={}, metrics={"latency": {"1": {}}},
            build_info=artifact.metadata,
        )  # fmt: skip
        session.add(engine)
        session.commit()
        return engine.id


def test_every_backend_downloads_and_openvino_exports_to_triton(
    local_api: LocalApi, uploaded: dict[str, str], tmp_path: Path
) -> None:
    client, model_path = local_api.client, Path(uploaded["path"])
    _, onnx_engine = stored_fp32_engine(
        local_api.store, local_api.settings.resolved_database_url, uploaded["model"]
    )
    download = client.get(f"/v1/engines/{onnx_engine}/download")
    assert download.status_code == 200, download.text
    assert f'filename="{onnx_engine}-onnxruntime-cpu.onnx"' in download.headers["content-disposition"]
    stored = client.get(f"/v1/models/{uploaded['model']}/download").content
    assert download.content == stored

    openvino = _openvino_engine(local_api, uploaded["model"], model_path, tmp_path)
    ir = client.get(f"/v1/engines/{openvino}/download")
    assert ir.status_code == 200 and ir.headers["content-type"] == "application/zip", ir.text
    assert f'filename="{openvino}-openvino-cpu.zip"' in ir.headers["content-disposition"]
    members = _unzip(ir.content)
    assert sorted(members) == ["engine.bin", "engine.xml"]  # the IR, not the report beside it
    import openvino as ov

    (tmp_path / "ir").mkdir()
    for name, content in members.items():
        (tmp_path / "ir" / name).write_bytes(content)
    # f32 as optiforge runs it (the CPU's default may be bf16 on AMX machines)
    compiled = ov.Core().compile_model(
        str(tmp_path / "ir" / "engine.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    x = np.random.default_rng(2).normal(size=(2, 1, 8, 8)).astype(np.float32)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[0]
    np.testing.assert_allclose(compiled(x)[0], expected, rtol=1e-4, atol=1e-4)

    exported = client.get(f"/v1/engines/{openvino}/triton")
    assert exported.status_code == 200, exported.text
    repository = _unzip(exported.content)
    assert sorted(repository) == [
        f"{openvino}/1/model.bin",
        f"{openvino}/1/model.xml",
        f"{openvino}/config.pbtxt",
    ]
    assert repository[f"{openvino}/1/model.xml"] == members["engine.xml"]
    assert repository[f"{openvino}/1/model.bin"] == members["engine.bin"]
    config = text_format.Parse(repository[f"{openvino}/config.pbtxt"].decode(), triton_schema().ModelConfig())
    assert config.backend == "openvino" and not config.platform
    kind = triton_schema().ModelInstanceGroup.Kind
    assert [kind.Name(group.kind) for group in config.instance_group] == ["KIND_CPU"]
    assert [tensor.name for tensor in config.input] == ["input"] and [t.name for t in config.output] == [
        "logits"
    ]

    missing = client.get("/v1/engines/eng_missing/download")
    assert missing.status_code == 404 and missing.json()["code"] == "engine_not_found"


def test_a_long_label_keeps_the_stage_within_its_column() -> None:
    stage = searching_stage(120, 300, ("int8 onnxruntime-cpu · " + "x" * 400, 0.5, 0.01))
    assert len(stage) <= 255 and stage.endswith("(2.00× speedup, drop 1.00 pt)")
    assert parse_best(stage)["speedup"] == 2.0
