"""SQL tables: projects and their API keys; models, datasets, jobs and engines, each in one project.
A job's state lives here, not in Celery."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Readable, unguessable ids: `mdl_3f9a…` tells a user what kind of thing an id names."""
    return f"{prefix}_{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps come back timezone-aware on every database (SQLite drops the zone when storing)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: UTCDateTime,
    }


#: The project of everything made before projects existed, and of every request on a server that
#: has no API key yet (loopback only: app.cli refuses other addresses until a key exists).
DEFAULT_PROJECT = "default"


class ProjectRecord(Base):
    """A tenant: its keys see its models, datasets, jobs and engines, and nothing else. The id is
    the name a person picked (`optiforge projects create vision`), readable in every record."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRecord(Base):
    """An API key: only its SHA-256 is stored (the key is 256 random bits, so a fast hash is as
    safe as a slow one); `prefix` is the key's first characters, for a person to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    #: Inference requests per second this key may make (None: the server's default).
    infer_rps: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)


class ServerFlagRecord(Base):
    """A fact about the whole server that, once true, stays true (app.services.access): e.g.
    `keys_required`, written with the server's first API key, so that revoking or deleting every
    key can never re-open the server to keyless requests."""

    __tablename__ = "server_flags"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    set_at: Mapped[datetime] = mapped_column(default=utcnow)


def _project_column() -> Mapped[str]:
    """No default: a record made without its project fails to insert instead of landing in one."""
    return mapped_column(ForeignKey("projects.id"), index=True)


class ModelStatus:
    """Whether a model can be used: an ONNX upload is `ready` at once; a PyTorch program (`.pt2`)
    is `converting` while its convert job runs, then `ready` or `failed` (with `error`)."""

    READY = "ready"
    CONVERTING = "converting"
    FAILED = "failed"
    ALL = (READY, CONVERTING, FAILED)


class ModelRecord(Base):
    __tablename__ = "models"
    #: What a converted model was uploaded as, kept under its prefix beside the ONNX it became
    #: (`<artifact_prefix>/source/model.pt2`).
    SOURCE_FILE: ClassVar[str] = "source/model.pt2"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("mdl"))
    project_id: Mapped[str] = _project_column()
    name: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact_prefix: Mapped[str] = mapped_column(String(255))
    info: Mapped[dict[str, Any]] = mapped_column(JSON)  # engines.ingest.model.ModelInfo.to_dict()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: ModelStatus; `info` is empty until a converted model is ready.
    status: Mapped[str] = mapped_column(
        String(16), default=ModelStatus.READY, server_default=ModelStatus.READY
    )
    #: Why a conversion failed: {"code", "detail", ...} as the convert job's error.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: The upload's identity for deduplication (app.services.uploads_dedup): the file's sha256 with
    #: the options that change what is stored (batch_axis, opset). Null for rows made before it.
    dedup_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class DatasetStatus:
    """Whether a dataset can be used: an `.npz` or a small image folder is `ready` at once; a large
    image folder is `processing` while its `decode_images` job runs, then `ready` or `failed`."""

    READY = "ready"
    PROCESSING = "processing"
    FAILED = "failed"
    ALL = (READY, PROCESSING, FAILED)

    @staticmethod
    def cancelled_error(job_id: str) -> dict[str, Any]:
        """The error of a dataset whose decode_images job was cancelled (by whoever ended it)."""
        return {
            "code": "decoding_cancelled",
            "detail": f"decoding job '{job_id}' was cancelled; upload the dataset again",
        }


class DatasetRecord(Base):
    __tablename__ = "datasets"
    #: Where a large image folder waits for its decode_images job (`<prefix>/source/images.zip`).
    SOURCE_FILE: ClassVar[str] = "source/images.zip"
    #: Where a long JSONL of texts waits for its tokenize_texts job (its tokenizer.json: `<prefix>/`).
    TEXT_SOURCE_FILE: ClassVar[str] = "source/texts.jsonl"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ds"))
    project_id: Mapped[str] = _project_column()
    name: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact_key: Mapped[str] = mapped_column(String(255))
    info: Mapped[dict[str, Any]] = mapped_column(JSON)  # engines.ingest.datasets.DatasetInfo.to_dict()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: DatasetStatus; while `processing`, `info` is what the decoded arrays will be.
    status: Mapped[str] = mapped_column(
        String(16), default=DatasetStatus.READY, server_default=DatasetStatus.READY
    )
    #: Why decoding failed: {"code", "detail", ...} as the decode_images job's error.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: The upload's identity for deduplication (app.services.uploads_dedup): the file's sha256 with
    #: the decoding options (preprocessing, classes, tokenizer, …). Null for rows made before it.
    dedup_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


