"""Transformers optimized as transformers: the corpus of bench/transformer_corpus.py, every engine side
by side with the unfused fp32 ONNX Runtime engine at the issue's (batch, sequence) points.

    make bench-transformers         # or: .venv/bin/python -m bench.transformers [--models ...] [--quick]

Per model, in one process and one timing loop (interleaved rounds, engines.measure.latency):

- `pytorch eager`: the PyTorch module, where the weights shipped as weights (not as ONNX);
- `onnxruntime fp32 (unfused)`: the original ONNX as the service's baseline loads it: the reference
  of every ratio;
- the service's engines, each built by `engines.pipeline.run_recipe` from a recipe, as a job builds
  it: fused fp32 (`graph_optimization`), `int8-dynamic`, static `int8` (minmax, and NNCF with
  SmoothQuant), `int8-weight` / `int4-weight` for the decoder. A precision, method or recipe section
  this checkout does not register is skipped and said so (the registries are read at run time:
  engines.variants.PRECISIONS, engines.quantize.methods.QUANTIZATION_METHODS, Recipe's fields);
- the same on OpenVINO (`openvino fp32`, `openvino bf16` where the CPU computes bf16: AVX512_BF16 or
  AMX, `openvino int8-dynamic`);
- `auto-optimize`: what the search (engines.search.autotune, every CPU backend here) serves for the
  objective latency at the model's target point (`SEARCH_POINTS`) within 1 % fidelity, scored on the
  calibration passages and measured here on the held-out ones like every other row;
- references built with ONNX Runtime's own tools and default arguments (`quantize_dynamic`, the
  transformer optimizer, `MatMulNBitsQuantizer`): what users compare the service with.

Fidelity is measured on held-out text (or speech) against the unfused fp32 engine: sentence-embedding
cosine for embedders (mean pooling + L2, as sentence-transformers uses them), next-token agreement and
logit cosine over real tokens for the decoder, per-sample cosine of the hidden states for the speech
encoder; `min cos` is the worst sample of any float output (the fusion check). Sizes are the engine
files against the original ONNX. The issue's targets are printed met / not met. Writes
transformers.json and transformers.md to --out. `--quick` is a smoke run (MiniLM-L6 at b=1 s=32, few
runs), not figures to quote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.transformer_corpus import CORPUS, QUICK_SUBSET, Corpus, Prepared, TransformerModel, by_name
from engines.backends.base import Runner, engine_size
from engines.backends.registry import get_backend
from engines.hardware import cpu_info
from engines.ingest.datasets import Dataset
from engines.ingest.signature import TensorSpec
from engines.measure.latency import MeasureConfig, measure_latency

ORT = "onnxruntime-cpu"
BASELINE = "onnxruntime fp32 (unfused)"
EAGER = "pytorch eager"
FULL_MEASURE = MeasureConfig(warmup_runs=3, timed_runs=15, min_seconds=2.0)
QUICK_MEASURE = MeasureConfig(warmup_runs=1, timed_runs=3, min_seconds=0.0)
#: run_recipe times what it builds against the original itself; the bench times everything again side
#: by side, so the job's own timing is kept to one run.
BUILD_MEASURE = {"warmup_runs": 0, "timed_runs": 1, "min_seconds": 0.0}


class Skip(Exception):
    """A candidate that cannot be built in this checkout or for this model; the message says why."""


# ---------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    label: str
    tasks: tuple[str, ...]  # the corpus tasks it is built for
    recipe: dict[str, Any] | None = None  # a service engine: the recipe's options
    reference: str | None = None  # an ONNX Runtime reference: its builder's name
    quick: bool = False  # part of --quick
    target: str = "onnxruntime-cpu"  # the backend a service engine is built for and run on
    search: bool = False  # auto-optimize (engines.search.autotune) picks the engine: `recipe` unused


SERVICE = "service"
REFERENCE = "ORT reference"
TEXT, SPEECH, LM = "embedding", "speech", "causal-lm"
ALL = (TEXT, SPEECH, LM)
FUSE = {"graph_optimization": {"model_type": "auto"}}
OPENVINO = "openvino-cpu"
#: Auto-optimize's objective per model: the (batch, sequence) point of the issue's target for it.
SEARCH_POINTS = {"minilm-l6": (1, 128), "minilm-l3": (1, 128), "mpnet-base": (8, 128)}
#: Auto-optimize's accuracy budget: fidelity (cosine to the original's outputs) within one point.
SEARCH_MAX_DROP = 0.01
#: Auto-optimize's time budget per model (the service's default is 30 minutes).
SEARCH_MINUTES = 8.0

CANDIDATES: tuple[Candidate, ...] = (
    Candidate("fused fp32", ALL, {"precision": "fp32", **FUSE}, quick=True),
    Candidate("int8-dynamic", ALL, {"precision": "int8-dynamic"}, quick=True),
    Candidate("fused int8-dynamic", (TEXT,), {"precision": "int8-dynamic", **FUSE}),
    # not SPEECH: ONNX Runtime's calibration keeps every activation of Whisper's 1 500-position attention
    # (8 x 1500 x 1500 floats per layer and sample): it passed 20 GB on 4 samples and was OOM-killed
    Candidate("int8 static (minmax)", (TEXT,), {"precision": "int8", "quantize": {"calibration": "minmax"}}),
    Candidate(
        "int8 static (nncf-smoothquant)",
        (TEXT,),
        {"precision": "int8", "quantize": {"calibration": "nncf-smoothquant"}},
    ),
    Candidate("int8-weight", (LM,), {"precision": "int8-weight"}),
    Candidate("int4-weight (rtn, block 32)", (LM,), {"precision": "int4-weight"}),
    Candidate(
        "int4-weight (rtn, block 128)",
        (LM,),
        {"precision": "int4-weight", "weight_only": {"block_size": 128}},
    ),
    Candidate(
        "int4-weight (rtn, block 32, embeddings too)",
        (LM,),
        {"precision": "int4-weight", "weight_only": {"embeddings": True}},
    ),
    # OpenVINO runs the same ONNX: fp32, and bf16 where the CPU computes it (AVX512_BF16 / AMX)
    Candidate("openvino fp32", ALL, {"precision": "fp32"}, target=OPENVINO),
    Candidate("openvino bf16", ALL, {"precision": "bf16"}, target=OPENVINO, quick=True),
    Candidate("openvino int8-dynamic", (TEXT,), {"precision": "int8-dynamic"}, target=OPENVINO),
    # the search itself, over every CPU backend here, at the model's target point within 1 % fidelity
    Candidate("auto-optimize", (TEXT,), {"precision": "fp32"}, search=True),
    Candidate("ORT quantize_dynamic", ALL, reference="quantize_dynamic", quick=True),
    Candidate("ORT optimizer", (TEXT,), reference="optimizer"),
    Candidate("ORT optimizer + quantize_dynamic", (TEXT,), reference="optimizer+quantize_dynamic"),
    Candidate("ORT MatMulNBits int4 (block 32)", (LM,), reference="matmulnbits"),
)


def unavailable(candidate: Candidate) -> str | None:
    """Why this checkout cannot build the candidate (a precision, method or recipe section it does
    not register), or None. Read from the registries, so features landing later are picked up."""
    if candidate.recipe is None:
        return None
    from engines.quantize.methods import QUANTIZATION_METHODS
    from engines.recipe import Recipe
    from engines.variants import PRECISIONS

    fields = {item.name for item in dataclasses.fields(Recipe)}
    missing = [name for name in candidate.recipe if name not in fields and name != "precision"]
    if missing:
        return f"this checkout's recipe has no {', '.join(missing)} section"
    precision = candidate.recipe["precision"]
    if precision not in PRECISIONS:
        return (
            f"precision '{precision}' is not registered (engines.variants.PRECISIONS: {sorted(PRECISIONS)})"
        )
    method = (candidate.recipe.get("quantize") or {}).get("calibration")
    if method and method not in QUANTIZATION_METHODS:
        return f"quantization method '{method}' is not registered"
    if method:
        from engines.quantize.nncf_ptq import nncf_missing

        if method.startswith("nncf") and (reason := nncf_missing()):
            return reason
    return None


# ---------------------------------------------------------------- runners


class TorchRunner(Runner):
    """A PyTorch module behind the Runner interface (numpy in, numpy out), inputs by name."""

    def __init__(self, module: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        import torch

        super().__init__()
        self._torch, self._module = torch, module.eval()
        self._inputs, self._outputs = inputs, outputs
        self._input_names, self._output_names = module.input_names, module.output_names
        self.activate()

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            result = self._module(
                *(self._torch.from_numpy(np.asarray(feeds[name])) for name in self._input_names)
            )
        results = result if isinstance(result, tuple) else (result,)
        return {name: value.numpy() for name, value in zip(self._output_names, results, strict=True)}

    def input_metadata(self) -> list[TensorSpec]:
        return self._inputs

    def output_metadata(self) -> list[TensorSpec]:
        return self._outputs


@dataclass
class Built:
    label: str
    kind: str  # pytorch, baseline, service, ORT reference
    runner: Runner
    size_bytes: int
    build_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _file_bytes(path: Path) -> int:
    """A model's size: the file and its external-data files beside it."""
    total = path.stat().st_size
    for sibling in path.parent.glob(path.name + ".data*"):
        total += sibling.stat().st_size
    return total


