"""Nothing orphaned, the API's half: an API SIGKILLed while receiving, checking or storing an upload
leaves folders that name their owner and hold its lock, and the next start-up removes those whose
owner is gone (and the files stored without their row), but not those of live processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.core.scratch import LOCK_FILE, claim_folder, owner_of, remove_abandoned
from tests.api_server import ApiServer
from tests.big_archives import zeros_bundle, zeros_npz
from tests.conftest import REPO_ROOT

#: Claims a folder like an upload (or a staging step) does, writes into it, says where, and waits
#: to be killed. argv: parent folder, kind, owner.
HOLDER = """
import sys, time
from pathlib import Path
from app.core.scratch import claim_folder
folder = claim_folder(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
(folder.path / "part").write_bytes(b"x" * 4096)
print(folder.path, flush=True)
time.sleep(600)
"""


def hold(parent: Path, kind: str, owner: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(parent), kind, owner],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def old_upload_temp_files() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("optiforge-upload-")}


def test_a_folder_is_removed_once_its_process_is_gone_and_not_before(tmp_path: Path) -> None:
    """Two live processes hold a folder each; clean-up, in a third, takes neither until one dies."""
    first, first_path = hold(tmp_path, "upload", "upl_one")
    second, second_path = hold(tmp_path, "upload", "upl_two")
    try:
        assert owner_of(first_path) == "upl_one" and (first_path / LOCK_FILE).is_file()
        assert remove_abandoned(tmp_path, ("upload",)) == []
        kill(first)
        assert remove_abandoned(tmp_path, ("upload",)) == [first_path.name]
        assert not first_path.exists() and (second_path / "part").is_file()
    finally:
        kill(second)
    assert remove_abandoned(tmp_path, ("upload",)) == [second_path.name]
    assert list(tmp_path.iterdir()) == []


def test_folders_without_a_lock_and_other_kinds(tmp_path: Path) -> None:
    (tmp_path / "upload-upl_x-empty").mkdir()  # its owner died before locking it: nothing in it
    legacy = tmp_path / "upload-upl_y-legacy"  # made before folders had owners, maybe still in use
    legacy.mkdir()
    (legacy / "file").write_bytes(b"x")
    (tmp_path / "job-job_z-abc").mkdir()  # a worker's: not the API's to judge
    assert remove_abandoned(tmp_path, ("upload",)) == ["upload-upl_x-empty"]
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    assert remove_abandoned(tmp_path, ("upload",)) == [legacy.name]
    assert [path.name for path in tmp_path.iterdir()] == ["job-job_z-abc"]
    with claim_folder(tmp_path, "upload", "upl/../odd-owner") as folder:  # the owner cannot escape
        assert folder.path.parent == tmp_path and owner_of(folder.path) == "upl_.._odd_owner"
    assert [path.name for path in tmp_path.iterdir()] == ["job-job_z-abc"]


def _send_slowly(server: ApiServer, content: bytes, fraction: float) -> socket.socket:
    """Send `fraction` of a multipart upload of `content`, 64 KiB at a time, and leave it there."""
    boundary = secrets.token_hex(8)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    sock = server.connect()
    sock.sendall(
        f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
    )
    for start in range(0, int(len(body) * fraction), 64 * 1024):
        sock.sendall(body[start : start + 64 * 1024])
        time.sleep(0.002)
    return sock


def _post_in_background(server: ApiServer, kind: str, name: str, content: bytes) -> threading.Thread:
    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the API is killed under it
            httpx.post(f"{server.url}/v1/{kind}", files={"file": (name, content)}, timeout=120)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def _kill_once_checking(server: ApiServer) -> list[str]:
    """SIGKILL the API once an upload's scratch folder holds the whole upload (it is being checked);
    returns what was in the upload places at that moment."""
    deadline = time.monotonic() + 60
    scratch = server.data_dir / "scratch"
    while time.monotonic() < deadline:
        if any(scratch.glob("upload-*/bundle")) or any(scratch.glob("upload-*/upload/*.npz")):
            time.sleep(0.3)  # into the checks: unpacking or reading a 2 GiB archive takes seconds
            break
        time.sleep(0.01)
    else:
        pytest.fail("the upload never reached its checks")
    left = server.leftovers()
    server.kill()
    return left


#: The 2 GiB dataset these tests send holds 2 million rows: over the default sample cap, which
#: would refuse it before the checks these tests kill the API in.
MANY_SAMPLES = {"max_dataset_samples": str(10_000_000)}


def test_an_api_killed_mid_upload_leaves_nothing_after_its_next_start(tmp_path: Path) -> None:
    temp_before = old_upload_temp_files()
    server = ApiServer(tmp_path, **MANY_SAMPLES)
    server.start()
    try:
        # 1. killed while receiving the body (sent slowly): the framework's spool has no name.
        with _send_slowly(server, os.urandom(4 * 1024 * 1024), 0.5):
            time.sleep(0.3)
            server.kill()
        server.start()
        assert server.leftovers() == []

        # 2. killed while checking a model bundle (unpacking 2.1 GiB), and 3. a dataset (2 GiB).
        for kind, name, content in [
            ("models", "big.zip", zeros_bundle(2**31 + 100 * 1024 * 1024)),
            ("datasets", "big.npz", zeros_npz(2 * 1024**3)),
        ]:
            _post_in_background(server, kind, name, content)
            at_kill = _kill_once_checking(server)
            assert any(entry.startswith("scratch/upload-") for entry in at_kill), at_kill
            server.start()
            assert server.leftovers() == [], f"killed while checking {name}"

        # 4. killed while storing: the files moved into the store, the row not yet written. A
        # process that holds what an upload holds then (its scratch folder with the intent, a
        # staging folder of the store, the stored files) is SIGKILLed at that point.
        artifacts = server.data_dir / "artifacts"
        upload, upload_path = hold(server.data_dir / "scratch", "upload", "upl_storing")
        staging, staging_path = hold(artifacts / ".staging", "put", "models~mdl_half")
        intent = {"prefix": "models/mdl_half", "table": "models", "record_id": "mdl_half"}
        (upload_path / "storing.json").write_text(json.dumps(intent))
        (artifacts / "models" / "mdl_half").mkdir(parents=True)
        (artifacts / "models" / "mdl_half" / "model.onnx").write_bytes(b"half-stored")
        server.kill()
        server.start()  # both still alive: kept
        assert (upload_path / "storing.json").exists() and staging_path.exists()
        server.kill()
        kill(upload)
        kill(staging)
        server.start()
        assert server.leftovers() == []
        assert not (artifacts / "models" / "mdl_half").exists()  # no row: its files went too

        # The API still takes uploads, and keeps nothing of them in scratch or staging afterwards.
        response = httpx.post(f"{server.url}/v1/datasets", files={"file": ("d.npz", zeros_npz(4096))})
        assert response.status_code == 201, response.text
        assert server.leftovers() == []
    finally:
        server.stop()
    assert old_upload_temp_files() == temp_before  # nothing in the system temp folder either


def test_a_restarting_api_leaves_the_uploads_of_another_live_api_alone(tmp_path: Path) -> None:
    """Two API processes on one data dir: one restarts while the other checks a 2 GiB dataset."""
    busy, restarting = ApiServer(tmp_path / "a", **MANY_SAMPLES), ApiServer(tmp_path / "b", **MANY_SAMPLES)
    restarting.env["OPTIFORGE_DATA_DIR"] = busy.env["OPTIFORGE_DATA_DIR"]
    restarting.data_dir = busy.data_dir
    busy.start()
    restarting.start()
    try:
        results: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: results.append(
                httpx.post(
                    f"{busy.url}/v1/datasets",
                    files={"file": ("big.npz", zeros_npz(2 * 1024**3))},
                    timeout=300,
                )
            )
        )
        thread.start()
        deadline = time.monotonic() + 60
        while not any((busy.data_dir / "scratch").glob("upload-*/upload/*.npz")):
            assert time.monotonic() < deadline, "the upload never reached its checks"
            time.sleep(0.01)
        restarting.kill()
        restarting.start()  # its start-up clean-up runs while the other API checks the upload
        thread.join()
        assert results[0].status_code == 201, results[0].text
        assert busy.leftovers() == []
    finally:
        busy.stop()
        restarting.stop()
