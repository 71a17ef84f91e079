"""Jobs: create (every check that can fail now fails here, as a 422), queue, cancel, report.

The database row, not the message, decides who runs a job: a job is committed first, then its id
is sent to the workers by task name (app.core.job_queue).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.core.errors import ApiError, from_engine_error
from app.core.job_queue import enqueue_job, job_queue, queue_for
from app.core.orm import (
    DatasetRecord,
    DatasetStatus,
    EngineRecord,
    JobKind,
    JobRecord,
    JobStatus,
    ModelRecord,
    ModelStatus,
    lease_cutoff,
    new_id,
    utcnow,
)
from app.core.outages import insufficient_storage, is_storage_full
from app.core.presence import largest_worker_cores, live_workers_by_queue
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.services.datasets import require_dataset_ready
from app.services.records import get_dataset_record, get_job_record, get_model_record
from app.services.text_checks import check_text_dataset
from engines.backends.registry import check_precision
from engines.errors import EngineError, InvalidRecipeError
from engines.graphopt.config import check_config
from engines.graphopt.stage import check_graph_optimization
from engines.ingest.datasets import DatasetInfo, check_fits_model
from engines.ingest.model import MODEL_FILENAME
from engines.ingest.sequence import SequenceProfile, check_sequence_lengths, read_profile
from engines.ingest.signature import TensorSpec, specs_from_dicts
from engines.measure.report import report_row
from engines.pipeline import BASELINE_BACKEND, validate_recipe
from engines.prune.methods import PruneConfig, check_prune_config
from engines.prune.sensitivity import SENSITIVITY_JSON, ratios_within
from engines.recipe import Recipe
from engines.search.autotune import AutotuneRequest
from engines.search.lineage import candidate_lineage, engine_lineage, original_lineage
from engines.search.report import REPORT_JSON
from engines.torch_bridge import check_prunable_layout, unconvertible_ops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivitySource:
    """Per-layer ratios from a sensitivity analysis: its job (None: the model's latest) and the drop."""

    job_id: str | None
    max_drop: float


@dataclass(frozen=True)
class ModelState:
    """Whether a model can be used, as the API shows it: `status` (ModelStatus), `error` when it
    failed, and its conversion job (None for an ONNX upload)."""

    status: str
    error: dict[str, Any] | None
    conversion_job_id: str | None


def conversion_jobs(session: Session, model_ids: list[str]) -> dict[str, JobRecord]:
    """The convert job of each model that has one (the latest, should there be several), in one
    query."""
    if not model_ids:
        return {}
    rows = session.scalars(
        select(JobRecord)
        .where(JobRecord.model_id.in_(model_ids), JobRecord.kind == JobKind.CONVERT)
        .order_by(JobRecord.created_at, JobRecord.id)
    )
    return {job.model_id: job for job in rows}


def model_state(model: ModelRecord, conversion: JobRecord | None) -> ModelState:
    """The model's state. A `converting` row whose convert job ended without the worker saying so
    (cancelled while queued, failed by the sweeper for want of a worker, a broker that was down) is
    `failed`, with the job's error: the job decides, as it does for everything else."""
    job_id = conversion.id if conversion is not None else None
    if model.status != ModelStatus.CONVERTING:
        return ModelState(model.status, model.error, job_id)
    if conversion is None:
        error = {"code": "conversion_failed", "detail": "the model has no conversion job; upload it again"}
        return ModelState(ModelStatus.FAILED, error, None)
    if conversion.status == JobStatus.CANCELLED:
        error = {
            "code": "conversion_cancelled",
            "detail": f"conversion job '{conversion.id}' was cancelled; upload the program again",
        }
        return ModelState(ModelStatus.FAILED, error, job_id)
    if conversion.status == JobStatus.FAILED:
        error = conversion.error or {"code": "conversion_failed", "detail": "the conversion job failed"}
        return ModelState(ModelStatus.FAILED, error, job_id)
    return ModelState(ModelStatus.CONVERTING, None, job_id)


def require_ready(session: Session, model: ModelRecord) -> None:
    """A model that is still converting, or whose conversion failed, has no ONNX and no signature
    yet: anything that uses it is a 409 `model_not_ready` that says which, and why."""
    if model.status == ModelStatus.READY:
        return
    state = model_state(model, conversion_jobs(session, [model.id]).get(model.id))
    if state.status == ModelStatus.CONVERTING:
        raise ApiError(
            409,
            "model_not_ready",
            f"model '{model.id}' is still converting to ONNX (job '{state.conversion_job_id}'); "
            "wait until its status is ready",
            model_status=state.status,
            conversion_job_id=state.conversion_job_id,
        )
    error = state.error or {}
    raise ApiError(
        409,
        "model_not_ready",
        f"model '{model.id}' failed to convert to ONNX ({error.get('code', 'conversion_failed')}: "
        f"{error.get('detail', '')}); fix the program and upload it again",
        model_status=state.status,
        conversion_job_id=state.conversion_job_id,
        error=error,
    )


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
    session: Session,
    project_id: str,
    dataset_id: str | None,
    inputs: list[TensorSpec],
    varying_unbatched: set[str],
    *,
    store: ArtifactStore,
    model: ModelRecord,
) -> DatasetInfo | None:
    """The dataset's description, after checking that its arrays fit the model's inputs (and a text
    dataset's token ids its embedding tables); adds to `varying_unbatched` the inputs without a
    batch axis whose rows differ in it."""
    if dataset_id is None:
        return None
    record = get_dataset_record(session, dataset_id, project_id)
    require_dataset_ready(session, record)
    info = DatasetInfo.from_dict(record.info)
    varying_unbatched.update(check_fits_model(info, inputs))
    check_text_dataset(store, model, record.info)
    return info


