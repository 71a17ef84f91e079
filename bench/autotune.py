"""The auto-optimize table: what the search chooses within an accuracy budget, against the original,
PyTorch eager and the best recipes written by hand, all timed side by side in one run.

    make bench-autotune             # or: .venv/bin/python -m bench.autotune [--quick] [--models ...]

Per network: the digits CNN (trained on real data) with a 0.5-point top-1 budget; ResNet-18,
ResNet-50 and MobileNetV2 (random weights, so the budget is 1 % of fidelity to the original's
outputs) — each searched by `engines.search.autotune` with the objective latency at batch 8 and
`--time-budget` minutes. Then the chosen engine, the original on ONNX Runtime fp32, PyTorch eager
fp32 and two hand recipes (INT8 minmax; structured L1 pruning at 0.5 then INT8, recovered by
distillation where there is training data) are timed side by side, with each one's accuracy drop
on the same evaluation set. Writes autotune.json and autotune.md to --out, and prints the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import TorchEagerRunner
from engines.backends.base import CompileOptions, Runner
from engines.backends.registry import get_backend
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.measure.accuracy import run_dataset
from engines.measure.latency import MeasureConfig, measure_latency
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig
from engines.prune.stage import run_prune_stage
from engines.quantize.budget import score_outputs
from engines.recipe import Recipe
from engines.search.autotune import AutotuneRequest, autotune
from engines.search.space import Budget, Objective, SearchSpace
from engines.variants import build_variant
from examples.digits import export_onnx

ORT = "onnxruntime-cpu"
BATCH = 8


def _int8_runner(source: Path, calibration: Dataset, workdir: Path) -> Runner:
    backend = get_backend(ORT)
    variant = build_variant(
        source,
        Recipe(precision="int8"),
        "cpu",
        workdir,
        calibration=calibration,
        evaluation=None,
        batch_size=16,
    )
    artifact = backend.compile(variant.path, workdir / "engine", CompileOptions(precision="int8"))
    return backend.load(artifact.path, backend.options())


def hand_recipes(
    onnx_path: Path, module_inputs: list, output_names: list[str], calibration: Dataset, workdir: Path, *,
    finetune: FinetuneConfig | None,
) -> dict[str, Runner]:  # fmt: skip
    """The hand-written recipes of bench/run.py and bench/prune.py: INT8 minmax, and L1 pruning at
    0.5 then INT8 (with recovery where the data has labels to train on)."""
    runners = {"hand: int8 minmax": _int8_runner(onnx_path, calibration, workdir / "int8")}
    (workdir / "pruned").mkdir(parents=True)
    stage = run_prune_stage(
        onnx_path, PruneConfig(method="l1", ratio=0.5), finetune, workdir / "pruned",
        inputs=module_inputs, output_names=output_names, calibration=calibration, evaluation=None,
        progress=lambda fraction, text: None, check_cancelled=lambda: None,
    )  # fmt: skip
    if stage.pruned:
        runners["hand: pruned 0.5 + int8"] = _int8_runner(stage.path, calibration, workdir / "pruned-int8")
    return runners


def bench_network(
    name: str, module: Any, shape: tuple[int, ...], *, evaluation: Dataset, calibration: Dataset,
    budget: Budget, minutes: float, measure: MeasureConfig, finetune: FinetuneConfig | None, workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    onnx_path = export_onnx(module, workdir / f"{name}.onnx", shape=shape)
    request = AutotuneRequest(Objective("latency", BATCH), budget, minutes * 60.0, SearchSpace())
    started = time.perf_counter()
    result = autotune(
        onnx_path, request, workdir / "search", evaluation=evaluation, calibration=calibration,
        progress=lambda fraction, text: print(f"  {name}: {text}", flush=True),
    )  # fmt: skip
    search_seconds = time.perf_counter() - started
    backend = get_backend(ORT)
    original = backend.load(onnx_path, backend.options())
    runners: dict[str, Runner] = {
        "pytorch eager fp32": TorchEagerRunner(module, original.input_metadata(), original.output_metadata()),
        "original (onnxruntime fp32)": original,
    }
    if result.engines:
        chosen = result.engines[0].artifact
        runners[f"chosen: {result.chosen.candidate.label()}"] = get_backend(chosen.backend).load(chosen.path)  # type: ignore[union-attr]
    outputs = [spec.name for spec in original.output_metadata()]
    runners.update(
        hand_recipes(
            onnx_path, original.input_metadata(), outputs, calibration, workdir / "hand", finetune=finetune
        )
    )
    latency = measure_latency(runners, (BATCH,), measure, evaluation)
    reference = run_dataset(original, evaluation, BATCH)
    base_score = score_outputs(reference, evaluation, budget.metric, reference)
    rows = []
    for label, runner in runners.items():
        score = score_outputs(run_dataset(runner, evaluation, BATCH), evaluation, budget.metric, reference)
        drop = (base_score if budget.metric == "top1" else 1.0) - score
        p50 = latency[label][str(BATCH)]["p50_ms"]
        rows.append({"engine": label, "p50_ms": p50, "drop": drop})
        runner.deactivate()
    by_label = {row["engine"]: row for row in rows}
    for row in rows:
        row["vs_ort_fp32"] = by_label["original (onnxruntime fp32)"]["p50_ms"] / row["p50_ms"]
        row["vs_eager"] = by_label["pytorch eager fp32"]["p50_ms"] / row["p50_ms"]
        row["within_budget"] = row["drop"] <= result.allowed_drop + 1e-9
    return {
        "network": name,
        "budget": {"metric": budget.metric, "max_drop": budget.max_drop},
        "search_seconds": search_seconds,
        "time_budget_s": request.time_budget_s,
        "candidates": len(result.outcomes),
        "statuses": {
            s: sum(o.status == s for o in result.outcomes) for s in {o.status for o in result.outcomes}
        },
        "chosen": result.chosen.candidate.lineage() if result.chosen else None,
        "messages": result.messages,
        "rows": rows,
    }


def render(results: list[dict[str, Any]], hardware: dict[str, Any]) -> str:
    header = ["Network", "Budget", "Engine", f"p50 b={BATCH} (ms)", "Drop (pt)", "In budget"]
    header += ["vs ORT fp32", "vs eager"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        budget = f"{result['budget']['max_drop'] * 100:g} pt {result['budget']['metric']}"
        for row in result["rows"]:
            cells = [result["network"], budget, row["engine"], f"{row['p50_ms']:.2f}"]
            cells += [f"{row['drop'] * 100:.2f}", "yes" if row["within_budget"] else "no"]
            cells += [f"{row['vs_ort_fp32']:.2f}×", f"{row['vs_eager']:.2f}×"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for result in results:
        statuses = ", ".join(f"{status} {count}" for status, count in sorted(result["statuses"].items()))
        lines.append(
            f"- {result['network']}: search {result['search_seconds']:.0f} s of "
            f"{result['time_budget_s']:.0f} s, {result['candidates']} candidates ({statuses})"
        )
    features = ", ".join(hardware["cpu_features"])
    lines += [
        "",
        f"{hardware['cpu_model']}, {hardware['logical_cores']} logical cores ({features}), Python "
        f"{hardware['python']}. Latencies are medians of interleaved runs in one process; drops are "
        "measured on the same evaluation set for every row.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import models
    from examples.digits import load_digits_split, train_cnn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--time-budget", type=float, default=30.0, help="minutes of search per network")
    parser.add_argument("--quick", action="store_true", help="digits only, 1 minute, few timed runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.time_budget = ["digits"], 1.0
    hardware = {**cpu_info(), "python": platform.python_version()}
    print(f"hardware: {hardware}", flush=True)
    measure = (
        MeasureConfig(warmup_runs=1, timed_runs=3, min_seconds=0)
        if args.quick
        else MeasureConfig(warmup_runs=3, timed_runs=20, min_seconds=2.0)
    )
    results = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"{name} …", flush=True)
            workdir = Path(tmp) / name
            workdir.mkdir()
            torch.manual_seed(0)
            if name == "digits":
                split = load_digits_split()
                module = train_cnn(split)
                evaluation = Dataset({"input": split.test_x}, split.test_y)
                calibration = Dataset({"input": split.train_x}, split.train_y)
                budget, shape, finetune = Budget("top1", 0.005), (1, 32, 32), FinetuneConfig(epochs=4)
            else:
                module = getattr(models, name)().eval()
                samples = rng.standard_normal((128, 3, 224, 224), dtype=np.float32)
                evaluation = Dataset({"input": samples[:64]}, None)
                calibration = Dataset({"input": samples[64:]}, None)
                budget, shape, finetune = Budget("fidelity", 0.01), (3, 224, 224), None
            results.append(
                bench_network(
                    name,
                    module,
                    shape,
                    evaluation=evaluation,
                    calibration=calibration,
                    budget=budget,
                    minutes=args.time_budget,
                    measure=measure,
                    finetune=finetune,
                    workdir=workdir,
                )
            )
    table = render(results, hardware)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autotune.json").write_text(json.dumps({"hardware": hardware, "results": results}, indent=1))
    (args.out / "autotune.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
