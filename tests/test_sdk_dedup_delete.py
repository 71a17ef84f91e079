"""The SDK and the CLI against a live server: files uploaded once (looked up by sha256 first), ids
taken where files are, deletes refused with the server's sentence (in the CLI's words) unless
forced, and image folders with their preprocessing spec (and the size the model wants suggested).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from optiforge_client import AsyncClient, Client, Conflict, NotFound, ValidationFailed
from optiforge_client.dedup import file_sha256

from tests.conftest import QUICK_MEASURE, REPO_ROOT, DigitsArtifacts, LiveStack


def optiforge(stack: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    """The `optiforge` command, output captured (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**stack.env, "OPTIFORGE_URL": stack.base_url},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    """The CLI's refusal: exit status 1, one line on stderr, no traceback."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


@pytest.fixture
def own_model(tmp_path: Path) -> tuple[Path, Path]:
    """A small model of random weights (bytes no other test uploads, so deleting it harms none)
    and an evaluation set for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(secrets.randbits(32))
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["logits"], name="matmul")],
        "own",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "own.onnx"
    onnx.save(model, path)
    data = tmp_path / "own.npz"
    np.savez(data, input=rng.standard_normal((32, 4)).astype(np.float32))
    return path, data


def test_uploads_are_found_by_content(embedded_stack: LiveStack, own_model: tuple[Path, Path]) -> None:
    model_path, data_path = own_model
    with Client(embedded_stack.base_url) as client:
        models_before = len(client.list_models())
        model = client.find_or_upload_model(model_path, name="own")
        assert not model.deduplicated and model.sha256 == file_sha256(model_path)
        again = client.find_or_upload_model(model_path, name="another name")
        assert again.id == model.id and again.deduplicated
        assert [found.id for found in client.list_models(sha256=model.sha256)] == [model.id]
        uploaded = client.upload_model(model_path)  # sent anyway: the server finds it too
        assert uploaded.id == model.id and uploaded.deduplicated
        assert len(client.list_models()) == models_before + 1

        dataset = client.find_or_upload_dataset(data_path)
        assert not dataset.deduplicated and dataset.sha256 == file_sha256(data_path)
        same = client.find_or_upload_dataset(data_path, name="again")
        assert same.id == dataset.id and same.deduplicated
        assert [found.id for found in client.list_datasets(sha256=dataset.sha256)] == [dataset.id]

    async def the_same_awaited() -> None:
        async with AsyncClient(embedded_stack.base_url) as client:
            found = await client.find_or_upload_model(model_path)
            assert found.id == model.id and found.deduplicated
            found_data = await client.find_or_upload_dataset(data_path)
            assert found_data.id == dataset.id and found_data.deduplicated

    asyncio.run(the_same_awaited())


def test_optimize_reuses_ids_and_uploaded_files(
    embedded_stack: LiveStack, own_model: tuple[Path, Path]
) -> None:
    model_path, data_path = own_model
    recipe = model_path.parent / "quick.json"
    recipe.write_text(json.dumps({"batch_sizes": [1], "measure": QUICK_MEASURE}))
    first = optiforge(
        embedded_stack, "optimize", str(model_path), "--eval", str(data_path), "--recipe", str(recipe)
    )
    assert first.returncode == 0, first.stderr
    with Client(embedded_stack.base_url) as client:
        model = client.list_models(sha256=file_sha256(model_path))[0]
        dataset = client.list_datasets(sha256=file_sha256(data_path))[0]
        counts = len(client.list_models()), len(client.list_datasets())
        by_file = optiforge(
            embedded_stack, "optimize", str(model_path), "--eval", str(data_path), "--recipe", str(recipe)
        )
        assert by_file.returncode == 0, by_file.stderr
        assert f"model {model.id}" in by_file.stderr and "already uploaded" in by_file.stderr
        assert f"evaluation set {dataset.id}" in by_file.stderr
        by_id = optiforge(embedded_stack, "optimize", model.id, "--eval", dataset.id, "--recipe", str(recipe))
        assert by_id.returncode == 0, by_id.stderr
        assert f"model {model.id}" in by_id.stderr
        assert (len(client.list_models()), len(client.list_datasets())) == counts
        for run in (first, by_file, by_id):
            job_id = run.stdout.strip()
            assert (
                job_id.startswith("job_") and client.wait_for_job(job_id, timeout=180).status == "succeeded"
            )
        missing = optiforge(embedded_stack, "optimize", "mdl_missing", "--eval", dataset.id)
        assert "model_not_found" in one_error_line(missing)


