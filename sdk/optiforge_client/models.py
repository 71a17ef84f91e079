"""What the server returns, as pydantic models. Unknown fields are kept, so a newer server works."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict


class _Resource(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class TensorSpec(_Resource):
    name: str
    dtype: str
    shape: list[int | str | None]
    batch_axis: int | None = 0  # where samples stack; None: a scalar or a tensor every sample shares


class Model(_Resource):
    """A model. `status`: `ready` (usable), `converting` (a PyTorch upload whose convert job,
    `conversion_job_id`, runs: its signature and figures are empty until then) or `failed` (`error`
    says why, e.g. `{"code": "unsupported_op", "operators": [...]}`). `Client.wait_for_model` waits."""

    id: str
    name: str
    status: str = "ready"  # a server from before conversions: every model is ready
    error: dict[str, Any] | None = None
    conversion_job_id: str | None = None
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    parameters: int | None = None
    macs: int | None = None
    size_bytes: int
    warnings: list[str] = []
    sha256: str | None = None  # of the uploaded file: `find_or_upload_model` looks for it first
    deduplicated: bool = False  # the upload matched a stored model: that one came back
    created_at: datetime

    @property
    def ready(self) -> bool:
        return self.status == "ready"


class Dataset(_Resource):
    """A dataset. `status`: `ready`, `processing` (a large image folder its job,
    `processing_job_id`, decodes) or `failed` (`error` says why). `Client.wait_for_dataset` waits."""

    id: str
    name: str
    status: str = "ready"  # a server from before image jobs: every dataset is ready
    error: dict[str, Any] | None = None
    processing_job_id: str | None = None
    samples: int
    has_labels: bool
    classes: int | None = None
    uniform_arrays: list[str] = []
    sha256: str | None = None  # of the uploaded file: `find_or_upload_dataset` looks for it first
    deduplicated: bool = False  # the upload matched a stored dataset (same options): that one came back
    image_folder: dict[str, Any] | None = None  # a .zip of images: its preprocessing spec, class names
    text: dict[str, Any] | None = None  # a JSONL of texts: its tokenization spec
    created_at: datetime


class Job(_Resource):
    id: str
    model_id: str | None = None  # none for a decode_images job
    kind: str = "optimize"
    status: str
    stage: str
    progress: float
    messages: list[str] = []
    error: dict[str, Any] | None = None
    engine_ids: list[str] = []
    model_name: str | None = None
    kind_label: str | None = None  # "recipe", "auto-optimize", or the kind
    elapsed_s: float | None = None
    time_budget_s: float | None = None  # a budgeted search's
    remaining_s: float | None = None  # a budgeted search's, while it runs
    best: dict[str, Any] | None = None  # a search's current best: label, speedup, drop, lineage
    created_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class Engine(_Resource):
    id: str
    job_id: str
    model_id: str
    backend: str
    precision: str
    size_bytes: int
    metrics: dict[str, Any]
    alias: str | None = None
    batching: dict[str, Any] | None = None
    max_batch: int | None = None  # the most samples one inference request may carry (older servers: None)
    lineage: dict[str, Any] | None = None  # backend, precision, pruning, fallback_nodes, calibration, label
    created_at: datetime


class InferResult(BaseModel):
    """Outputs by name, with where the time went on the server."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    compute_ms: float | None = None
    queue_ms: float | None = None
    batch_size: int | None = None