def build_service(
    candidate: Candidate, prepared: Prepared, calibration: Dataset, workdir: Path, threads: int
) -> tuple[Path, list[str], dict[str, Any]]:
    """The candidate's engine as a job builds it (engines.pipeline.run_recipe): engine path, messages,
    what its build recorded."""
    from engines.errors import EngineError
    from engines.pipeline import run_recipe
    from engines.recipe import Recipe

    assert candidate.recipe is not None
    recipe = Recipe.from_dict(
        {
            **candidate.recipe,
            "targets": [candidate.target],
            "batch_sizes": [1],
            "measure": {**BUILD_MEASURE, "threads": threads},
        }
    )
    try:
        result = run_recipe(prepared.onnx_path, recipe, workdir, calibration=calibration)
    except EngineError as exc:
        raise Skip(f"the service refused it: {exc.code}: {exc.detail}") from exc
    engine = result.engines[0]
    artifact = engine.artifact
    info = {
        key: value
        for key, value in artifact.metadata.items()
        if key.startswith(("graph", "fusion", "weight", "dynamic", "reduce_range", "calibration"))
        or key.endswith("_fallback")
    }
    fallback = artifact.metadata.get(f"{recipe.precision}_fallback")
    noise = ("no evaluation dataset", "the calibration dataset is not used")  # the bench measures both itself
    messages = [message for message in result.messages if not message.startswith(noise)]
    if fallback is not None or artifact.precision != recipe.precision:
        reason = (fallback or {}).get("reason", "the service built another precision")
        raise Skip(f"the service handed over {artifact.precision} instead: {reason}")
    return artifact.path, messages, info


