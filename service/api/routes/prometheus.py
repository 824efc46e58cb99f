"""GET /metrics: the service's state for Prometheus, in the text exposition format (version 0.0.4).

Job gauges are read from the database at scrape time (it is the record of truth, and every API
replica then reports the same numbers); HTTP counters are this process's own.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.deps import SessionDep
from service.api.telemetry import HttpStats, escape_label
from service.models import Job, JobStatus, utcnow

router = APIRouter(tags=["operations"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    """A gauge family: HELP, TYPE, then `name{labels} value` per sample (labels already formatted)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{{{labels}}} {value:g}" if labels else f"{name} {value:g}" for labels, value in samples]
    return lines


def job_metrics(session: Session) -> list[str]:
    """Jobs by status, queue depth per queue, live workers and the training throughput of running jobs."""
    by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines = _gauge("itrd_jobs", "Jobs in each status.",
                   [(f'status="{s.value}"', float(by_status.get(s, 0))) for s in JobStatus])
    depth = session.execute(select(Job.queue, func.count()).where(Job.status == JobStatus.queued)
                            .group_by(Job.queue).order_by(Job.queue)).all()
    lines += _gauge("itrd_queue_depth", "Queued jobs waiting for a worker, per queue.",
                    [(f'queue="{escape_label(q)}"', float(n)) for q, n in depth])
    leased = (Job.lease_owner.is_not(None), Job.lease_expires_at > utcnow())
    live = session.scalar(select(func.count(func.distinct(Job.lease_owner))).where(*leased))
    lines += _gauge("itrd_live_workers", "Workers holding an unexpired lease on a job.", [("", float(live or 0))])
    # Only jobs a live worker holds: an expired lease's last figure describes a run that has stopped.
    latest = session.scalars(select(Job.latest_metrics).where(*leased))
    rate = sum(float(m.get("images_per_second") or 0.0) for m in latest if m)
    lines += _gauge("itrd_training_images_per_second",
                    "Training throughput summed over the jobs live workers hold (each job's latest epoch).",
                    [("", rate)])
    return lines


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
def prometheus_metrics(session: SessionDep, request: Request) -> PlainTextResponse:
    """The service's metrics in Prometheus' text format."""
    stats: HttpStats = request.app.state.http_stats
    lines = job_metrics(session) + stats.exposition()
    return PlainTextResponse("\n".join(lines) + "\n", media_type=CONTENT_TYPE)
