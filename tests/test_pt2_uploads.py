"""PyTorch uploads: `POST /v1/models` with a torch.export program (`.pt2`), converted to ONNX by a
`convert` job (app.api.routes.models, workers.handlers.run_convert), and the SDK's `upload_model`
of an `nn.Module`.

In process (jobs run with `run_job_by_id`): a real small CNN uploaded as a `.pt2` answers
`converting`, its job converts it, the model is `ready` with a dynamic `batch` dim, and an optimize
job on it builds an engine whose outputs match torch's; an operator the exporter cannot translate
fails the model and its job with `unsupported_op` naming it; hostile archives are a 4xx at upload
with nothing stored; a model that is not ready is a 409 `model_not_ready` wherever it is used.
Over a live stack: the SDK exports an `nn.Module`, waits for the model, optimizes it, infers.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient
from optiforge_client import AsyncClient, Client
from optiforge_client.cli import main as client_cli
from optiforge_client.client import ModelFailed
from optiforge_client.torch_export import export_module

from app.core.migrate import alembic_config, upgrade
from app.main import create_app
from tests.conftest import QUICK_MEASURE, LiveStack, LocalApi, make_settings
from tests.test_torch_conversion import QR, RunsShell, UsesCustomOp, rewrite, tiny_cnn, touch
from workers.job_runner import run_job_by_id

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

EXAMPLE = (torch.randn(1, 1, 16, 16),)


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_module(tiny_cnn(), EXAMPLE, tmp_path_factory.mktemp("pt2") / "cnn.pt2")


def upload(client: TestClient, path: Path, name: str | None = None, **form: Any) -> Any:
    with path.open("rb") as handle:
        return client.post("/v1/models", files={"file": (name or path.name, handle)}, data=form)


def torch_outputs(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tiny_cnn()(torch.from_numpy(x)).numpy()


def not_ready(response: Any, words: str) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["code"] == "model_not_ready" and words in body["detail"], body


def nothing_stored(api: LocalApi) -> None:
    assert api.client.get("/v1/models").json() == []
    assert api.client.get("/v1/jobs").json() == []
    assert api.store.files() == []


# ---------------------------------------------------------------- in process


def test_a_pt2_converts_in_a_job_then_optimizes_like_an_onnx_upload(
    local_api: LocalApi, cnn_pt2: Path, tmp_path: Path
) -> None:
    client, settings = local_api.client, local_api.settings
    response = upload(client, cnn_pt2, name="tiny")
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["status"] == "converting" and model["error"] is None
    assert model["inputs"] == [] and model["opset"] is None and model["parameters"] is None
    assert model["filename"] == "tiny" and model["size_bytes"] == cnn_pt2.stat().st_size
    job_id = model["conversion_job_id"]
    (listed,) = client.get("/v1/jobs").json()  # a job like any other
    assert listed["id"] == job_id and listed["kind"] == "convert" and listed["status"] == "queued"

    # Nothing uses a model before it is ready.
    mid = model["id"]
    not_ready(client.post("/v1/jobs", json={"model_id": mid}), "still converting")
    not_ready(client.post(f"/v1/models/{mid}/sensitivity", json={"dataset_id": "ds_x"}), job_id)
    body = {"evaluation_dataset_id": "ds_x", "time_budget_minutes": 1}
    not_ready(client.post(f"/v1/models/{mid}/optimize", json=body), "converting")
    not_ready(client.get(f"/v1/models/{mid}/download"), "converting")
    assert client.delete(f"/v1/models/{mid}").json()["code"] == "model_in_use"  # its job runs

    run_job_by_id(settings, job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["stage"] == "done", job
    assert any("converted to ONNX opset" in message for message in job["messages"])
    model = client.get(f"/v1/models/{mid}").json()
    assert model["status"] == "ready" and model["conversion_job_id"] == job_id
    (spec,) = model["inputs"]
    assert spec == {"name": "x", "dtype": "float32", "shape": ["batch", 1, 16, 16], "batch_axis": 0}
    assert [out["shape"] for out in model["outputs"]] == [["batch", 10]]
    assert model["opset"] >= 18 and model["parameters"] > 0 and model["op_types"]["Conv"] == 2
    assert model["conversion"]["source_format"] == "torch.export"
    assert any("not read" in note for note in model["conversion"]["notes"])  # the pickled examples
    assert local_api.store.files() == [f"models/{mid}/model.onnx", f"models/{mid}/source/model.pt2"]

    # Downloaded and optimized exactly as an uploaded ONNX model.
    onnx_file = tmp_path / "downloaded.onnx"
    onnx_file.write_bytes(client.get(f"/v1/models/{mid}/download").content)
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], torch_outputs(x), rtol=1e-4, atol=1e-5)
    recipe = {"batch_sizes": [1, 4], "measure": QUICK_MEASURE}
    optimize = client.post("/v1/jobs", json={"model_id": mid, "recipe": recipe})
    assert optimize.status_code == 202, optimize.text
    run_job_by_id(settings, optimize.json()["id"])
    optimized = client.get(f"/v1/jobs/{optimize.json()['id']}").json()
    assert optimized["status"] == "succeeded", optimized
    (engine_id,) = optimized["engine_ids"]
    answer = client.post(f"/v1/engines/{engine_id}/infer", json={"inputs": {"x": x.tolist()}})
    assert answer.status_code == 200, answer.text
    (logits,) = answer.json()["outputs"].values()
    np.testing.assert_allclose(np.asarray(logits), torch_outputs(x), rtol=1e-4, atol=1e-5)
    assert client.get(f"/v1/jobs/{optimized['id']}/report").json()["rows"][0]["engine"] == "original"


def test_an_operator_the_exporter_cannot_translate_fails_the_model_and_its_job(
    local_api: LocalApi, tmp_path: Path
) -> None:
    client = local_api.client
    pt2 = tmp_path / "qr.pt2"
    torch.export.save(torch.export.export(QR(), (torch.randn(2, 4, 4),)), pt2)
    model = upload(client, pt2).json()
    assert model["status"] == "converting", model
    run_job_by_id(local_api.settings, model["conversion_job_id"])

    job = client.get(f"/v1/jobs/{model['conversion_job_id']}").json()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "unsupported_op"
    assert "No ONNX function found" in job["error"]["detail"]  # the exporter's own words
    failed = client.get(f"/v1/models/{model['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == {**job["error"], "operators": ["aten.linalg_qr.default"]}
    assert client.get("/v1/models").json()[0]["status"] == "failed"
    not_ready(client.post("/v1/jobs", json={"model_id": model["id"]}), "aten.linalg_qr.default")
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204  # its job has ended
    assert local_api.store.files() == []


def _with_member(member: str, data: bytes) -> Callable[[Path, Path], Path]:
    def build(source: Path, target: Path) -> Path:
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
            root = src.namelist()[0].split("/")[0]
            for info in src.infolist():
                dst.writestr(info, src.read(info))
            dst.writestr(member.replace("{root}", root), data)
        return target

    return build


def _shape_expression_that_runs(marker: Path) -> Callable[[Path, Path], Path]:
    def inject(document: dict[str, Any]) -> None:
        sizes = document["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = f"__import__('os').system({touch(marker)!r})"

    return lambda source, target: rewrite(source, target, program=inject)


def _target_os_system(source: Path, target: Path) -> Path:
    def retarget(document: dict[str, Any]) -> None:
        document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    return rewrite(source, target, program=retarget)


def _custom_op(_source: Path, target: Path) -> Path:
    torch.export.save(torch.export.export(UsesCustomOp(), (torch.randn(3, 4),)), target)
    return target


def _file_of(data: bytes) -> Callable[[Path, Path], Path]:
    def build(_source: Path, target: Path) -> Path:
        target.write_bytes(data)
        return target

    return build


def _torch_save(_source: Path, target: Path) -> Path:
    torch.save({"weight": torch.zeros(2)}, target)
    return target


@pytest.mark.parametrize(
    ("case", "filename", "status", "code"),
    [
        ("path_traversal", "evil.pt2", 422, "archive_path_traversal"),
        ("code_in_a_shape", "evil.pt2", 422, "invalid_torch_program"),
        ("target_os_system", "evil.pt2", 422, "invalid_torch_program"),
        ("custom_operator", "custom.pt2", 422, "unsupported_op"),
        ("aotinductor", "compiled.pt2", 422, "invalid_torch_program"),
        ("bomb", "bomb.pt2", 413, "upload_too_large"),
        ("not_a_zip", "model.pt2", 422, "invalid_torch_program"),
        ("torch_save", "weights.pt", 422, "pickle_refused"),
        ("bare_pickle", "weights.pkl", 422, "pickle_refused"),
    ],
)
def test_hostile_and_foreign_files_are_refused_at_upload_with_nothing_stored(
    local_api: LocalApi, cnn_pt2: Path, tmp_path: Path, case: str, filename: str, status: int, code: str
) -> None:
    marker = tmp_path / "ran"
    builders: dict[str, Callable[[Path, Path], Path]] = {
        "path_traversal": _with_member("../escape.txt", b"x"),
        "code_in_a_shape": _shape_expression_that_runs(marker),
        "target_os_system": _target_os_system,
        "custom_operator": _custom_op,
        "aotinductor": _with_member("{root}/data/aotinductor/model/model.so", b"\x7fELF"),
        # 32 MiB of zeros, deflated to a few KiB: over the 16 MiB this server unpacks (4 × 4 MiB)
        "bomb": _with_member("{root}/extra/zeros.bin", bytes(32 * 2**20)),
        "not_a_zip": _file_of(b"\x08\x07 not a zip"),
        "torch_save": _torch_save,
        "bare_pickle": _file_of(pickle.dumps(RunsShell(touch(marker)))),
    }
    path = builders[case](cnn_pt2, tmp_path / filename)
    response = upload(local_api.client, path)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    if case == "custom_operator":
        assert body["operators"] == ["optiforge_test::scale_rows"]
    nothing_stored(local_api)
    assert not marker.exists()


def test_a_pt2_is_told_by_its_layout_and_converts_at_the_opset_asked(
    local_api: LocalApi, cnn_pt2: Path
) -> None:
    client = local_api.client
    response = upload(client, cnn_pt2, name="exported.zip", opset="18")  # named like an ONNX bundle
    assert response.status_code == 201, response.text
    model = response.json()
    job = client.get(f"/v1/jobs/{model['conversion_job_id']}").json()
    assert job["recipe"] == {"source": "torch.export", "opset": 18}
    run_job_by_id(local_api.settings, job["id"])
    model = client.get(f"/v1/models/{model['id']}").json()
    assert model["status"] == "ready" and model["opset"] == 18, model

    bad = {"17": "validation_error", "99": "invalid_opset"}
    for opset, code in bad.items():
        answer = upload(client, cnn_pt2, opset=opset)
        assert answer.status_code == 422 and answer.json()["code"] == code, answer.text
    onnx_file = local_api.store.local_path(f"models/{model['id']}/model.onnx")
    answer = upload(client, onnx_file, opset="18")  # an ONNX model keeps its own opset
    assert answer.status_code == 422 and answer.json()["code"] == "invalid_opset", answer.text
    assert [item["id"] for item in client.get("/v1/models").json()] == [model["id"]]


def test_a_cancelled_conversion_fails_its_model_which_can_then_be_deleted(
    local_api: LocalApi, cnn_pt2: Path
) -> None:
    client = local_api.client
    model = upload(client, cnn_pt2).json()
    cancelled = client.post(f"/v1/jobs/{model['conversion_job_id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    run_job_by_id(local_api.settings, cancelled["id"])  # a late delivery does nothing
    failed = client.get(f"/v1/models/{model['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "conversion_cancelled", failed
    not_ready(client.post("/v1/jobs", json={"model_id": model["id"]}), "conversion_cancelled")
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    nothing_stored(local_api)


def test_a_pickled_weight_fails_the_conversion_unread(
    local_api: LocalApi, cnn_pt2: Path, tmp_path: Path
) -> None:
    """The upload's checks read no payload list; the worker's loader refuses the pickle unread."""
    marker = tmp_path / "ran"
    with zipfile.ZipFile(cnn_pt2) as archive:
        root = archive.namelist()[0].split("/")[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    fqn = next(iter(config["config"]))
    config["config"][fqn]["use_pickle"] = True
    evil = rewrite(
        cnn_pt2,
        tmp_path / "evil.pt2",
        members={
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{config['config'][fqn]['path_name']}": pickle.dumps(RunsShell(touch(marker))),
        },
    )
    model = upload(local_api.client, evil).json()
    run_job_by_id(local_api.settings, model["conversion_job_id"])
    failed = local_api.client.get(f"/v1/models/{model['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "pickle_refused", failed
    job = local_api.client.get(f"/v1/jobs/{model['conversion_job_id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "pickle_refused"
    assert not marker.exists()


def test_a_conversion_counts_against_the_projects_jobs_in_flight(tmp_path: Path, cnn_pt2: Path) -> None:
    settings = make_settings(tmp_path / "data", max_jobs_in_flight_per_project=1)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        first = upload(client, cnn_pt2)
        assert first.status_code == 201, first.text
        second = upload(client, cnn_pt2, opset="18")  # another opset: a second conversion, not deduplicated
        assert second.status_code == 429 and second.json()["code"] == "too_many_jobs", second.text
        assert second.headers["Retry-After"]
        assert [model["id"] for model in client.get("/v1/models").json()] == [first.json()["id"]]
        assert all(key.startswith(f"models/{first.json()['id']}/") for key in app.state.store.files())


def test_migration_0007_makes_existing_models_ready(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    command.upgrade(alembic_config(url), "0006")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO models (id, project_id, name, filename, sha256, size_bytes, artifact_prefix, "
                "info, created_at) VALUES ('mdl_1', 'default', 'm', 'm.onnx', 'x', 1, 'models/mdl_1', "
                "'{}', '2026-01-01')"
            )
        )
    upgrade(url)
    with engine.connect() as connection:
        row = connection.execute(sa.text("SELECT status, error FROM models")).one()
    assert tuple(row) == ("ready", None)
    command.downgrade(alembic_config(url), "0006")
    upgrade(url)


# ---------------------------------------------------------------- over a live stack, with the SDK


def test_the_sdk_uploads_an_nn_module_over_a_live_stack(
    embedded_stack: LiveStack, cnn_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the SDK's export goes
    x = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32)
    with Client(embedded_stack.base_url) as client:
        model = client.upload_model(tiny_cnn(), example_inputs=EXAMPLE, name="sdk-cnn")
        assert model.status == "converting" and model.name == "sdk-cnn" and model.parameters is None
        assert not list(tmp_path.glob("optiforge-export-*"))  # the temporary .pt2 is gone
        model = client.wait_for_model(model.id, timeout=120)
        assert model.ready and model.inputs[0].shape == ["batch", 1, 16, 16]
        job = client.create_job(model.id, {"batch_sizes": [3], "measure": QUICK_MEASURE})
        job = client.wait_for_job(job.id, timeout=120)
        result = client.infer(job.engine_ids[0], {"x": x})
        (logits,) = result.outputs.values()
        np.testing.assert_allclose(logits, torch_outputs(x), rtol=1e-4, atol=1e-5)

    async def failing() -> None:
        async with AsyncClient(embedded_stack.base_url) as client:
            model = await client.upload_model(QR(), example_inputs=(torch.randn(2, 4, 4),))
            with pytest.raises(ModelFailed) as caught:
                await client.wait_for_model(model.id, timeout=120)
            assert caught.value.code == "unsupported_op"
            assert caught.value.model.error["operators"] == ["aten.linalg_qr.default"]

    asyncio.run(failing())

    # The CLI uploads a .pt2 file and waits; `models get` shows the status.
    url = ["--url", embedded_stack.base_url]
    assert client_cli(["models", "upload", str(cnn_pt2), "--wait", *url]) == 0
    uploaded = json.loads(capsys.readouterr().out)
    assert uploaded["status"] == "ready" and uploaded["inputs"][0]["shape"][0] == "batch"
    assert client_cli(["models", "get", uploaded["id"], *url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ready"