def build_search(
    prepared: Prepared, calibration: Dataset, workdir: Path, threads: int
) -> tuple[Path, str, list[str], dict[str, Any]]:
    """What auto-optimize serves (engines.search.autotune, every CPU backend here, the objective at the
    model's target point, fidelity within `SEARCH_MAX_DROP`): engine path, backend, messages, choice.

    The search scores its candidates on the calibration passages (it sees no evaluation text); the
    bench then measures the engine it chose on the held-out passages like every other row."""
    from engines.search.autotune import AutotuneRequest, autotune
    from engines.search.space import Budget, Objective, SearchSpace

    batch, length = SEARCH_POINTS.get(prepared.model.name, prepared.model.points[0])
    request = AutotuneRequest(
        Objective("latency", batch, length), Budget("fidelity", SEARCH_MAX_DROP), SEARCH_MINUTES * 60.0,
        SearchSpace(prune_ratios=()),
    )  # fmt: skip
    result = autotune(
        prepared.onnx_path, request, workdir, evaluation=calibration, calibration=calibration,
        progress=lambda fraction, text: print(f"    search: {text}", flush=True),
    )  # fmt: skip
    if result.chosen is None or result.serves_original or not result.engines:
        raise Skip(f"auto-optimize serves the original: {'; '.join(result.messages)[:300]}")
    artifact = result.engines[0].artifact
    chosen = result.chosen.candidate.label()
    tried = sum(1 for outcome in result.outcomes if outcome.build_seconds is not None)
    notes = [
        f"auto-optimize chose {chosen} on {artifact.backend} (objective latency at b={batch} s={length}, "
        f"fidelity within {SEARCH_MAX_DROP:.0%}; {tried} candidates built in {result.elapsed_s:.0f} s)"
    ]
    return artifact.path, artifact.backend, notes, {"chosen": chosen, "backend": artifact.backend}


