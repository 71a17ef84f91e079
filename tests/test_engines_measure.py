"""The measurement harness and report, used as a plain library (as a notebook or bench/ would)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.backends.registry import get_backend
from engines.errors import BackendUnavailableError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.measure.accuracy import classification_accuracy, fidelity
from engines.measure.latency import MeasureConfig, measure_latency
from engines.measure.report import render_markdown, report_row
from engines.pipeline import run_recipe
from engines.recipe import Recipe
from tests.conftest import DigitsArtifacts


def test_accuracy_and_fidelity_math() -> None:
    logits = np.array([[0.1, 0.9, 0, 0, 0, 0], [0.8, 0.1, 0, 0, 0, 0.5], [0, 0, 0, 0, 1, 2]])
    labels = np.array([1, 5, 4])
    assert classification_accuracy(logits, labels) == {"top1": pytest.approx(1 / 3), "top5": 1.0}
    same = fidelity(logits, logits)
    assert same["top1_agreement"] == 1.0 and same["cosine_similarity"] == pytest.approx(1.0)
    assert same["max_abs_error"] == 0.0
    flipped = fidelity(-logits, logits)
    assert flipped["cosine_similarity"] == pytest.approx(-1.0) and flipped["top1_agreement"] < 1


def test_side_by_side_latency_respects_runs_and_time(digits: DigitsArtifacts) -> None:
    backend = get_backend("onnxruntime-cpu")
    runner = backend.load(digits.onnx_path, backend.options(threads=1))
    config = MeasureConfig(warmup_runs=1, timed_runs=7, min_seconds=0.05, threads=1)
    stats = measure_latency({"a": runner, "b": runner}, (1, 2), config)
    for name in ("a", "b"):
        for size in ("1", "2"):
            row = stats[name][size]
            assert row["runs"] >= 7 and row["runs"] * row["mean_ms"] >= 50 * 0.9
            assert row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]


def test_pipeline_as_a_library(digits: DigitsArtifacts, tmp_path: Path) -> None:
    evaluation = Dataset(inputs={"input": digits.split.test_x[:64]}, labels=digits.split.test_y[:64])
    recipe = Recipe(batch_sizes=(1, 8), measure=MeasureConfig(warmup_runs=1, timed_runs=5, min_seconds=0))
    stages: list[str] = []
    result = run_recipe(
        digits.onnx_path,
        recipe,
        tmp_path,
        evaluation=evaluation,
        progress=lambda fraction, stage: stages.append(stage),
    )
    assert stages[-1] == "done" and any("measuring" in stage for stage in stages)
    (engine,) = result.engines
    assert engine.artifact.path.is_file() and engine.comparison["top1_delta"] == 0.0
    rows = [
        report_row("digits", "original", result.baseline.to_dict(), None),
        report_row("digits", "ort", {**engine.measurement.to_dict()}, engine.comparison),
    ]
    table = render_markdown(rows, result.baseline.hardware)
    assert table.count("\n| digits |") == 2 and "Speedup (b=8)" in table and "threads" in table


def test_static_batch_and_unknown_backend_are_clear_errors(digits: DigitsArtifacts, tmp_path: Path) -> None:
    with pytest.raises(InvalidRecipeError, match="static batch dim of 1"):
        run_recipe(digits.static_batch_onnx_path, Recipe(batch_sizes=(1, 4)), tmp_path)
    with pytest.raises(BackendUnavailableError, match="not available on this node"):
        get_backend("tensorrt-on-a-toaster")
