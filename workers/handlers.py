"""One handler per job kind: what an attempt does once it owns the job (workers.attempts).

A handler reads its inputs from a JobContext and returns an Outcome: the job's messages, the
columns to set on success, and the rows to write in the same transaction that marks it succeeded.
Files go to the artifact store under `jobs/<id>/` and their prefixes into `context.written`, so an
attempt that does not succeed removes them. A new kind is one function here and one line in
HANDLERS (and its constant in app.core.orm.JobKind).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.core.orm import DatasetRecord, EngineRecord, JobKind, JobRecord, new_id, take_alias
from app.core.settings import Settings
from app.core.store import ArtifactStore
from engines.backends.base import engine_size
from engines.ingest.datasets import Dataset, load_dataset
from engines.ingest.signature import TensorSpec
from engines.pipeline import BuiltEngine, run_recipe
from engines.prune.sensitivity import SENSITIVITY_JSON, SENSITIVITY_PNG, SensitivityConfig, analyse
from engines.prune.sensitivity import plot as plot_sensitivity
from engines.recipe import Recipe
from engines.search import report as search_report
from engines.search.autotune import AutotuneRequest, autotune
from engines.search.report import REPORT_JSON, REPORT_MD, REPORT_PNG
from workers.attempts import Attempt


@dataclass
class JobContext:
    settings: Settings
    store: ArtifactStore
    job_id: str
    recipe: dict[str, Any]
    inputs: list[TensorSpec]
    model_path: Path
    calibration: DatasetRecord | None
    evaluation: DatasetRecord | None
    workdir: Path
    attempt: Attempt
    written: list[str] = field(default_factory=list)  # artifact prefixes, removed unless the job succeeds

    def dataset(self, record: DatasetRecord | None) -> Dataset | None:
        if record is None:
            return None
        return load_dataset(
            self.store.local_path(record.artifact_key),
            self.inputs,
            max_unpacked_bytes=self.settings.max_unpacked_bytes,
        )


@dataclass
class Outcome:
    messages: list[str] = field(default_factory=list)
    columns: dict[str, Any] = field(default_factory=dict)
    record: Callable[[Session, JobRecord], None] = lambda session, job: None


Handler = Callable[[JobContext], Outcome]


def run_optimize(context: JobContext) -> Outcome:
    """A recipe through engines.pipeline; each engine's files and row are stored."""
    result = run_recipe(
        context.model_path,
        Recipe.from_dict(context.recipe),
        context.workdir,
        evaluation=context.dataset(context.evaluation),
        calibration=context.dataset(context.calibration),
        progress=context.attempt.progress,
        check_cancelled=context.attempt.check_cancelled,
    )
    return Outcome(
        messages=result.messages,
        columns={"baseline": result.baseline.to_dict()},
        record=lambda session, job: store_engines(
            session, context.store, job, result.engines, context.written
        ),
    )


def run_autotune(context: JobContext) -> Outcome:
    """The search (engines.search.autotune); its report (JSON, markdown, plot) goes under
    jobs/<id>/autotune/, the chosen engine and the other front members are stored as engines, the
    chosen one first and with the job's alias."""
    request = AutotuneRequest.from_dict(context.recipe)
    evaluation = context.dataset(context.evaluation)
    assert evaluation is not None, "an autotune job is created with an evaluation set"
    result = autotune(
        context.model_path,
        request,
        context.workdir / "search",
        evaluation=evaluation,
        calibration=context.dataset(context.calibration),
        progress=context.attempt.progress,
        check_cancelled=context.attempt.check_cancelled,
    )
    report = result.report(request.objective, request.budget)
    out = context.workdir / "autotune"
    out.mkdir()
    (out / REPORT_JSON).write_text(json.dumps(report))
    (out / REPORT_MD).write_text(search_report.markdown(report))
    search_report.plot(report, out / REPORT_PNG)
    prefix = f"jobs/{context.job_id}/autotune"
    context.written.append(prefix)
    context.store.put_dir(prefix, out)
    alias = context.recipe.get("alias")

    def record(session: Session, job: JobRecord) -> None:
        stored = store_engines(session, context.store, job, result.engines, context.written)
        if alias and result.chosen is not None and stored:
            take_alias(session, stored[0], alias)

    return Outcome(messages=result.messages, columns={"baseline": result.baseline.to_dict()}, record=record)


def run_sensitivity(context: JobContext) -> Outcome:
    """A sensitivity analysis; its table and plot go under jobs/<id>/sensitivity/."""
    data = context.dataset(context.evaluation or context.calibration)
    assert data is not None, "a sensitivity job is created with a dataset"
    config = SensitivityConfig(method=context.recipe["method"], ratios=tuple(context.recipe["ratios"]))
    report = analyse(context.model_path, context.inputs, data, config, progress=context.attempt.progress)
    out = context.workdir / "sensitivity"
    out.mkdir()
    (out / SENSITIVITY_JSON).write_text(json.dumps(report))
    plot_sensitivity(report, out / SENSITIVITY_PNG)
    prefix = f"jobs/{context.job_id}/sensitivity"
    context.written.append(prefix)
    context.store.put_dir(prefix, out)
    return Outcome()


HANDLERS: dict[str, Handler] = {
    JobKind.OPTIMIZE: run_optimize,
    JobKind.SENSITIVITY: run_sensitivity,
    JobKind.AUTOTUNE: run_autotune,
}


def store_engines(
    session: Session, store: ArtifactStore, job: JobRecord, engines: list[BuiltEngine], written: list[str]
) -> list[EngineRecord]:
    """Store each engine's files and row, in order; `written` collects the prefixes, for clean-up on
    failure."""
    records = []
    for built in engines:
        engine_id = new_id("eng")
        prefix = f"jobs/{job.id}/engines/{engine_id}"
        written.append(prefix)
        store.put_dir(prefix, built.artifact.path.parent)
        measurement = built.measurement
        record = EngineRecord(
            id=engine_id,
            job_id=job.id,
            model_id=job.model_id,
            backend=built.artifact.backend,
            precision=built.artifact.precision,
            artifact_prefix=prefix,
            engine_file=built.artifact.path.name,
            size_bytes=engine_size(built.artifact.path),
            build_seconds=built.artifact.build_seconds,
            hardware=measurement.hardware,
            metrics={
                "latency": measurement.latency,
                "accuracy": measurement.accuracy,
                "memory_mb": measurement.memory_mb,
                "vs_baseline": built.comparison,
            },
            build_info=built.artifact.metadata,
        )
        session.add(record)
        records.append(record)
    return records
