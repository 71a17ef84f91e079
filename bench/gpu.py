"""The GPU table: ResNet-50 at batch 1 and 8, PyTorch eager fp32 against the torch-cuda engines
(fp32, fp16, bf16, with and without CUDA graphs), TensorRT fp32/fp16/int8 where TensorRT imports,
and ONNX Runtime fp32 on the same node's CPU for scale.

    make bench-gpu                  # or: python -m bench.gpu [--quick] [--device cpu] [--no-compile]

Every runner is timed side by side (interleaved rounds, engines.measure.latency) with numpy in and
numpy out, as the service serves them: host-to-device and back are part of every figure, eager's
included. Weights are random (latency and fidelity only: cosine similarity of each engine's
outputs to eager fp32's on the same random inputs). `--device cpu` is a smoke run of the same
code on a machine without a GPU (torch-cpu against eager; the figures mean nothing for GPUs).
Prints the GPU, driver, CUDA, torch and TensorRT versions, and writes gpu.json and gpu.md to --out.
Made to finish in under 8 minutes on one GPU, so it can run as one prepared command on a GPU
machine that is lent for a short while.
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

from bench.run import TorchEagerRunner, render_table
from engines.backends.base import CompileOptions, Runner, engine_size
from engines.backends.registry import get_backend, unavailable_reason
from engines.backends.torch_runtime import TorchEngineSettings, TorchLoadOptions, TorchRunner
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.measure.accuracy import fidelity, run_dataset
from engines.measure.latency import MeasureConfig, measure_latency
from examples.digits import export_onnx

EAGER, ORT_FP32 = "pytorch eager fp32", "onnxruntime-cpu fp32"


def torch_cuda_runners(
    onnx_path: Path, workdir: Path, batch_sizes: tuple[int, ...], device: str, try_compile: bool
) -> dict[str, tuple[Runner, int, dict[str, Any]]]:
    """torch-cuda (or torch-cpu with --device cpu) at each precision, with and without CUDA graphs,
    and one engine built by the backend itself (its CUDA graphs and its torch.compile decision)."""
    backend_name = "torch-cuda" if device == "cuda" else "torch-cpu"
    backend = get_backend(backend_name)
    base = backend.compile(onnx_path, workdir / "torch-fp32", CompileOptions(batch_sizes=batch_sizes))
    size = engine_size(base.path)
    found: dict[str, tuple[Runner, int, dict[str, Any]]] = {}
    precisions = ("fp32", "fp16", "bf16") if device == "cuda" else ("fp32",)
    for precision in precisions:
        for graphs in ((), batch_sizes) if device == "cuda" else ((),):
            settings = TorchEngineSettings(device, precision, tuple(graphs))
            label = f"{backend_name} {precision}" + (" + CUDA graphs" if graphs else "")
            runner = TorchRunner(base.path, settings, TorchLoadOptions()).activate()
            found[label] = (runner, size, {})
    if try_compile and device == "cuda":
        built = backend.compile(
            onnx_path, workdir / "torch-fp16-built", CompileOptions(precision="fp16", batch_sizes=batch_sizes)
        )
        label = "torch-cuda fp16 (as the backend builds it" + (
            ", torch.compile)" if built.metadata["torch_compile"] else ", eager)"
        )
        found[label] = (backend.load(built.path), size, {"notes": built.metadata["notes"]})
    return found


def tensorrt_runners(
    onnx_path: Path, workdir: Path, batch_sizes: tuple[int, ...], calibration: Dataset
) -> tuple[dict[str, tuple[Runner, int, dict[str, Any]]], str | None]:
    """TensorRT fp32/fp16/int8 engines built through the pipeline's variants, or why there are none."""
    reason = unavailable_reason("tensorrt")
    if reason is not None:
        return {}, reason
    from engines.recipe import Recipe
    from engines.variants import build_variant

    backend = get_backend("tensorrt")
    found: dict[str, tuple[Runner, int, dict[str, Any]]] = {}
    for precision in ("fp32", "fp16", "int8"):
        variant = build_variant(
            onnx_path,
            Recipe(targets=("tensorrt",), precision=precision, batch_sizes=batch_sizes),
            "tensorrt",
            workdir / f"trt-{precision}",
            calibration=calibration,
            evaluation=None,
            batch_size=8,
        )
        artifact = backend.compile(
            variant.path, workdir / f"trt-{precision}", CompileOptions(precision, batch_sizes)
        )
        found[f"tensorrt {precision}"] = (
            backend.load(artifact.path),
            engine_size(artifact.path),
            {"build_seconds": artifact.build_seconds},
        )
    return found, None


