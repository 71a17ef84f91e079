"""Dynamic INT8 and weight-only INT4/INT8 against the float model, through the service's pipeline.

    .venv/bin/python -m bench.precisions                    # MiniLM-L3 (the zoo corpus), batch 1
    .venv/bin/python -m bench.precisions --transformer smollm2-135m --precisions int4-weight int8-weight
    .venv/bin/python -m bench.precisions --model model.onnx --inputs data.npz

Each row is one `engines.pipeline.run_recipe` on ONNX Runtime (the engine a job builds), timed side by
side with the original fp32 model in the same run (interleaved: the speedup is a ratio measured under
the same load), with the service's fidelity (the cosine of the first float output, per sample) and,
beside it, the cosine of every float output computed here from both models on the same inputs (a
sentence embedder's pooled embedding is not its first output). Sizes: the quantized ONNX the engine is
built from, against the original file. Writes precisions.json and precisions.md to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.measure.latency import MeasureConfig
from engines.quantize.dynamic import DynamicConfig
from engines.quantize.int8 import QuantizeConfig
from engines.quantize.weight_only import WeightOnlyConfig
from engines.recipe import Recipe


@dataclass(frozen=True)
class Variant:
    """One row: a precision with its settings (`calibration`: a static INT8 method, which calibrates
    on samples held apart from the evaluation ones)."""

    label: str
    precision: str
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    weight_only: WeightOnlyConfig = field(default_factory=WeightOnlyConfig)
    calibration: str | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant("int8-dynamic", "int8-dynamic"),
    Variant("int8-dynamic per-tensor", "int8-dynamic", dynamic=DynamicConfig(per_channel=False)),
    Variant("int8-weight rtn", "int8-weight"),
    Variant("int4-weight rtn", "int4-weight"),
    Variant("int4-weight hqq", "int4-weight", weight_only=WeightOnlyConfig(algorithm="hqq")),
    Variant("int4-weight rtn + embeddings", "int4-weight", weight_only=WeightOnlyConfig(embeddings=True)),
    Variant(
        "int4-weight hqq + embeddings",
        "int4-weight",
        weight_only=WeightOnlyConfig(algorithm="hqq", embeddings=True),
    ),
    Variant("int4-weight rtn, int8 compute", "int4-weight", weight_only=WeightOnlyConfig(accuracy_level=4)),
    Variant("int4-weight rtn asymmetric", "int4-weight", weight_only=WeightOnlyConfig(symmetric=False)),
    Variant(
        "int4-weight rtn asymmetric + embeddings",
        "int4-weight",
        weight_only=WeightOnlyConfig(symmetric=False, embeddings=True),
    ),
    # static INT8 (--static): ONNX Runtime's minmax, NNCF, NNCF with SmoothQuant
    Variant("int8 static minmax", "int8", calibration="minmax"),
    Variant("int8 static nncf", "int8", calibration="nncf"),
    Variant("int8 static nncf-smoothquant", "int8", calibration="nncf-smoothquant"),
)


@dataclass
class Row:
    label: str
    precision: str
    outcome: str = "built"
    size_ratio: float | None = None
    original_p50_ms: float | None = None
    engine_p50_ms: float | None = None
    speedup: float | None = None
    service_cosine: float | None = None
    output_cosines: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def _cosines(original: Path, quantized: Path, data: Dataset, batch: int) -> dict[str, float]:
    """The mean per-sample cosine of every float output of the two models over `data`, and for a
    decoder's logits ([batch, position, vocabulary], an output named so) the share of positions whose
    arg-max agrees (`logits top1`: next-token agreement)."""
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (original, quantized)
    ]
    names = [o.name for o in sessions[0].get_outputs() if o.type in ("tensor(float)", "tensor(float16)")]
    sums = dict.fromkeys(names, 0.0)
    agreement: dict[str, list[float]] = {}
    for start in range(0, data.samples - batch + 1, batch):
        feeds = data.batch(start, start + batch)
        reference, candidate = (session.run(names, feeds) for session in sessions)
        for name, ref, got in zip(names, reference, candidate, strict=True):
            if ref.ndim >= 3 and "logit" in name:
                agreement.setdefault(name, []).append(float((ref.argmax(-1) == got.argmax(-1)).mean()))
            ref, got = ref.reshape(batch, -1).astype(np.float64), got.reshape(batch, -1).astype(np.float64)
            norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
            sums[name] += float(((ref * got).sum(1) / np.maximum(norms, 1e-30)).sum())
    count = (data.samples // batch) * batch
    cosines = {name: round(total / count, 5) for name, total in sums.items()}
    return cosines | {f"{name} top1": round(float(np.mean(values)), 4) for name, values in agreement.items()}


def run_row(
    model: Path,
    variant: Variant,
    data: Dataset,
    calibration: Dataset,
    batch: int,
    measure: MeasureConfig,
    workdir: Path,
) -> Row:
    from engines.errors import EngineError
    from engines.pipeline import run_recipe

    precision = variant.precision
    row = Row(variant.label, precision)
    recipe = Recipe(
        targets=("onnxruntime-cpu",),
        precision=precision,
        batch_sizes=(batch,),
        quantize=QuantizeConfig(calibration=variant.calibration or "minmax"),
        dynamic=variant.dynamic,
        weight_only=variant.weight_only,
        measure=measure,
    )
    calibrated = calibration if variant.calibration else None
    try:
        result = run_recipe(model, recipe, workdir, evaluation=data, calibration=calibrated)
    except EngineError as exc:
        row.outcome = f"{exc.code}: {exc.detail}"
        return row
    row.messages = result.messages
    engine = result.engines[0]
    if engine.artifact.precision != precision:
        row.outcome = f"handed over {engine.artifact.precision}"
        return row
    key = next(iter(engine.measurement.latency))
    row.original_p50_ms = result.baseline.latency[key]["p50_ms"]
    row.engine_p50_ms = engine.measurement.latency[key]["p50_ms"]
    row.speedup = engine.comparison["speedup"][key]
    fidelity = (engine.measurement.accuracy or {}).get("fidelity") or {}
    row.service_cosine = fidelity.get("cosine_similarity")
    quantized = next(workdir.glob(f"{precision}-cpu/model-*.onnx"))
    row.size_ratio = quantized.stat().st_size / model.stat().st_size
    row.output_cosines = _cosines(model, quantized, data, batch)
    return row


def _tail(data: Dataset, start: int) -> Dataset:
    """The samples from `start` on: calibration data apart from the evaluation samples."""
    return Dataset({name: rows[start:] for name, rows in data.inputs.items()}, None)


def _model_and_data(args: argparse.Namespace) -> tuple[Path, Dataset, str]:
    """The model and 2 × --samples inputs: the first half evaluates, the second calibrates."""
    rng = np.random.default_rng(0)
    if args.model:
        arrays = dict(np.load(args.inputs)) if args.inputs else {}
        return Path(args.model), Dataset(arrays, None), Path(args.model).name
    if args.transformer:
        from bench.transformer_corpus import Corpus as TransformerCorpus
        from bench.transformer_corpus import by_name as transformer

        prepared = TransformerCorpus().prepare(transformer([args.transformer])[0])
        evaluation = prepared.make_inputs("evaluation", args.samples, args.sequence_length)
        calibration = prepared.make_inputs("calibration", args.samples, args.sequence_length)
        inputs = {name: np.concatenate([rows, calibration[name]]) for name, rows in evaluation.items()}
        return prepared.onnx_path, Dataset(inputs, None), args.transformer
    from bench.zoo_corpus import Corpus, by_name

    zoo = by_name([args.zoo])[0]
    return Corpus().path(zoo), Dataset(zoo.make_inputs(2 * args.samples, rng, Corpus()), None), args.zoo


def table(name: str, rows: list[Row], batch: int) -> str:
    lines = [
        f"| {name} | size × | p50 fp32 (ms) | p50 engine (ms) | speedup b={batch} | cosine (service) | "
        "cosine per float output |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.outcome != "built":
            lines.append(f"| {row.label} | {row.outcome} | | | | | |")
            continue
        outputs = ", ".join(f"{key}: {value:.4f}" for key, value in row.output_cosines.items())
        lines.append(
            f"| {row.label} | {row.size_ratio:.3f} | {row.original_p50_ms:.2f} | {row.engine_p50_ms:.2f} | "
            f"{row.speedup:.2f}× | {row.service_cosine:.4f} | {outputs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", default="minilm-l3", help="a model of bench.zoo_corpus")
    parser.add_argument("--transformer", help="a model of bench.transformer_corpus (e.g. smollm2-135m)")
    parser.add_argument("--model", help="an ONNX file (with --inputs, an .npz keyed by input name)")
    parser.add_argument("--inputs")
    parser.add_argument("--precisions", nargs="*", help="keep only the rows of these precisions")
    parser.add_argument("--rows", nargs="*", help="keep only the rows whose label contains one of these")
    parser.add_argument("--samples", type=int, default=64, help="evaluation samples (as many calibrate)")
    parser.add_argument("--static", action="store_true", help="also static INT8: minmax, nncf, smoothquant")
    parser.add_argument("--sequence-length", type=int, default=None, help="--transformer inputs' length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--out", default="bench-results/precisions")
    args = parser.parse_args(argv)

    model, data, name = _model_and_data(args)
    measure = MeasureConfig(
        warmup_runs=20, timed_runs=200, min_seconds=args.min_seconds, threads=args.threads
    )
    rows = [
        variant
        for variant in VARIANTS
        if (not args.precisions or variant.precision in args.precisions)
        and (args.static or variant.calibration is None)
        and (not args.rows or any(part in variant.label for part in args.rows))
    ]
    evaluation, calibration = data.take(args.samples), _tail(data, args.samples)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, variant in enumerate(rows):
            workdir = Path(scratch) / str(index)
            row = run_row(model, variant, evaluation, calibration, args.batch, measure, workdir)
            print(table(name, [row], args.batch).splitlines()[-1], flush=True)
            results.append(row)
    hardware = cpu_info()
    report = table(name, results, args.batch)
    header = (
        f"{hardware['cpu_model']}, {hardware['logical_cores']} cores, threads {args.threads or 'all'}, "
        f"flags {', '.join(hardware['cpu_features'])}; {data.samples} samples"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precisions.md").write_text(f"{header}\n\n{report}\n")
    (out / "precisions.json").write_text(
        json.dumps({"model": name, "hardware": hardware, "rows": [asdict(r) for r in results]}, indent=1)
    )
    print(f"\n{header}\n\n{report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
