"""Runners have a lifecycle (activate, deactivate), validate their feeds, and the pool honours it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.serving.pool import EnginePool, LoadedEngine
from engines.backends.onnxruntime_cpu import OnnxRuntimeCpuBackend, OnnxRuntimeLoadOptions, OnnxRuntimeRunner
from engines.errors import EngineError, InvalidInputError
from tests import quirk_graphs


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quirk_graphs.scalar_weight(tmp_path_factory.mktemp("lifecycle") / "model.onnx")


def _x(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.ones((batch, 8), np.float32)}


def test_a_runner_is_active_after_load_validates_and_can_be_deactivated(model: Path) -> None:
    backend = OnnxRuntimeCpuBackend()
    runner = backend.load(model, backend.options(threads=1, unknown_knob=True))  # unknown knobs ignored
    assert runner.active and runner.infer(_x())["y"].shape == (2, 4)
    with pytest.raises(InvalidInputError, match="dim 1 is 3"):
        runner.infer({"x": np.ones((2, 3), np.float32)})
    runner.deactivate()
    with pytest.raises(EngineError) as caught:
        runner.infer(_x())
    assert caught.value.code == "runner_inactive"
    with runner:  # a context manager too: active inside, given back after
        assert runner.infer(_x())["y"].shape == (2, 4)
    assert not runner.active


def test_the_pool_deactivates_what_it_evicts(model: Path, tmp_path: Path) -> None:
    other = quirk_graphs.row_vector_bias(tmp_path / "other.onnx")
    pool = EnginePool(max_engines=1, threads=1)
    first = pool.get("eng_a", "onnxruntime-cpu", model, None)
    pool.get("eng_b", "onnxruntime-cpu", other, None)
    assert not first.runner.active and pool.loads == 2 and pool.evictions == 1


class _SlowRunner(OnnxRuntimeRunner):
    """ONNX Runtime, slowed down and watched: how many calls run at once."""

    max_concurrency = 1

    def __init__(self, path: Path):
        super().__init__(path, OnnxRuntimeLoadOptions(threads=1))
        self.running = self.most = 0
        self._count = threading.Lock()

    def _infer(self, feeds):
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        try:
            return super()._infer(feeds)
        finally:
            with self._count:
                self.running -= 1


def test_max_concurrency_is_honoured_and_eviction_waits_for_running_requests(model: Path) -> None:
    runner = _SlowRunner(model).activate()
    engine = LoadedEngine("eng_slow", runner, footprint_bytes=1)
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.infer(_x()).batch_size)) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.02)
    engine.close()  # evicted while requests run: they finish, then the runner is given back
    assert runner.active
    for thread in threads:
        thread.join()
    assert results == [2] * 6 and runner.most == 1
    assert not runner.active
