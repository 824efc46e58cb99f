"""Running one job on this worker: claim its lease, spawn the trainer, keep the records, end the job.

The Celery task is a thin wrapper around `execute_job`, so the whole life of a job can be driven and
tested without a broker. The trainer runs in a spawned (not forked) child, so CUDA never initialises
in the Celery process and a cancel or a crash is a clean process exit.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from itrd.spec import JobSpec
from service import logs
from service.config import Settings, get_settings
from service.db import get_engine, session_scope
from service.dispatch import dispatch
from service.jobs import teacher_weights_location
from service.models import Artifact, Job, JobStatus, record_artifact, record_metrics
from service.notify import kick
from service.states import InvalidTransition, LeaseLost, Progress, claim, finish, heartbeat, release
from service.storage import ArtifactStore, store_from_settings
from worker import runner

log = logging.getLogger(__name__)

# Set by the worker's shutdown hook (SIGTERM, a deploy): running trainers checkpoint and hand back.
SHUTTING_DOWN = threading.Event()
CURRENT_JOB = threading.Event()  # set while this process runs a job


def worker_identity() -> str:
    """A name unique to this worker process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Tail:
    """What of the trainer's files has already reached the database."""

    metrics_offset: int = 0
    events_offset: int = 0
    pending: list[tuple[str, Any]] = field(default_factory=list)


class JobRun:
    """One attempt at one job by this worker."""

    def __init__(self, job_id: str, worker_id: str, settings: Settings, engine: Engine, store: ArtifactStore):
        self.job_id = job_id
        self.worker_id = worker_id
        self.s = settings
        self.engine = engine
        self.store = store
        self.dir = settings.state_dir / "runs" / job_id
        self.tail = _Tail()

    # ------------------------------------------------------------------------------------ preparing
    def prepare(self, job: Job) -> tuple[JobSpec, Path | None, bool]:
        """Fresh run directory with the teacher's weights and the last stored checkpoint, if any."""
        spec = JobSpec.model_validate(job.spec)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        teacher: Path | None = None
        location = teacher_weights_location(job)
        if location is not None:
            teacher = self.dir / "teacher.safetensors"
            self.store.get_file(*location, teacher)
        resume = False
        for name in ("last.pt", "last.pt.sha256", "last.prev.pt", "last.prev.pt.sha256"):
            if self.store.exists(self.job_id, name):
                self.store.get_file(self.job_id, name, self.dir / name)
                resume = True
        return spec, teacher, resume

    # ------------------------------------------------------------------------------------ syncing
    def _new_lines(self, name: str, offset_attr: str) -> list[dict[str, Any]]:
        path = self.dir / name
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(getattr(self.tail, offset_attr))
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next round
        setattr(self.tail, offset_attr, getattr(self.tail, offset_attr) + len(complete))
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def sync(self) -> bool | None:
        """Push progress, metrics and artifacts to the database and renew the lease.

        Returns whether cancellation was requested, or None when this worker lost the lease. Rows not
        written because the database is down stay pending and go in the next round.
        """
        self.tail.pending += [("metric", m) for m in self._new_lines("metrics.jsonl", "metrics_offset")]
        self.tail.pending += [("artifact", a) for a in self._new_lines(runner.EVENTS, "events_offset")]
        progress = None
        prog_file = self.dir / runner.PROGRESS
        if prog_file.exists():
            p = json.loads(prog_file.read_text() or "{}")
            if p:
                progress = Progress(epoch=int(p.get("epoch", 0)), step=int(p.get("step", 0)),
                                    fraction=float(p.get("fraction", 0.0)), epochs=p.get("epochs"),
                                    steps_per_epoch=p.get("steps_per_epoch"))
        try:
            with session_scope(self.engine) as session:
                beat = heartbeat(session, self.job_id, self.worker_id, progress=progress,
                                 lease_seconds=self.s.lease_seconds)
                if not beat.owned:
                    return None
                for kind, row in self.tail.pending:
                    if kind == "metric":
                        record_metrics(session, self.job_id, int(row["epoch"]), row)
                    else:
                        record_artifact(session, self.job_id, row["name"], int(row["size"]), row["sha256"])
            self.tail.pending = []
            return beat.cancel_requested
        except Exception as exc:  # database down: keep training, keep the rows for later
            log.warning("job %s: could not reach the database (%s); will retry", self.job_id, exc)
            return False

    # ------------------------------------------------------------------------------------ running
    def supervise(self, spec: JobSpec, teacher: Path | None, resume: bool) -> dict[str, Any]:
        """Run the trainer child to its end, heartbeating; returns its outcome."""
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=runner.run, name=f"trainer-{self.job_id}",
                            args=(self.job_id, spec.model_dump_json(), str(self.dir),
                                  str(teacher) if teacher else None, resume))
        child.start()
        stop_file = self.dir / runner.STOP
        while child.is_alive():
            child.join(timeout=self.s.heartbeat_seconds)
            cancel = self.sync()
            if cancel is None:
                log.error("job %s: lease lost; stopping its trainer", self.job_id)
                child.terminate()
                child.join()
                return {"status": "lease-lost"}
            if (cancel or SHUTTING_DOWN.is_set()) and not stop_file.exists():
                stop_file.write_text("cancelled" if cancel else "worker shutting down")
        outcome_file = self.dir / runner.OUTCOME
        if outcome_file.exists():
            outcome: dict[str, Any] = json.loads(outcome_file.read_text())
            return outcome
        return {"status": "failed", "reason": f"the trainer process died (exit code {child.exitcode})"}

    def upload_results(self) -> None:
        """Store the run's metrics and summary next to its checkpoints, and record them."""
        for name in ("metrics.jsonl", "summary.json"):
            path = self.dir / name
            if path.exists():
                size, digest = self.store.put_file(self.job_id, name, path)
                with open(self.dir / runner.EVENTS, "a") as f:
                    f.write(json.dumps({"name": name, "size": size, "sha256": digest}) + "\n")

    def end(self, outcome: dict[str, Any]) -> list[str]:
        """Record how the run ended; returns dependent jobs that became queued."""
        status = outcome.get("status")
        if status == "lease-lost":
            return []
        if status == "succeeded":
            self.upload_results()
        for _ in range(30):  # the final rows must land before the end status does
            if self.sync() is not None and not self.tail.pending:
                break
            SHUTTING_DOWN.wait(2.0)
        with session_scope(self.engine) as session:
            try:
                if status == "succeeded":
                    return finish(session, self.job_id, self.worker_id, JobStatus.succeeded,
                                  result=outcome.get("summary"))
                if status == "stopped" and outcome.get("reason") == "cancelled":
                    return finish(session, self.job_id, self.worker_id, JobStatus.cancelled, "cancelled by request")
                if status == "stopped":
                    release(session, self.job_id, self.worker_id, f"handed back: {outcome.get('reason')}")
                    return [self.job_id] if not SHUTTING_DOWN.is_set() else []
                return finish(session, self.job_id, self.worker_id, JobStatus.failed,
                              str(outcome.get("reason", "unknown failure")))
            except InvalidTransition:
                # e.g. the trainer finished while a cancel was being requested: the cancel wins.
                return finish(session, self.job_id, self.worker_id, JobStatus.cancelled, "cancelled by request")


