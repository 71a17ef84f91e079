"""One handler per job kind: what an attempt does once it owns the job (workers.attempts).

A handler reads its inputs from a JobContext and returns an Outcome: the job's messages, the
columns to set on success, and the rows to write in the same transaction that marks it succeeded.
Files go to the artifact store under `jobs/<id>/` and their prefixes into `context.written`, so an
attempt that does not succeed removes them. A new kind is one function here and one line in
HANDLERS (and its constant in app.core.orm.JobKind); a kind whose failure must show elsewhere (a
conversion's, on its model) adds a line in ENDED_UNSUCCESSFULLY.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.artifacts.manifest import file_sha256
from app.core.dataset_limits import dataset_limits, text_limits
from app.core.invalidation import ENGINES
from app.core.orm import (
    DatasetRecord,
    DatasetStatus,
    EngineRecord,
    JobKind,
    JobRecord,
    JobStatus,
    ModelRecord,
    ModelStatus,
    new_id,
    take_alias,
)
from app.core.settings import Settings
from app.core.store import ArtifactStore
from engines.backends.base import EngineArtifact, engine_size
from engines.convert import convert_exported_program
from engines.errors import Cancelled, ConversionError, EngineError
from engines.ingest.datasets import Dataset, inspect_npz, load_dataset
from engines.ingest.image_npz import write_image_npz
from engines.ingest.images import ImagePreprocessing, plan_image_folder
from engines.ingest.model import inspect_model, write_normalized
from engines.ingest.signature import TensorSpec
from engines.ingest.texts import (
    TOKENIZER_FILENAME,
    TextModel,
    open_tokenizer,
    prepare_text_dataset,
    write_text_dataset,
)
from engines.pipeline import BuiltEngine, run_recipe
from engines.prune.sensitivity import SENSITIVITY_JSON, SENSITIVITY_PNG, SensitivityConfig, analyse
from engines.prune.sensitivity import plot as plot_sensitivity
from engines.recipe import Recipe
from engines.search import report as search_report
from engines.search.autotune import AutotuneRequest, autotune
from engines.search.report import REPORT_JSON, REPORT_MD, REPORT_PNG
from workers.attempts import Attempt

logger = logging.getLogger(__name__)


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
            scratch_dir=self.workdir / "datasets",  # memory-mapped: memory does not grow with the set
        )


@dataclass
class Outcome:
    messages: list[str] = field(default_factory=list)
    columns: dict[str, Any] = field(default_factory=dict)
    record: Callable[[Session, JobRecord], None] = lambda session, job: None
    #: Change-feed topics (app.core.invalidation) to announce to the API replicas once `record` is
    #: committed: a search that moves an alias tells them at once, not after their caches' TTL.
    changes: list[str] = field(default_factory=list)


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
        model_inputs=context.inputs,  # the batch axes a user stated: what the datasets were laid out by
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
        model_inputs=context.inputs,
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

    return Outcome(
        messages=result.messages,
        columns={"baseline": result.baseline.to_dict()},
        record=record,
        changes=[ENGINES] if alias and result.chosen is not None else [],
    )


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


def run_convert(context: JobContext) -> Outcome:
    """A torch.export program (`context.model_path`: the model's source, checked again here before
    anything is loaded) converted to ONNX (engines.convert), validated as an ONNX upload is
    (engines.ingest.model), and stored where an uploaded model's ONNX lives, beside its source; the
    model's row gets its description and `ready` in the transaction that marks the job succeeded.
    A program the exporter refuses fails the job (and the model) with the exporter's code:
    `unsupported_op` naming the operators, `conversion_failed`, `invalid_torch_program`, …"""
    progress = context.attempt.progress
    opset = context.recipe.get("opset")
    target = f"ONNX opset {opset}" if opset else "ONNX"
    progress(0.05, f"converting the torch.export program to {target} (checked first, nothing unpickled)")
    try:
        result = convert_exported_program(
            context.model_path,
            context.workdir / "onnx",
            max_unpacked_bytes=context.settings.max_unpacked_bytes,
            opset=opset,
        )
    except (EngineError, Cancelled):
        raise
    except Exception as exc:  # the library names what it knows; a program is never an internal error
        logger.exception("job %s: the conversion failed", context.job_id)
        first_line = (str(exc).strip().splitlines() or [""])[0][:400]
        raise ConversionError(f"the conversion failed: {type(exc).__name__}: {first_line}") from exc
    progress(0.7, "validating the ONNX model (checker, shape inference), as an upload is")
    info = inspect_model(result.onnx_path, scratch_dir=context.workdir)
    stored = context.workdir / "stored"
    write_normalized(result.onnx_path, stored)
    source = stored / ModelRecord.SOURCE_FILE
    source.parent.mkdir(parents=True)
    _link_or_copy(context.model_path, source)
    progress(0.9, "storing the ONNX model")
    conversion = {key: value for key, value in result.to_dict().items() if key != "onnx_file"}
    description = {**info.to_dict(), "conversion": {"source_format": "torch.export", **conversion}}
    signature = ", ".join(f"{spec.name} {list(spec.shape)}" for spec in info.inputs)
    messages = [f"converted to ONNX opset {result.opset}: inputs {signature}", *result.notes]

    def record(session: Session, job: JobRecord) -> None:
        model = session.get(ModelRecord, job.model_id)
        assert model is not None, "a model with active jobs cannot be deleted"
        # Replaces the prefix at once (the ONNX and the source it came from): every later job and
        # /download read `<prefix>/model.onnx`, as for an uploaded model.
        context.store.put_dir(model.artifact_prefix, stored, move=True)
        model.info, model.status, model.error = description, ModelStatus.READY, None

    return Outcome(messages=messages, record=record)


def _link_or_copy(source: Path, target: Path) -> None:
    """The stored source, kept beside the ONNX it became: a hard link where the store allows."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def conversion_ended(session: Session, job: JobRecord, status: str, error: dict[str, Any] | None) -> None:
    """A convert job that did not succeed leaves its model `failed` with the job's error (a
    cancellation too: the model has no ONNX). A model that is not converting is left alone."""
    if status == JobStatus.CANCELLED:
        error = {
            "code": "conversion_cancelled",
            "detail": f"conversion job '{job.id}' was cancelled; upload the program again",
        }
    session.execute(
        update(ModelRecord)
        .where(ModelRecord.id == job.model_id, ModelRecord.status == ModelStatus.CONVERTING)
        .values(status=ModelStatus.FAILED, error=error or {"code": "conversion_failed", "detail": status})
    )


