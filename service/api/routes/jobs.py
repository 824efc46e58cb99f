"""Jobs: submit, look up, list, follow metrics, cancel."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from itrd.spec import JobSpec
from service import jobs
from service.api.deps import (
    CurrentOwner,
    IdempotencyKeyHeader,
    SessionDep,
    SettingsDep,
    SubmitLimit,
    idempotency_claim,
)
from service.api.problems import problem_responses
from service.idempotency import create_once
from service.models import JobStatus
from service.notify import kick
from service.schemas import JobPublic, JobsPublic

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=problem_responses(401))


@router.post("", status_code=201, response_model=JobPublic, dependencies=[SubmitLimit],
             responses=problem_responses(409, 429))
def submit_job(spec: JobSpec, session: SessionDep, settings: SettingsDep, owner: CurrentOwner,
               request: Request, response: Response, idempotency_key: IdempotencyKeyHeader = None) -> JobPublic:
    """Submit a job spec: 201 with the job, queued (or waiting on its teacher job).

    A repeat with the same Idempotency-Key and body answers with the job the first one made.
    """
    claim = idempotency_claim(owner, "jobs", idempotency_key, spec.model_dump(mode="json"))
    job, replayed = create_once(session, claim, lambda c: jobs.submit(session, spec, settings, owner, c),
                                lambda job_id: jobs.get_job(session, job_id, owner))
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    return JobPublic.from_job(job, jobs.queue_position(session, job))


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    owner: CurrentOwner,
    status: Annotated[list[JobStatus] | None, Query(description="repeat to match any of several")] = None,
    kind: Literal["train", "distill"] | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobsPublic:
    """List jobs newest first, filtered by status and kind, a page at a time."""
    page, total, next_cursor = jobs.list_jobs(session, owner=owner, statuses=status or (), kind=kind,
                                              limit=limit, offset=offset, cursor=cursor)
    items = [JobPublic.from_job(job, jobs.queue_position(session, job)) for job in page]
    return JobsPublic(items=items, total=total, limit=limit, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> JobPublic:
    """One job: status, progress, latest metrics, failure reason, queue position."""
    job = jobs.get_job(session, job_id, owner)
    return JobPublic.from_job(job, jobs.queue_position(session, job))


@router.get("/{job_id}/metrics", response_model=list[dict[str, Any]])
def get_metrics(job_id: str, session: SessionDep, owner: CurrentOwner) -> list[dict[str, Any]]:
    """The job's metrics per finished epoch, ordered by epoch."""
    return jobs.metric_series(session, job_id, owner)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, settings: SettingsDep, owner: CurrentOwner) -> JobPublic:
    """Cancel a job: queued or waiting ones end now, running ones stop at their next step."""
    job = jobs.cancel(session, job_id, owner)
    public = JobPublic.from_job(job, jobs.queue_position(session, job))
    if job.status == JobStatus.cancelled:
        # Ended here, not by a worker: its callback (and those of dependants it ended) is owed now.
        session.commit()
        kick(session.get_bind(), settings)  # type: ignore[arg-type]
    return public
