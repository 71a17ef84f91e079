"""The FastAPI application. `create_app()` is what uvicorn serves (`optiforge serve`)."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api.access_policy import DOCS_ASSETS_PATH
from app.api.errors import install_error_handlers
from app.api.middleware import install_middleware
from app.api.openapi import install_openapi
from app.api.query_params import refuse_repeated_scalars
from app.api.routes import (
    admin,
    capabilities,
    datasets,
    engines,
    health,
    inference_v2,
    jobs,
    models,
    triton,
)
from app.api.uploads import remove_abandoned_uploads
from app.core.invalidation import KEYS, change_feed
from app.core.settings import MIB, Settings, get_settings
from app.core.shared_counters import shared_counters
from app.core.space import disk_reserve
from app.core.store import check_at_startup, get_store
from app.services.access import KeyDirectory
from app.serving.inference import Serving
from app.ui import routes as ui

DESCRIPTION = """
Upload a trained model (ONNX) and a dataset, start a job, get engines that are measured side by
side with the original: latency per batch size (mean, p50, p90, p99, throughput) and accuracy
(top-1 against labels, or fidelity to the original without labels).

Send an API key as `Authorization: Bearer <key>` (or `X-API-Key: <key>`); a server that has no
key yet answers loopback clients without one. Each key belongs to a project and sees only its
project's models, datasets, jobs and engines.

Errors are JSON: `{"code": "machine_readable", "detail": "for a person"}`; under `/v2` (the Open
Inference Protocol, which tritonclient and other KServe/Triton clients speak) they are
`{"error": "for a person", "code": "machine_readable"}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Swagger UI and ReDoc with their scripts served from here (fastapi-offline ships them): the
    # default pages load them from a public CDN, a blank page on a cluster without internet.
    app = FastAPIOffline(
        title="optiforge",
        version=__version__,
        description=DESCRIPTION,
        static_url=DOCS_ASSETS_PATH,
        swagger_ui_parameters={"persistAuthorization": True},  # the key typed in "Authorize" stays
        dependencies=[Depends(refuse_repeated_scalars)],  # ?a=1&a=2 for a one-value parameter: 422
    )
    app.state.settings = settings
    app.state.store = get_store(settings)
    # What replicas must agree on, in Redis when the broker is Redis (README, "Per replica").
    app.state.changes = change_feed(settings)
    app.state.counters = shared_counters(settings)
    app.state.serving = Serving(settings, app.state.store, app.state.changes)
    install_error_handlers(app)
    install_openapi(app)
    app.state.keys = KeyDirectory(
        settings.resolved_database_url, settings.auth_cache_ttl_s, settings.database_outage_grace_s
    )
    app.state.changes.subscribe(KEYS, lambda _ids: app.state.keys.invalidate())
    install_middleware(app, settings, upload_paths=(models.router.prefix, datasets.router.prefix))
    app.router.routes[:0] = inference_v2.hot_routes
    for module in (health, capabilities, models, datasets, jobs, engines, triton, inference_v2, admin):
        app.include_router(module.router)
    app.include_router(admin.whoami_router)
    app.include_router(ui.router)  # the web console: pages only, its data comes from the API above
    app.mount(ui.UI_PREFIX + "/static", ui.static_files, name="ui-static")
    # A bucket that does not exist stops the start; an unreachable store is only logged (readiness).
    app.router.add_event_handler("startup", lambda: check_at_startup(app.state.store))
    app.router.add_event_handler("startup", lambda: remove_abandoned_uploads(settings, app.state.store))
    # The space a delete may need on a full disk, set aside while there is room (app.core.space).
    app.router.add_event_handler(
        "startup", lambda: disk_reserve(settings).ensure(keep_free_bytes=settings.min_free_disk_mb * MIB)
    )
    app.router.add_event_handler("startup", app.state.changes.start)
    app.router.add_event_handler("shutdown", app.state.serving.close)
    app.router.add_event_handler("shutdown", app.state.changes.close)
    app.router.add_event_handler("shutdown", app.state.counters.close)
    return app
