"""Real models through the whole service: upload → fp32 → int8 → int8 within a 1 % fidelity
budget → pruning, each as a user would run it over the API, with the engine served over /v2.

    make bench-zoo                  # or: .venv/bin/python -m bench.zoo [--models ...] [--quick]

The API and the worker's job code run in this process (FastAPI's test client, jobs executed by
`workers.job_runner.run_job_by_id` as a worker executes them) on a temporary SQLite database and
store, so every row went through upload validation, dataset binding, job creation checks, the
pipeline and serving. One row per model and stage: the outcome (or the error code and sentence),
p50 at batch 1 and at the largest batch the model allows, the speedup against the original timed
in the same job, fidelity to the original (cosine, top-1 agreement for class scores), the verdict,
and whether the per-layer INT8 report exists. Writes zoo.json and zoo.md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.zoo_corpus import CORPUS, QUICK_SUBSET, Corpus, ZooModel, by_name
from engines.hardware import cpu_info

FULL_MEASURE = {"warmup_runs": 3, "timed_runs": 20, "min_seconds": 1.0}
QUICK_MEASURE = {"warmup_runs": 1, "timed_runs": 3, "min_seconds": 0.0}
BUDGET = {"metric": "fidelity", "max_drop": 0.01}


@dataclass
class Settings:
    calibration_samples: int = 64
    evaluation_samples: int = 24
    measure: dict[str, Any] = field(default_factory=lambda: dict(FULL_MEASURE))
    prune: bool = True


@contextmanager
def service(workdir: Path) -> Iterator[tuple[Any, Any]]:
    """The API in process on a fresh SQLite database and artifact store: (client, settings)."""
    from fastapi.testclient import TestClient

    from app.core.migrate import upgrade
    from app.core.settings import Settings as AppSettings
    from app.main import create_app

    settings = AppSettings(
        data_dir=workdir / "data", broker_url=None, database_url=None, open_hosts="testserver"
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def _upload(client: Any, kind: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        response = client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
    if response.status_code != 201:
        raise RuntimeError(f"{kind} upload refused: {response.status_code} {response.text[:300]}")
    return response.json()


def _run_job(client: Any, settings: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Create a job and run it as a worker would; a refusal at creation comes back as a failed job."""
    from workers.job_runner import run_job_by_id

    response = client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        error = response.json()
        return {"status": "refused", "error": {"code": error.get("code"), "detail": error.get("detail")}}
    run_job_by_id(settings, response.json()["id"])
    return client.get(f"/v1/jobs/{response.json()['id']}").json()


def _serve_check(client: Any, engine_id: str, model_path: Path, feeds: dict[str, np.ndarray]) -> str:
    """Infer over /v2 with binary tensors and compare with ONNX Runtime on the uploaded file."""
    import onnxruntime as ort
    from optiforge_client import tensors

    body, length = tensors.encode({"inputs": []}, "inputs", feeds, binary=True)
    response = client.post(
        f"/v2/models/{engine_id}/infer",
        content=body,
        headers={tensors.HEADER_LENGTH: str(length)},
    )
    if response.status_code != 200:
        return f"failed: {response.status_code} {response.text[:200]}"
    header_length = response.headers.get(tensors.HEADER_LENGTH)
    message, tail = tensors.split(response.content, header_length)
    served = tensors.decode(message["outputs"], tail, what="output")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    worst = max(
        float(
            np.abs(served[name].astype(np.float64) - expected[name]).max()
            / (np.abs(expected[name]).max() + 1e-9)
        )
        for name in expected
        if expected[name].dtype.kind == "f" and expected[name].size
    )
    return "ok" if worst < 1e-3 else f"outputs differ from ONNX Runtime's (relative {worst:.2e})"


