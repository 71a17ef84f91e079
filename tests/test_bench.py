"""The benchmark runs end to end (a quick smoke run: its figures are not the README's)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.run import main


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
