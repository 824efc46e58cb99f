"""The dashboard: a jobs page and a live job page, plain HTML and JavaScript served by the API itself.

No front-end build: the pages are static files that call the same public API as every other client
(with the API key a user types in, kept in the browser's localStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.api.problems import Problem

router = APIRouter(tags=["dashboard"], include_in_schema=False)
STATIC = Path(__file__).resolve().parents[1] / "static"
# Only these files are served: a fixed table, so no request path ever reaches the file system.
ASSETS = {"dashboard.js": "text/javascript", "charts.js": "text/javascript", "dashboard.css": "text/css"}
NO_STORE = {"Cache-Control": "no-cache"}


@router.get("/")
def root() -> RedirectResponse:
    """The service's front page is the dashboard."""
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard")
def jobs_page() -> FileResponse:
    """The jobs page: every job the caller may see, its status and progress."""
    return FileResponse(STATIC / "jobs.html", media_type="text/html", headers=NO_STORE)


@router.get("/dashboard/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    """One job's page: live curves, the spec and the artifacts (the script reads the id from the URL)."""
    return FileResponse(STATIC / "job.html", media_type="text/html", headers=NO_STORE)


@router.get("/dashboard/static/{name}")
def asset(name: str) -> FileResponse:
    """A script or style sheet of the dashboard."""
    if name not in ASSETS:
        raise Problem(404, f"no dashboard asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_STORE)
