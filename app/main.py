"""The FastAPI application. `create_app()` is what uvicorn serves (`optiforge serve`)."""

from __future__ import annotations

from fastapi import FastAPI

from app import __version__
from app.api.body_limit import BodySizeLimitMiddleware
from app.api.control_chars import ControlCharacterMiddleware
from app.api.errors import install_error_handlers
from app.api.request_log import RequestLogMiddleware
from app.api.routes import capabilities, datasets, engines, health, inference_v2, jobs, models, triton
from app.api.uploads import MULTIPART_SLACK_BYTES
from app.core.settings import Settings, get_settings
from app.core.store import get_store
from app.serving.inference import Serving

DESCRIPTION = """
Upload a trained model (ONNX) and a dataset, start a job, get engines that are measured side by
side with the original: latency per batch size (mean, p50, p90, p99, throughput) and accuracy
(top-1 against labels, or fidelity to the original without labels).

Errors are JSON: `{"code": "machine_readable", "detail": "for a person"}`; under `/v2` (the Open
Inference Protocol, which tritonclient and other KServe/Triton clients speak) they are
`{"error": "for a person", "code": "machine_readable"}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="optiforge", version=__version__, description=DESCRIPTION)
    app.state.settings = settings
    app.state.store = get_store(settings.resolved_artifact_dir)
    app.state.serving = Serving(settings, app.state.store)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_request_bytes,
        upload_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        upload_paths=(models.router.prefix, datasets.router.prefix),
        json_tensor_bytes=settings.max_json_tensor_bytes,
    )
    app.add_middleware(ControlCharacterMiddleware)
    app.add_middleware(
        RequestLogMiddleware, metrics=app.state.serving.metrics
    )  # outermost: sees every response
    app.router.routes[:0] = inference_v2.hot_routes
    for module in (health, capabilities, models, datasets, jobs, engines, triton, inference_v2):
        app.include_router(module.router)
    app.router.add_event_handler("shutdown", app.state.serving.close)
    return app
