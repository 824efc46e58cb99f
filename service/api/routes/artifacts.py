"""A job's artifacts: the list, and downloads that resume (HTTP Range)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from service import jobs
from service.api.deps import CurrentOwner, SessionDep, StoreDep
from service.api.problems import Problem, problem_responses
from service.api.ranges import RangeNotSatisfiable, parse_range
from service.schemas import ArtifactPublic, ArtifactsPublic
from service.storage import validate_name

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"], responses=problem_responses(401))

_DOWNLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the whole file"},
    206: {"content": {"application/octet-stream": {}}, "description": "the requested byte range"},
    416: {"description": "the range lies past the end of the file"},
}


@router.get("", response_model=ArtifactsPublic)
def list_artifacts(job_id: str, session: SessionDep, owner: CurrentOwner, request: Request) -> ArtifactsPublic:
    """The files a job has produced so far, with sizes, checksums and download paths."""
    rows = jobs.list_artifacts(session, job_id, owner)
    url = request.app.url_path_for
    return ArtifactsPublic(items=[
        ArtifactPublic.from_row(row, str(url("download_artifact", job_id=job_id, name=row.name))) for row in rows
    ])


@router.get("/{name}", response_class=StreamingResponse, responses=_DOWNLOAD_RESPONSES)
def download_artifact(
    job_id: str, name: str, session: SessionDep, store: StoreDep, owner: CurrentOwner,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """Download an artifact, whole or one byte range (bytes=a-b, a- or -n); the ETag is its sha256."""
    validate_name(name)  # an unsafe name is a 404 before the database or the store is asked
    row = jobs.get_artifact(session, job_id, name, owner)
    # The download may take long; it must not hold a database connection meanwhile.
    session.close()
    size, etag = store.size(job_id, name), f'"{row.sha256}"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Content-Disposition": f'attachment; filename="{name}"'}
    try:
        # If-Range: resume only if the file is still the one the client has the start of.
        wanted = parse_range(range_header, size) if if_range in (None, etag) else None
    except RangeNotSatisfiable as exc:
        raise Problem(416, str(exc), "range-not-satisfiable",
                      headers={**headers, "Content-Range": f"bytes */{size}"}) from exc
    if wanted is None:
        body = store.iter_range(job_id, name, 0, size)
        return StreamingResponse(body, media_type="application/octet-stream",
                                 headers={**headers, "Content-Length": str(size)})
    body = store.iter_range(job_id, name, wanted.start, wanted.stop)
    headers.update({"Content-Length": str(wanted.length), "Content-Range": wanted.content_range()})
    return StreamingResponse(body, status_code=206, media_type="application/octet-stream", headers=headers)
