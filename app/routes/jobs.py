"""/v1/jobs: optimization jobs run by Celery workers; their state lives in SQL."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.deps import get_db, get_settings_dep, get_store_dep
from app.errors import ApiError, from_engine_error, not_found
from app.job_queue import enqueue_job
from app.orm import EngineRecord, JobRecord, JobStatus, ModelRecord, lease_cutoff, utcnow
from app.routes.datasets import get_dataset_record
from app.routes.models import get_model_record
from app.schemas import JobCreate, JobOut
from app.settings import Settings
from app.store import ArtifactStore
from engines.datasets import DatasetInfo, check_fits_model
from engines.errors import EngineError, InvalidRecipeError
from engines.pipeline import validate_recipe
from engines.prune import check_prune_config
from engines.recipe import Recipe
from engines.report import render_markdown, report_row
from engines.sensitivity import SENSITIVITY_JSON, SENSITIVITY_KEY, SENSITIVITY_PNG, ratios_within
from engines.signature import TensorSpec, specs_from_dicts
from engines.torch_bridge import check_prunable_layout, unconvertible_ops

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def engine_ids_by_job(session: Session, job_ids: list[str]) -> dict[str, list[str]]:
    """Engine ids of many jobs in one query."""
    found: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    rows = session.execute(
        select(EngineRecord.job_id, EngineRecord.id)
        .where(EngineRecord.job_id.in_(job_ids))
        .order_by(EngineRecord.created_at, EngineRecord.id)
    )
    for job_id, engine_id in rows:
        found[job_id].append(engine_id)
    return found


def job_out(session: Session, job: JobRecord, engine_ids: list[str] | None = None) -> JobOut:
    if engine_ids is None:
        engine_ids = engine_ids_by_job(session, [job.id])[job.id]
    return JobOut(
        id=job.id,
        model_id=job.model_id,
        calibration_dataset_id=job.calibration_dataset_id,
        evaluation_dataset_id=job.evaluation_dataset_id,
        recipe=job.recipe,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        messages=job.messages or [],
        error=job.error,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        worker=job.worker,
        heartbeat_at=job.heartbeat_at,
        engine_ids=engine_ids,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def get_job_record(session: Session, job_id: str) -> JobRecord:
    job = session.get(JobRecord, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def check_convertible(model: ModelRecord, recipe: Recipe) -> None:
    """A prune-only job on a model with ops the converter lacks is refused now, naming them. With a
    precision stage to fall back on, the job goes ahead and reports `pruning skipped` instead."""
    if recipe.precision == "fp32":
        check_prunable_layout(specs_from_dicts(model.info["inputs"]))
    try:
        missing = unconvertible_ops(list(model.info.get("op_types", {})), model.info["opset"])
    except EngineError:  # this API node has no torch/onnx2torch: the worker will say
        return
    if missing and recipe.precision == "fp32":
        raise InvalidRecipeError(
            f"the model cannot be converted to PyTorch for pruning: no converter for {missing}"
        )


def _dataset_fitting(
    session: Session, dataset_id: str | None, inputs: list[TensorSpec], varying_unbatched: set[str]
) -> DatasetInfo | None:
    """The dataset's description, after checking that its arrays fit the model's inputs; adds to
    `varying_unbatched` the inputs without a batch axis whose rows differ in it."""
    if dataset_id is None:
        return None
    info = DatasetInfo.from_dict(get_dataset_record(session, dataset_id).info)
    varying_unbatched.update(check_fits_model(info, inputs))
    return info


@router.post("", status_code=202, response_model=JobOut, summary="Start an optimization job")
def create_job(
    body: JobCreate,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> JobOut:
    """Check that the recipe and datasets fit the model, store the job, then queue it.

    The dataset/model match is checked here, so a mismatch is a 422 now, not a failed job later.
    """
    model = get_model_record(session, body.model_id)
    inputs = specs_from_dicts(model.info["inputs"])
    recipe = body.recipe.to_config()
    source = body.recipe.prune.ratios_from_sensitivity if body.recipe.prune else None
    if source is not None and recipe.prune is not None:
        report = sensitivity_report(
            session, store, source.job_id or _latest_sensitivity(session, model.id), model_id=model.id
        )
        recipe = replace(
            recipe, prune=replace(recipe.prune, layer_ratios=ratios_within(report, source.max_drop))
        )
    try:
        varying: set[str] = set()
        calibration = _dataset_fitting(session, body.calibration_dataset_id, inputs, varying)
        evaluation = _dataset_fitting(session, body.evaluation_dataset_id, inputs, varying)
        validate_recipe(
            inputs,
            recipe,
            evaluation_samples=evaluation and evaluation.samples,
            evaluation_has_labels=bool(evaluation and evaluation.has_labels),
            calibration_samples=calibration and calibration.samples,
            calibration_has_labels=bool(calibration and calibration.has_labels),
            varying_unbatched=sorted(varying),
        )
        if recipe.prune is not None:
            check_prune_config(recipe.prune, model.info.get("op_types", {}))
            check_convertible(model, recipe)
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    job = JobRecord(
        model_id=model.id,
        calibration_dataset_id=body.calibration_dataset_id,
        evaluation_dataset_id=body.evaluation_dataset_id,
        recipe=recipe.to_dict(),
        messages=[],
    )
    queue_job(session, settings, job, recipe)
    return job_out(session, job)


def queue_job(session: Session, settings: Settings, job: JobRecord, recipe: Recipe) -> None:
    """Commit the job, then send its id to the workers; a broker that is down fails the job (503)."""
    session.add(job)
    session.commit()  # enqueue only after the row is committed: the worker re-reads it
    try:
        enqueue_job(settings, job.id, recipe)
    except Exception as exc:
        logger.exception("could not enqueue job %s", job.id)
        job.status, job.finished_at = JobStatus.FAILED, utcnow()
        job.error = {"code": "broker_unavailable", "detail": f"the job queue is unreachable: {exc}"}
        session.commit()
        raise ApiError(
            503, "broker_unavailable", f"the job queue is unreachable: {exc}", job_id=job.id
        ) from exc


@router.get("", response_model=list[JobOut], summary="List jobs")
def list_jobs(
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    model_id: str | None = None,
    session: Session = Depends(get_db),
) -> list[JobOut]:
    query = select(JobRecord).order_by(JobRecord.created_at.desc())
    if status:
        query = query.where(JobRecord.status == status)
    if model_id:
        query = query.where(JobRecord.model_id == model_id)
    jobs = list(session.scalars(query))
    engine_ids = engine_ids_by_job(session, [job.id for job in jobs])
    return [job_out(session, job, engine_ids[job.id]) for job in jobs]


@router.get("/{job_id}", response_model=JobOut, summary="Job status, progress and error")
def get_job(job_id: str, session: Session = Depends(get_db)) -> JobOut:
    return job_out(session, get_job_record(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(
    job_id: str,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> JobOut:
    """A queued job, or a running one whose worker was lost, is cancelled at once; a running one
    stops at its next checkpoint (timed runs are checked twice a second) and stores nothing."""
    job = get_job_record(session, job_id)
    stops_now = (JobRecord.status == JobStatus.QUEUED) | (
        (JobRecord.status == JobStatus.RUNNING)
        & (JobRecord.heartbeat_at < lease_cutoff(settings.job_lease_s))
    )
    cancelled_now = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job_id, stops_now)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, stage="cancelled", finished_at=utcnow())
    ).rowcount
    flagged = (
        cancelled_now
        or session.execute(
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.status == JobStatus.RUNNING)
            .values(cancel_requested=True)
        ).rowcount
    )
    if not flagged:
        session.rollback()
        raise ApiError(
            409,
            "job_not_cancellable",
            f"job '{job_id}' is {job.status}; only queued or running jobs can be cancelled",
        )
    session.commit()
    if cancelled_now:
        store.delete(f"jobs/{job_id}")  # whatever a lost worker may have left
    session.refresh(job)
    return job_out(session, job)


@router.get(
    "/{job_id}/report",
    summary="The comparison table: baseline and every engine",
    responses={200: {"content": {"application/json": {}, "text/markdown": {}}}},
)
def job_report(
    job_id: str,
    format: Literal["json", "md"] = Query("json", description="json, or md for a markdown table"),
    session: Session = Depends(get_db),
) -> Response:
    job = get_job_record(session, job_id)
    if SENSITIVITY_KEY in job.recipe:
        raise ApiError(
            409, "not_an_optimization_job", f"job '{job_id}' is a sensitivity analysis: GET its /sensitivity"
        )
    if job.status != JobStatus.SUCCEEDED or job.baseline is None:
        raise ApiError(
            409, "job_not_succeeded", f"job '{job_id}' is {job.status}; reports exist for succeeded jobs"
        )
    model = get_model_record(session, job.model_id)
    engines = session.scalars(
        select(EngineRecord).where(EngineRecord.job_id == job_id).order_by(EngineRecord.created_at)
    ).all()
    params, macs = model.info.get("parameters"), model.info.get("macs")
    rows = [report_row(model.name, "original", job.baseline, None, model.size_bytes, params, macs)]
    for engine in engines:
        measurement = {"backend": engine.backend, "precision": engine.precision, **engine.metrics}
        pruned = engine.build_info.get("prune", {})
        rows.append(
            report_row(
                model.name,
                engine.id,
                measurement,
                engine.metrics.get("vs_baseline"),
                engine.size_bytes,
                pruned.get("params", params),
                pruned.get("macs", macs),
            )
        )
    hardware = job.baseline.get("hardware", {})
    if format == "md":
        return PlainTextResponse(render_markdown(rows, hardware), media_type="text/markdown")
    return JSONResponse(
        {
            "job_id": job.id,
            "model_id": model.id,
            "network": model.name,
            "hardware": hardware,
            "messages": job.messages or [],
            "rows": rows,
        }
    )


def _latest_sensitivity(session: Session, model_id: str) -> str:
    jobs = session.scalars(
        select(JobRecord)
        .where(JobRecord.model_id == model_id, JobRecord.status == JobStatus.SUCCEEDED)
        .order_by(JobRecord.finished_at.desc())
    )
    latest = next((job.id for job in jobs if SENSITIVITY_KEY in job.recipe), None)
    if latest is None:
        raise ApiError(
            409,
            "sensitivity_not_available",
            f"model '{model_id}' has no sensitivity analysis yet; "
            f"POST /v1/models/{model_id}/sensitivity first",
        )
    return latest


def sensitivity_report(
    session: Session, store: ArtifactStore, job_id: str, *, model_id: str | None = None
) -> dict:
    """The stored table of a succeeded sensitivity job (of `model_id`, when given)."""
    job = get_job_record(session, job_id)
    if SENSITIVITY_KEY not in job.recipe or job.status != JobStatus.SUCCEEDED:
        raise ApiError(
            409, "sensitivity_not_available", f"job '{job_id}' is not a succeeded sensitivity analysis"
        )
    if model_id is not None and job.model_id != model_id:
        raise ApiError(
            422, "invalid_recipe", f"sensitivity job '{job_id}' analysed another model ({job.model_id})"
        )
    return json.loads((store.local_path(f"jobs/{job_id}/sensitivity") / SENSITIVITY_JSON).read_text())


@router.get(
    "/{job_id}/sensitivity",
    summary="A sensitivity analysis: drop per layer and ratio (JSON), or its plot (?format=png)",
    responses={200: {"content": {"application/json": {}, "image/png": {}}}},
)
def get_sensitivity(
    job_id: str,
    format: Literal["json", "png"] = Query("json"),
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    report = sensitivity_report(session, store, job_id)
    if format == "png":
        png = store.local_path(f"jobs/{job_id}/sensitivity") / SENSITIVITY_PNG
        return Response(png.read_bytes(), media_type="image/png")
    return JSONResponse(report)