def execute_job(job_id: str, settings: Settings | None = None, worker_id: str | None = None) -> str:
    """Claim and run one job to its end; a job someone else holds (or that ended) is a no-op."""
    job_token, request_token = logs.job_id.set(None), logs.request_id.set(None)
    try:
        return _execute(job_id, settings, worker_id)
    finally:
        # The worker outlives the job: what it logs next must not carry this job's ids.
        logs.job_id.reset(job_token)
        logs.request_id.reset(request_token)
        CURRENT_JOB.clear()


def _execute(job_id: str, settings: Settings | None, worker_id: str | None) -> str:
    s = settings or get_settings()
    engine = get_engine(s.database_url)
    worker_id = worker_id or worker_identity()
    with session_scope(engine) as session:
        if not claim(session, job_id, worker_id, lease_seconds=s.lease_seconds):
            log.info("job %s: not claimable (running elsewhere, ended or gone); message ignored", job_id)
            return "skipped"
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
    # Everything this worker logs about the job carries its id and the id of the request that made it.
    logs.job_id.set(job_id)
    logs.request_id.set(job.request_id)
    CURRENT_JOB.set()
    log.info("job %s: claimed (attempt %d)", job_id, job.attempt)
    run = JobRun(job_id, worker_id, s, engine, store_from_settings(s))
    try:
        spec, teacher, resume = run.prepare(job)
    except Exception as exc:
        with session_scope(engine) as session:
            finish(session, job_id, worker_id, JobStatus.failed, f"could not prepare the run: {exc}")
        kick(engine, s)
        return "failed"
    outcome = run.supervise(spec, teacher, resume)
    try:
        queued = run.end(outcome)
    except LeaseLost:
        log.error("job %s: lease lost before its end could be recorded", job_id)
        return "lease-lost"
    if queued:
        dispatch(queued, engine, s)
    kick(engine, s)  # callbacks of the jobs this end settled (none when the job was only handed back)
    return str(outcome.get("status"))


def artifact_names(engine: Engine, job_id: str) -> list[str]:
    """Names of the artifacts recorded for a job (used by tests and the demo)."""
    with session_scope(engine) as session:
        return list(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