def create_optimization_job(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    *,
    project_id: str,
    model_id: str,
    recipe: Recipe,
    calibration_dataset_id: str | None,
    evaluation_dataset_id: str | None,
    sensitivity: SensitivitySource | None = None,
    budget_metric_stated: bool = True,
) -> JobRecord:
    """Check that the recipe and datasets fit the model, store the job, then queue it.

    The dataset/model match is checked here, so a mismatch is a 422 now, not a failed job later.
    An accuracy budget whose metric was left out measures fidelity when the evaluation set has no
    labels (top1 would need them).
    """
    model = get_model_record(session, model_id, project_id)
    require_ready(session, model)
    inputs = specs_from_dicts(model.info["inputs"])
    if sensitivity is not None and recipe.prune is not None:
        report = sensitivity_report(
            session,
            store,
            sensitivity.job_id or latest_sensitivity(session, model.id),
            project_id=project_id,
            model_id=model.id,
        )
        recipe = replace(
            recipe, prune=replace(recipe.prune, layer_ratios=ratios_within(report, sensitivity.max_drop))
        )
    try:
        varying: set[str] = set()
        calibration = _dataset_fitting(
            session, project_id, calibration_dataset_id, inputs, varying, store=store, model=model
        )
        evaluation = _dataset_fitting(
            session, project_id, evaluation_dataset_id, inputs, varying, store=store, model=model
        )
        budget = recipe.accuracy_budget
        if budget is not None and not budget_metric_stated and evaluation and not evaluation.has_labels:
            recipe = replace(recipe, accuracy_budget=replace(budget, metric="fidelity"))
        validate_recipe(
            inputs,
            recipe,
            evaluation_samples=evaluation and evaluation.samples,
            evaluation_has_labels=bool(evaluation and evaluation.has_labels),
            calibration_samples=calibration and calibration.samples,
            calibration_has_labels=bool(calibration and calibration.has_labels),
            varying_unbatched=sorted(varying),
            sequence=model_sequence(store, model, inputs) if recipe.sequence_lengths else None,
        )
        if recipe.prune is not None:
            check_prune_config(recipe.prune, model.info.get("op_types", {}))
            check_convertible(model, recipe)
        if recipe.graph_optimization.enabled:  # stated values against the graph; heads not found
            check_graph_optimization(model_file(store, model), recipe.graph_optimization)
        check_machine_limits(session, settings, recipe)
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    job = JobRecord(
        project_id=project_id,
        model_id=model.id,
        calibration_dataset_id=calibration_dataset_id,
        evaluation_dataset_id=evaluation_dataset_id,
        recipe=recipe.to_dict(),
        messages=[],
    )
    queue_job(session, settings, job)
    return job