def lease_cutoff(lease_seconds: float) -> datetime:
    """Heartbeats older than this mean the job's worker is gone."""
    return utcnow() - timedelta(seconds=lease_seconds)


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ACTIVE = (QUEUED, RUNNING)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)


class JobKind:
    """What a job does; the worker runs each kind with its own handler (workers.handlers)."""

    OPTIMIZE = "optimize"  # a recipe: prune, quantize, compile, measure
    SENSITIVITY = "sensitivity"  # each layer pruned alone at each ratio, the drop measured
    CONVERT = "convert"  # a torch.export program (.pt2) to ONNX: the model is `converting` meanwhile
    AUTOTUNE = "autotune"  # to come: the fastest engine within an accuracy budget
    #: A large image folder decoded into its dataset's arrays (no model; the dataset is its
    #: `evaluation_dataset_id`, `processing` meanwhile).
    DECODE_IMAGES = "decode_images"
    #: A long JSONL of texts tokenized into its dataset's arrays (no model: the one it is made for,
    #: if any, is described in its recipe; the dataset is its `evaluation_dataset_id`).
    TOKENIZE_TEXTS = "tokenize_texts"
    ALL = (OPTIMIZE, SENSITIVITY, CONVERT, AUTOTUNE, DECODE_IMAGES, TOKENIZE_TEXTS)
    #: Kinds that work on no model (their model_id is null).
    WITHOUT_MODEL = (DECODE_IMAGES, TOKENIZE_TEXTS)
    #: Kinds that make a dataset's arrays: the dataset is `processing` until the job ends.
    DATASET_KINDS = (DECODE_IMAGES, TOKENIZE_TEXTS)


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("job"))
    project_id: Mapped[str] = _project_column()
    #: Null for the kinds in JobKind.WITHOUT_MODEL.
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), index=True, nullable=True
    )
    kind: Mapped[str] = mapped_column(
        String(16), default=JobKind.OPTIMIZE, server_default=JobKind.OPTIMIZE, index=True
    )
    calibration_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True
    )
    evaluation_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True
    )
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    stage: Mapped[str] = mapped_column(String(255), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    messages: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # the current attempt owns the row
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    #: When its message was last sent to the broker (the sweeper sends a queued job's again).
    published_at: Mapped[datetime | None] = mapped_column(nullable=True)
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class EngineRecord(Base):
    __tablename__ = "engines"
    #: An alias names one engine of its project (two projects may both have "prod").
    __table_args__ = (UniqueConstraint("project_id", "alias", name="uq_engines_project_alias"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("eng"))
    project_id: Mapped[str] = _project_column()
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    backend: Mapped[str] = mapped_column(String(64))
    precision: Mapped[str] = mapped_column(String(16))
    artifact_prefix: Mapped[str] = mapped_column(String(255))
    engine_file: Mapped[str] = mapped_column(String(255))
    #: The engine file's sha256 as the worker built it; a node that pulls the file checks it (NULL
    #: for engines stored before migration 0010).
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    build_seconds: Mapped[float] = mapped_column(Float)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    build_info: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: A name clients infer with instead of the id; moving it switches them to another engine.
    alias: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: Dynamic batching, off while null.
    max_batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queue_delay_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class WorkerRecord(Base):
    """A live worker and the queues it takes jobs from, refreshed by its sweeper every
    `job_sweep_interval_s`: how a job learns that no worker can take it (no GPU worker alive)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSON)  # logical names: cpu, gpu
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


def take_alias(session: Any, engine: EngineRecord, alias: str) -> None:
    """Name `engine` with `alias`, taking it from the engine of its project that had it (an alias
    names one engine of a project);
    the caller commits (a concurrent taker then fails the unique constraint, not silently)."""
    from sqlalchemy import update

    session.execute(
        update(EngineRecord)
        .where(
            EngineRecord.project_id == engine.project_id,
            EngineRecord.alias == alias,
            EngineRecord.id != engine.id,
        )
        .values(alias=None)
    )
    engine.alias = alias
