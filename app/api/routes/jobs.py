"""/v1/jobs: optimization jobs run by Celery workers; their state lives in SQL (app.services.jobs)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import PrincipalDep, ProjectDep, ServingDep, get_db, get_settings_dep, get_store_dep
from app.api.pagination import PAGE_RESPONSES, PageDep, fetch_page, page_response
from app.api.schemas import ForceQuery, JobCreate, JobKindName, JobOut, JobStatusName
from app.api.views import job_list, job_out
from app.core.audit import audit
from app.core.orm import JobRecord
from app.core.settings import Settings
from app.core.space import disk_reserve
from app.core.store import ArtifactStore
from app.services import deletes
from app.services import jobs as service
from app.services.records import get_job_record
from engines.measure.report import render_markdown
from engines.prune.sensitivity import SENSITIVITY_PNG
from engines.search.report import REPORT_MD, REPORT_PNG

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut, summary="Start an optimization job")
def create_job(
    body: JobCreate,
    principal: PrincipalDep,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> JobOut:
    """Check that the recipe and datasets fit the model, store the job, then queue it.

    The dataset/model match is checked here, so a mismatch is a 422 now, not a failed job later.
    """
    source = body.recipe.prune.ratios_from_sensitivity if body.recipe.prune else None
    job = service.create_optimization_job(
        session,
        settings,
        store,
        project_id=principal.project_id,
        model_id=body.model_id,
        recipe=body.recipe.to_config(),
        calibration_dataset_id=body.calibration_dataset_id,
        evaluation_dataset_id=body.evaluation_dataset_id,
        sensitivity=None if source is None else service.SensitivitySource(source.job_id, source.max_drop),
        budget_metric_stated=body.recipe.accuracy_budget is None or body.recipe.accuracy_budget.metric_stated,
    )
    audit(principal, "job.create", job.id, kind=job.kind, model_id=body.model_id)
    return job_out(session, job)


@router.get("", response_model=list[JobOut], responses=PAGE_RESPONSES, summary="List jobs")
def list_jobs(
    request: Request,
    project: ProjectDep,
    page: PageDep,
    status: Annotated[
        list[JobStatusName] | None, Query(description="any of these statuses (repeat it for several)")
    ] = None,
    kind: Annotated[
        list[JobKindName] | None, Query(description="any of these kinds (repeat it for several)")
    ] = None,
    model_id: Annotated[str | None, Query(description="jobs on this model")] = None,
    session: Session = Depends(get_db),
) -> Response:
    """Newest first, a page at a time (app.api.pagination); filtered by status, kind and model."""
    query = select(JobRecord).where(JobRecord.project_id == project)
    if status:
        query = query.where(JobRecord.status.in_(status))
    if kind:
        query = query.where(JobRecord.kind.in_(kind))
    if model_id:
        query = query.where(JobRecord.model_id == model_id)
    jobs, next_cursor = fetch_page(session, query, JobRecord, page)
    return page_response(request, job_list(session, jobs), next_cursor)


@router.get("/{job_id}", response_model=JobOut, summary="Job status, progress and error")
def get_job(job_id: str, project: ProjectDep, session: Session = Depends(get_db)) -> JobOut:
    return job_out(session, get_job_record(session, job_id, project))


@router.delete("/{job_id}", status_code=204, summary="Delete a finished job, its engines and report")
def delete_job(
    job_id: str,
    serving: ServingDep,
    principal: PrincipalDep,
    force: ForceQuery = False,
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    """Its engines (their files too) and its report go with it. A queued or running job is a 409
    `job_active` (cancel it first); an engine of the job that holds an alias is a 409
    `engine_holds_alias` unless `force=true`, which deletes the alias too. Works on a full disk."""
    job = get_job_record(session, job_id, principal.project_id)
    engines = deletes.delete_job(session, store, disk_reserve(settings), serving.forget, job, force=force)
    audit(principal, "job.delete", job_id, engines=len(engines))
    return Response(status_code=204)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(
    job_id: str,
    principal: PrincipalDep,
    session: Session = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    store: ArtifactStore = Depends(get_store_dep),
) -> JobOut:
    """A queued job, or a running one whose worker was lost, is cancelled at once; a running one
    stops at its next checkpoint (timed runs are checked twice a second) and stores nothing."""
    job = service.cancel_job(session, settings, store, job_id, principal.project_id)
    audit(principal, "job.cancel", job_id)
    return job_out(session, job)


@router.get(
    "/{job_id}/report",
    summary="The comparison table: baseline and every engine",
    responses={200: {"content": {"application/json": {}, "text/markdown": {}}}},
)
def job_report(
    job_id: str,
    project: ProjectDep,
    format: Literal["json", "md"] = Query("json", description="json, or md for a markdown table"),
    session: Session = Depends(get_db),
) -> Response:
    report = service.job_report(session, job_id, project)
    if format == "md":
        return PlainTextResponse(
            render_markdown(report["rows"], report["hardware"]), media_type="text/markdown"
        )
    return JSONResponse(report)


@router.get(
    "/{job_id}/sensitivity",
    summary="A sensitivity analysis: drop per layer and ratio (JSON), or its plot (?format=png)",
    responses={200: {"content": {"application/json": {}, "image/png": {}}}},
)
def get_sensitivity(
    job_id: str,
    project: ProjectDep,
    format: Literal["json", "png"] = Query("json"),
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    report = service.sensitivity_report(session, store, job_id, project_id=project)
    if format == "png":
        png = store.local_path(f"jobs/{job_id}/sensitivity") / SENSITIVITY_PNG
        return Response(png.read_bytes(), media_type="image/png")
    return JSONResponse(report)


@router.get(
    "/{job_id}/autotune",
    summary="An autotune search: every candidate with its lineage, outcome and figures, the Pareto front",
    responses={200: {"content": {"application/json": {}, "text/markdown": {}, "image/png": {}}}},
)
def get_autotune(
    job_id: str,
    project: ProjectDep,
    format: Literal["json", "md", "png"] = Query("json", description="json, md (a table) or png (the plot)"),
    session: Session = Depends(get_db),
    store: ArtifactStore = Depends(get_store_dep),
) -> Response:
    if format == "json":
        return JSONResponse(service.autotune_report(session, store, job_id, project))
    folder = service.autotune_report_dir(session, store, job_id, project)
    if format == "png":
        return Response((folder / REPORT_PNG).read_bytes(), media_type="image/png")
    return PlainTextResponse((folder / REPORT_MD).read_text(), media_type="text/markdown")
