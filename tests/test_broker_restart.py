"""Jobs are never lost: a broker that restarts without persistence loses every queued message, and
the sweeper sends each still-queued job again. A real redis-server, started by the test on its own
port, a real worker process, real jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.migrate import upgrade
from app.main import create_app
from bench.processes import start_redis as _redis
from tests.conftest import REPO_ROOT, DigitsArtifacts, free_port, make_settings, wait_for_job


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_queued_jobs_survive_a_broker_restart(digits: DigitsArtifacts, tmp_path: Path) -> None:
    port = free_port()
    redis = _redis(port, tmp_path)
    overrides = {"queue_republish_s": 2, "job_sweep_interval_s": 1, "queue_prefix": f"restart-{port}-"}
    settings = make_settings(tmp_path / "data", **overrides)
    settings = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    worker = None
    try:
        with TestClient(create_app(settings)) as client:
            with digits.onnx_path.open("rb") as handle:
                model = client.post("/v1/models", files={"file": ("digits.onnx", handle)}).json()
            recipe = {"batch_sizes": [1], "measure": {"warmup_runs": 1, "timed_runs": 2, "min_seconds": 0}}
            jobs = [
                client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe}).json()
                for _ in range(10)
            ]
            assert all(job["status"] == "queued" for job in jobs)

            redis.kill()  # every queued message is gone with it
            redis.wait()
            redis = _redis(port, tmp_path)
            env = {key: value for key, value in os.environ.items() if not key.startswith("OPTIFORGE_")}
            env.update({
                "OPTIFORGE_DATA_DIR": str(settings.data_dir), "OPTIFORGE_BROKER_URL": settings.broker_url,
                "OPTIFORGE_QUEUE_REPUBLISH_S": "2", "OPTIFORGE_JOB_SWEEP_INTERVAL_S": "1",
                "OPTIFORGE_QUEUE_PREFIX": overrides["queue_prefix"], "PYTHONUNBUFFERED": "1",
            })  # fmt: skip
            worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--queues", "cpu", "--loglevel", "WARNING"],
                env=env, cwd=REPO_ROOT, stdout=(tmp_path / "worker.log").open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            finished = [wait_for_job(client, job["id"], timeout=240) for job in jobs]
            assert [job["status"] for job in finished] == ["succeeded"] * 10, (
                tmp_path / "worker.log"
            ).read_text()[-2000:]
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        redis.kill()
        redis.wait()