def test_engine_download_and_deletes_refused_unless_forced(
    embedded_stack: LiveStack, own_model: tuple[Path, Path], tmp_path: Path
) -> None:
    model_path, data_path = own_model
    stack = embedded_stack
    with Client(stack.base_url) as client:
        model = client.find_or_upload_model(model_path)
        dataset = client.find_or_upload_dataset(data_path)
        recipe = {"batch_sizes": [1], "measure": QUICK_MEASURE}
        job = client.wait_for_job(
            client.create_job(model.id, recipe, evaluation_dataset_id=dataset.id).id, timeout=180
        )
        engine_id = job.engine_ids[0]
        downloaded = client.download_engine(engine_id, tmp_path)  # a folder: the server's file name
        assert downloaded.parent == tmp_path and downloaded.name.startswith(f"{engine_id}-")
        assert downloaded.suffix == ".onnx" and not list(tmp_path.glob("*.part"))
        import onnx

        assert onnx.load(downloaded).graph.node[0].op_type == "MatMul"
        by_cli = optiforge(stack, "engines", "download", engine_id, "--out", str(tmp_path / "engine.onnx"))
        assert by_cli.returncode == 0 and by_cli.stdout.strip() == str(tmp_path / "engine.onnx"), (
            by_cli.stderr
        )
        assert (tmp_path / "engine.onnx").read_bytes() == downloaded.read_bytes()
        into_new_folder = client.download_engine(engine_id, f"{tmp_path}/engines/")
        assert into_new_folder == tmp_path / "engines" / downloaded.name
        assert "engine_not_found" in one_error_line(optiforge(stack, "engines", "download", "eng_missing"))
        alias = f"cli23-{secrets.token_hex(3)}"
        client.set_alias(engine_id, alias)

        for argv in (
            ["engines", "delete", engine_id],
            ["jobs", "delete", job.id],
            ["models", "delete", model.id],
        ):
            line = one_error_line(optiforge(stack, *argv))
            assert alias in line and "--force" in line and "force=true" not in line, line
        assert client.get_engine(engine_id).alias == alias  # nothing was deleted

        with pytest.raises(Conflict) as held:
            client.delete_engine(engine_id)
        assert held.value.code == "engine_holds_alias"
        forced = optiforge(stack, "engines", "delete", engine_id, "--force")
        assert forced.returncode == 0 and forced.stdout.strip() == f"deleted engine {engine_id}", (
            forced.stderr
        )
        with pytest.raises(NotFound):
            client.get_engine(engine_id)
        with pytest.raises(NotFound):
            client.infer(alias, {"input": np.zeros((1, 4), np.float32)})

        assert optiforge(stack, "jobs", "delete", job.id).returncode == 0
        with pytest.raises(NotFound):
            client.get_job(job.id)

        # timing for two minutes (a run of this model takes microseconds: max_runs would stop it
        # first at its default); cancelled long before
        slow = {"batch_sizes": [1], "measure": {**QUICK_MEASURE, "min_seconds": 120, "max_runs": 1_000_000}}
        queued = client.create_job(model.id, slow, evaluation_dataset_id=dataset.id)
        with pytest.raises(Conflict) as active:
            client.delete_job(queued.id)
        assert active.value.code == "job_active"
        refused = one_error_line(optiforge(stack, "jobs", "delete", queued.id))
        assert "job_active" in refused and f"optiforge jobs cancel {queued.id}" in refused, refused
        in_use = one_error_line(optiforge(stack, "datasets", "delete", dataset.id))
        assert "dataset_in_use" in in_use and queued.id in in_use and "--force" in in_use, in_use
        client.cancel_job(queued.id)
        while not client.get_job(queued.id).finished:
            time.sleep(0.2)
        client.delete_job(queued.id)

        assert optiforge(stack, "datasets", "delete", dataset.id).returncode == 0
        with pytest.raises(NotFound):
            client.get_dataset(dataset.id)
        assert optiforge(stack, "models", "delete", model.id).returncode == 0
        assert client.list_models(sha256=model.sha256) == []


def _digits_zip(digits: DigitsArtifacts, path: Path, samples: int = 40) -> Path:
    from PIL import Image

    with zipfile.ZipFile(path, "w") as archive:
        for index in range(samples):
            image, label = digits.split.test_x[index, 0], digits.split.test_y[index]
            buffer = io.BytesIO()
            Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
            archive.writestr(f"{label}/{index:04d}.png", buffer.getvalue())
    return path


def test_image_folder_preprocessing_and_the_size_hint(
    embedded_stack: LiveStack, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    archive = _digits_zip(digits, tmp_path / "digits.zip")
    gray = {"channel_order": "GRAY", "mean": [0.0], "std": [1.0]}
    with Client(embedded_stack.base_url) as client:
        model = client.find_or_upload_model(digits.onnx_path, name="digits")
        default_size = client.upload_dataset(archive, preprocessing=gray)
        assert default_size.image_folder is not None
        assert default_size.image_folder["preprocessing"]["size"] == [224, 224]
        with pytest.raises(ValidationFailed) as mismatch:
            client.create_job(model.id, {"batch_sizes": [1]}, evaluation_dataset_id=default_size.id)
        assert 'preprocessing={"size": [32, 32]}' in str(mismatch.value), str(mismatch.value)

    refused = optiforge(
        embedded_stack, "jobs", "create", model.id, "--eval", default_size.id, "--batch-sizes", "1"
    )
    line = one_error_line(refused)
    assert "--preprocessing 'size=[32,32]'" in line, line

    uploaded = optiforge(
        embedded_stack, "datasets", "upload", str(archive), "--preprocessing", json.dumps(gray),
        "--preprocessing", "size=[32,32]", "--preprocessing", "resize=none",
    )  # fmt: skip
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["image_folder"]["preprocessing"]["size"] == [32, 32]
    assert dataset["image_folder"]["preprocessing"]["resize"] == "none"
    with Client(embedded_stack.base_url) as client:
        job = client.create_job(
            model.id, {"batch_sizes": [1], "measure": QUICK_MEASURE}, evaluation_dataset_id=dataset["id"]
        )
        assert client.wait_for_job(job.id, timeout=180).status == "succeeded"