def build_reference(kind: str, prepared: Prepared, workdir: Path) -> tuple[Path, list[str]]:
    """ONNX Runtime's own tools, default arguments, on the original model."""
    from onnxruntime.quantization import quantize_dynamic

    model, source = prepared.model, prepared.onnx_path
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "quantize_dynamic":
        out = workdir / "dynamic.onnx"
        quantize_dynamic(str(source), str(out))
        return out, ["quantize_dynamic(model, out): QInt8 weights per tensor, no reduce_range"]
    if kind.startswith("optimizer"):
        if not model.model_type:
            raise Skip("no ONNX Runtime optimizer model type for this architecture")
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(
            str(source), model_type=model.model_type, num_heads=model.heads, hidden_size=model.hidden
        )
        fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
        out = workdir / "optimized.onnx"
        optimized.save_model_to_file(str(out))
        notes = [
            f"optimize_model(model_type='{model.model_type}', num_heads={model.heads}, "
            f"hidden_size={model.hidden}): {fused}"
        ]
        if kind == "optimizer+quantize_dynamic":
            import onnx

            quantized = workdir / "optimized-dynamic.onnx"
            # the fused com.microsoft ops defeat ONNX shape inference: their outputs are float
            extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
            quantize_dynamic(str(out), str(quantized), extra_options=extra)
            return quantized, [*notes, "then quantize_dynamic(DefaultTensorType=FLOAT)"]
        return out, notes
    if kind == "matmulnbits":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=32, is_symmetric=True)
        quantizer.process()
        out = workdir / "int4.onnx"
        onnx.save(quantizer.model.model, str(out))
        return out, ["MatMulNBitsQuantizer(block_size=32, is_symmetric=True), RTN"]
    raise ValueError(kind)


def build_all(
    prepared: Prepared,
    candidates: list[Candidate],
    calibration: Dataset,
    workdir: Path,
    threads: int,
    skipped: list[dict[str, str]],
    eager: bool,
) -> list[Built]:
    backend = get_backend(ORT)
    options = backend.options(threads=threads)
    baseline = backend.load(prepared.onnx_path, options)
    built = [Built(BASELINE, "baseline", baseline, _file_bytes(prepared.onnx_path))]
    if eager and prepared.make_module is not None:
        torch_runner = TorchRunner(prepared.module, baseline.input_metadata(), baseline.output_metadata())
        built.insert(0, Built(EAGER, "pytorch", torch_runner, _file_bytes(prepared.onnx_path)))
    model = prepared.model
    for index, candidate in enumerate(candidates):
        if model.task not in candidate.tasks:
            continue
        reason = unavailable(candidate)
        started = time.perf_counter()
        try:
            if reason:
                raise Skip(reason)
            folder = workdir / f"candidate-{index}"
            target = candidate.target
            if candidate.search:
                path, target, notes, info = build_search(prepared, calibration, folder, threads)
                kind = SERVICE
            elif candidate.recipe is not None:
                path, notes, info = build_service(candidate, prepared, calibration, folder, threads)
                kind = SERVICE
            else:
                assert candidate.reference is not None
                path, notes = build_reference(candidate.reference, prepared, folder)
                info, kind = {}, REFERENCE
            runner = get_backend(target).load(path, get_backend(target).options(threads=threads))
        except Skip as exc:
            skipped.append({"model": model.name, "engine": candidate.label, "reason": str(exc)})
            print(f"  {candidate.label}: skipped: {exc}", flush=True)
            continue
        except Exception as exc:  # a builder that fails is a finding, not the end of the run
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            skipped.append(
                {"model": model.name, "engine": candidate.label, "reason": f"failed: {detail}"[:400]}
            )
            print(f"  {candidate.label}: failed: {detail}"[:400], flush=True)
            continue
        seconds = time.perf_counter() - started
        # a service engine's files are named like it (OpenVINO's .xml + .bin), a reference's beside it
        size = engine_size(path) if kind == SERVICE else _file_bytes(path)
        built.append(Built(candidate.label, kind, runner, size, seconds, notes, info))
        print(f"  {candidate.label}: built in {seconds:.1f} s", flush=True)
    return built


# ---------------------------------------------------------------- fidelity