#: Seconds between two progress reports of a dataset-building job (each is a database write).
_PROGRESS_EVERY_S = 1.0


def _throttled_progress(attempt: Any, message: str) -> Callable[[int, int], None]:
    """A (done, total) callback for a dataset-building job: checks cancellation at every call and
    reports progress (5 % to 90 %) at most every `_PROGRESS_EVERY_S`, and at the end; `message` is
    formatted with `done` and `total`."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        attempt.check_cancelled()
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_EVERY_S or done == total:
            last[0] = now
            attempt.progress(0.05 + 0.85 * done / total, message.format(done=done, total=total))

    return progress


def run_decode_images(context: JobContext) -> Outcome:
    """A large image folder (`context.evaluation`, `processing`; its zip at `SOURCE_FILE`) decoded
    into its `.npz` in bounded memory (engines.ingest.image_npz), with progress per image and the
    cancellation checked as often. The folder is checked again as at upload (the same plan, the
    same limits), each image's pixels from its header before it is decoded. The `.npz` replaces
    the zip under the dataset's prefix, and the dataset is `ready` in the transaction that marks
    the job succeeded; a refusal fails the job (and the dataset) with the upload's code."""
    record = context.evaluation
    assert record is not None, "a decode_images job is created with its dataset"
    settings, attempt = context.settings, context.attempt
    limits = dataset_limits(settings)
    prefix, npz_name = record.artifact_key.rsplit("/", 1)
    archive = context.store.local_path(f"{prefix}/{DatasetRecord.SOURCE_FILE}")
    options = context.recipe
    attempt.progress(0.02, "checking the archive (members, layout, sizes), as at upload")
    spec = ImagePreprocessing.from_dict(json.loads(options["preprocessing"] or "{}"))
    plan = plan_image_folder(
        archive,
        spec,
        max_unpacked_bytes=settings.max_unpacked_bytes,
        max_images=settings.max_dataset_images,
        input_name=options.get("input_name") or "input",
        classes=json.loads(options["classes"]) if options.get("classes") else None,
        limits=limits,
    )
    stored = context.workdir / "stored"
    progress = _throttled_progress(attempt, "decoding images: {done} of {total}")

    write_image_npz(archive, plan, stored / npz_name, max_pixels=limits.max_image_pixels, progress=progress)
    attempt.progress(0.92, "checking the arrays, as an uploaded .npz is checked")
    info = inspect_npz(stored / npz_name, max_unpacked_bytes=settings.max_unpacked_bytes, limits=limits)
    description = {**info.to_dict(), "image_folder": plan.describe(), "processing_job_id": context.job_id}

    def record_ready(session: Session, job: JobRecord) -> None:
        dataset = session.get(DatasetRecord, record.id)
        assert dataset is not None, "a dataset with active jobs cannot be deleted"
        context.store.put_dir(prefix, stored, move=True)  # the .npz replaces the zip at once
        dataset.info, dataset.status, dataset.error = description, DatasetStatus.READY, None

    return Outcome(
        messages=[f"decoded {plan.samples} images into {list(plan.shape)} {spec.dtype}"], record=record_ready
    )