def model_file(store: ArtifactStore, model: ModelRecord) -> Path:
    """The model's ONNX file, for checks that read its graph (weights not loaded)."""
    return store.local_path(f"{model.artifact_prefix}/{MODEL_FILENAME}")


def model_sequence(store: ArtifactStore, model: ModelRecord, inputs: list[TensorSpec]) -> SequenceProfile:
    """The model's sequence axes and position limit (engines.ingest.sequence): from its record when
    the upload recorded them (`info["sequence"]`), else read from its graph (weights not loaded)."""
    stored = model.info.get("sequence")
    if isinstance(stored, dict):
        return SequenceProfile.from_dict(stored)
    return read_profile(model_file(store, model), inputs)


def check_machine_limits(session: Session, settings: Settings, recipe: Recipe) -> None:
    """A recipe must fit the machine that runs it: no more threads than the worker has cores (more
    only slow a measurement down and can take a worker over), and no more timing in all than
    `max_measure_seconds` (every runner is timed `min_seconds` per batch size, side by side)."""
    threads = recipe.measure.threads
    if threads:
        queue = queue_for(recipe)
        cores = largest_worker_cores(session, settings, queue) or os.cpu_count() or 1
        if threads > cores:
            raise InvalidRecipeError(
                f"measure.threads {threads} is more than the {cores} cores of the '{queue}' workers; "
                f"ask for at most {cores}, or null for all of them"
            )
    stages = 2 if recipe.prune is not None and recipe.precision != "fp32" else 1
    runners = 1 + len(recipe.targets) * stages
    lengths = max(1, len(recipe.sequence_lengths))  # each batch size is timed at each length
    seconds = recipe.measure.min_seconds * len(recipe.batch_sizes) * lengths * runners
    if seconds > settings.max_measure_seconds:
        per_length = f"{lengths} sequence lengths × " if recipe.sequence_lengths else ""
        raise InvalidRecipeError(
            f"this recipe asks for {seconds:.0f} s of timing (min_seconds {recipe.measure.min_seconds:g} × "
            f"{len(recipe.batch_sizes)} batch sizes × {per_length}{runners} runners), over the limit of "
            f"{settings.max_measure_seconds} s: lower min_seconds or ask for fewer batch sizes"
            + (" or sequence lengths" if recipe.sequence_lengths else "")
        )


def check_time_budget(settings: Settings, time_budget_s: float) -> None:
    """A search holds a worker slot for its whole time budget: past `max_time_budget_minutes`, one
    project could keep the workers from everyone else for a day, so the request is a 422."""
    limit = settings.max_time_budget_minutes
    if time_budget_s > limit * 60.0:
        raise ApiError(
            422,
            "time_budget_too_long",
            f"time_budget_minutes {time_budget_s / 60.0:g} is over this server's limit of {limit:g} "
            f"minutes; ask for at most {limit:g}",
            max_time_budget_minutes=limit,
        )


