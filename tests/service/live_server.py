"""A real uvicorn process serving the API over a migrated SQLite state dir, and helpers to fill it.

The client, CLI and event-stream tests talk HTTP to it; they put jobs, metrics and artifacts straight
into the records (no worker), as a worker would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from api_support import make_key, uvicorn_server
from sqlalchemy import update

from service.db import get_engine, migrate_to_head, session_scope
from service.models import Job, JobStatus, new_id, record_artifact, record_metrics, utcnow
from service.storage import LocalArtifactStore

OWNER = "client-tests"


@dataclass
class LiveServer:
    """A running API: its base URL, state dir, database URL and an API key of OWNER."""

    url: str
    state: Path
    database_url: str
    api_key: str

    def add_job(self, status: JobStatus = JobStatus.running, owner: str = OWNER, **fields: Any) -> str:
        """Insert a job in any status (test setup that bypasses the state machine); returns its id."""
        now = utcnow()
        values: dict[str, Any] = {
            "id": new_id(), "kind": "distill", "status": status, "owner": owner, "created_at": now,
            "queued_at": now, "max_attempts": 3, "epochs": 3, "steps_per_epoch": 10,
            "spec": {"kind": "distill", "model": "resnet8", "method": {"name": "itrd"}, "dataset": {"name": "digits"}},
        }
        if status in (JobStatus.running, JobStatus.cancelling):
            values.update(lease_owner="worker-0", lease_expires_at=now + timedelta(hours=1), started_at=now)
        values.update(fields)
        with session_scope(get_engine(self.database_url)) as session:
            session.add(Job(**values))
        return str(values["id"])

    def update_job(self, job_id: str, **values: Any) -> None:
        """Overwrite columns of a job row."""
        with session_scope(get_engine(self.database_url)) as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    def add_metrics(self, job_id: str, epoch: int, **values: Any) -> None:
        """Record one epoch's metrics, as the worker does."""
        with session_scope(get_engine(self.database_url)) as session:
            record_metrics(session, job_id, epoch, {"epoch": epoch, **values})

    def add_artifact(self, job_id: str, name: str, payload: bytes) -> str:
        """Store a file as the job's artifact and record it; returns its sha256."""
        source = self.state / f"upload-{name}"
        source.write_bytes(payload)
        size, digest = LocalArtifactStore(self.state / "artifacts").put_file(job_id, name, source)
        with session_scope(get_engine(self.database_url)) as session:
            record_artifact(session, job_id, name, size, digest)
        return digest


@contextmanager
def running_server(directory: Path) -> Iterator[LiveServer]:
    """Start uvicorn on a fresh state dir under `directory` (no reaper: nothing re-queues test jobs)."""
    state = directory / "state"
    database_url = f"sqlite:///{state / 'itrd.db'}"
    migrate_to_head(database_url)
    env = {"ITRD_STATE_DIR": str(state), "ITRD_REAPER_IN_API": "false", "ITRD_BROKER_TIMEOUT_SECONDS": "0.5"}
    with uvicorn_server(env, directory / "uvicorn.log") as url:
        yield LiveServer(url, state, database_url, make_key(database_url, OWNER))
