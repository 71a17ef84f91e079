"""One settings object shared by the API and the workers, read from environment variables.

Every variable is `OPTIFORGE_<FIELD>` (e.g. `OPTIFORGE_DATA_DIR`); `REDIS_URL` is honoured as the
broker too, as container platforms usually set it. Defaults are the embedded single-machine setup:
a SQLite file, a local artifact directory and a filesystem broker, all under the data directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPTIFORGE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path("./data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in data_dir")
    broker_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPTIFORGE_BROKER_URL", "REDIS_URL"),
        description="Celery broker; default: a filesystem broker in data_dir (no Redis needed)",
    )
    artifact_dir: Path | None = Field(default=None, description="default: data_dir/artifacts")
    #: Where artifacts live (app.core.artifacts.factory): `file:///…` (default: file:// + artifact_dir)
    #: or `s3://bucket/prefix`, through boto3 with the standard `AWS_*` variables.
    artifact_url: str | None = None
    #: An S3-compatible endpoint (MinIO, Ceph, a test server) instead of AWS's.
    s3_endpoint_url: str | None = None
    #: A CA bundle (PEM) to trust for the S3 endpoint's certificate: self-signed endpoints.
    s3_ca_bundle: Path | None = None
    #: The node-local read cache of a remote store (never shared between nodes); default: data_dir/cache.
    cache_dir: Path | None = None
    #: Bytes the read cache keeps at most; the least recently used prefixes go first.
    cache_max_bytes: int = Field(default=10 * 1024 * MIB, ge=1)
    max_upload_bytes: int = 1024 * MIB  # model and dataset uploads
    max_request_bytes: int = 64 * MIB  # every other request body, inference included
    #: JSON tensors take about 11× their text in memory once parsed: binary tensors are for big inputs.
    max_json_tensor_bytes: int = 16 * MIB
    max_inflight_requests: int = 64  # inference requests in progress per API process; more get 503
    #: Model and dataset uploads received or checked at once (across all API replicas when the broker
    #: is Redis, else per API process); more get 503 `too_many_uploads` with Retry-After, before
    #: their body is read (app.api.middleware.upload_slots).
    max_concurrent_uploads: int = Field(default=4, ge=1)
    #: Images one image-folder dataset may hold (a large folder is decoded by a worker job).
    max_dataset_images: int = Field(default=50_000, ge=1)
    #: Pixels one image may have (width × height, read from its header before it is decoded).
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    #: Bytes a dataset's arrays may hold once decoded (an image folder: images × size × channels ×
    #: dtype, checked before any image is decoded). A few bytes of PNG can ask for gigabytes.
    max_dataset_bytes: int = Field(default=1024 * MIB, ge=1)
    #: Samples one dataset may hold (.npz or images); evaluation streams them in batches.
    max_dataset_samples: int = Field(default=100_000, ge=1)
    #: Arrays one .npz may hold: one per model input, plus labels.
    max_dataset_arrays: int = Field(default=256, ge=1)
    #: An image folder whose images hold at most this many pixels in all (read from their headers)
    #: is decoded at upload (201); a larger one by a `decode_images` job (202, `processing`).
    image_inline_max_pixels: int = Field(default=16_000_000, ge=0)
    #: ... and at most this many images (their headers are read in the API to count the pixels).
    image_inline_max_images: int = Field(default=512, ge=0)
    #: A JSONL of texts of at most this many lines is tokenized at upload (201; every line is
    #: checked at upload whatever its size); a longer one by a `tokenize_texts` job (202).
    text_inline_max_lines: int = Field(default=2_000, ge=0)
    #: Bytes one line of a JSONL of texts may hold, and a tokenizer.json (engines.ingest.texts).
    max_text_line_bytes: int = Field(default=1024 * 1024, ge=1)
    max_tokenizer_bytes: int = Field(default=64 * MIB, ge=1)
    #: A tokenizer.json is loaded and run in a child process (engines.ingest.bounded_tokenize), killed
    #: past this many seconds to load, then to tokenize an upload's lines (a job's: each chunk of 512
    #: lines): 422 `tokenizer_too_slow` (a backtracking regex can take hours on one line).
    tokenize_timeout_s: float = Field(default=60.0, gt=0)
    #: ... and with at most this much address space (RLIMIT_AS): 422 `tokenizer_out_of_memory`.
    tokenizer_memory_bytes: int = Field(default=4096 * MIB, ge=256 * MIB)
    #: Seconds an inference request's whole body may take to arrive; then 408 `body_timeout`. The
    #: body is read before the request takes an in-flight slot, so a slow client holds no slot.
    body_read_timeout_s: float = 30.0
    #: Any request body (uploads included) must arrive at this many bytes per second at least,
    #: averaged over each `body_rate_window_s`; a slower one gets 408 `body_too_slow` and frees its
    #: slot. A floor, not a deadline, so a big upload on a slow link still passes.
    body_min_rate_bytes_s: int = Field(default=32 * 1024, ge=1)
    body_rate_window_s: float = Field(default=30.0, gt=0)
    #: Connections (app.server.connections): a connection's request line and headers must be
    #: complete this many seconds after its first byte (or after it opened); then it is closed.
    header_timeout_s: float = Field(default=10.0, gt=0)
    keep_alive_timeout_s: int = Field(default=5, ge=1)  # an idle keep-alive connection is closed after this
    #: Open connections per API process; None: 7/8 of the file-descriptor limit. Over it, or over the
    #: per-client cap (a socket peer's), the oldest connection still waiting for its headers is closed.
    max_connections: int | None = Field(default=None, ge=1)
    max_connections_per_client: int = Field(default=128, ge=1)
    #: Bytes of inference request bodies one API process holds at once, counted as they arrive;
    #: a request that would go over it gets 503 `server_busy` with Retry-After.
    max_buffered_body_bytes: int = 256 * MIB
    #: Bytes of JSON tensors parsed or written at once per API process (that takes about 11× the
    #: text in memory while it runs, and holds the GIL); others wait their turn. A larger body
    #: still parses, alone.
    max_json_in_flight_bytes: int = 16 * MIB
    #: An archive (.zip bundle or .npz) may unpack to at most this many times the upload limit.
    max_unpack_ratio: int = 4
    queue_prefix: str = Field(default="", description="prepended to queue names, to share one broker")
    worker_concurrency: int = 1  # measurements on a shared CPU would disturb each other
    #: Seconds of timing a job may ask for (min_seconds × batch sizes × runners timed side by side).
    max_measure_seconds: int = 900
    job_max_attempts: int = 3  # attempts before a job that keeps losing its worker is failed
    job_lease_s: int = 60  # a running job whose heartbeat is older than this lost its worker
    job_sweep_interval_s: int = 15  # how often each worker looks for such jobs to re-queue
    #: A queued job whose queue no live worker takes (a GPU job with no GPU worker) fails after this long.
    queue_wait_s: int = 600
    #: A job queued this long since its message was sent, on a queue a live worker takes, is sent
    #: again (its message may have been lost with a broker restart; a duplicate delivery is a no-op).
    queue_republish_s: int = 300
    job_visibility_timeout_s: int = 6 * 3600  # Redis re-delivers unacked jobs after this long
    engine_pool_size: int = 8  # loaded engines kept in the API process, at most
    engine_pool_max_mb: int | None = 4096  # and at most this many MiB of engine files; None: no limit
    inference_threads: int | None = None  # None: all cores
    #: Spinning idle inference threads cut latency a little but take the cores the server's own
    #: threads need (HTTP parsing, the event loop); worth turning on for a dedicated many-core box.
    inference_spin_wait: bool = False
    #: The largest batch one inference request may carry (413 `batch_too_large` above it), unless
    #: an engine was measured at a larger one, or has a fixed profile (TensorRT: its maximum).
    max_inference_batch: int = Field(default=1024, ge=1)
    #: Estimated activation bytes of engine calls running at once per API process; more wait their
    #: turn (app.serving.admission). One call over the whole budget runs alone.
    inference_activation_budget_mb: int = Field(default=512, ge=1)
    #: The estimate of a call's activations: this many times its input and output bytes.
    inference_activation_factor: float = Field(default=32.0, gt=0)
    #: Seconds a request waits for the activation budget before 503 `server_busy` with Retry-After.
    inference_queue_timeout_s: float = Field(default=30.0, gt=0)
    #: After a call estimated at this many MiB or more, free memory is given back to the system.
    inference_trim_mb: int = Field(default=16, ge=0)
    #: How long an API process trusts what it looked up for an engine name. Changes made through
    #: another replica reach this one at once when they share Redis (app.core.invalidation); without
    #: it, or while Redis is out of reach, within this time.
    engine_cache_ttl_s: float = 2.0
    log_format: str = Field(default="json", pattern="^(json|text)$", description="json: one object per line")
    # Access (app.api.middleware.auth, app.services.access).
    #: An admin key of the default project made at start-up when absent (compose and the Docker
    #: image require one): how a server that listens beyond loopback gets its first key.
    bootstrap_api_key: str | None = Field(default=None, repr=False)
    #: How long an API process trusts what it looked up for a key (a revoked key is refused on every
    #: replica at once when they share Redis; without it, or while Redis is out of reach, within this time).
    auth_cache_ttl_s: float = 2.0
    public_docs: bool = True  # /docs, /redoc and /openapi.json without a key
    public_metrics: bool = False  # /metrics without a key (else: an admin key; it spans projects)
    #: Web origins allowed to call the API from a browser (CORS), comma-separated; none by default.
    cors_origins: str = ""
    #: Host names, besides loopback ones, that a server with no key yet answers (a test client's).
    open_hosts: str = ""
    #: Socket peers, besides loopback addresses, that a server with no key yet answers (a test client's).
    open_peers: str = ""
    #: Unknown API keys a client address may send per window; past it, 429 without a database query
    #: (app.api.middleware.failed_keys; per API process, at most 10 000 addresses remembered).
    auth_failures_per_client: int = Field(default=20, ge=1)
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    #: Addresses or networks (comma-separated) of the reverse proxies whose `X-Forwarded-For` and
    #: `X-Forwarded-Proto` are believed; from anyone else they are ignored (the client is the socket peer).
    trusted_proxies: str = ""
    #: Inference requests per second per key, unless the key sets its own (across all API replicas
    #: when the broker is Redis, else per API process); None: no limit.
    infer_rate_limit_rps: float | None = None
    #: Jobs queued or running at once per project; more are refused with 429 until one finishes.
    max_jobs_in_flight_per_project: int = 32
    #: Jobs of one project running at once across all workers; its others wait queued while free
    #: slots go to other projects (workers.fairness). None: no limit but the workers' slots.
    max_running_jobs_per_project: int | None = Field(default=None, ge=1)
    #: The longest time budget an auto-optimize job may ask for; more is a 422 naming this limit.
    max_time_budget_minutes: float = Field(default=240.0, gt=0)
    # Storage faults (app.core.outages, app.core.space, app.services.health).
    #: /readyz answers not ready while the data directory's file system has less free space.
    min_free_disk_mb: int = Field(default=256, ge=0)
    #: A file of this size kept in the data directory and given up when the disk is full, so a
    #: delete can still write the database's journal (deletes are how space is won back); 0: none.
    disk_reserve_mb: int = Field(default=8, ge=0)
    #: While the database is unreachable, /v2 inference keeps serving engine names and API keys it
    #: looked up at most this long ago (a short outage does not stop a hot model); 0: never.
    database_outage_grace_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        """Relative paths are resolved once, against the directory the process started in: nothing
        that changes the working directory later (a library that writes scratch files there) moves them."""
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.artifact_dir is not None:
            self.artifact_dir = self.artifact_dir.expanduser().resolve()
        if self.cache_dir is not None:
            self.cache_dir = self.cache_dir.expanduser().resolve()
        if self.s3_ca_bundle is not None:
            self.s3_ca_bundle = self.s3_ca_bundle.expanduser().resolve()
        if self.artifact_url is not None and urlsplit(self.artifact_url).scheme == "file":
            self.artifact_url = _file_url_dir(self.artifact_url).as_uri()
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'optiforge.db').resolve()}"

    @property
    def resolved_artifact_url(self) -> str:
        return self.artifact_url or (self.artifact_dir or self.data_dir / "artifacts").resolve().as_uri()

    @property
    def resolved_artifact_dir(self) -> Path:
        """The local folder holding this node's artifacts: the store itself for a `file://` URL,
        the read cache for a remote store (what the disk checks watch)."""
        url = self.resolved_artifact_url
        return _file_url_dir(url) if urlsplit(url).scheme == "file" else self.resolved_cache_dir

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def scratch_dir(self) -> Path:
        """Where jobs and uploads work, one folder each named after its owner (`job-<id>-…`,
        `upload-<id>-…`), so a starting worker or API can tell whose a leftover folder was
        (workers.recovery, app.core.scratch)."""
        return self.data_dir / "scratch"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def max_unpacked_bytes(self) -> int:
        return self.max_upload_bytes * self.max_unpack_ratio

    @property
    def allowed_origins(self) -> frozenset[str]:
        return _comma_separated(self.cors_origins)

    @property
    def extra_open_hosts(self) -> frozenset[str]:
        return _comma_separated(self.open_hosts.lower())

    @property
    def extra_open_peers(self) -> frozenset[str]:
        return _comma_separated(self.open_peers.lower())

    def queue(self, name: str) -> str:
        return f"{self.queue_prefix}{name}"


def _file_url_dir(url: str) -> Path:
    """The folder of a `file:///absolute/path` URL; ValueError naming the variable otherwise."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(
            "OPTIFORGE_ARTIFACT_URL: a file URL names an absolute folder, e.g. file:///srv/artifacts"
        )
    return Path(unquote(parts.path)).resolve()


def _comma_separated(value: str) -> frozenset[str]:
    return frozenset(item.strip() for item in value.split(",") if item.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