def run_tokenize_texts(context: JobContext) -> Outcome:
    """A long JSONL of texts (`context.evaluation`, `processing`; at `TEXT_SOURCE_FILE`, its
    tokenizer.json beside) tokenized into its `.npz` (engines.ingest.texts) with the tokenization
    and the model its upload resolved (the recipe), every line checked again as at upload, progress
    per chunk of lines and the cancellation checked as often. The `.npz` and the tokenizer replace
    the source under the dataset's prefix, and the dataset is `ready` in the transaction that marks
    the job succeeded; a refusal fails the job (and the dataset) with the upload's code and line.
    The tokenizer runs in a bounded child process, each chunk of lines within `tokenize_timeout_s`
    (engines.ingest.bounded_tokenize): a slow one fails the job `tokenizer_too_slow`, not hangs it."""
    record = context.evaluation
    assert record is not None, "a tokenize_texts job is created with its dataset"
    settings, attempt, options = context.settings, context.attempt, context.recipe
    limits, bounds = dataset_limits(settings), text_limits(settings)
    prefix, npz_name = record.artifact_key.rsplit("/", 1)
    source = context.store.local_path(f"{prefix}/{DatasetRecord.TEXT_SOURCE_FILE}")
    tokenizer_file = context.store.local_path(f"{prefix}/{TOKENIZER_FILENAME}")
    attempt.progress(0.02, "checking the lines and the tokenizer, as at upload")
    stored = context.workdir / "stored"
    progress = _throttled_progress(attempt, "tokenizing texts: {done} of {total} lines")
    with open_tokenizer(tokenizer_file, bounds) as tokenizer:
        plan = prepare_text_dataset(
            source,
            tokenizer,
            options["tokenization"],
            limits=limits,
            text_limits=bounds,
            model=TextModel.from_dict(options["model"]) if options.get("model") else None,
            classes=options.get("classes"),
            max_bytes=settings.max_unpacked_bytes,
        )
        info = write_text_dataset(
            source,
            tokenizer,
            plan,
            stored / npz_name,
            limits=limits,
            text_limits=bounds,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            tokenizer_sha256=options.get("tokenizer_sha256"),
            progress=progress,
            each_chunk=True,
        )
    shutil.copyfile(tokenizer_file, stored / TOKENIZER_FILENAME)
    description = {**info, "processing_job_id": context.job_id}

    def record_ready(session: Session, job: JobRecord) -> None:
        dataset = session.get(DatasetRecord, record.id)
        assert dataset is not None, "a dataset with active jobs cannot be deleted"
        context.store.put_dir(prefix, stored, move=True)  # the .npz and tokenizer replace the source
        dataset.info, dataset.status, dataset.error = description, DatasetStatus.READY, None

    length = info["text"]["sequence_length"]
    return Outcome(
        messages=[f"tokenized {plan.samples} lines into {len(plan.dtypes)} arrays of {length} tokens"],
        record=record_ready,
    )


def decoding_ended(session: Session, job: JobRecord, status: str, error: dict[str, Any] | None) -> None:
    """A decode_images or tokenize_texts job that did not succeed leaves its dataset `failed` with
    the job's error."""
    if status == JobStatus.CANCELLED:
        error = DatasetStatus.cancelled_error(job.id)
    session.execute(
        update(DatasetRecord)
        .where(
            DatasetRecord.id == job.evaluation_dataset_id, DatasetRecord.status == DatasetStatus.PROCESSING
        )
        .values(status=DatasetStatus.FAILED, error=error or {"code": "decoding_failed", "detail": status})
    )


HANDLERS: dict[str, Handler] = {
    JobKind.OPTIMIZE: run_optimize,
    JobKind.SENSITIVITY: run_sensitivity,
    JobKind.AUTOTUNE: run_autotune,
    JobKind.CONVERT: run_convert,
    JobKind.DECODE_IMAGES: run_decode_images,
    JobKind.TOKENIZE_TEXTS: run_tokenize_texts,
}
#: What to record elsewhere when a job of a kind fails or is cancelled (in the worker: the API and
#: the sweeper end jobs too, and app.services.jobs.model_state reads those from the job).
ENDED_UNSUCCESSFULLY: dict[str, Callable[[Session, JobRecord, str, dict[str, Any] | None], None]] = {
    JobKind.CONVERT: conversion_ended,
    JobKind.DECODE_IMAGES: decoding_ended,
    JobKind.TOKENIZE_TEXTS: decoding_ended,
}


def build_seconds(artifact: EngineArtifact) -> float:
    """The engine's whole build: what the builder recorded (`build_seconds` in its metadata: the
    search's candidates, the pipeline's engines), else the backend's compile step plus the model's
    quantization (`quantize_seconds`, at the top of the metadata or in a precision's own section).
    The compile step alone read 0.0 s for an ONNX Runtime engine whose INT8 model took 4.4 s."""
    recorded = artifact.metadata.get("build_seconds")
    if isinstance(recorded, int | float) and not isinstance(recorded, bool):
        return float(recorded)
    sections = [artifact.metadata, *(v for v in artifact.metadata.values() if isinstance(v, dict))]
    quantized = next(
        (
            float(part["quantize_seconds"])
            for part in sections
            if isinstance(part.get("quantize_seconds"), int | float)
        ),
        0.0,
    )
    return artifact.build_seconds + quantized


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
            project_id=job.project_id,
            job_id=job.id,
            model_id=job.model_id,
            backend=built.artifact.backend,
            precision=built.artifact.precision,
            artifact_prefix=prefix,
            engine_file=built.artifact.path.name,
            sha256=file_sha256(built.artifact.path),
            size_bytes=engine_size(built.artifact.path),
            build_seconds=build_seconds(built.artifact),
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