def create_autotune_job(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    *,
    project_id: str,
    model_id: str,
    request: AutotuneRequest,
    evaluation_dataset_id: str,
    calibration_dataset_id: str | None,
    alias: str | None,
    budget_metric_stated: bool = True,
) -> JobRecord:
    """An `autotune` job: the fastest engine within the accuracy budget (engines.search.autotune).

    What can be refused now is: datasets that do not fit the model, a top1 budget without labels,
    an objective batch the model's static batch refuses. The latest succeeded sensitivity analysis
    of the model, when there is one, gives the search a pruning candidate with its per-layer ratios.
    A budget whose metric was left out measures fidelity when the evaluation set has no labels.
    """
    check_time_budget(settings, request.time_budget_s)
    model = get_model_record(session, model_id, project_id)
    require_ready(session, model)
    inputs = specs_from_dicts(model.info["inputs"])
    try:
        varying: set[str] = set()
        evaluation = _dataset_fitting(
            session, project_id, evaluation_dataset_id, inputs, varying, store=store, model=model
        )
        _dataset_fitting(
            session, project_id, calibration_dataset_id, inputs, varying, store=store, model=model
        )
        assert evaluation is not None
        if not budget_metric_stated and not evaluation.has_labels:
            request = replace(request, budget=replace(request.budget, metric="fidelity"))
        if request.budget.metric == "top1" and not evaluation.has_labels:
            raise InvalidRecipeError(
                "a top1 budget needs labels in the evaluation set; use the metric 'fidelity'"
            )
        static = {spec.batch_dim for spec in inputs if spec.has_static_batch()}
        if static and request.objective.batch_size not in static:
            raise InvalidRecipeError(
                f"the model's batch is fixed at {sorted(static)}; ask for that objective batch size"
            )
        if request.objective.sequence_length is not None:
            check_sequence_lengths(
                request.objective.sequence_lengths,
                model_sequence(store, model, inputs),
                inputs,
                what="objective.sequence_length",
            )
        for name in request.space.backends:
            check_precision((name,), "fp32")
        graph = request.space.graph_optimization
        if graph.stated_type or graph.num_heads or graph.hidden_size:  # "auto" alone never refuses
            check_config(graph)
            check_graph_optimization(model_file(store, model), graph)
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    try:
        report = sensitivity_report(
            session, store, latest_sensitivity(session, model.id), project_id=project_id, model_id=model.id
        )
        request = replace(request, sensitivity_ratios=ratios_within(report, request.budget.max_drop))
    except ApiError:  # no analysis yet: the search tries uniform ratios only
        pass
    job = JobRecord(
        project_id=project_id,
        model_id=model.id,
        kind=JobKind.AUTOTUNE,
        calibration_dataset_id=calibration_dataset_id,
        evaluation_dataset_id=evaluation_dataset_id,
        recipe={**request.to_dict(), "alias": alias},
        messages=[],
    )
    queue_job(session, settings, job)
    return job


def create_sensitivity_job(
    session: Session,
    settings: Settings,
    *,
    project_id: str,
    model_id: str,
    dataset_id: str,
    method: str,
    ratios: list[float],
) -> JobRecord:
    """Prune each Conv/Linear layer alone at each ratio and measure the drop: a job like any other."""
    model = get_model_record(session, model_id, project_id)
    require_ready(session, model)
    dataset = get_dataset_record(session, dataset_id, project_id)
    require_dataset_ready(session, dataset)
    try:
        inputs = specs_from_dicts(model.info["inputs"])
        check_fits_model(DatasetInfo.from_dict(dataset.info), inputs)
        check_prunable_layout(inputs)
        check_prune_config(PruneConfig(method=method, ratio=0.5), model.info.get("op_types", {}))
        check_convertible(model, Recipe())
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    job = JobRecord(
        project_id=project_id,
        model_id=model.id,
        evaluation_dataset_id=dataset.id,
        kind=JobKind.SENSITIVITY,
        recipe={"method": method, "ratios": ratios},
        messages=[],
    )
    queue_job(session, settings, job)
    return job


def new_convert_job(project_id: str, model_id: str, opset: int | None) -> JobRecord:
    """The job that converts an uploaded PyTorch program (the model's `SOURCE_FILE`) to ONNX
    (workers.handlers.run_convert). A job like any other: listed, cancellable, counted in flight.
    The upload stages it with `stage_job` and commits it with the model's row, then `publish_job`."""
    return JobRecord(
        id=new_id("job"),
        project_id=project_id,
        model_id=model_id,
        kind=JobKind.CONVERT,
        recipe={"source": "torch.export", "opset": opset},
        messages=[],
    )


def queue_job(session: Session, settings: Settings, job: JobRecord) -> None:
    """Commit the job, then send its id to the workers; a broker that is down fails the job (503).
    A job whose queue no live worker takes says so in its stage (the sweeper fails it after
    `queue_wait_s`)."""
    stage_job(session, settings, job)
    session.commit()  # enqueue only after the row is committed: the worker re-reads it
    publish_job(session, settings, job)