def _outputs(runner: Runner, data: Dataset, batch: int) -> dict[str, np.ndarray]:
    collected: dict[str, list[np.ndarray]] = {}
    for start in range(0, data.samples, batch):
        for name, value in runner.infer(data.batch(start, start + batch)).items():
            collected.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)


def _sentence_embedding(outputs: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    if "sentence_embedding" in outputs:
        return outputs["sentence_embedding"]
    hidden = next(value for value in outputs.values() if value.dtype.kind == "f" and value.ndim == 3)
    summed = (hidden * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    return summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)


def fidelity_of(
    model: TransformerModel, outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], data: Dataset
) -> dict[str, Any]:
    floats = [name for name, value in reference.items() if value.dtype.kind == "f"]
    worst = min(float(_row_cosines(outputs[name], reference[name]).min()) for name in floats)
    result: dict[str, Any] = {"min_cosine_any_output": worst, "samples": data.samples}
    mask = data.inputs.get("attention_mask")
    if model.task == TEXT:
        assert mask is not None
        cosines = _row_cosines(_sentence_embedding(outputs, mask), _sentence_embedding(reference, mask))
        result.update(sentence_cosine=float(cosines.mean()), sentence_cosine_min=float(cosines.min()))
    elif model.task == LM:
        assert mask is not None
        real = mask.astype(bool)
        logits, expected = outputs["logits"][real], reference["logits"][real]
        result.update(
            next_token_agreement=float((logits.argmax(-1) == expected.argmax(-1)).mean()),
            logits_cosine=float(_row_cosines(logits, expected).mean()),
        )
    else:
        cosines = _row_cosines(outputs[floats[0]], reference[floats[0]])
        result.update(hidden_cosine=float(cosines.mean()))
    return result


# ---------------------------------------------------------------- one model


@dataclass
class Settings:
    quick: bool = False
    eval_samples: int = 32
    calibration_samples: int = 32
    measure: MeasureConfig = FULL_MEASURE
    threads: int = 1
    eager: bool = True
    labels: tuple[str, ...] | None = None  # candidate labels to build (None: all for the mode)


def _point_key(batch: int, length: int | None) -> str:
    return f"b={batch}" if length is None else f"b={batch} s={length}"