def _row(model: ZooModel, stage: str, job: dict[str, Any], client: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model.name, "kind": model.kind, "stage": stage, "outcome": job["status"]}
    if job["status"] != "succeeded":
        row["error"] = job.get("error")
        row["messages"] = job.get("messages", [])
        return row
    if any(message.startswith("pruning skipped") for message in job.get("messages", [])):
        row["outcome"] = "pruning skipped"  # the job succeeded with engines of the unpruned model
    engine = client.get(f"/v1/engines/{job['engine_ids'][-1]}").json()
    metrics, largest = engine["metrics"], str(max(model.batch_sizes))
    latency, comparison = metrics["latency"], metrics["vs_baseline"]
    fidelity = (metrics.get("accuracy") or {}).get("fidelity") or {}
    row.update(
        engine_id=engine["id"],
        precision=engine["precision"],
        p50_b1_ms=latency["1"]["p50_ms"],
        p50_bmax_ms=latency[largest]["p50_ms"],
        bmax=int(largest),
        speedup_b1=comparison["speedup"].get("1"),
        speedup_bmax=comparison["speedup"].get(largest),
        cosine=fidelity.get("cosine_similarity"),
        top1_agreement=fidelity.get("top1_agreement"),
        verdict=comparison["verdict"],
        messages=job.get("messages", []),
        nodes_kept_float=len(engine["build_info"].get("nodes_kept_float", [])),
        quantize_nodes=engine["build_info"].get("quantize_nodes"),
        budget=engine["build_info"].get("accuracy_budget"),
    )
    if engine["precision"] == "int8":
        report = client.get(f"/v1/engines/{engine['id']}/layer-errors")
        unavailable = report.json().get("unavailable", []) if report.status_code == 200 else ["not stored"]
        row["layer_report"] = "complete" if not unavailable else f"partial: {unavailable}"
    return row


