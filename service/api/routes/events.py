"""A job's live events as server-sent events: state changes, progress and per-epoch metrics.

The stream polls the database (the record of truth) about twice a second; no broker or pub/sub is
involved, so it works the same in embedded and distributed deployments. Metrics events carry the
epoch as their id, so a client that reconnects with Last-Event-ID gets only the epochs it missed. An
epoch recorded again (a job resumed from a checkpoint older than its last recorded epoch redoes it)
is sent again with its new values: a client keeps the latest metrics event of each epoch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import jobs
from service.api.deps import CurrentOwner, SessionDep, SettingsDep
from service.db import get_engine
from service.models import JobStatus, Metric
from service.schemas import JobPublic
from service.states import JobNotFound

router = APIRouter(prefix="/jobs", tags=["jobs"])

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
RETRY_MS = 2000
TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}},
          "description": "events `state` (the job), `progress` and `metrics` (id = epoch) until the job ends"},
}


def sse(event: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event, serialised (the data is one line of JSON)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


@dataclass
class _Seen:
    """What the stream has already sent, so that each poll sends only what changed."""

    status: str | None = None
    progress: dict[str, Any] | None = None
    epoch: int = 0  # every epoch up to here was sent (or skipped through Last-Event-ID)
    recorded: dict[int, datetime] = field(default_factory=dict)  # when each sent epoch's row was written
    since: datetime | None = None  # the newest recorded_at sent
    pending: list[str] = field(default_factory=list)


def _poll(database_url: str, job_id: str, owner: str | None, seen: _Seen) -> bool:
    """Queue the events that are new since the last poll in `seen.pending`; True once the job has ended.

    A state event comes before the metrics (a client learns the job first), except the final one,
    which comes last: the worker records an epoch's metrics before it finishes the job, and the job is
    read before its metrics, so the final state follows every epoch.
    """
    with Session(get_engine(database_url), expire_on_commit=False) as session:
        job = jobs.get_job(session, job_id, owner)
        public = JobPublic.from_job(job, jobs.queue_position(session, job))
        wanted = Metric.epoch > seen.epoch
        if seen.since is not None:
            wanted = wanted | (Metric.recorded_at >= seen.since)  # an epoch written again since
        rows = [r for r in session.scalars(select(Metric).where(Metric.job_id == job_id, wanted)
                                           .order_by(Metric.epoch))
                if seen.recorded.get(r.epoch) != r.recorded_at]
    updates = [sse("metrics", {"epoch": r.epoch, **{k: v for k, v in r.values.items() if k != "epoch"}}, str(r.epoch))
               for r in rows]
    for r in rows:
        seen.recorded[r.epoch] = r.recorded_at
        seen.epoch = max(seen.epoch, r.epoch)
        seen.since = r.recorded_at if seen.since is None else max(seen.since, r.recorded_at)
    ended = public.status in TERMINAL
    state = [sse("state", public.model_dump(mode="json"))] if public.status != seen.status else []
    seen.status = public.status
    progress = public.progress.model_dump()
    if progress != seen.progress:
        updates.append(sse("progress", progress))
        seen.progress = progress
    seen.pending.extend(updates + state if ended else state + updates)
    return ended


def _last_epoch(last_event_id: str | None) -> int:
    try:
        return max(int(last_event_id or 0), 0)
    except ValueError:
        return 0


@router.get("/{job_id}/events", response_class=StreamingResponse, responses=_STREAM_RESPONSES)
def job_events(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, owner: CurrentOwner,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Follow a job: a `state` event on every status change, `progress`, and `metrics` per epoch."""
    jobs.get_job(session, job_id, owner)  # a missing job is a 404 problem, not an empty stream
    session.close()  # the stream opens a short session per poll instead of holding this one
    seen = _Seen(epoch=_last_epoch(last_event_id))

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        quiet_since = time.monotonic()
        while True:
            try:
                ended = await anyio.to_thread.run_sync(_poll, settings.database_url, job_id, owner, seen)
            except JobNotFound:  # deleted while followed: nothing more will happen to it
                return
            if seen.pending:
                quiet_since = time.monotonic()
            for chunk in seen.pending:
                yield chunk
            seen.pending.clear()
            if ended or await request.is_disconnected():
                return
            if time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"  # proxies close connections that stay silent too long
                quiet_since = time.monotonic()
            await asyncio.sleep(POLL_SECONDS)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
