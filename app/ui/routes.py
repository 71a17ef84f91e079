"""/ui: the web console's pages. Each is a Jinja2 template holding layout, forms and the ids from
its URL; the browser fills it from the public API (`static/*.js`, started by console.js) with the
API key the person typed, kept in the tab's sessionStorage. The pages hold no data, so they need
no key: the API calls they make do.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app import __version__
from app.ui.autotune_form import autotune_form

UI_PREFIX = "/ui"
_HERE = FilePath(__file__).parent
#: What an id in a console URL may be (the API's ids: `job_…`, `eng_…`); anything else is a 422.
RecordId = Annotated[str, Path(pattern=r"^[a-z]+_[0-9a-f]{1,32}$", max_length=40)]
templates = Jinja2Templates(directory=_HERE / "templates")
static_files = StaticFiles(directory=_HERE / "static")

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)
#: A page answers HEAD as it answers GET (link checkers and monitors ask HEAD; FastAPI's routes
#: take only the methods they name).
PAGE_METHODS = ["GET", "HEAD"]


def _page(request: Request, template: str, page: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"page": page, "version": __version__, "prefix": UI_PREFIX, **context}
    )


@router.api_route("", methods=PAGE_METHODS, response_class=HTMLResponse)
def overview(request: Request) -> HTMLResponse:
    """Models and datasets (upload, delete), the auto-optimize form (its options, defaults and
    limits read from the API's request schema) and a form to start a job from a recipe."""
    return _page(request, "overview.html", "overview", auto=_autotune_form())


@cache
def _autotune_form() -> dict[str, Any]:
    return autotune_form()


@router.api_route("/jobs", methods=PAGE_METHODS, response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    """Every job, filtered by status, kind and model; two of them chosen to compare."""
    return _page(request, "jobs.html", "jobs")


@router.api_route("/compare", methods=PAGE_METHODS, response_class=HTMLResponse)
def compare(request: Request) -> HTMLResponse:
    """Two jobs (`?jobs=a,b`) or two engines (`?engines=a,b`) side by side; the ids are read by the
    page's script from its URL and checked there, like every id put into an API path."""
    return _page(request, "compare.html", "compare")


@router.api_route("/jobs/{job_id}", methods=PAGE_METHODS, response_class=HTMLResponse)
def job(request: Request, job_id: RecordId) -> HTMLResponse:
    """Live progress and stage, cancel; once done, the report table and the latency-vs-accuracy
    plot, the sensitivity or auto-optimize plot, and the job's engines."""
    return _page(request, "job.html", "job", job_id=job_id)


@router.api_route("/engines/{engine_id}", methods=PAGE_METHODS, response_class=HTMLResponse)
def engine(request: Request, engine_id: RecordId) -> HTMLResponse:
    """Metrics, per-layer INT8 errors, alias and batching settings, and a "try it" form."""
    return _page(request, "engine.html", "engine", engine_id=engine_id)


@router.get("/", include_in_schema=False)
def slash() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX)