def run_model(model: ZooModel, corpus: Corpus, settings: Settings, workdir: Path) -> list[dict[str, Any]]:
    path = corpus.path(model)
    rng = np.random.default_rng(0)
    calibration = model.make_inputs(settings.calibration_samples, rng, corpus)
    evaluation = model.make_inputs(settings.evaluation_samples, rng, corpus)
    np.savez(workdir / f"{model.name}-calib.npz", **calibration)
    np.savez(workdir / f"{model.name}-eval.npz", **evaluation)
    rows = []
    with service(workdir / model.name) as (client, app_settings):
        uploaded = _upload(client, "models", path)
        calib = _upload(client, "datasets", workdir / f"{model.name}-calib.npz")
        evals = _upload(client, "datasets", workdir / f"{model.name}-eval.npz")
        base = {
            "model_id": uploaded["id"],
            "calibration_dataset_id": calib["id"],
            "evaluation_dataset_id": evals["id"],
        }
        recipe = {"batch_sizes": list(model.batch_sizes), "measure": settings.measure}
        stages = {
            "fp32": {**recipe, "precision": "fp32"},
            "int8": {**recipe, "precision": "int8"},
            "int8, 1 % fidelity budget": {**recipe, "precision": "int8", "accuracy_budget": BUDGET},
        }
        if settings.prune:
            stages["pruned (l1, 0.3)"] = {
                **recipe,
                "precision": "fp32",
                "prune": {"method": "l1", "ratio": 0.3},
            }
        for stage, stage_recipe in stages.items():
            started = time.perf_counter()
            row = _row(model, stage, _run_job(client, app_settings, {**base, "recipe": stage_recipe}), client)
            row["seconds"] = round(time.perf_counter() - started, 1)
            if stage == "fp32" and row["outcome"] == "succeeded":
                from engines.ingest.datasets import Dataset
                from engines.ingest.signature import specs_from_dicts

                specs = specs_from_dicts(uploaded["inputs"])
                first = Dataset(evaluation, None, {spec.name: spec.batch_axis for spec in specs})
                row["served_v2"] = _serve_check(client, row["engine_id"], path, first.batch(0, 1))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    if row["outcome"] not in ("succeeded", "pruning skipped"):
        error = row.get("error") or {}
        return f"{row['model']:>20} | {row['stage']:<26} | {row['outcome']}: {error.get('code')}: " + str(
            error.get("detail")
        )
    return (
        f"{row['model']:>20} | {row['stage']:<26} | p50 b1 {row['p50_b1_ms']:.2f} ms "
        f"({_ratio(row['speedup_b1'])}) b{row['bmax']} {row['p50_bmax_ms']:.2f} ms "
        f"({_ratio(row['speedup_bmax'])}) "
        f"cos {_num(row['cosine'], '.4f')} {row['verdict']}"
    )


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render_markdown(rows: list[dict[str, Any]], hardware: dict[str, Any]) -> str:
    header = (
        "| Model | Kind | Stage | Outcome | p50 b=1 ms | Speedup b=1 | Largest batch | p50 ms | Speedup | "
        "Cosine | Top-1 agr. | Verdict | INT8 layer report | Notes |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        if row["outcome"] not in ("succeeded", "pruning skipped"):
            error = row.get("error") or {}
            detail = str(error.get("detail", ""))[:160].replace("|", "\\|")
            lines.append(
                f"| {row['model']} | {row['kind']} | {row['stage']} | {row['outcome']} "
                f"(`{error.get('code')}`) | | | | | | | | | | {detail} |"
            )
            continue
        notes = []
        budget = row.get("budget")
        if budget and budget.get("met") is None:
            notes.append("budget not searched (see messages)")
        elif budget:
            notes.append(
                f"budget {'met' if budget['met'] else 'missed'} ({budget.get('strategy', '')}): "
                f"{row['nodes_kept_float']} nodes kept float, drop {budget['drop'] * 100:.2f} pt"
            )
        if row.get("served_v2"):
            notes.append(f"/v2 binary: {row['served_v2']}")
        notes += [
            message[:140] for message in row.get("messages", []) if message.startswith("pruning skipped")
        ]
        if row.get("quantize_nodes") == 0:
            notes.append(
                "nothing quantized: its compute sits in If subgraphs, which the quantizer does not enter"
            )
        outcome = "ok" if row["outcome"] == "succeeded" else row["outcome"]
        lines.append(
            f"| {row['model']} | {row['kind']} | {row['stage']} | {outcome} | {row['p50_b1_ms']:.2f} | "
            f"{_ratio(row['speedup_b1'])} | {row['bmax']} | {row['p50_bmax_ms']:.2f} | "
            f"{_ratio(row['speedup_bmax'])} | {_num(row['cosine'], '.4f')} | "
            f"{_num(row['top1_agreement'], '.3f')} | {row['verdict']} | {row.get('layer_report', '')} | "
            f"{'; '.join(notes)} |"
        )
    lines += [
        "",
        f"{hardware['cpu_model']}, {hardware['logical_cores']} logical cores "
        f"({', '.join(hardware['cpu_features'])}), onnxruntime {hardware['onnxruntime']}, Python "
        f"{hardware['python']}. Speedups compare p50s of the engine and the original timed side by side "
        "in the same job.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="corpus names (default: all)")
    parser.add_argument("--quick", action="store_true", help="the test subset, few samples, quick timing")
    parser.add_argument("--no-prune", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    names = args.models or (list(QUICK_SUBSET) if args.quick else [model.name for model in CORPUS])
    settings = Settings()
    if args.quick:
        settings = Settings(
            calibration_samples=16, evaluation_samples=8, measure=dict(QUICK_MEASURE), prune=False
        )
    settings.prune = settings.prune and not args.no_prune
    import onnxruntime

    hardware = {**cpu_info(), "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    features = ", ".join(hardware["cpu_features"])
    print(f"{hardware['cpu_model']} ({features}), onnxruntime {hardware['onnxruntime']}")
    corpus, rows, started = Corpus(), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in by_name(names):
            rows += run_model(model, corpus, settings, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"hardware": hardware, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    (args.out / "zoo.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "zoo.md").write_text(render_markdown(rows, hardware))
    print(f"\n{len(rows)} rows in {result['seconds']} s; wrote {args.out / 'zoo.json'} and zoo.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
