"""Bad input gets a clear 4xx with a machine-readable code, and nothing is half-stored."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import func, select

from app.core.db import session_scope
from app.core.orm import DatasetRecord, EngineRecord, JobRecord, ModelRecord
from tests.conftest import DigitsArtifacts, LocalApi


def assert_nothing_stored(api: LocalApi, models: int = 0, datasets: int = 0, jobs: int = 0) -> None:
    with session_scope(api.settings.resolved_database_url) as session:
        counts = {
            table.__tablename__: session.scalar(select(func.count()).select_from(table))
            for table in (ModelRecord, DatasetRecord, JobRecord, EngineRecord)
        }
    assert counts == {"models": models, "datasets": datasets, "jobs": jobs, "engines": 0}
    stored = api.store.files()
    assert len([key for key in stored if key.startswith("models/")]) <= models * 2
    assert len([key for key in stored if key.startswith("datasets/")]) == datasets
    assert not [key for key in stored if key.startswith("jobs/")]


def post_file(api: LocalApi, kind: str, name: str, content: bytes):
    return api.client.post(f"/v1/{kind}", files={"file": (name, content)})


def expect_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["detail"], body
    return body


def linear_model(external: dict[str, str] | None = None) -> onnx.ModelProto:
    """y = x @ W: small enough to build by hand, with optional external-data fields on W."""
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "W")
    if external is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in external.items():
            weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


# ---------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty_file"),
        (b"this is not a protobuf at all \xff\xfe", "invalid_model"),
        (b"\x08\x07\x12\x04test", "onnx_check_failed"),  # parses as a ModelProto, but has no graph
    ],
)
def test_model_garbage_is_refused(local_api: LocalApi, content: bytes, code: str) -> None:
    expect_error(post_file(local_api, "models", "model.onnx", content), 422, code)
    assert_nothing_stored(local_api)


def test_truncated_model_is_refused(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    content = digits.onnx_path.read_bytes()
    body = expect_error(
        post_file(local_api, "models", "digits.onnx", content[: len(content) // 2]), 422, "invalid_model"
    )
    assert "not a readable ONNX model" in body["detail"]
    assert_nothing_stored(local_api)


def test_model_failing_the_checker_is_refused(local_api: LocalApi) -> None:
    model = linear_model()
    model.graph.node[0].input[1] = "undefined_tensor"
    body = expect_error(
        post_file(local_api, "models", "bad.onnx", model.SerializeToString()), 422, "onnx_check_failed"
    )
    assert "undefined_tensor" in body["detail"]
    assert_nothing_stored(local_api)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../escape.bin"])
def test_external_data_outside_the_upload_is_refused(local_api: LocalApi, location: str) -> None:
    model = linear_model({"location": location, "offset": "0", "length": "48"})
    content = zip_bytes({"model.onnx": model.SerializeToString(), "weights.bin": b"\0" * 48})
    expect_error(post_file(local_api, "models", "bundle.zip", content), 422, "external_data_outside_upload")
    expect_error(
        post_file(local_api, "models", "model.onnx", model.SerializeToString()),
        422,
        "external_data_outside_upload",
    )
    assert_nothing_stored(local_api)


def test_external_data_missing_from_the_upload_is_refused(local_api: LocalApi) -> None:
    model = linear_model({"location": "weights.bin", "offset": "0", "length": "48"})
    body = expect_error(
        post_file(local_api, "models", "model.onnx", model.SerializeToString()), 422, "external_data_missing"
    )
    assert ".zip" in body["detail"]
    assert_nothing_stored(local_api)


def test_bundle_with_external_data_is_accepted(local_api: LocalApi, tmp_path: Path) -> None:
    """What the dynamo exporter writes: model.onnx plus a data file, uploaded as one zip."""
    model = linear_model()
    onnx.save_model(
        model,
        tmp_path / "model.onnx",
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    content = zip_bytes({name: (tmp_path / name).read_bytes() for name in ("model.onnx", "model.onnx.data")})
    response = post_file(local_api, "models", "linear.zip", content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["external_data"] is True and body["parameters"] == 12 and body["macs"] == 12
    download = local_api.client.get(f"/v1/models/{body['id']}/download")
    stored = onnx.load_from_string(download.content)  # normalized into one self-contained file
    np.testing.assert_array_equal(numpy_helper.to_array(stored.graph.initializer[0]), np.ones((4, 3)))


@pytest.mark.parametrize("member", ["../evil.onnx", "/abs/evil.onnx", "a/../../evil.onnx"])
def test_archive_path_traversal_is_refused(local_api: LocalApi, member: str) -> None:
    content = zip_bytes({member: linear_model().SerializeToString()})
    expect_error(post_file(local_api, "models", "bundle.zip", content), 422, "archive_path_traversal")
    assert_nothing_stored(local_api)


def test_bundle_needs_exactly_one_model(local_api: LocalApi) -> None:
    one = linear_model().SerializeToString()
    expect_error(
        post_file(local_api, "models", "b.zip", zip_bytes({"a.onnx": one, "b.onnx": one})),
        422,
        "invalid_bundle",
    )
    expect_error(
        post_file(local_api, "models", "b.zip", zip_bytes({"readme.txt": b"hi"})), 422, "invalid_bundle"
    )
    assert_nothing_stored(local_api)


def test_oversized_upload_is_refused(local_api: LocalApi) -> None:
    too_big = b"\0" * (local_api.settings.max_upload_bytes + 1)
    expect_error(post_file(local_api, "models", "big.onnx", too_big), 413, "upload_too_large")
    expect_error(post_file(local_api, "datasets", "big.npz", too_big), 413, "upload_too_large")
    assert_nothing_stored(local_api)


def test_zip_bomb_bundle_is_refused(local_api: LocalApi) -> None:
    limit = local_api.settings.max_unpacked_bytes
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.onnx", b"\0" * (limit + 1))
    expect_error(post_file(local_api, "models", "bomb.zip", buffer.getvalue()), 413, "upload_too_large")
    assert_nothing_stored(local_api)


# ---------------------------------------------------------------- datasets


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_object_arrays_are_never_unpickled(local_api: LocalApi) -> None:
    payload = np.array([{"a": 1}, None], dtype=object)
    expect_error(
        post_file(local_api, "datasets", "evil.npz", npz_bytes(input=payload)), 422, "pickle_refused"
    )
    assert_nothing_stored(local_api)


def test_raw_pickle_member_is_refused(local_api: LocalApi) -> None:
    import pickle

    content = zip_bytes({"input.pkl": pickle.dumps({"boom": 1}), "x.npy": b"not npy"})
    body = expect_error(post_file(local_api, "datasets", "evil.npz", content), 422, "invalid_dataset")
    assert "not a .npy array" in body["detail"] or "could not be read" in body["detail"]
    assert_nothing_stored(local_api)


@pytest.mark.parametrize(
    ("arrays", "code"),
    [
        ({"input": np.zeros((4, 3), np.float32), "labels": np.zeros(3, np.int64)}, "invalid_labels"),
        ({"input": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.float32)}, "invalid_labels"),
        ({"input": np.zeros((4, 3), np.float32), "labels": -np.ones(4, np.int64)}, "invalid_labels"),
        ({"input": np.full((2, 3), np.nan, np.float32)}, "non_finite_values"),
        ({"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)}, "invalid_dataset"),
        ({"input": np.array(["a", "b"])}, "invalid_dataset"),
        ({"labels": np.zeros(3, np.int64)}, "invalid_dataset"),
    ],
)
def test_inconsistent_datasets_are_refused(local_api: LocalApi, arrays: dict, code: str) -> None:
    expect_error(post_file(local_api, "datasets", "d.npz", npz_bytes(**arrays)), 422, code)
    assert_nothing_stored(local_api)


def test_dataset_that_is_not_npz_is_refused(local_api: LocalApi) -> None:
    expect_error(post_file(local_api, "datasets", "d.npz", b"just text"), 422, "invalid_dataset")
    expect_error(post_file(local_api, "datasets", "d.npz", b""), 422, "empty_file")
    assert_nothing_stored(local_api)


# ---------------------------------------------------------------- jobs


@pytest.fixture
def digits_model_id(local_api: LocalApi, digits: DigitsArtifacts) -> str:
    response = post_file(local_api, "models", "digits.onnx", digits.onnx_path.read_bytes())
    assert response.status_code == 201, response.text
    return response.json()["id"]


def upload_dataset(api: LocalApi, **arrays: np.ndarray) -> str:
    response = post_file(api, "datasets", "d.npz", npz_bytes(**arrays))
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
    return response.json()["id"]


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"input": np.zeros((2, 1, 32, 32), np.float64)}, "dtype float64, model expects float32"),
        ({"input": np.zeros((2, 32, 32), np.float32)}, "rank 3"),
        ({"input": np.zeros((2, 1, 28, 28), np.float32)}, "dim 2 is 28, model expects 32"),
        (
            {"image": np.zeros((2, 1, 32, 32), np.float32), "extra": np.zeros((2, 1), np.float32)},
            "missing array for model input 'input'",
        ),
    ],
)
def test_dataset_model_mismatch_is_caught_at_job_creation(
    local_api: LocalApi, digits_model_id: str, arrays: dict, fragment: str
) -> None:
    dataset_id = upload_dataset(local_api, **arrays)
    for role in ("calibration_dataset_id", "evaluation_dataset_id"):
        response = local_api.client.post("/v1/jobs", json={"model_id": digits_model_id, role: dataset_id})
        body = expect_error(response, 422, "dataset_mismatch")
        assert any(fragment in mismatch for mismatch in body["mismatches"]), body
    assert_nothing_stored(local_api, models=1, datasets=1)


def test_single_unnamed_array_binds_to_the_only_input(local_api: LocalApi, digits_model_id: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, np.zeros((2, 1, 32, 32), np.float32))  # stored as arr_0
    response = post_file(local_api, "datasets", "d.npz", buffer.getvalue())
    assert response.json()["arrays"] == {"arr_0": {"shape": [2, 1, 32, 32], "dtype": "float32"}}
    job = local_api.client.post(
        "/v1/jobs", json={"model_id": digits_model_id, "evaluation_dataset_id": response.json()["id"]}
    )
    assert job.status_code == 202, job.text


@pytest.mark.parametrize(
    "recipe",
    [
        {"targets": ["openvino-npu"]},
        {"precision": "int3"},
        {"batch_sizes": [0]},
        {"batch_sizes": []},
        {"targets": []},
        {"tragets": ["onnxruntime-cpu"]},
        {"measure": {"timed_runs": 0}},
    ],
)
def test_bad_recipes_are_refused(local_api: LocalApi, digits_model_id: str, recipe: dict) -> None:
    response = local_api.client.post("/v1/jobs", json={"model_id": digits_model_id, "recipe": recipe})
    body = expect_error(response, 422, "validation_error")
    assert body["errors"]
    assert_nothing_stored(local_api, models=1)


def test_unknown_target_names_the_known_ones(local_api: LocalApi, digits_model_id: str) -> None:
    response = local_api.client.post(
        "/v1/jobs", json={"model_id": digits_model_id, "recipe": {"targets": ["openvino-npu"]}}
    )
    assert "onnxruntime-cpu" in response.json()["detail"]


def test_static_batch_model_refuses_other_batch_sizes(local_api: LocalApi, digits: DigitsArtifacts) -> None:
    model = post_file(local_api, "models", "b1.onnx", digits.static_batch_onnx_path.read_bytes()).json()
    response = local_api.client.post(
        "/v1/jobs", json={"model_id": model["id"], "recipe": {"batch_sizes": [1, 8]}}
    )
    body = expect_error(response, 422, "invalid_recipe")
    assert "static batch dim of 1" in body["detail"]
    assert_nothing_stored(local_api, models=1)


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("get", "/v1/models/mdl_nope", "model_not_found"),
        ("get", "/v1/models/mdl_nope/download", "model_not_found"),
        ("delete", "/v1/models/mdl_nope", "model_not_found"),
        ("get", "/v1/datasets/ds_nope", "dataset_not_found"),
        ("delete", "/v1/datasets/ds_nope", "dataset_not_found"),
        ("get", "/v1/jobs/job_nope", "job_not_found"),
        ("post", "/v1/jobs/job_nope/cancel", "job_not_found"),
        ("get", "/v1/jobs/job_nope/report", "job_not_found"),
        ("get", "/v1/engines/eng_nope", "engine_not_found"),
        ("delete", "/v1/engines/eng_nope", "engine_not_found"),
        ("get", "/v1/nothing-here", "not_found"),
    ],
)
def test_unknown_ids_are_404(local_api: LocalApi, method: str, path: str, code: str) -> None:
    expect_error(getattr(local_api.client, method)(path), 404, code)


def test_job_with_unknown_model_or_dataset_is_404(local_api: LocalApi, digits_model_id: str) -> None:
    expect_error(local_api.client.post("/v1/jobs", json={"model_id": "mdl_nope"}), 404, "model_not_found")
    expect_error(
        local_api.client.post(
            "/v1/jobs", json={"model_id": digits_model_id, "evaluation_dataset_id": "ds_x"}
        ),
        404,
        "dataset_not_found",
    )
    assert_nothing_stored(local_api, models=1)


def test_oversized_body_without_content_length_is_cut_off(local_api: LocalApi) -> None:
    """A chunked upload declares no length: reading stops once the limit is passed."""
    limit = local_api.settings.max_upload_bytes
    sent = 0

    def chunks():
        nonlocal sent
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n\r\n'
        while sent < 3 * limit:
            sent += 256 * 1024
            yield b"\0" * (256 * 1024)

    response = local_api.client.post(
        "/v1/models", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    expect_error(response, 413, "upload_too_large")
    assert_nothing_stored(local_api)


def _damaged_zips() -> dict[str, bytes]:
    model = linear_model().SerializeToString()
    good = zip_bytes({"model.onnx": model})
    bad_crc = bytearray(good)
    offset = bytes(bad_crc).index(model[:8])
    bad_crc[offset] ^= 0xFF  # stored member: flip a byte of the data, the CRC no longer matches
    encrypted = bytearray(good)
    encrypted[6] |= 0x1  # general-purpose flag bit 0: encrypted (local header)
    central = bytes(encrypted).index(b"PK\x01\x02")
    encrypted[central + 8] |= 0x1  # and in the central directory
    weird_method = bytearray(good)
    for offset_of_method in (8, central + 10):
        weird_method[offset_of_method] = 99  # compression method 99 (AES): not supported
    return {
        "bad_crc": bytes(bad_crc),
        "encrypted": bytes(encrypted),
        "unsupported_method": bytes(weird_method),
        "file_and_dir": zip_bytes({"x": b"1", "x/model.onnx": model}),
        "dot_member": zip_bytes({".": b"1", "model.onnx": model}),
        "truncated": good[: len(good) // 2],
    }


@pytest.mark.parametrize("case", sorted(_damaged_zips()))
def test_damaged_bundles_are_422_not_500(local_api: LocalApi, case: str) -> None:
    response = post_file(local_api, "models", "bundle.zip", _damaged_zips()[case])
    assert response.status_code == 422, response.text
    assert response.json()["code"] in ("invalid_bundle", "archive_path_traversal", "invalid_model")
    assert_nothing_stored(local_api)


def test_symlink_member_is_refused(local_api: LocalApi) -> None:
    info = zipfile.ZipInfo("model.onnx")
    info.external_attr = 0o120777 << 16  # a symlink
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, "/etc/passwd")
    expect_error(post_file(local_api, "models", "b.zip", buffer.getvalue()), 422, "archive_path_traversal")
    assert_nothing_stored(local_api)


@pytest.mark.parametrize("filename", ["..", "a/..", ".", "...", "../../x.onnx"])
def test_hostile_upload_filenames_are_harmless(local_api: LocalApi, filename: str) -> None:
    response = local_api.client.post(
        "/v1/models", files={"file": (filename, linear_model().SerializeToString())}
    )
    assert response.status_code == 201, response.text
    assert ".." not in response.json()["filename"] and "/" not in response.json()["filename"]


def test_model_with_non_tensor_output_is_refused(local_api: LocalApi) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    body = expect_error(
        post_file(local_api, "models", "seq.onnx", model.SerializeToString()), 422, "unsupported_io_type"
    )
    assert "seq" in body["detail"]
    assert_nothing_stored(local_api)


def test_external_data_in_a_model_function_is_checked(local_api: LocalApi) -> None:
    """Tensors inside model-local functions are loaded by onnx too: their paths are checked."""
    constant = numpy_helper.from_array(np.ones(3, dtype=np.float32), "c")
    constant.ClearField("raw_data")
    constant.data_location = TensorProto.EXTERNAL
    constant.external_data.add(key="location", value="../../../../etc/hostname")
    function = helper.make_function(
        "local",
        "AddOnes",
        ["x"],
        ["y"],
        [helper.make_node("Constant", [], ["c"], value=constant), helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddOnes", ["x"], ["y"], domain="local")],
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    expect_error(
        post_file(local_api, "models", "f.onnx", model.SerializeToString()),
        422,
        "external_data_outside_upload",
    )
    assert_nothing_stored(local_api)


def test_truncated_npy_member_is_invalid_not_pickle(local_api: LocalApi) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((10, 3), np.float32))
    content = zip_bytes({"input.npy": buffer.getvalue()[:-20]})
    expect_error(post_file(local_api, "datasets", "d.npz", content), 422, "invalid_dataset")
    assert_nothing_stored(local_api)


def test_big_endian_arrays_are_read_in_native_order(local_api: LocalApi, digits_model_id: str) -> None:
    response = post_file(
        local_api, "datasets", "be.npz", npz_bytes(input=np.ones((2, 1, 32, 32), dtype=">f4"))
    )
    assert response.status_code == 201 and response.json()["arrays"]["input"]["dtype"] == "float32"
    from engines.ingest.datasets import read_npz

    stored = local_api.store.local_path(f"datasets/{response.json()['id']}/dataset.npz")
    array = read_npz(stored, max_unpacked_bytes=10**8)["input"]
    assert array.dtype == np.dtype("float32") and array.dtype.isnative and float(array.max()) == 1.0


def test_jobs_that_could_not_run_are_refused_up_front(local_api: LocalApi) -> None:
    static = linear_model()
    for value in (static.graph.input[0], static.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 8  # a static batch of 8
    static_id = post_file(local_api, "models", "b8.onnx", static.SerializeToString()).json()["id"]
    five = upload_dataset(local_api, x=np.ones((5, 4), np.float32))
    body = expect_error(
        local_api.client.post(
            "/v1/jobs",
            json={"model_id": static_id, "evaluation_dataset_id": five, "recipe": {"batch_sizes": [8]}},
        ),
        422,
        "invalid_recipe",
    )
    assert "5 samples, fewer than the model's static batch of 8" in body["detail"]

    dynamic = linear_model()
    dynamic.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    dynamic_id = post_file(local_api, "models", "dyn.onnx", dynamic.SerializeToString()).json()["id"]
    body = expect_error(
        local_api.client.post("/v1/jobs", json={"model_id": dynamic_id}), 422, "invalid_recipe"
    )
    assert "dynamic dims [1]" in body["detail"]
    assert_nothing_stored(local_api, models=2, datasets=1)


def test_inference_the_model_cannot_do_is_422(local_api: LocalApi) -> None:
    """Inputs that fit the signature, but a Reshape inside the model cannot take them."""
    from workers.job_runner import run_job_by_id

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_id = post_file(local_api, "models", "r.onnx", model.SerializeToString()).json()["id"]
    recipe = {"batch_sizes": [3], "measure": {"timed_runs": 1, "min_seconds": 0}}
    job_id = local_api.client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe}).json()["id"]
    run_job_by_id(local_api.settings, job_id)
    engine_id = local_api.client.get(f"/v1/jobs/{job_id}").json()["engine_ids"][0]
    infer = f"/v1/engines/{engine_id}/infer"
    ok = local_api.client.post(infer, json={"inputs": {"x": np.ones((3, 4)).tolist()}})
    assert ok.status_code == 200 and np.asarray(ok.json()["outputs"]["y"]).shape == (4, 3)
    bad = local_api.client.post(infer, json={"inputs": {"x": np.ones((1, 4)).tolist()}})
    expect_error(bad, 422, "inference_failed")


@pytest.mark.parametrize(
    ("recipe", "status", "code", "fragment"),
    [
        ({"prune": {"ratio": 1.0}}, 422, "validation_error", "ratio"),
        ({"prune": {"method": "obd"}}, 422, "validation_error", "method"),
        ({"prune": {"method": "slimming"}}, 422, "invalid_recipe", "no BatchNormalization"),
        ({"finetune": {"epochs": 1}}, 422, "invalid_recipe", "give a prune stage"),
        ({"prune": {"method": "l1"}, "finetune": {"epochs": 1}}, 422, "invalid_recipe", "calibration"),
        ({"prune": {"method": "taylor"}}, 422, "invalid_recipe", "taylor"),
    ],
)
def test_bad_pruning_recipes_are_refused(
    local_api: LocalApi, digits_model_id: str, recipe: dict, status: int, code: str, fragment: str
) -> None:
    body = expect_error(
        local_api.client.post("/v1/jobs", json={"model_id": digits_model_id, "recipe": recipe}), status, code
    )
    assert fragment in body["detail"], body
    assert_nothing_stored(local_api, models=1)


def test_pruning_a_model_the_converter_cannot_map_names_the_op(local_api: LocalApi) -> None:
    model = linear_model()
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model_id = post_file(local_api, "models", "custom.onnx", model.SerializeToString()).json()["id"]
    response = local_api.client.post(
        "/v1/jobs", json={"model_id": model_id, "recipe": {"prune": {"method": "l1"}}}
    )
    assert "Frobnicate" in expect_error(response, 422, "invalid_recipe")["detail"]
    no_analysis = local_api.client.post(
        "/v1/jobs",
        json={"model_id": model_id, "recipe": {"prune": {"ratios_from_sensitivity": {"max_drop": 0.01}}}},
    )
    expect_error(no_analysis, 409, "sensitivity_not_available")
    assert_nothing_stored(local_api, models=1)
