"""Models of 2 GiB or more (a bundle: one .onnx plus external data) are stored and validated
without serializing the whole proto: checked on the path, weights kept external and gathered file
to file. The weights here are sparse files and deflated zeros, so 2.1 GiB costs megabytes of disk
and upload, and the test seconds."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from app.api.zip_stream import iter_zip
from engines.ingest.model import (
    EXTERNAL_DATA_FILENAME,
    MODEL_FILENAME,
    PROTOBUF_LIMIT_BYTES,
    inspect_model,
    unpack_upload,
    write_normalized,
)
from tests.api_server import ApiServer
from tests.big_archives import gather_model, zeros_bundle
from tests.conftest import LocalApi
from tests.test_bad_input import post_file, zip_bytes

MIB = 1024 * 1024
BIG = (PROTOBUF_LIMIT_BYTES + 100 * MIB) // 4 * 4  # float32 weights over what one protobuf message holds


def disk_bytes(root: Path) -> int:
    """What the files under `root` take on disk (holes take nothing)."""
    return sum(path.stat().st_blocks * 512 for path in root.rglob("*") if path.is_file())


def two_file_model(folder: Path) -> Path:
    """y = x @ A + B, with A in a.bin and B in b.bin (at an offset, after a few unused bytes)."""
    a = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "A")
    b = numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32), "B")
    (folder / "a.bin").write_bytes(a.raw_data)
    (folder / "b.bin").write_bytes(b"\x07" * 5 + b.raw_data)
    for tensor, location, offset in ((a, "a.bin", 0), (b, "b.bin", 5)):
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
        tensor.external_data.add(key="offset", value=str(offset))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "two-files",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[a, b],
    )
    path = folder / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weights_kept_external_are_gathered_file_to_file(tmp_path: Path) -> None:
    """The path a 2 GiB model takes, forced on a small one: the graph is written alone, the weights
    of both files gathered into model.onnx.data, and the model computes what it did."""
    source = tmp_path / "upload"
    source.mkdir()
    original = two_file_model(source)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    written = write_normalized(original, tmp_path / "out", keep_external_from=0)
    assert [path.name for path in written] == [MODEL_FILENAME, EXTERNAL_DATA_FILENAME]
    stored = onnx.load(str(written[0]), load_external_data=False)
    locations = {
        tensor.name: {entry.key: entry.value for entry in tensor.external_data}
        for tensor in stored.graph.initializer
    }
    assert {entries["location"] for entries in locations.values()} == {EXTERNAL_DATA_FILENAME}
    assert all(int(entries["offset"]) % (64 * 1024) in (0, 5) for entries in locations.values())
    np.testing.assert_allclose(run(written[0], x), run(original, x))
    onnx.checker.check_model(str(written[0]), full_check=True)


def test_one_data_file_is_linked_not_copied(tmp_path: Path) -> None:
    source = tmp_path / "upload"
    source.mkdir()
    onnx.save_model(gather_model(1024), str(source / "model.onnx"))
    (source / "weights.bin").write_bytes(np.arange(1024, dtype=np.float32).tobytes())
    written = write_normalized(source / "model.onnx", tmp_path / "out", keep_external_from=0)
    assert os.path.samefile(written[1], source / "weights.bin")  # the same blocks: no second copy
    y = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"]).run(
        None, {"idx": np.array([[0, 1, 2, 1023]], np.int64)}
    )[0]
    np.testing.assert_array_equal(y, [[0, 1, 2, 1023]])


def test_a_model_under_2gib_is_still_one_self_contained_file(local_api: LocalApi, tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    original = two_file_model(folder)
    written = write_normalized(original, tmp_path / "out")
    assert [path.name for path in written] == [MODEL_FILENAME]
    stored = onnx.load(str(written[0]), load_external_data=False)
    assert all(tensor.data_location != TensorProto.EXTERNAL for tensor in stored.graph.initializer)
    content = zip_bytes({name: (folder / name).read_bytes() for name in ("model.onnx", "a.bin", "b.bin")})
    response = post_file(local_api, "models", "two.zip", content)
    assert response.status_code == 201, response.text
    assert response.json()["external_data"] is True
    assert local_api.client.get(f"/v1/models/{response.json()['id']}/download").headers["content-type"] == (
        "application/octet-stream"
    )


def test_a_bundle_unpacks_with_its_zeros_as_holes(tmp_path: Path) -> None:
    bundle = tmp_path / "b.zip"
    bundle.write_bytes(zeros_bundle(256 * MIB))
    onnx_path = unpack_upload(bundle, tmp_path / "bundle", max_unpacked_bytes=10**9)
    weights = onnx_path.parent / "weights.bin"
    assert weights.stat().st_size == 256 * MIB and disk_bytes(tmp_path / "bundle") < 4 * MIB
    info = inspect_model(onnx_path, scratch_dir=tmp_path)
    assert info.external_data and info.parameters == 64 * MIB
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.zip", "bundle"]  # no inference file left


def test_a_bundle_over_2gib_is_stored_checked_and_downloaded(tmp_path: Path) -> None:
    content = zeros_bundle(BIG)
    assert len(content) < 4 * MIB
    server = ApiServer(tmp_path)
    server.start()
    try:
        server.reset_peak()
        before, started = server.rss_mib(), time.monotonic()
        response = httpx.post(f"{server.url}/v1/models", files={"file": ("big.zip", content)}, timeout=300)
        upload_s, peak = time.monotonic() - started, server.peak_mib()
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["external_data"] is True and body["parameters"] == BIG // 4
        assert body["inputs"][0]["name"] == "idx" and body["outputs"][0]["shape"] == ["batch", 4]
        stored = server.data_dir / "artifacts" / "models" / body["id"]
        assert sorted(path.name for path in stored.iterdir()) == [MODEL_FILENAME, EXTERNAL_DATA_FILENAME]
        assert (stored / EXTERNAL_DATA_FILENAME).stat().st_size == BIG
        onnx.checker.check_model(str(stored / MODEL_FILENAME), full_check=True)
        assert disk_bytes(server.data_dir) < 64 * MIB  # 2.1 GiB of holes, stored once
        assert server.leftovers() == []

        started = time.monotonic()
        download = tmp_path / "download.zip"
        with httpx.stream("GET", f"{server.url}/v1/models/{body['id']}/download", timeout=300) as streamed:
            assert streamed.status_code == 200 and streamed.headers["content-type"] == "application/zip"
            with open(download, "wb") as out:  # zeros as holes, as the server wrote them
                for chunk in streamed.iter_bytes(MIB):
                    if chunk.count(0) == len(chunk):
                        out.seek(len(chunk), os.SEEK_CUR)
                    else:
                        out.write(chunk)
                out.truncate(out.tell())
        download_s = time.monotonic() - started
        with zipfile.ZipFile(download) as archive:
            sizes = {info.filename: info.file_size for info in archive.infolist()}
            graph = onnx.load_model_from_string(archive.read(MODEL_FILENAME))
            with archive.open(EXTERNAL_DATA_FILENAME) as data:
                assert data.read(MIB) == bytes(MIB)
        assert sizes == {
            MODEL_FILENAME: (stored / MODEL_FILENAME).stat().st_size,
            EXTERNAL_DATA_FILENAME: BIG,
        }
        assert graph.graph.initializer[0].external_data[0].value == EXTERNAL_DATA_FILENAME
        print(
            f"\n2.1 GiB bundle ({len(content) / MIB:.1f} MB zip): upload {upload_s:.1f} s, API peak RSS "
            f"{peak:.0f} MiB ({before:.0f} before); download as a streamed zip {download_s:.1f} s"
        )
        assert peak - before < 512
        assert server.leftovers() == []
    finally:
        server.stop()


def test_a_2gib_bundle_that_reads_past_its_data_is_refused(local_api: LocalApi, tmp_path: Path) -> None:
    """Weights kept external are checked against their file, as loading them would have."""
    model = gather_model(BIG // 4)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.onnx", model.SerializeToString())
        archive.writestr("weights.bin", b"\0" * 1024)  # the model claims 2.1 GiB of it
    response = post_file(local_api, "models", "short.zip", buffer.getvalue())
    assert response.status_code == 422, response.text
    assert "weights.bin" in response.json()["detail"] and "/" not in response.json()["detail"]


def test_a_zip_built_while_sent_reads_back(tmp_path: Path) -> None:
    """What the download of a model over 2 GiB sends, on small files: any zip reader takes it."""
    files = [tmp_path / MODEL_FILENAME, tmp_path / EXTERNAL_DATA_FILENAME]
    files[0].write_bytes(b"graph" * 1000)
    files[1].write_bytes(os.urandom(3 * MIB + 17))
    zipped = tmp_path / "model.zip"
    zipped.write_bytes(b"".join(iter_zip(files, chunk_bytes=MIB)))
    with zipfile.ZipFile(zipped) as archive:
        assert archive.testzip() is None  # every CRC checks
        assert {name: archive.read(name) for name in archive.namelist()} == {
            path.name: path.read_bytes() for path in files
        }
    if shutil.which("unzip"):
        listing = subprocess.run(["unzip", "-t", str(zipped)], capture_output=True, text=True)
        assert listing.returncode == 0 and "No errors detected" in listing.stdout, listing.stdout
