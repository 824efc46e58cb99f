"""Faults injected into real processes (PostgreSQL, Redis, Celery workers, trainers), driven through the API.

Each test takes the `stack` of conftest.py: a fresh database, a Redis database and the environment that
names them; the API runs in this process (TestClient, its reaper thread on), workers as subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from api_support import assert_problem, bearer, make_key
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from stack_support import Stack, ended, spec

from service.api.app import create_app
from service.config import Settings, get_settings
from service.db import session_scope
from service.models import Artifact, Job, JobEvent, JobStatus, Metric
from service.storage import LocalArtifactStore

pytestmark = pytest.mark.slow
OWNER = "faults"


@contextlib.contextmanager
def stack_api(stack: Stack, **overrides: Any) -> Iterator[TestClient]:
    """The API on the stack's settings (env) with `overrides`, its reaper sweeping every half second."""
    settings = Settings(**{"reap_seconds": 0.5, "broker_timeout_seconds": 0.5, **overrides})
    key = make_key(settings.database_url, OWNER)
    with TestClient(create_app(settings), headers=bearer(key)) as client:
        yield client


class TcpRelay:
    """A TCP relay to a target port that can be switched off and on: a broker that goes down and comes back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def start(self) -> None:
        """Listen and relay every connection to the target."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and cut every relayed connection."""
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it accepting.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def events(stack: Stack, job_id: str) -> list[str]:
    """The reasons recorded on a job's transitions, in order."""
    with session_scope(stack.engine) as session:
        query = select(JobEvent.reason).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return [r or "" for r in session.scalars(query)]


def test_broker_down_then_back(stack: Stack) -> None:
    real = stack.env["ITRD_BROKER_URL"]  # redis://127.0.0.1:6379/N
    relay = TcpRelay(6379)
    relayed = real.replace(":6379/", f":{relay.port}/")
    try:
        with stack_api(stack, broker_url=relayed) as api:
            # Down: the submit still succeeds (the row is committed), readiness says why, nothing is sent.
            created = api.post("/v1/jobs", json=spec(1, kind="train", model="resnet8"))
            assert created.status_code == 201, created.text
            job = created.json()
            assert job["status"] == "queued" and job["dispatched_at"] is None
            assert "broker" in assert_problem(api.get("/readyz"), 503, "not-ready")["detail"]
            time.sleep(1.5)  # a few reaper rounds fail quietly
            assert api.get(f"/v1/jobs/{job['id']}").json()["dispatched_at"] is None
            assert api.get("/healthz").status_code == 200

            relay.start()  # back: the API's reaper sends the job
            deadline = time.monotonic() + 30
            while api.get(f"/v1/jobs/{job['id']}").json()["dispatched_at"] is None:
                assert time.monotonic() < deadline, "the reaper never sent the job once the broker was back"
                time.sleep(0.2)
            assert api.get("/readyz").status_code == 200
        assert redis.Redis.from_url(real).llen("cpu") >= 1  # the message went through the relay into Redis
        stack.start_worker()
        done = stack.wait(job["id"], ended)
        assert done.status == JobStatus.succeeded, f"{done.failure_reason}\n{stack.tail_logs()}"
        assert done.attempt == 1 and sum("claimed" in r for r in events(stack, job["id"])) == 1
    finally:
        relay.stop()


def _kill_after_checkpoints(stack: Stack, job: str, first: subprocess.Popen[bytes]) -> LocalArtifactStore:
    """Wait until the job has stored two checkpoints (last and the previous), then SIGKILL its worker."""

    def two_checkpoints(j: Job) -> bool:
        with session_scope(stack.engine) as session:
            found = select(Artifact.id).where(Artifact.job_id == j.id, Artifact.name == "last.prev.pt.sha256")
            return j.status == JobStatus.running and session.scalar(found) is not None

    stack.wait(job, two_checkpoints)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    return LocalArtifactStore(Path(get_settings().artifact_store.removeprefix("file://")))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: the pickle may still parse
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_at_resume_falls_back_to_the_previous_one(stack: Stack) -> None:
    first = stack.start_worker()
    job = stack.submit("train", spec(16, kind="train", model="resnet8"))  # still running at the kill
    store = _kill_after_checkpoints(stack, job, first)
    _flip_a_byte(store.path(job, "last.pt"))
    stack.start_worker()
    done = stack.wait(job, ended, timeout=300)
    assert done.status == JobStatus.succeeded, f"{done.status}: {done.failure_reason}\n{stack.tail_logs()}"
    assert done.attempt == 2 and done.result is not None and done.result["started_at_epoch"] >= 2
    assert done.result["epochs"] == 16


def test_corrupt_checkpoints_at_resume_fail_the_job_clearly(stack: Stack) -> None:
    first = stack.start_worker()
    job = stack.submit("train", spec(16, kind="train", model="resnet8"))  # still running at the kill
    store = _kill_after_checkpoints(stack, job, first)
    for name in ("last.pt", "last.prev.pt"):
        _flip_a_byte(store.path(job, name))
    stack.start_worker()
    done = stack.wait(job, ended, timeout=300)
    assert done.status == JobStatus.failed, f"{done.status}: {done.failure_reason}\n{stack.tail_logs()}"
    reason = done.failure_reason or ""
    assert "corrupt" in reason and "last.pt" in reason and "last.prev.pt" in reason, reason
    assert done.attempt >= 2 and any("lease" in r for r in events(stack, job))


