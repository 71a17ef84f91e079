"""What a job page and the job list show besides the row: the model's name, timing, the best
engine, a readable kind, and each engine's lineage.

Derived from what the records already hold, never stored twice: the timing from the row's
timestamps (and, for a search, its time budget), the best engine from the job's engines (a search
marks its chosen one; a recipe's fastest wins) or, while a search runs, from the line its stage
says (engines.search.best), the lineage from each engine's build_info and its job's recipe
(engines.search.lineage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.orm import EngineRecord, JobKind, JobRecord, JobStatus, ModelRecord, utcnow
from engines.measure.latency import latency_key
from engines.pipeline import BASELINE_BACKEND
from engines.search.best import parse_best
from engines.search.lineage import engine_lineage, original_lineage

#: How the API names each job kind for people: `optimize` runs a fixed recipe, `autotune` is
#: what the CLI's `optiforge optimize` and the console's auto-optimize start.
KIND_LABELS = {JobKind.OPTIMIZE: "recipe", JobKind.AUTOTUNE: "auto-optimize"}


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


@dataclass(frozen=True)
class JobContext:
    """What the rows of one page of jobs need from other tables, read in two queries."""

    model_names: dict[str, str]
    engines: dict[str, list[EngineRecord]]


def job_context(session: Session, jobs: Sequence[JobRecord]) -> JobContext:
    model_ids = sorted({job.model_id for job in jobs if job.model_id})
    names = (
        dict(
            session.execute(
                select(ModelRecord.id, ModelRecord.name).where(ModelRecord.id.in_(model_ids))
            ).all()
        )
        if model_ids
        else {}
    )
    engines: dict[str, list[EngineRecord]] = {job.id: [] for job in jobs}
    if engines:
        rows = session.scalars(
            select(EngineRecord)
            .where(EngineRecord.job_id.in_(list(engines)))
            .order_by(EngineRecord.created_at, EngineRecord.id)
        )
        for engine in rows:
            engines[engine.job_id].append(engine)
    return JobContext(names, engines)


def lineage_of(engine: EngineRecord, recipe: dict[str, Any] | None) -> dict[str, Any]:
    """An engine's lineage (engines.search.lineage), from its build_info and its job's recipe."""
    return engine_lineage(engine.backend, engine.precision, engine.build_info or {}, recipe)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None:
        return None
    return max(0.0, ((end or utcnow()) - start).total_seconds())


def _objective_key(job: JobRecord) -> str | None:
    """The latency key a search's speedup is read at (None: a recipe's smallest batch)."""
    objective = (job.recipe or {}).get("objective") if job.kind == JobKind.AUTOTUNE else None
    if not isinstance(objective, dict):
        return None
    return latency_key(int(objective.get("batch_size", 1)), objective.get("sequence_length"))


def _speedup(engine: EngineRecord, key: str | None) -> float | None:
    speedups = ((engine.metrics or {}).get("vs_baseline") or {}).get("speedup") or {}
    if not speedups:
        return None
    if key is None or key not in speedups:
        key = min(speedups, key=lambda item: [int(part) for part in str(item).split("x")])
    value = speedups.get(key)
    return float(value) if isinstance(value, int | float) else None


def _drop(engine: EngineRecord) -> float | None:
    """The accuracy drop (a fraction): a search's own figure, else the top-1 delta's loss."""
    searched = (engine.build_info or {}).get("autotune") or {}
    if isinstance(searched.get("drop"), int | float):
        return float(searched["drop"])
    delta = ((engine.metrics or {}).get("vs_baseline") or {}).get("top1_delta")
    return -float(delta) if isinstance(delta, int | float) else None


def _engine_best(job: JobRecord, engine: EngineRecord) -> dict[str, Any]:
    lineage = lineage_of(engine, job.recipe)
    return {
        "label": lineage["label"],
        "speedup": _speedup(engine, _objective_key(job)),
        "drop": _drop(engine),
        "lineage": lineage,
        "engine_id": engine.id,
    }


def _original_best() -> dict[str, Any]:
    lineage = original_lineage(BASELINE_BACKEND)
    return {"label": lineage["label"], "speedup": 1.0, "drop": 0.0, "lineage": lineage, "engine_id": None}


def best_of(job: JobRecord, engines: Sequence[EngineRecord]) -> dict[str, Any] | None:
    """A search's current best while it runs (from its stage), its chosen engine once it succeeded
    (the original when nothing beat it: one answer, as its messages give); a recipe's fastest
    engine. None before there is one."""
    if job.kind == JobKind.AUTOTUNE:
        if job.status == JobStatus.RUNNING:
            found = parse_best(job.stage)
            return None if found is None else {**found, "lineage": None, "engine_id": None}
        if job.status != JobStatus.SUCCEEDED:
            return None
        for engine in engines:
            searched = (engine.build_info or {}).get("autotune") or {}
            if searched.get("chosen") and not searched.get("serves_original"):
                return _engine_best(job, engine)
        return _original_best()
    if job.kind != JobKind.OPTIMIZE or not engines:
        return None
    rows = [_engine_best(job, engine) for engine in engines]
    return max(rows, key=lambda row: row["speedup"] if row["speedup"] is not None else float("-inf"))


def job_fields(job: JobRecord, context: JobContext) -> dict[str, Any]:
    """The JobOut fields beside the row's own: model_name, elapsed_s, time_budget_s, remaining_s,
    best, kind_label."""
    elapsed = _seconds(job.started_at, job.finished_at)
    budget = (job.recipe or {}).get("time_budget_s") if job.kind == JobKind.AUTOTUNE else None
    time_budget = float(budget) if isinstance(budget, int | float) else None
    remaining = None
    if time_budget is not None and job.status == JobStatus.RUNNING:
        remaining = max(0.0, time_budget - (elapsed or 0.0))
    return {
        "model_name": context.model_names.get(job.model_id or ""),
        "elapsed_s": elapsed,
        "time_budget_s": time_budget,
        "remaining_s": remaining,
        "best": best_of(job, context.engines.get(job.id, [])),
        "kind_label": kind_label(job.kind),
    }