def stage_job(session: Session, settings: Settings, job: JobRecord) -> None:
    """Add the job to the session (429 past the project's jobs in flight); the caller commits it,
    with whatever must exist with it, before `publish_job`."""
    check_jobs_in_flight(session, settings, job.project_id)
    queue = job_queue(job.kind or JobKind.OPTIMIZE, job.recipe)
    if queue != "cpu" and not live_workers_by_queue(session, settings).get(queue):
        job.stage = (
            f"queued: no worker takes '{queue}' jobs now; it fails after {settings.queue_wait_s} s "
            f"unless one starts (`optiforge worker --queues {queue}`)"
        )
    job.published_at = utcnow()  # just before it is sent: the sweeper sends it again if it stays queued
    session.add(job)


def publish_job(session: Session, settings: Settings, job: JobRecord) -> None:
    """Send a committed job's id to the workers; a broker that is down fails the job (503)."""
    queue = job_queue(job.kind or JobKind.OPTIMIZE, job.recipe)
    try:
        enqueue_job(settings, job.id, queue)
    except Exception as exc:
        # The broker's own words stay in the log: they name hosts, or a path on a filesystem broker.
        logger.exception("could not enqueue job %s", job.id)
        refusal = (
            insufficient_storage()
            if is_storage_full(exc)
            else ApiError(
                503,
                "broker_unavailable",
                "the job queue is unreachable; retry shortly",
                headers={"Retry-After": "5"},
            )
        )
        job.status, job.finished_at = JobStatus.FAILED, utcnow()
        job.error = {"code": refusal.code, "detail": refusal.detail}
        with contextlib.suppress(SQLAlchemyError):  # on a full disk this write may fail too
            session.commit()
        refusal.extra["job_id"] = job.id
        raise refusal from exc


def publish_upload_job(
    session: Session, settings: Settings, job: JobRecord, record: ModelRecord | DatasetRecord
) -> None:
    """Send the job that finishes an upload (a .pt2's conversion, a large image folder's decoding).
    When it cannot be sent, the job is recorded failed (publish_job) and so is the uploaded model
    or dataset, which is kept: the refusal says so and names it."""
    is_model = isinstance(record, ModelRecord)
    kind = "model" if is_model else "dataset"
    try:
        publish_job(session, settings, job)
    except ApiError as exc:
        record.status = ModelStatus.FAILED if is_model else DatasetStatus.FAILED
        record.error = job.error
        session.commit()
        raise ApiError(
            exc.status,
            exc.code,
            f"{exc.detail}; {kind} '{record.id}' is kept, failed: delete it, and upload again later",
            **{f"{kind}_id": record.id},
            **exc.extra,
        ) from exc


def check_jobs_in_flight(session: Session, settings: Settings, project_id: str) -> None:
    """One project cannot fill the workers' queues for everyone: past
    `max_jobs_in_flight_per_project` queued or running jobs, a new one is a 429 until one ends."""
    active = session.scalar(
        select(func.count())
        .select_from(JobRecord)
        .where(JobRecord.project_id == project_id, JobRecord.status.in_(JobStatus.ACTIVE))
    )
    limit = settings.max_jobs_in_flight_per_project
    if active >= limit:
        raise ApiError(
            429,
            "too_many_jobs",
            f"project '{project_id}' has {active} jobs queued or running, its limit; "
            "retry when one has finished, or cancel one",
            headers={"Retry-After": "30"},
        )


def cancel_job(
    session: Session, settings: Settings, store: ArtifactStore, job_id: str, project_id: str
) -> JobRecord:
    """A queued job, or a running one whose worker was lost, is cancelled at once; a running one
    stops at its next checkpoint (timed runs are checked twice a second) and stores nothing."""
    job = get_job_record(session, job_id, project_id)
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
    return job


