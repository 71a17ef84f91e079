"""The benchmark runs end to end (a quick smoke run: its figures are not the README's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.run import main
from tests.conftest import POSTGRES_URL, require_service


def test_bench_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    assert main(["--quick", "--models", "digits", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    engines = [row["engine"] for row in results["rows"]]
    assert engines == [
        "pytorch eager",
        "onnxruntime",
        "onnxruntime int8 (minmax)",
        "onnxruntime int8 (entropy)",
        "onnxruntime int8 (percentile)",
    ]
    assert all(row["top1"] > 0.95 for row in results["rows"])
    assert results["hardware"]["cpu_model"] and results["hardware"]["threads"] >= 1
    assert "| digits | onnxruntime int8 (entropy) |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "latency_vs_accuracy.png").stat().st_size > 10_000


def test_prune_bench_quick_run(tmp_path: Path) -> None:
    from bench.prune import main as prune_main

    assert prune_main(["--quick", "--models", "digits", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "prune_results.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == ["original fp32", "original int8", "pruned fp32", "pruned int8"]
    assert rows[2]["macs"] * 2 <= rows[0]["macs"] and rows[2]["top1"] > 0.8
    assert "| digits | pruned int8 |" in (tmp_path / "prune_results.md").read_text()


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
