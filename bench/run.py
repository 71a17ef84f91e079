"""The classic comparison table: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    make bench                      # or: .venv/bin/python -m bench.run [--models ...] [--quick]

Every runner of one model is timed side by side (interleaved rounds, engines.measure.latency), so the
ratios hold on a noisy machine; latencies are medians (p50) with p99 beside them. ResNet-18,
ResNet-50 and MobileNetV2 have random weights (latency only; calibrated on random inputs, their
outputs are compared with the fp32 model's by cosine similarity: a random-weight network gives
almost the same logits for every input, so top-1 agreement would flip on noise); the digits CNN
is trained on real data and gives real top-1 for every calibration method. Writes results.json, results.md and
latency_vs_accuracy.png to --out, and prints the hardware.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Runner
from engines.backends.registry import get_backend
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec
from engines.measure.accuracy import classification_accuracy, fidelity, run_dataset
from engines.measure.latency import MeasureConfig, measure_latency
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8
from examples.digits import export_onnx

ORT = "onnxruntime-cpu"


class TorchEagerRunner(Runner):
    """PyTorch eager mode behind the same Runner interface, so the harness times it the same way
    (numpy in, numpy out: on a GPU the copies to and from the device are timed, as for every engine)."""

    def __init__(self, module: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], device: str = "cpu"):
        import torch

        super().__init__()
        self._torch, self._device = torch, torch.device(device)
        self._module = module.eval().to(self._device)
        self._inputs, self._outputs = inputs, outputs
        self.activate()

    def _activate(self) -> None:
        pass  # the module is in memory already

    def _deactivate(self) -> None:
        pass

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            batch = self._torch.from_numpy(feeds[self._inputs[0].name]).to(self._device)
            result = self._module(batch)
        return {self._outputs[0].name: result.cpu().numpy()}

    def input_metadata(self) -> list[TensorSpec]:
        return self._inputs

    def output_metadata(self) -> list[TensorSpec]:
        return self._outputs


@dataclass
class Candidate:
    label: str
    precision: str
    backend: str
    runner: Any
    size_bytes: int
    build_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def candidates_for(
    module: Any,
    name: str,
    shape: tuple[int, ...],
    calibration: Dataset,
    methods: list[str],
    workdir: Path,
    threads: int,
) -> list[Candidate]:
    backend = get_backend(ORT)
    onnx_path = export_onnx(module, workdir / f"{name}.onnx", shape=shape)
    fp32 = backend.compile(onnx_path, workdir / "fp32", _options(threads))
    ort_fp32 = backend.load(fp32.path, backend.options(threads=threads))
    eager = TorchEagerRunner(module, ort_fp32.input_metadata(), ort_fp32.output_metadata())
    found = [
        Candidate("pytorch eager", "fp32", "pytorch", eager, onnx_path.stat().st_size),
        Candidate("onnxruntime", "fp32", ORT, ort_fp32, fp32.path.stat().st_size, fp32.build_seconds),
    ]
    float_path, _ = prepare_float_model(onnx_path, workdir, "cpu")
    for method in methods:
        started = time.perf_counter()
        quantized = quantize_int8(
            float_path,
            workdir / f"int8-{method}.onnx",
            calibration,
            QuantizeConfig(calibration=method),
            profile="cpu",
            batch_size=16,
            cpu_features=cpu_info()["cpu_features"],
        )
        engine = backend.compile(quantized.path, workdir / f"int8-{method}", _options(threads))
        found.append(
            Candidate(
                f"onnxruntime int8 ({method})",
                "int8",
                ORT,
                backend.load(engine.path, backend.options(threads=threads)),
                engine.path.stat().st_size,
                time.perf_counter() - started,
                {"reduce_range": quantized.metadata["reduce_range"]},
            )
        )
    return found


def _options(threads: int):
    from engines.backends.base import CompileOptions

    return CompileOptions(threads=threads)


def bench_model(
    name: str,
    module: Any,
    shape: tuple[int, ...],
    *,
    calibration: Dataset,
    evaluation: Dataset | None,
    methods: list[str],
    batch_sizes: tuple[int, ...],
    measure: MeasureConfig,
    threads: int,
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        found = candidates_for(module, name, shape, calibration, methods, Path(tmp), threads)
        print(
            f"  {name}: built {len(found) - 1} engines; timing {len(found)} runners side by side", flush=True
        )
        runners = {candidate.label: candidate.runner for candidate in found}
        latency = measure_latency(runners, batch_sizes, measure, calibration)
        scored = evaluation or calibration.take(min(256, calibration.samples))
        outputs = {label: run_dataset(runner, scored, max(batch_sizes)) for label, runner in runners.items()}
    reference = outputs["onnxruntime"]
    eager, fp32 = latency["pytorch eager"], latency["onnxruntime"]
    rows = []
    for candidate in found:
        stats = latency[candidate.label]
        row: dict[str, Any] = {
            "network": name,
            "engine": candidate.label,
            "precision": candidate.precision,
            "backend": candidate.backend,
            "latency": stats,
            "size_mb": candidate.size_bytes / 1e6,
            "build_seconds": candidate.build_seconds,
            "vs_eager": {size: eager[size]["p50_ms"] / stats[size]["p50_ms"] for size in stats},
            "vs_ort_fp32": {size: fp32[size]["p50_ms"] / stats[size]["p50_ms"] for size in stats},
            "vs_fp32": fidelity(outputs[candidate.label], reference),
            **candidate.notes,
        }
        if evaluation is not None and evaluation.labels is not None:
            row["top1"] = classification_accuracy(outputs[candidate.label], evaluation.labels)["top1"]
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], hardware: dict[str, Any], batch_sizes: tuple[int, ...]) -> str:
    lines = render_table(rows, batch_sizes)
    lines.append("")
    lines.append(
        f"{hardware['cpu_model']}, {hardware['threads']} threads ({hardware['logical_cores']} logical cores, "
        f"{', '.join(hardware['cpu_features'])}), onnxruntime {hardware['onnxruntime']}, "
        f"torch {hardware['torch']}. "
        "Latencies are medians of interleaved timed runs; ratios compare p50s measured in the same run."
    )
    return "\n".join(lines) + "\n"


def render_table(rows: list[dict[str, Any]], batch_sizes: tuple[int, ...]) -> list[str]:
    """The table's lines (the layout every benchmark of this repository shares)."""
    header = ["Network", "Engine"]
    for size in batch_sizes:
        header += [f"p50 b={size} (ms)", f"p99 b={size} (ms)"]
    header += ["Top-1", "Cosine vs fp32", "Size (MB)", "vs eager (b=8)", "vs ORT fp32 (b=8)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    big = str(max(batch_sizes))
    for row in rows:
        cells = [row["network"], row["engine"]]
        for size in batch_sizes:
            stats = row["latency"][str(size)]
            cells += [f"{stats['p50_ms']:.2f}", f"{stats['p99_ms']:.2f}"]
        top1 = row.get("top1")
        cells += [
            "—" if top1 is None else f"{top1:.4f}",
            f"{row['vs_fp32']['cosine_similarity']:.5f}",
            f"{row['size_mb']:.2f}",
            f"{row['vs_eager'][big]:.2f}×",
            f"{row['vs_ort_fp32'][big]:.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], path: Path, batch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    digits = [row for row in rows if row.get("top1") is not None]
    for row in digits:
        left.scatter(row["latency"][batch]["p50_ms"], row["top1"] * 100, s=60, label=row["engine"], alpha=0.8)
    left.set_xscale("log")
    left.set(
        xlabel=f"latency p50, batch {batch} (ms, log scale)",
        ylabel="top-1 (%)",
        title="digits CNN: latency vs accuracy",
    )
    left.legend(fontsize=8)
    networks = list(dict.fromkeys(row["network"] for row in rows))
    engines = list(
        dict.fromkeys(row["engine"] for row in rows if "(" not in row["engine"] or "minmax" in row["engine"])
    )
    width = 0.8 / len(engines)
    for index, engine in enumerate(engines):
        values = [
            next(
                (row["vs_eager"][batch] for row in rows if row["network"] == net and row["engine"] == engine),
                0,
            )
            for net in networks
        ]
        right.bar(np.arange(len(networks)) + index * width, values, width, label=engine)
    right.set_xticks(np.arange(len(networks)) + width * (len(engines) - 1) / 2, networks)
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(ylabel=f"speedup vs PyTorch eager (p50, batch {batch})", title="speedup by network")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.models import ARCHITECTURES
    from examples.digits import load_digits_split, train_cnn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", *ARCHITECTURES])
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs (a smoke test, not figures to quote)"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    threads = args.threads or cpu_info()["logical_cores"]
    torch.set_num_threads(threads)
    hardware = {
        **get_backend(ORT).hardware(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"hardware: {hardware}", flush=True)
    batch_sizes = (1, 8)
    measure = (
        MeasureConfig(warmup_runs=1, timed_runs=3, min_seconds=0)
        if args.quick
        else MeasureConfig(warmup_runs=3, timed_runs=15, min_seconds=2.0)
    )
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in args.models:
        print(f"{name} ...", flush=True)
        if name == "digits":
            split = load_digits_split()
            module = train_cnn(split)
            rows += bench_model(
                name,
                module,
                (1, 32, 32),
                calibration=Dataset({"input": split.train_x[:512]}, None),
                evaluation=Dataset({"input": split.test_x}, split.test_y),
                methods=["minmax", "entropy", "percentile"],
                batch_sizes=batch_sizes,
                measure=measure,
                threads=threads,
            )
        else:
            torch.manual_seed(0)
            module = ARCHITECTURES[name]().eval()
            samples = 16 if args.quick else 64
            calibration = Dataset(
                {"input": rng.standard_normal((samples, 3, 224, 224), dtype=np.float32)}, None
            )
            rows += bench_model(
                name,
                module,
                (3, 224, 224),
                calibration=calibration,
                evaluation=None,
                methods=["minmax"],
                batch_sizes=batch_sizes,
                measure=measure,
                threads=threads,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    table = render(rows, hardware, batch_sizes)
    (args.out / "results.json").write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=1))
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "latency_vs_accuracy.png", str(max(batch_sizes)))
    print(table)
    print(
        f"wrote {args.out}/results.json, results.md, latency_vs_accuracy.png "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