def hardware_line(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {**cpu_info(), "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        from engines.hardware import gpu_info

        info.update(gpu_info())
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=[*sorted(models.ARCHITECTURES), "wide_mlp"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the backend's torch.compile trial")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke run of this benchmark")
        return 2
    hardware = hardware_line(args.device)
    print(f"hardware: {hardware}", flush=True)
    batch_sizes = (1, 8)
    measure = (
        MeasureConfig(warmup_runs=2, timed_runs=3, min_seconds=0)
        if args.quick
        else MeasureConfig(warmup_runs=10, timed_runs=50, min_seconds=1.0)
    )
    torch.manual_seed(0)
    module = getattr(models, args.model)().eval()
    shape = (3, 224, 224) if args.model != "wide_mlp" else (1, 32, 32)
    rng = np.random.default_rng(0)
    samples = 16 if args.quick else 64
    data = Dataset({"input": rng.standard_normal((samples, *shape), dtype=np.float32)}, None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        onnx_path = export_onnx(module, workdir / f"{args.model}.onnx", shape=shape)
        ort = get_backend("onnxruntime-cpu")
        ort_engine = ort.compile(onnx_path, workdir / "ort", CompileOptions())
        ort_runner = ort.load(ort_engine.path, ort.options(spin_wait=False))
        eager = TorchEagerRunner(
            module, ort_runner.input_metadata(), ort_runner.output_metadata(), device=args.device
        )
        candidates: dict[str, tuple[Runner, int, dict[str, Any]]] = {
            EAGER: (eager, onnx_path.stat().st_size, {}),
            ORT_FP32: (ort_runner, engine_size(ort_engine.path), {}),
        }
        print("building torch engines …", flush=True)
        candidates.update(
            torch_cuda_runners(onnx_path, workdir, batch_sizes, args.device, not args.no_compile)
        )
        trt, trt_missing = tensorrt_runners(onnx_path, workdir, batch_sizes, data)
        candidates.update(trt)
        runners = {label: runner for label, (runner, _size, _notes) in candidates.items()}
        print(f"timing {len(runners)} runners side by side …", flush=True)
        latency = measure_latency(runners, batch_sizes, measure, data)
        outputs = {label: run_dataset(runner, data, max(batch_sizes)) for label, runner in runners.items()}
        for runner in runners.values():
            runner.deactivate()
    rows = []
    for label, (_runner, size, notes) in candidates.items():
        stats = latency[label]
        rows.append(
            {
                "network": args.model,
                "engine": label,
                "latency": stats,
                "size_mb": size / 1e6,
                "vs_eager": {b: latency[EAGER][b]["p50_ms"] / stats[b]["p50_ms"] for b in stats},
                "vs_ort_fp32": {b: latency[ORT_FP32][b]["p50_ms"] / stats[b]["p50_ms"] for b in stats},
                "vs_fp32": fidelity(outputs[label], outputs[EAGER]),
                **notes,
            }
        )
    device_name = hardware.get("gpu_model") or f"{hardware['cpu_model']} (CPU smoke run)"
    footer = (
        f"{device_name}; driver {hardware.get('nvidia_driver')}, CUDA {hardware.get('cuda_runtime')}, "
        f"torch {hardware['torch']}, TensorRT {hardware['tensorrt'] or 'not installed'}"
        + (f" ({trt_missing})" if trt_missing else "")
        + ". Numpy in and out (device copies timed); medians of interleaved runs; the ORT row runs on "
        f"this node's CPU ({hardware['logical_cores']} logical cores)."
    )
    table = "\n".join(render_table(rows, batch_sizes)) + "\n\n" + footer + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(
        json.dumps({"hardware": hardware, "rows": rows}, indent=1, default=str)
    )
    (args.out / "gpu.md").write_text(table)
    print(table)
    print(f"wrote {args.out}/gpu.json and gpu.md in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
