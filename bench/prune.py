"""Pruning benchmark: the Network-Slimming-plus-TensorRT table, on ONNX Runtime (CPU).

    make bench-prune                # or: .venv/bin/python -m bench.prune [--models ...] [--quick]

For each network, one row per stage, all timed side by side in one run: the original fp32,
the original int8, the pruned fp32 and the pruned int8 (structured L1 pruning, channel counts
multiples of 8). Accuracy comes only from trained networks on real data, measured on their
held-out split: the digits CNN and the depthwise MNIST net trained here (top-1; recovered by
distillation with labels on their training split), and EfficientNet-Lite0 with ImageNet weights
(photo crops without labels: top-1 agreement with the original fp32; recovered by pure
distillation on the calibration crops, as the service does without labels). Every row names its
weights and data. ResNet-18/50 have random weights: latency-only rows, accuracy n/a.

With the digits CNN comes the recovery table: L1 pruning at ratios 0.3 (4 epochs) and 0.5
(8 epochs), the training split as the fine-tuning set, top-1 on the held-out split measured on the
exported ONNX with ONNX Runtime: no recovery, plain cross-entropy, distillation with the former
defaults, and distillation with the current defaults, with labels and without (pure distillation);
each with the wall time of its prune stage (convert, prune, recover, export). `--quick` runs it at
ratio 0.3 with 1 epoch only (a smoke run); `--models digits` gives the full table in about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import CompileOptions
from engines.backends.registry import get_backend
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.ingest.model import inspect_model
from engines.measure.accuracy import classification_accuracy, fidelity, run_dataset
from engines.measure.latency import MeasureConfig, measure_latency
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig
from engines.prune.stage import run_prune_stage
from engines.quantize.int8 import QuantizeConfig, prepare_float_model, quantize_int8
from examples.digits import export_onnx

ORT = "onnxruntime-cpu"

# (ratio, epochs): the recovery table's settings (issue: within 1 point at 0.3, 1.5 points at 0.5)
RECOVERY_SETTINGS = ((0.3, 4), (0.5, 8))
QUICK_RECOVERY_SETTINGS = ((0.3, 1),)  # --quick: a smoke run of the same code
# What FinetuneConfig defaulted to before BatchNorm re-insertion and the one-cycle 2e-2 schedule
FORMER_DEFAULTS = {"lr": 3e-3, "temperature": 4.0, "batch_size": 32, "reinsert_batchnorm": False}


def _int8(onnx_path: Path, calibration: Dataset, workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    float_path, _ = prepare_float_model(onnx_path, workdir, "cpu")
    return quantize_int8(
        float_path,
        workdir / "int8.onnx",
        calibration,
        QuantizeConfig(),
        profile="cpu",
        batch_size=16,
        cpu_features=cpu_info()["cpu_features"],
    ).path


LATENCY_ONLY = "random weights: latency only"


def bench_network(
    name: str,
    onnx_path: Path,
    *,
    ratio: float,
    calibration: Dataset,
    evaluation: Dataset | None,
    finetune: FinetuneConfig | None,
    measure: MeasureConfig,
    threads: int,
    workdir: Path,
    weights: str = LATENCY_ONLY,
    source: str = "",
) -> list[dict[str, Any]]:
    """The four stages of one network. `evaluation` is the held-out split accuracy is measured on
    (top-1 where labelled, agreement with the original fp32 always); None: latency only."""
    backend = get_backend(ORT)
    original = backend.load(onnx_path, backend.options(threads=threads))
    inputs = original.input_metadata()
    output_names = [spec.name for spec in original.output_metadata()]
    (workdir / "prune").mkdir(parents=True)
    started = time.perf_counter()
    stage = run_prune_stage(
        onnx_path,
        PruneConfig("l1", ratio),
        finetune,
        workdir / "prune",
        inputs=inputs,
        output_names=output_names,
        calibration=calibration,
        evaluation=evaluation if evaluation is not None and evaluation.labels is not None else None,
        progress=lambda fraction, stage: None,
        check_cancelled=lambda: None,
    )
    prune_seconds = time.perf_counter() - started
    if not stage.pruned:
        raise RuntimeError(f"{name}: pruning failed: {stage.messages}")
    unlabelled = Dataset(calibration.inputs, None)
    models = {
        "original fp32": onnx_path,
        "original int8": _int8(onnx_path, unlabelled, workdir / "int8-original"),
        "pruned fp32": stage.path,
        "pruned int8": _int8(stage.path, unlabelled, workdir / "int8-pruned"),
    }
    runners = {}
    for label, path in models.items():
        engine = backend.compile(path, workdir / label.replace(" ", "-"), CompileOptions(threads=threads))
        runners[label] = backend.load(engine.path, backend.options(threads=threads))
    print(
        f"  {name}: pruned in {prune_seconds:.0f} s; timing {len(runners)} engines side by side", flush=True
    )
    latency = measure_latency(runners, (1, 8), measure, unlabelled)
    baseline = latency["original fp32"]
    outputs = (
        {label: run_dataset(runner, evaluation, 8) for label, runner in runners.items()}
        if evaluation is not None
        else {}
    )
    rows = []
    for label, path in models.items():
        info = inspect_model(path if "int8" not in label else models[label.replace("int8", "fp32")])
        row = {
            "network": name,
            "weights": weights,
            "source": source,
            "stage": label,
            "params": info.parameters,
            "macs": info.macs,
            "size_mb": path.stat().st_size / 1e6,
            "latency": latency[label],
            "speedup": {
                size: baseline[size]["p50_ms"] / stats["p50_ms"] for size, stats in latency[label].items()
            },
            "prune_seconds": prune_seconds if label.startswith("pruned") else None,
        }
        if outputs:
            row["vs_original"] = fidelity(outputs[label], outputs["original fp32"])
            row["accuracy_samples"] = evaluation.samples
            if evaluation.labels is not None:
                row["top1"] = classification_accuracy(outputs[label], evaluation.labels)["top1"]
        rows.append(row)
    if evaluation is not None and evaluation.labels is not None:
        rows[2]["top1_before_recovery"] = stage.metadata.get("top1_after_pruning")
    return rows


def _top1_onnx(path: Path, evaluation: Dataset, threads: int) -> float:
    backend = get_backend(ORT)
    runner = backend.load(path, backend.options(threads=threads))
    return classification_accuracy(run_dataset(runner, evaluation, 64), evaluation.labels)["top1"]


def bench_recovery(
    onnx_path: Path,
    *,
    train: Dataset,
    evaluation: Dataset,
    threads: int,
    workdir: Path,
    settings: tuple[tuple[float, int], ...] = RECOVERY_SETTINGS,
) -> list[dict[str, Any]]:
    """One row per (ratio, recovery): top-1 of the exported pruned model on `evaluation`, its drop
    from the unpruned model's, and the prune stage's wall time."""
    backend = get_backend(ORT)
    inputs = backend.load(onnx_path, backend.options(threads=threads)).input_metadata()
    unpruned = _top1_onnx(onnx_path, evaluation, threads)
    unlabelled = Dataset(train.inputs, None)
    rows = []
    for ratio, epochs in settings:
        variants: list[tuple[str, FinetuneConfig | None, Dataset]] = [
            ("none", None, train),
            ("cross-entropy", FinetuneConfig(epochs=epochs, distill=False), train),
            ("distillation, former defaults, labels", FinetuneConfig(epochs, **FORMER_DEFAULTS), train),
            ("distillation, labels", FinetuneConfig(epochs=epochs), train),
            ("distillation, no labels", FinetuneConfig(epochs=epochs), unlabelled),
        ]
        for label, config, calibration in variants:
            stage_dir = workdir / f"recovery-{ratio}-{len(rows)}"
            stage_dir.mkdir(parents=True)
            started = time.perf_counter()
            stage = run_prune_stage(
                onnx_path,
                PruneConfig("l1", ratio),
                config,
                stage_dir,
                inputs=inputs,
                output_names=["logits"],
                calibration=calibration,
                evaluation=None,
                progress=lambda fraction, stage: None,
                check_cancelled=lambda: None,
            )
            seconds = time.perf_counter() - started
            if not stage.pruned:
                raise RuntimeError(f"pruning failed: {stage.messages}")
            top1 = _top1_onnx(stage.path, evaluation, threads)
            rows.append(
                {
                    "network": "digits",
                    "method": "l1",
                    "ratio": ratio,
                    "macs_reduction": stage.metadata["macs_reduction"],
                    "recovery": label,
                    "epochs": 0 if config is None else config.epochs,
                    "config": None if config is None else dataclasses.asdict(config),
                    "top1_unpruned": unpruned,
                    "top1": top1,
                    "drop_points": 100 * (unpruned - top1),
                    "wall_s": seconds,
                }
            )
            print(f"  recovery ratio {ratio}, {label}: top-1 {top1:.4f} in {seconds:.1f} s", flush=True)
    return rows


def render_recovery(rows: list[dict[str, Any]]) -> str:
    header = ["Ratio", "MACs ÷", "Recovery", "Epochs", "Top-1 unpruned", "Top-1", "Drop (points)", "Wall (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"{row['ratio']}",
            f"{row['macs_reduction']:.2f}×",
            row["recovery"],
            str(row["epochs"]),
            f"{row['top1_unpruned']:.4f}",
            f"{row['top1']:.4f}",
            f"{row['drop_points']:.1f}",
            f"{row['wall_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Digits CNN, structured L1 pruning (channels rounded to multiples of 8), fine-tuned on the "
        '1 297-image training split (labels hidden for "no labels"), top-1 of the exported ONNX on '
        "the 500 held-out images (one image = 0.2 points); wall time of the whole prune stage "
        "(convert, prune, recover, export). Former defaults: "
        + ", ".join(f"{key}={value}" for key, value in FORMER_DEFAULTS.items())
        + "."
    )
    return "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], hardware: dict[str, Any]) -> str:
    header = [
        "Network",
        "Weights and data",
        "Stage",
        "Params (M)",
        "MACs (M)",
        "Size (MB)",
        "p50 b=1 (ms)",
        "p50 b=8 (ms)",
        "p99 b=8 (ms)",
        "Speedup b=8",
        "Top-1",
        "Agreement with original",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        top1, vs_original = row.get("top1"), row.get("vs_original")
        agreement = None if vs_original is None else vs_original.get("top1_agreement")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["network"],
                    row.get("weights", LATENCY_ONLY),
                    row["stage"],
                    f"{row['params'] / 1e6:.3f}",
                    "—" if not row["macs"] else f"{row['macs'] / 1e6:.1f}",  # not countable: —
                    f"{row['size_mb']:.2f}",
                    f"{row['latency']['1']['p50_ms']:.2f}",
                    f"{row['latency']['8']['p50_ms']:.2f}",
                    f"{row['latency']['8']['p99_ms']:.2f}",
                    f"{row['speedup']['8']:.2f}×",
                    ("n/a" if vs_original is None else "—") if top1 is None else f"{top1:.4f}",
                    "n/a" if agreement is None else f"{agreement:.4f}",
                ]
            )
            + " |"
        )
    lines.append("")
    lines.append(
        f"{hardware['cpu_model']}, {hardware['threads']} threads, onnxruntime {hardware['onnxruntime']}. "
        "Structured L1 pruning, channels rounded to multiples of 8; speedups are p50 ratios against the "
        "original fp32 engine measured in the same run; MACs per sample. Top-1 and agreement (top-1 of "
        "the original fp32 kept) on each network's held-out split."
    )
    sources = dict.fromkeys((row["network"], row.get("source", "")) for row in rows)
    lines.append("")
    lines += [f"- {network}: {source}" for network, source in sources if source]
    return "\n".join(lines) + "\n"


#: (ratio, fine-tuning epochs, quick epochs) per trained network of bench/trained.py
TRAINED_SETTINGS = {"mnist64-dw": (0.3, 6, 1), "efficientnet-lite0": (0.3, 4, 1)}
DEFAULT_MODELS = ("digits", "mnist64-dw", "efficientnet-lite0", "resnet18", "resnet50")
QUICK_MODELS = ("digits",)


def _bench_trained(
    name: str, quick: bool, measure: MeasureConfig, threads: int, workdir: Path
) -> list[dict[str, Any]]:
    """A network of bench/trained.py: fine-tuned on its calibration split (with labels where it has
    them, pure distillation otherwise), measured on its held-out split."""
    from bench import trained

    network = trained.load(name, trained.QUICK_SIZES if quick else trained.Sizes())
    ratio, epochs, quick_epochs = TRAINED_SETTINGS.get(name, (0.3, 4, 1))
    return bench_network(
        name,
        network.path,
        ratio=ratio,
        calibration=network.calibration,
        evaluation=network.held_out,  # QUICK_SIZES already makes it small (MNIST's 1 000 are cheap)
        finetune=FinetuneConfig(epochs=quick_epochs if quick else epochs),
        measure=measure,
        threads=threads,
        workdir=workdir,
        weights=network.summary,
        source=network.source,
    )


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import trained
    from bench.models import ARCHITECTURES
    from examples.digits import load_digits_split, train_cnn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    models = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    threads = cpu_info()["logical_cores"]
    torch.set_num_threads(threads)
    hardware = get_backend(ORT).hardware(threads)
    print(f"hardware: {hardware}", flush=True)
    measure = (
        MeasureConfig(warmup_runs=1, timed_runs=3, min_seconds=0)
        if args.quick
        else MeasureConfig(warmup_runs=3, timed_runs=15, min_seconds=2.0)
    )
    rows: list[dict[str, Any]] = []
    recovery: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            print(f"{name} ...", flush=True)
            workdir = Path(tmp) / name
            workdir.mkdir()
            if name == "digits":
                split = load_digits_split()
                onnx_path = export_onnx(train_cnn(split), workdir / "digits.onnx")
                rows += bench_network(
                    name,
                    onnx_path,
                    ratio=0.25,
                    calibration=Dataset({"input": split.train_x}, split.train_y),
                    evaluation=Dataset({"input": split.test_x}, split.test_y),
                    finetune=FinetuneConfig(epochs=2 if args.quick else 8),
                    measure=measure,
                    threads=threads,
                    workdir=workdir,
                    weights="trained here; sklearn digits, 500 held-out",
                    source="small CNN trained here on scikit-learn's 8x8 digits (upsampled to 32x32): "
                    "1 297 train, 500 held-out",
                )
                print("digits recovery ...", flush=True)
                recovery = bench_recovery(
                    onnx_path,
                    train=Dataset({"input": split.train_x}, split.train_y),
                    evaluation=Dataset({"input": split.test_x}, split.test_y),
                    threads=threads,
                    workdir=workdir / "recovery",
                    settings=QUICK_RECOVERY_SETTINGS if args.quick else RECOVERY_SETTINGS,
                )
            elif name in trained.NETWORKS:
                rows += _bench_trained(name, args.quick, measure, threads, workdir)
            else:
                torch.manual_seed(0)
                onnx_path = export_onnx(
                    ARCHITECTURES[name]().eval(), workdir / f"{name}.onnx", shape=(3, 224, 224)
                )
                samples = 16 if args.quick else 64
                calibration = Dataset(
                    {
                        "input": np.random.default_rng(0).standard_normal(
                            (samples, 3, 224, 224), dtype=np.float32
                        )
                    },
                    None,
                )
                rows += bench_network(
                    name,
                    onnx_path,
                    ratio=0.3,
                    calibration=calibration,
                    evaluation=None,
                    finetune=None,
                    measure=measure,
                    threads=threads,
                    workdir=workdir,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    table = render(rows, hardware)
    if recovery:
        table += "\n" + render_recovery(recovery)
    (args.out / "prune_results.json").write_text(
        json.dumps({"hardware": hardware, "rows": rows, "recovery": recovery}, indent=1)
    )
    (args.out / "prune_results.md").write_text(table)
    print(table)
    print(
        f"wrote {args.out}/prune_results.json and prune_results.md in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
