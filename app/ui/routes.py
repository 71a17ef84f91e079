"""/ui: the web console's pages. Each is a Jinja2 template holding layout, forms and the ids from
its URL; the browser fills it from the public API (`static/console.js`) with the API key the
person typed, kept in the tab's sessionStorage. The pages hold no data, so they need no key: the
API calls they make do.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app import __version__

UI_PREFIX = "/ui"
_HERE = Path(__file__).parent
templates = Jinja2Templates(directory=_HERE / "templates")
static_files = StaticFiles(directory=_HERE / "static")

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)


def _page(request: Request, template: str, page: str, **context: str) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"page": page, "version": __version__, "prefix": UI_PREFIX, **context}
    )


@router.get("", response_class=HTMLResponse)
def overview(request: Request) -> HTMLResponse:
    """Models and datasets (upload from the browser), and a form to start a job."""
    return _page(request, "overview.html", "overview")


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", "jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: str) -> HTMLResponse:
    """Live progress and stage, cancel; once done, the report table and the latency-vs-accuracy
    plot, the sensitivity or auto-optimize plot, and the job's engines."""
    return _page(request, "job.html", "job", job_id=job_id)


@router.get("/engines/{engine_id}", response_class=HTMLResponse)
def engine(request: Request, engine_id: str) -> HTMLResponse:
    """Metrics, per-layer INT8 errors, alias and batching settings, and a "try it" form."""
    return _page(request, "engine.html", "engine", engine_id=engine_id)


@router.get("/", include_in_schema=False)
def slash() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX)
