"""What a delete may take with it, and when it must refuse (409) unless forced.

An engine that holds an alias serves every client that infers by that name: deleting it silently
(as it was, a 204) made the alias a 404 and took the chosen row out of its job's report. So a
delete that would take an alias away is refused with the alias named, unless `force=true`; forced,
the alias goes with its engine. The same rule protects a job's engines (DELETE /v1/jobs/{id}) and a
model's (`model_serving`). A dataset that a queued or running job reads is refused likewise
(`dataset_in_use`); forced, those jobs are cancelled first. Jobs still queued or running are never
deleted (`job_active`, `model_in_use`): cancel them first.

Rows go first and files after (app.services.records.delete_records: on a full disk too), through
the artifact store; the engines' ids are published to every API replica
(app.core.invalidation, through `forget`) once the rows are gone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.core.errors import ApiError
from app.core.orm import DatasetRecord, EngineRecord, JobRecord, JobStatus, ModelRecord
from app.core.settings import Settings
from app.core.space import DiskReserve
from app.core.store import ArtifactStore
from app.services.jobs import cancel_job
from app.services.records import delete_records

#: Called with the ids of deleted engines once their rows are gone (Serving.forget).
Forget = Callable[..., None]
FORCE_HINT = "pass force=true to delete it anyway"


def _aliases(engines: Sequence[EngineRecord]) -> dict[str, str]:
    """engine id -> alias, for the engines that hold one."""
    return {engine.id: engine.alias for engine in engines if engine.alias}


def _alias_list(aliases: dict[str, str]) -> str:
    return ", ".join(f"'{alias}' (engine '{engine_id}')" for engine_id, alias in sorted(aliases.items()))


def delete_engine(
    session: Session,
    store: ArtifactStore,
    reserve: DiskReserve,
    forget: Forget,
    engine: EngineRecord,
    *,
    force: bool,
) -> str | None:
    """Delete the engine (its files too); 409 `engine_holds_alias` while it holds an alias, unless
    `force`. Returns the alias that went with it."""
    alias = engine.alias
    if alias and not force:
        raise ApiError(
            409,
            "engine_holds_alias",
            f"engine '{engine.id}' holds the alias '{alias}': clients that infer with it would get 404s. "
            f"Move the alias to another engine (PUT /v1/engines/{{id}}/alias) or {FORCE_HINT} (the alias "
            "goes too)",
            alias=alias,
        )
    delete_records(
        session, store, reserve, [engine], [engine.artifact_prefix], after_commit=lambda: forget(engine.id)
    )
    return alias


def job_engines(session: Session, job_ids: Sequence[str]) -> list[EngineRecord]:
    if not job_ids:
        return []
    return list(session.scalars(select(EngineRecord).where(EngineRecord.job_id.in_(job_ids))).all())


def delete_job(
    session: Session,
    store: ArtifactStore,
    reserve: DiskReserve,
    forget: Forget,
    job: JobRecord,
    *,
    force: bool,
) -> list[str]:
    """Delete a finished job with its engines and report (everything under `jobs/<id>/`); 409
    `job_active` while it is queued or running, 409 `engine_holds_alias` when one of its engines
    holds an alias, unless `force`. Returns the ids of the engines deleted."""
    if job.status in JobStatus.ACTIVE:
        raise ApiError(
            409,
            "job_active",
            f"job '{job.id}' is {job.status}; cancel it first (POST /v1/jobs/{job.id}/cancel), then "
            "delete it",
        )
    engines = job_engines(session, [job.id])
    aliases = _aliases(engines)
    if aliases and not force:
        raise ApiError(
            409,
            "engine_holds_alias",
            f"job '{job.id}' has engines that hold aliases: {_alias_list(aliases)}; clients that infer "
            f"with them would get 404s. Move the aliases or {FORCE_HINT} (the aliases go too)",
            aliases=sorted(aliases.values()),
        )
    engine_ids = [engine.id for engine in engines]
    delete_records(
        session, store, reserve, [*engines, job], [f"jobs/{job.id}"], after_commit=lambda: forget(*engine_ids)
    )
    return engine_ids


def delete_model(
    session: Session,
    store: ArtifactStore,
    reserve: DiskReserve,
    forget: Forget,
    model: ModelRecord,
    *,
    force: bool,
) -> tuple[int, int]:
    """Delete the model, its jobs and engines; 409 `model_in_use` while a job on it is queued or
    running (cancel it first, forced or not), 409 `model_serving` while one of its engines holds an
    alias, unless `force`. Returns (jobs, engines) deleted."""
    jobs = session.scalars(select(JobRecord).where(JobRecord.model_id == model.id)).all()
    active = [job.id for job in jobs if job.status in JobStatus.ACTIVE]
    if active:
        raise ApiError(
            409, "model_in_use", f"jobs {active} are still running on this model; cancel them first"
        )
    engines = list(session.scalars(select(EngineRecord).where(EngineRecord.model_id == model.id)).all())
    aliases = _aliases(engines)
    if aliases and not force:
        raise ApiError(
            409,
            "model_serving",
            f"model '{model.id}' is served: its engines hold the aliases {_alias_list(aliases)}. Move "
            f"the aliases to other engines or {FORCE_HINT} (its jobs, engines and aliases go too)",
            aliases=sorted(aliases.values()),
        )
    prefixes = [model.artifact_prefix] + [f"jobs/{job.id}" for job in jobs]
    engine_ids = [engine.id for engine in engines]
    delete_records(
        session, store, reserve, [*engines, *jobs, model], prefixes, after_commit=lambda: forget(*engine_ids)
    )
    return len(jobs), len(engine_ids)


def delete_dataset(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    reserve: DiskReserve,
    dataset: DatasetRecord,
    *,
    force: bool,
) -> list[str]:
    """Delete the dataset; 409 `dataset_in_use` while a queued or running job reads it, unless
    `force`, which cancels those jobs first. Finished jobs keep their results (their dataset id
    becomes null). Returns the ids of the jobs cancelled."""
    active = list(
        session.scalars(
            select(JobRecord.id).where(
                JobRecord.project_id == dataset.project_id,
                JobRecord.status.in_(JobStatus.ACTIVE),
                or_(
                    JobRecord.calibration_dataset_id == dataset.id,
                    JobRecord.evaluation_dataset_id == dataset.id,
                ),
            )
        ).all()
    )
    if active and not force:
        raise ApiError(
            409,
            "dataset_in_use",
            f"jobs {active} still use this dataset; cancel them first, or {FORCE_HINT} (they are cancelled)",
            job_ids=active,
        )
    cancelled = []
    for job_id in active:
        try:
            cancel_job(session, settings, store, job_id, dataset.project_id)
            cancelled.append(job_id)
        except ApiError as exc:  # it finished in the meantime: nothing to cancel
            if exc.code != "job_not_cancellable":
                raise
    prefix = dataset.artifact_key.rsplit("/", 1)[0]
    delete_records(session, store, reserve, [dataset], [prefix])
    return cancelled
