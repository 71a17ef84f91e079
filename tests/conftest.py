"""Shared fixtures: a real digits CNN, in-process API clients, and live service stacks.

Two live stacks run the same end-to-end tests over real HTTP:
- `embedded`: `optiforge serve` alone (SQLite, filesystem broker, worker started beside the API);
- `postgres-redis`: `optiforge serve --no-worker` plus `optiforge worker`, on PostgreSQL and Redis.
PostgreSQL and Redis tests skip when those servers are unreachable, unless
OPTIFORGE_REQUIRE_SERVICES=1 (as in CI), where they fail instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.db import get_sessionmaker
from app.core.migrate import upgrade
from app.core.orm import (
    DEFAULT_PROJECT,
    EngineRecord,
    JobKind,
    JobRecord,
    JobStatus,
    ModelRecord,
    utcnow,
)
from app.core.settings import Settings
from app.core.store import ArtifactStore, LocalArtifactStore
from app.main import create_app
from bench import processes as bench_processes
from engines.ingest.datasets import Dataset
from examples import digits as digits_model
from tests.trained_graphs import depthwise_digits  # noqa: F401 - a session fixture shared by several files

# Starlette's test client sends `Host: testserver`; a server with no API key (most tests) answers
# loopback names only, and this one (app.api.middleware.auth).
os.environ.setdefault("OPTIFORGE_OPEN_HOSTS", "testserver")
# ... and its socket peer is "testclient", not a loopback address: a server with no key answers
# loopback peers only, and this one.
os.environ.setdefault("OPTIFORGE_OPEN_PEERS", "testclient")

POSTGRES_URL = os.environ.get(
    "OPTIFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("OPTIFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("OPTIFORGE_REQUIRE_SERVICES") == "1"
REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_LEASE_S = 5
#: A measurement that only proves the path works (timings are the benchmarks' business).
QUICK_MEASURE = {"warmup_runs": 1, "timed_runs": 3, "min_seconds": 0}


@dataclass(frozen=True)
class DigitsArtifacts:
    onnx_path: Path
    static_batch_onnx_path: Path
    bn_onnx_path: Path  # BatchNorm kept, as Network Slimming needs
    split: digits_model.DigitsSplit
    torch_test_logits: np.ndarray
    eval_npz: Path  # test split with labels
    eval_unlabeled_npz: Path  # test split without labels
    calib_npz: Path  # part of the training split, no labels


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsArtifacts:
    """Train the digits CNN once per session and export it to ONNX."""
    root = tmp_path_factory.mktemp("digits")
    split = digits_model.load_digits_split()
    model = digits_model.train_cnn(split)
    eval_npz, unlabeled, calib = root / "eval.npz", root / "eval_unlabeled.npz", root / "calib.npz"
    np.savez(eval_npz, input=split.test_x, labels=split.test_y)
    np.savez(unlabeled, input=split.test_x)
    np.savez(calib, input=split.train_x[:256])
    return DigitsArtifacts(
        onnx_path=digits_model.export_onnx(model, root / "digits.onnx"),
        static_batch_onnx_path=digits_model.export_onnx(model, root / "digits_b1.onnx", dynamic_batch=False),
        bn_onnx_path=digits_model.export_onnx(model, root / "digits_bn.onnx", keep_batchnorm=True),
        split=split,
        torch_test_logits=digits_model.predict(model, split.test_x),
        eval_npz=eval_npz,
        eval_unlabeled_npz=unlabeled,
        calib_npz=calib,
    )


@pytest.fixture(scope="session")
def evaluation(digits: DigitsArtifacts) -> Dataset:
    """The digits test split with labels, as the engines library takes it."""
    return Dataset({"input": digits.split.test_x}, digits.split.test_y)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, broker_url=None, database_url=None, **overrides)


@dataclass
class LocalApi:
    """An in-process API on SQLite with its store, for tests that check what is (not) stored."""

    client: TestClient
    settings: Settings
    store: LocalArtifactStore


@pytest.fixture
def local_api(tmp_path: Path) -> Iterator[LocalApi]:
    settings = make_settings(tmp_path / "data", max_upload_bytes=4 * 1024 * 1024)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield LocalApi(client, settings, app.state.store)


# ---------------------------------------------------------------- live stacks over real HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _service_reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (OPTIFORGE_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """bench.processes.start_moto, failing the test when the server does not start."""
    try:
        return bench_processes.start_moto(env)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@dataclass
class LiveStack:
    name: str
    base_url: str
    env: dict[str, str]
    data_dir: Path
    processes: list[subprocess.Popen]
    logs: list[Path]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)

    def job_files(self, job_id: str) -> list[Path]:
        root = self.data_dir / "artifacts" / "jobs" / job_id
        return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - closed with the process at teardown
    return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def _wait_ready(stack: LiveStack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process, log in zip(stack.processes, stack.logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"{stack.name}: a process exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{stack.base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(
        f"{stack.name} did not become ready:\n" + "\n".join(log.read_text()[-2000:] for log in stack.logs)
    )


def _stop(stack: LiveStack) -> None:
    for process in stack.processes:
        if process.poll() is None:
            process.terminate()
    for process in stack.processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def api_process(
    port: int, env: dict[str, str], log: Path, preexec_fn: Callable[[], None] | None = None
) -> Iterator[subprocess.Popen]:
    """`optiforge serve --no-worker` on `port` with `env` (its output in `log`), yielded once
    /healthz answers (a test of a failing database or a full disk cannot wait for /readyz);
    terminated at the end. `preexec_fn` runs in the child first (a lower descriptor limit)."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*_optiforge(), "serve", "--no-worker", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            preexec_fn=preexec_fn,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()[-4000:]
            with suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def another_replica(stack: LiveStack, log: Path) -> Iterator[str]:
    """One more API process on `stack`'s database, broker and data directory (a second replica
    behind the same load balancer), yielded as its base URL once /healthz answers."""
    port = free_port()
    with api_process(port, stack.env, log):
        yield f"http://127.0.0.1:{port}"


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPTIFORGE_", "REDIS_URL"))}
    env["OPTIFORGE_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    # Short leases so the tests that kill a worker see its job recovered within seconds.
    env["OPTIFORGE_JOB_LEASE_S"] = str(JOB_LEASE_S)
    env["OPTIFORGE_JOB_SWEEP_INTERVAL_S"] = "1"
    # A wake-up can be lost when a test kills a worker (seen once in the embedded stack: the next
    # job's message arrived only with the sweeper's re-send, after its test's 180 s wait); re-send
    # within the tests' waits. The service's default stays 300 s.
    env["OPTIFORGE_QUEUE_REPUBLISH_S"] = "30"
    return env


def _optiforge() -> list[str]:
    return [sys.executable, "-m", "app.cli"]


@contextmanager
def _embedded(root: Path, extra_env: Mapping[str, str]) -> Iterator[LiveStack]:
    """`optiforge serve` on the embedded defaults: the README's first command, minus the install."""
    data_dir = root / "data"
    port = free_port()
    env = {**_base_env(data_dir), **extra_env}
    log = root / "serve.log"
    process = _start([*_optiforge(), "serve", "--port", str(port)], env, log)
    stack = LiveStack("embedded", f"http://127.0.0.1:{port}", env, data_dir, [process], [log])
    try:
        _wait_ready(stack)
        yield stack
    finally:
        _stop(stack)


@contextmanager
def _postgres_redis(root: Path, extra_env: Mapping[str, str]) -> Iterator[LiveStack]:
    """API and a separate worker on a fresh PostgreSQL database and a Redis broker."""
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    admin_url = make_url(POSTGRES_URL)
    redis_url = make_url(REDIS_URL.replace("redis://", "redis+x://"))  # parsed for host/port only
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    require_service("Redis", redis_url.host or "127.0.0.1", redis_url.port or 6379)
    db_name = f"optiforge_test_{secrets.token_hex(4)}"
    conninfo = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{db_name}"')
    data_dir = root / "data"
    env = _base_env(data_dir)
    env["OPTIFORGE_DATABASE_URL"] = admin_url.set(database=db_name).render_as_string(hide_password=False)
    env["OPTIFORGE_BROKER_URL"] = REDIS_URL
    env["OPTIFORGE_QUEUE_PREFIX"] = f"test-{secrets.token_hex(4)}-"
    env.update(extra_env)
    port = free_port()
    logs = [root / "api.log", root / "worker.log"]
    processes: list[subprocess.Popen] = []
    try:
        subprocess.run([*_optiforge(), "migrate"], env=env, check=True, cwd=REPO_ROOT, capture_output=True)
        processes += [
            _start([*_optiforge(), "serve", "--no-worker", "--port", str(port)], env, logs[0]),
            _start([*_optiforge(), "worker", "--queues", "cpu"], env, logs[1]),
        ]
        stack = LiveStack("postgres-redis", f"http://127.0.0.1:{port}", env, data_dir, processes, logs)
        _wait_ready(stack)
        yield stack
    finally:
        _stop(LiveStack("postgres-redis", "", env, data_dir, processes, logs))
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{env['OPTIFORGE_QUEUE_PREFIX']}*"):
            client.delete(key)


#: The kinds of live stack, by name: what `start_stack` starts.
STACK_KINDS = {"embedded": _embedded, "postgres-redis": _postgres_redis}


def start_stack(kind: str, root: Path, **extra_env: str) -> AbstractContextManager[LiveStack]:
    """A live stack of `kind` (a STACK_KINDS name) in `root`, its processes started with `extra_env`
    over the base environment, stopped (and its database dropped) when the context ends: for tests
    that need a stack of their own, e.g. one with an API key (`OPTIFORGE_BOOTSTRAP_API_KEY`), which
    the shared open stacks below can never be (the first key closes a stack for good)."""
    return STACK_KINDS[kind](root, extra_env)


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """The shared open embedded stack (`_embedded`)."""
    with start_stack("embedded", tmp_path_factory.mktemp("embedded")) as stack:
        yield stack


@pytest.fixture(scope="session")
def postgres_redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """The shared open PostgreSQL + Redis stack (`_postgres_redis`)."""
    with start_stack("postgres-redis", tmp_path_factory.mktemp("pgredis")) as stack:
        yield stack


@pytest.fixture(scope="session", params=["embedded", "postgres-redis"])
def live_stack(request: pytest.FixtureRequest) -> LiveStack:
    fixture = "embedded_stack" if request.param == "embedded" else "postgres_redis_stack"
    return request.getfixturevalue(fixture)


def stored_fp32_engine(
    store: ArtifactStore,
    database_url: str,
    model_id: str,
    *,
    project_id: str = DEFAULT_PROJECT,
    evaluation_dataset_id: str | None = None,
    metrics: dict | None = None,
) -> tuple[str, str]:
    """A succeeded job and its fp32 ONNX Runtime engine (the uploaded model's own file), stored as
    a worker stores them: an engine to serve without running a job. Returns (job id, engine id)."""
    with get_sessionmaker(database_url)() as session:
        job = JobRecord(
            project_id=project_id,
            model_id=model_id,
            kind=JobKind.OPTIMIZE,
            evaluation_dataset_id=evaluation_dataset_id,
            recipe={},
            messages=[],
            status=JobStatus.SUCCEEDED,
            stage="done",
            progress=1.0,
            baseline={"hardware": {}},
            finished_at=utcnow(),
        )
        session.add(job)
        session.commit()
        model_dir = store.local_path(f"models/{model_id}")
        staging = model_dir.parent / f"engine-staging-{job.id}"
        shutil.copytree(model_dir, staging)
        prefix = f"jobs/{job.id}/engines/eng"
        store.put_dir(prefix, staging, move=True)
        engine = EngineRecord(
            project_id=project_id,
            job_id=job.id,
            model_id=model_id,
            backend="onnxruntime-cpu",
            precision="fp32",
            artifact_prefix=prefix,
            engine_file="model.onnx",
            size_bytes=1,
            build_seconds=0.0,
            hardware={},
            metrics=metrics or {},
            build_info={},
        )
        session.add(engine)
        session.commit()
        return job.id, engine.id


def placeholder_model(session, artifact_prefix: str = "models/m") -> ModelRecord:
    """A model row with no file behind it, in the default project, for tests of job bookkeeping
    (sweepers, scratch clean-up) that never read the model."""
    model = ModelRecord(
        project_id=DEFAULT_PROJECT,
        name="m",
        filename="m.onnx",
        sha256="0" * 64,
        size_bytes=1,
        artifact_prefix=artifact_prefix,
        info={},
    )
    session.add(model)
    session.flush()
    return model


def wait_for_job(client: httpx.Client | TestClient, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")
