"""Celery tasks and worker hooks. Tasks take ids, never payloads: the database holds the job."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from service.dispatch import Reaper
from worker.celery_app import RUN_JOB, app
from worker.execution import CURRENT_JOB, SHUTTING_DOWN, execute_job

log = logging.getLogger(__name__)
_reaper: Reaper | None = None


@app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim job `job_id` and train it to its end (a no-op when another worker holds it)."""
    return execute_job(job_id)


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    # Every worker sweeps expired leases, so a lost worker's job is re-run even with no API running.
    global _reaper
    _reaper = Reaper()
    _reaper.start()


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    # A warm shutdown (SIGTERM): the running trainer checkpoints and its job goes back to the queue.
    if CURRENT_JOB.is_set():
        log.warning("worker shutting down: asking the running trainer to checkpoint and hand its job back")
    else:
        log.info("worker shutting down: no job running")
    SHUTTING_DOWN.set()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