def bench_model(model: TransformerModel, corpus: Corpus, settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    prepared = corpus.prepare(model)
    points = model.quick_points if settings.quick else model.points
    longest = max((length or 0 for _, length in points), default=0) or None
    calibration = Dataset(prepared.make_inputs("calibration", settings.calibration_samples, longest), None)
    evaluation = Dataset(prepared.make_inputs("evaluation", settings.eval_samples, longest), None)
    candidates = [
        candidate
        for candidate in CANDIDATES
        if (settings.labels is None and (candidate.quick or not settings.quick))
        or (settings.labels is not None and candidate.label in settings.labels)
    ]
    skipped: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        built = build_all(
            prepared, candidates, calibration, Path(tmp), settings.threads, skipped, settings.eager
        )
        runners = {item.label: item.runner for item in built}
        latency: dict[str, dict[str, dict[str, float]]] = {item.label: {} for item in built}
        for batch, length in points:
            rows = prepared.make_inputs("evaluation", max(batch, 8), length)
            print(f"  timing {len(runners)} engines side by side at {_point_key(batch, length)}", flush=True)
            measured = measure_latency(runners, (batch,), settings.measure, Dataset(rows, None))
            for label, stats in measured.items():
                latency[label][_point_key(batch, length)] = next(iter(stats.values()))
        batch = max(b for b, _ in points)
        reference = _outputs(runners[BASELINE], evaluation, batch)
        fidelity = {
            item.label: fidelity_of(model, _outputs(item.runner, evaluation, batch), reference, evaluation)
            for item in built
        }
        for item in built:
            item.runner.deactivate()
    base = latency[BASELINE]
    rows = []
    for item in built:
        rows.append(
            {
                "model": model.name,
                "engine": item.label,
                "kind": item.kind,
                "latency": latency[item.label],
                "speedup": {
                    key: base[key]["p50_ms"] / stats["p50_ms"] for key, stats in latency[item.label].items()
                },
                "fidelity": fidelity[item.label],
                "size_mb": item.size_bytes / 1e6,
                "size_ratio": item.size_bytes / _file_bytes(prepared.onnx_path),
                "build_seconds": round(item.build_seconds, 1),
                "notes": item.notes,
                "info": item.info,
            }
        )
    return {
        "model": dataclasses.asdict(model),
        "notes": prepared.notes,
        "points": [_point_key(b, s) for b, s in points],
        "fidelity_data": f"{evaluation.samples} held-out "
        + ("recordings" if model.task == SPEECH else f"passages at {longest} tokens"),
        "rows": rows,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- targets and tables


def _fidelity_value(row: dict[str, Any]) -> float | None:
    values = row["fidelity"]
    for key in ("sentence_cosine", "next_token_agreement", "hidden_cosine"):
        if key in values:
            return values[key]
    return None


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against this run's rows: the best service engine (not a reference, not
    eager) at the target's point within its fidelity, and the fusion and int4 checks."""
    by_model = {result["model"]["name"]: result for result in results}
    found = []

    def best(model: str, point: str, threshold: float) -> dict[str, Any] | None:
        result = by_model.get(model)
        if result is None:
            return None
        rows = [
            row
            for row in result["rows"]
            if row["kind"] == SERVICE and point in row["speedup"] and (_fidelity_value(row) or 0) >= threshold
        ]
        return max(rows, key=lambda row: row["speedup"][point], default=None)

    for model in ("minilm-l6", "minilm-l3"):
        if model in by_model:
            row = best(model, "b=1 s=128", 0.99)
            value = None if row is None else row["speedup"]["b=1 s=128"]
            found.append(
                {
                    "target": f"{model}, b=1 s=128: >= 2.5x unfused fp32 ORT within sentence cosine >= 0.99",
                    "value": value,
                    "by": None if row is None else row["engine"],
                    "unit": "x",
                    "met": value is not None and value >= 2.5,
                }
            )
    if "mpnet-base" in by_model:
        row = best("mpnet-base", "b=8 s=128", 0.99)
        value = None if row is None else row["speedup"]["b=8 s=128"]
        found.append(
            {
                "target": "mpnet-base (BERT-base size), b=8 s=128: >= 2x within 1 % fidelity (cos >= 0.99)",
                "value": value,
                "by": None if row is None else row["engine"],
                "unit": "x",
                "met": value is not None and value >= 2.0,
            }
        )
    if "smollm2-135m" in by_model:
        rows = [
            row
            for row in by_model["smollm2-135m"]["rows"]
            if row["kind"] == SERVICE and row["engine"].startswith("int4-weight")
        ]
        row = min(rows, key=lambda row: row["size_ratio"], default=None)
        found.append(
            {
                "target": "smollm2-135m int4-weight: size <= 0.3x, faithfulness reported",
                "value": None if row is None else row["size_ratio"],
                "by": None if row is None else row["engine"],
                "faithfulness": None if row is None else row["fidelity"],
                "unit": "ratio",
                "met": row is not None and row["size_ratio"] <= 0.3,
            }
        )
    fused = [
        (result["model"]["name"], row)
        for result in results
        for row in result["rows"]
        if row["kind"] == SERVICE and row["engine"] == "fused fp32"
    ]
    if fused:
        worst = min(fused, key=lambda item: item[1]["fidelity"]["min_cosine_any_output"])
        value = worst[1]["fidelity"]["min_cosine_any_output"]
        found.append(
            {
                "target": "fusion never changes fp32 outputs beyond cosine 0.9999 (worst sample, any output)",
                "value": value,
                "by": worst[0],
                "unit": "cosine",
                "met": value >= 0.9999,
            }
        )
    return found


def _fidelity_cell(row: dict[str, Any]) -> str:
    values = row["fidelity"]
    if "sentence_cosine" in values:
        return f"{values['sentence_cosine']:.5f} (min {values['sentence_cosine_min']:.4f})"
    if "next_token_agreement" in values:
        return f"agree {values['next_token_agreement']:.3f}, logits cos {values['logits_cosine']:.4f}"
    return f"{values['hidden_cosine']:.5f}"


def render(results: list[dict[str, Any]], hardware: dict[str, Any], found: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        model, points = result["model"], result["points"]
        lines += [
            f"### {model['name']}: {model['what']}",
            "",
            f"`{', '.join(model['packages'])}` — {model['files']}; {model['licence']}; tokenizer: "
            f"{model['tokenizer']}. Fidelity on {result['fidelity_data']}.",
            "",
        ]
        header = ["Engine", "Kind"]
        for point in points:
            header += [f"p50 {point} (ms)", f"vs unfused {point}"]
        header += ["Fidelity vs unfused fp32", "min cos (any output)", "Size (MB)", "Size ratio"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in result["rows"]:
            cells = [row["engine"], row["kind"]]
            for point in points:
                stats = row["latency"].get(point)
                cells += [
                    f"{stats['p50_ms']:.2f}" if stats else "—",
                    f"{row['speedup'][point]:.2f}×" if stats else "—",
                ]
            cells += [
                _fidelity_cell(row),
                f"{row['fidelity']['min_cosine_any_output']:.6f}",
                f"{row['size_mb']:.1f}",
                f"{row['size_ratio']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {row['engine']}: {note}" for row in result["rows"] for note in row["notes"]]
        notes += [f"- {note}" for note in result["notes"]]
        notes += [f"- skipped {item['engine']}: {item['reason']}" for item in result["skipped"]]
        lines += ["", *notes, ""]
    lines += ["### Targets (issue 21)", "", "| Target | This run | By | Met |", "|---|---|---|---|"]
    for target in found:
        value = target["value"]
        shown = "—" if value is None else f"{value:.2f}×" if target["unit"] == "x" else f"{value:.4f}"
        verdict = "met" if target["met"] else "not met"
        lines.append(f"| {target['target']} | {shown} | {target['by'] or '—'} | {verdict} |")
    lines += [
        "",
        f"{hardware['cpu_model']}, {hardware['threads']} threads ({hardware['logical_cores']} logical "
        f"cores; flags {', '.join(hardware['cpu_flags']) or 'none of the listed'}), onnxruntime "
        f"{hardware['onnxruntime']}, torch {hardware['torch']}, Python {hardware['python']}. p50 of "
        "interleaved timed runs; ratios compare p50s measured in the same loop.",
    ]
    return "\n".join(lines) + "\n"


CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "avx512_fp16",
)


def hardware_record(threads: int) -> dict[str, Any]:
    """The machine the figures belong to, with the CPU flags that decide INT8 and BF16 speed."""
    import onnxruntime
    import torch

    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    return {
        **cpu_info(),
        "threads": threads,
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help=f"default: all of {[m.name for m in CORPUS]}"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: minilm-l6 at b=1 s=32, few runs")
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        help=f"engine labels to build (default: all that apply); known: {[c.label for c in CANDIDATES]}",
    )
    parser.add_argument("--no-eager", action="store_true", help="leave the PyTorch eager rows out")
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    known = {candidate.label for candidate in CANDIDATES}
    if args.candidates and (unknown := sorted(set(args.candidates) - known)):
        raise SystemExit(f"unknown candidates {unknown}; known: {sorted(known)}")
    names = args.models or (list(QUICK_SUBSET) if args.quick else [model.name for model in CORPUS])
    threads = args.threads or cpu_info()["logical_cores"]
    settings = Settings(
        quick=args.quick,
        eval_samples=args.eval_samples or (8 if args.quick else 32),
        calibration_samples=args.calibration_samples or (8 if args.quick else 32),
        measure=dataclasses.replace(QUICK_MEASURE if args.quick else FULL_MEASURE, threads=threads),
        threads=threads,
        eager=not args.no_eager,
        labels=tuple(args.candidates) if args.candidates else None,
    )
    import torch

    torch.set_num_threads(threads)
    hardware = hardware_record(threads)
    print(
        f"{hardware['cpu_model']}, {threads} threads, flags {', '.join(hardware['cpu_flags'])}, "
        f"onnxruntime {hardware['onnxruntime']}, torch {hardware['torch']}",
        flush=True,
    )
    corpus, results, started = Corpus(), [], time.perf_counter()
    for model in by_name(names):
        print(f"{model.name} ...", flush=True)
        results.append(bench_model(model, corpus, settings))
    found = targets(results)
    table = render(results, hardware, found)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "hardware": hardware,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "targets": found,
    }
    (args.out / "transformers.json").write_text(json.dumps(payload, indent=1, default=str))
    (args.out / "transformers.md").write_text(table)
    print("\n" + table)
    skipped = [item for result in results for item in result["skipped"]]
    if skipped:
        print(f"{len(skipped)} engines skipped (listed under each table).")
    print(f"wrote {args.out / 'transformers.json'} and transformers.md in {payload['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