def test_cancel_while_queued_and_after_the_end(stack: Stack) -> None:
    with stack_api(stack) as api:
        queued = api.post("/v1/jobs", json=spec(1, kind="train", model="resnet8")).json()
        assert queued["dispatched_at"] is not None  # its message waits in Redis: no worker yet
        cancelled = api.post(f"/v1/jobs/{queued['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"

        stack.start_worker()  # it receives the cancelled job's message first, and must not run it
        later = api.post("/v1/jobs", json=spec(1, kind="train", model="resnet8")).json()
        done = stack.wait(later["id"], ended)
        assert done.status == JobStatus.succeeded, f"{done.failure_reason}\n{stack.tail_logs()}"

        shown = api.get(f"/v1/jobs/{queued['id']}").json()
        assert (shown["status"], shown["started_at"], shown["attempt"]) == ("cancelled", None, 1)
        with session_scope(stack.engine) as session:
            count = select(func.count()).select_from(Artifact).where(Artifact.job_id == queued["id"])
            assert session.scalar(count) == 0
        assert not any("claimed" in r for r in events(stack, queued["id"]))

        for finished in (queued["id"], later["id"]):
            body = assert_problem(api.post(f"/v1/jobs/{finished}/cancel"), 409, "job-already-ended")
            assert "already" in body["detail"]
        assert api.get(f"/v1/jobs/{later['id']}").json()["status"] == "succeeded"


def test_database_down_then_back_while_training(stack: Stack) -> None:
    real = stack.env["ITRD_DATABASE_URL"]  # postgresql://...@127.0.0.1:5432/itrd_test_...
    relay = TcpRelay(5432)
    relayed = real.replace(":5432/", f":{relay.port}/")
    relay.start()
    # A lease longer than the outage: the job must survive it without being presumed lost.
    stack.env.update(ITRD_DATABASE_URL=relayed, ITRD_LEASE_SECONDS="60")
    try:
        stack.start_worker()
        # Epochs enough to still be training when the outage starts, on a fast CPU too.
        job = stack.submit("train", spec(16, kind="train", model="resnet8"))
        stack.wait(job, lambda j: j.status == JobStatus.running and j.epoch >= 1)
        metrics_file = Path(stack.env["ITRD_STATE_DIR"]) / "runs" / job / "metrics.jsonl"
        with stack_api(stack, database_url=relayed) as api:
            written = len(metrics_file.read_text().splitlines())
            relay.stop()  # the database vanishes for the worker and the API
            body = assert_problem(api.get("/readyz"), 503, "not-ready")
            assert not body["checks"]["database"]["ok"] and "database" in body["detail"]
            down_since = time.monotonic()
            deadline = down_since + 120
            # The trainer goes on: an epoch ends while the database is away (for a few heartbeats at least).
            while len(metrics_file.read_text().splitlines()) <= written or time.monotonic() < down_since + 3:
                assert time.monotonic() < deadline, f"training stopped with the database\n{stack.tail_logs()}"
                time.sleep(0.3)
            relay.start()
            assert api.get("/readyz").status_code == 200
        done = stack.wait(job, ended)
        assert done.status == JobStatus.succeeded, f"{done.failure_reason}\n{stack.tail_logs()}"
        assert done.attempt == 1 and not any("lease" in r for r in events(stack, job))
        with session_scope(stack.engine) as session:
            epochs = list(session.scalars(select(Metric.epoch).where(Metric.job_id == job).order_by(Metric.epoch)))
        assert epochs == list(range(1, 17))  # the rows held back during the outage arrived
        worker_log = "".join(p.read_text(errors="replace") for p in stack.logs.glob("worker-*.log"))
        assert "could not reach the database" in worker_log  # the outage did reach the worker
    finally:
        relay.stop()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(stack: Stack) -> None:
    """The trainer's run directory is a 2 MiB tmpfs: epoch 1's checkpoints fit, epoch 2's do not."""
    runs = Path(stack.env["ITRD_STATE_DIR"]) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(runs)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        stack.start_worker()
        job = stack.submit("train", spec(4, kind="train", model="resnet8"))
        done = stack.wait(job, ended, timeout=300)
        assert done.status == JobStatus.failed, f"{done.status}: {done.failure_reason}\n{stack.tail_logs()}"
        assert "No space left on device" in (done.failure_reason or ""), done.failure_reason
        assert done.epoch >= 2  # it failed writing a later checkpoint, not at the start
        # The checkpoint stored before the disk filled is whole: it verifies against its sha256 and loads.
        store = LocalArtifactStore(Path(get_settings().artifact_store.removeprefix("file://")))
        from itrd.engine.checkpoint import load_checkpoint

        state = load_checkpoint(store.path(job, "last.pt"))
        assert state["epoch"] >= 1 and "student" in state
        assert not [p for p in (runs / job).iterdir() if ".tmp" in p.name]  # no half-written file left
    finally:
        for proc in stack.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(["umount", "-l", str(runs)], check=False)