def job_report(session: Session, job_id: str, project_id: str) -> dict[str, Any]:
    """The comparison table of a succeeded optimization or autotune job: the original and every
    engine it stored (for autotune: the chosen one and the other Pareto-front members)."""
    job = get_job_record(session, job_id, project_id)
    if job.kind not in (JobKind.OPTIMIZE, JobKind.AUTOTUNE):
        raise ApiError(
            409,
            "not_an_optimization_job",
            f"job '{job_id}' is a {job.kind} job: reports exist for optimize and autotune jobs"
            + (": GET its /sensitivity" if job.kind == JobKind.SENSITIVITY else ""),
        )
    if job.status != JobStatus.SUCCEEDED or job.baseline is None:
        raise ApiError(
            409, "job_not_succeeded", f"job '{job_id}' is {job.status}; reports exist for succeeded jobs"
        )
    model = get_model_record(session, job.model_id, project_id)
    engines = session.scalars(
        select(EngineRecord).where(EngineRecord.job_id == job_id).order_by(EngineRecord.created_at)
    ).all()
    params, macs = model.info.get("parameters"), model.info.get("macs")
    rows = [report_row(model.name, "original", job.baseline, None, model.size_bytes, params, macs)]
    rows[0]["lineage"] = original_lineage(job.baseline.get("backend") or BASELINE_BACKEND)
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
        rows[-1]["lineage"] = engine_lineage(
            engine.backend, engine.precision, engine.build_info or {}, job.recipe
        )
    return {
        "job_id": job.id,
        "model_id": model.id,
        "network": model.name,
        "hardware": job.baseline.get("hardware", {}),
        "messages": job.messages or [],
        "rows": rows,
    }


def latest_sensitivity(session: Session, model_id: str) -> str:
    latest = session.scalar(
        select(JobRecord.id)
        .where(
            JobRecord.model_id == model_id,
            JobRecord.kind == JobKind.SENSITIVITY,
            JobRecord.status == JobStatus.SUCCEEDED,
        )
        .order_by(JobRecord.finished_at.desc())
        .limit(1)
    )
    if latest is None:
        raise ApiError(
            409,
            "sensitivity_not_available",
            f"model '{model_id}' has no sensitivity analysis yet; "
            f"POST /v1/models/{model_id}/sensitivity first",
        )
    return latest


def autotune_report(session: Session, store: ArtifactStore, job_id: str, project_id: str) -> dict[str, Any]:
    """A succeeded autotune job's JSON report, every candidate row with its lineage in the shape of
    engines.search.lineage (reports stored before it had one get it here, from their candidate)."""
    report = json.loads((autotune_report_dir(session, store, job_id, project_id) / REPORT_JSON).read_text())
    method = (job_space(session, job_id).get("prune_method")) or None
    for row in report.get("candidates", []):
        lineage = row.get("lineage") or {}
        if "label" not in lineage:
            row["lineage"] = candidate_lineage(lineage, criterion=method)
    report.setdefault("original_lineage", original_lineage(BASELINE_BACKEND))
    return report


def job_space(session: Session, job_id: str) -> dict[str, Any]:
    """An autotune job's search space, as its row keeps it."""
    recipe = session.scalar(select(JobRecord.recipe).where(JobRecord.id == job_id)) or {}
    space = recipe.get("space")
    return space if isinstance(space, dict) else {}


def autotune_report_dir(session: Session, store: ArtifactStore, job_id: str, project_id: str) -> Path:
    """Where a succeeded autotune job's report (JSON, markdown, plot) is stored."""
    job = get_job_record(session, job_id, project_id)
    if job.kind != JobKind.AUTOTUNE or job.status != JobStatus.SUCCEEDED:
        raise ApiError(409, "autotune_not_available", f"job '{job_id}' is not a succeeded autotune job")
    return store.local_path(f"jobs/{job_id}/autotune")


def sensitivity_report(
    session: Session, store: ArtifactStore, job_id: str, *, project_id: str, model_id: str | None = None
) -> dict[str, Any]:
    """The stored table of a succeeded sensitivity job (of `model_id`, when given)."""
    job = get_job_record(session, job_id, project_id)
    if job.kind != JobKind.SENSITIVITY or job.status != JobStatus.SUCCEEDED:
        raise ApiError(
            409, "sensitivity_not_available", f"job '{job_id}' is not a succeeded sensitivity analysis"
        )
    if model_id is not None and job.model_id != model_id:
        raise ApiError(
            422, "invalid_recipe", f"sensitivity job '{job_id}' analysed another model ({job.model_id})"
        )
    return json.loads((store.local_path(f"jobs/{job_id}/sensitivity") / SENSITIVITY_JSON).read_text())
