"""The Stack of the tests with real parts: PostgreSQL, Redis as the broker, Celery worker processes.

The `stack` fixture itself lives in conftest.py; test_worker.py and test_faults.py both use it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from service.db import session_scope
from service.dispatch import dispatch
from service.models import Job, JobStatus
from service.states import create_job

REDIS = "redis://127.0.0.1:6379"
QUICK = {"dataset": {"name": "digits", "subset": 256}, "device": "cpu", "optim": {"lr_decay_epochs": []}}


def spec(epochs: int, **over: Any) -> dict[str, Any]:
    """A resolved spec of a quick CPU run on 256 digits for `epochs` epochs, with `over` merged in."""
    from itrd.spec import JobSpec

    data: dict[str, Any] = {**QUICK, **over}
    data["optim"] = {**data["optim"], "epochs": epochs}
    return JobSpec.model_validate(data).model_dump(mode="json")


@dataclass
class Stack:
    """One test's service: a fresh PostgreSQL database, a Redis database, a state dir, worker processes."""

    env: dict[str, str]
    engine: Engine
    logs: Path
    workers: list[subprocess.Popen[bytes]]

    def start_worker(self) -> subprocess.Popen[bytes]:
        with open(self.logs / f"worker-{len(self.workers)}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "itrd", "worker", "--device", "cpu"], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        return proc

    def submit(self, kind: str, job_spec: dict[str, Any], teacher_job: str | None = None) -> str:
        with session_scope(self.engine) as session:
            job = create_job(session, kind=kind, spec=job_spec, teacher_job_id=teacher_job, queue="cpu")
            job_id, queued = job.id, job.status == JobStatus.queued
        if queued:
            assert dispatch([job_id], self.engine) == [job_id]
        return job_id

    def job(self, job_id: str) -> Job:
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def wait(self, job_id: str, until: Callable[[Job], bool], timeout: float = 240.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} stuck in {self.job(job_id).status}; logs:\n{self.tail_logs()}")

    def tail_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log")))


def ended(job: Job) -> bool:
    """Whether the job reached a final status."""
    return job.status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
