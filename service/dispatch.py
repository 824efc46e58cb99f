"""Telling the broker about queued jobs, and sweeping up after lost workers, messages and callbacks.

The database is the record of truth: a job row is committed first, then its id is sent. If the send
fails (broker down) the job simply stays queued with no `dispatched_at`, and the reaper sends it once
the broker answers again. A duplicate message is harmless: a worker must claim the job's lease first.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from service.config import Settings, get_settings
from service.db import get_engine, session_scope
from service.models import Job, JobStatus, utcnow
from service.notify import kick
from service.states import requeue_expired

log = logging.getLogger(__name__)


_producers: dict[str, Celery] = {}
_producers_lock = threading.Lock()
_MAX_PRODUCERS = 4


def _producer(s: Settings) -> Celery:
    """A Celery app for sending with these settings' broker, built once per broker configuration.

    Not the worker module's import-time app: that one is bound to whatever settings were current at
    import, while callers (and tests) may pass settings with another broker.
    """
    from worker.celery_app import make_celery

    key = json.dumps([s.broker_url, s.broker_transport_options(), s.broker_timeout_seconds], sort_keys=True)
    with _producers_lock:
        app = _producers.get(key)
        if app is None:
            if len(_producers) >= _MAX_PRODUCERS:
                _producers.pop(next(iter(_producers))).close()
            app = _producers[key] = make_celery(s)
        return app


def send_job(job_id: str, queue: str, settings: Settings | None = None) -> bool:
    """Send one job id to the broker; False (logged) when the broker cannot be reached in time."""
    from worker.celery_app import RUN_JOB

    s = settings or get_settings()
    app = _producer(s)
    try:
        policy = {"max_retries": 1, "interval_start": 0, "interval_step": s.broker_timeout_seconds}
        app.send_task(RUN_JOB, args=[job_id], queue=queue, retry=True, retry_policy=policy)
    except Exception as exc:  # kombu raises OperationalError and friends; all mean "not sent"
        log.warning("broker did not take job %s: %s", job_id, exc)
        return False
    return True


def dispatch(job_ids: Iterable[str], engine: Engine | None = None, settings: Settings | None = None) -> list[str]:
    """Send queued jobs to the broker and record when it accepted them; returns the ids sent."""
    engine = engine or get_engine()
    sent: list[str] = []
    for job_id in job_ids:
        with session_scope(engine) as session:
            queue = session.scalar(select(Job.queue).where(Job.id == job_id, Job.status == JobStatus.queued))
        if queue is None or not send_job(job_id, queue, settings):
            continue
        with session_scope(engine) as session:
            session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                            .values(dispatched_at=utcnow()))
        sent.append(job_id)
    return sent


def reap_once(engine: Engine | None = None, settings: Settings | None = None) -> dict[str, list[str]]:
    """Requeue jobs whose worker's lease expired, send every queued job the broker never took, and
    start sending the callbacks that are due (in the background: a slow receiver never holds up a sweep)."""
    engine = engine or get_engine()
    with session_scope(engine) as session:
        requeued = requeue_expired(session)
    with session_scope(engine) as session:
        unsent = list(session.scalars(select(Job.id).where(Job.status == JobStatus.queued,
                                                           Job.dispatched_at.is_(None))
                                      .order_by(Job.created_at)))
    sent = dispatch(unsent, engine, settings)
    kick(engine, settings)  # callbacks still owed: retries due, or a sender that died with its process
    return {"requeued": requeued, "sent": sent}


class Reaper(threading.Thread):
    """A daemon thread that calls `reap_once` every `settings.reap_seconds` until stopped."""

    def __init__(self, engine: Engine | None = None, settings: Settings | None = None) -> None:
        super().__init__(name="itrd-reaper", daemon=True)
        self.engine = engine
        self.settings = settings or get_settings()
        self.stopped = threading.Event()

    def run(self) -> None:
        """Sweep until `stop()`; errors (database or broker down) are logged and retried next round."""
        while not self.stopped.wait(self.settings.reap_seconds):
            try:
                reap_once(self.engine, self.settings)
            except Exception as exc:
                log.warning("reaper round failed: %s", exc)

    def stop(self) -> None:
        """Ask the thread to finish after its current round."""
        self.stopped.set()
