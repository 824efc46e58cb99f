"""Workers with real parts: PostgreSQL, Redis as the broker, Celery worker processes, trainer processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from safetensors.torch import load_file
from sqlalchemy import Engine, select

from itrd.models import create_model
from service.config import get_settings
from service.db import get_engine, migrate_to_head, session_scope
from service.dispatch import dispatch
from service.models import Artifact, Job, JobEvent, JobStatus, Metric
from service.states import create_job, request_cancel
from service.storage import store_from_settings

pytestmark = pytest.mark.slow
REDIS = "redis://127.0.0.1:6379"
QUICK = {"dataset": {"name": "digits", "subset": 256}, "device": "cpu", "optim": {"lr_decay_epochs": []}}


def spec(epochs: int, **over: Any) -> dict[str, Any]:
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
    return job.status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


@pytest.fixture
def stack(tmp_path: Path, create_pg_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    db = create_pg_database()
    migrate_to_head(db)
    broker = f"{REDIS}/{secrets.randbelow(14) + 1}"
    redis.Redis.from_url(broker).flushdb()
    env_vars = {"ITRD_DATABASE_URL": db, "ITRD_BROKER_URL": broker, "ITRD_STATE_DIR": str(tmp_path / "state"),
                "ITRD_LEASE_SECONDS": "5", "ITRD_HEARTBEAT_SECONDS": "1", "ITRD_REAP_SECONDS": "1",
                "OMP_NUM_THREADS": "1"}
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    logs = tmp_path / "logs"
    logs.mkdir()
    s = Stack(env={**os.environ}, engine=get_engine(db), logs=logs, workers=[])
    yield s
    for proc in s.workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    redis.Redis.from_url(broker).flushdb()


def test_teacher_then_dependent_student_both_succeed(stack: Stack) -> None:
    stack.start_worker()
    teacher = stack.submit("train", spec(2, kind="train", model="resnet8"))
    student_spec = spec(2, model="resnet8", teacher={"architecture": "resnet8", "job": teacher})
    student = stack.submit("distill", student_spec, teacher_job=teacher)
    assert stack.job(student).status == JobStatus.waiting
    fractions: set[float] = set()
    stack.wait(teacher, lambda j: fractions.add(j.fraction) or ended(j))
    assert stack.job(teacher).status == JobStatus.succeeded, stack.job(teacher).failure_reason
    assert any(0.0 < f < 1.0 for f in fractions), f"progress never moved: {fractions}"
    done = stack.wait(student, ended)
    assert done.status == JobStatus.succeeded, f"{done.failure_reason}\n{stack.tail_logs()}"
    assert done.result is not None and done.result["teacher_top1"] == stack.job(teacher).result["final_top1"]
    with session_scope(stack.engine) as session:
        names = set(session.scalars(select(Artifact.name).where(Artifact.job_id == student)))
        epochs = list(session.scalars(select(Metric.epoch).where(Metric.job_id == student).order_by(Metric.epoch)))
    assert {"last.pt", "best.pt", "student.safetensors", "model_card.json", "metrics.jsonl"} <= names
    assert epochs == [1, 2]
    path = stack.logs / "student.safetensors"
    store_from_settings(get_settings()).get_file(student, "student.safetensors", path)
    model = create_model("resnet8", 10)
    model.load_state_dict(load_file(str(path)), strict=True)


def test_cancel_a_running_job(stack: Stack) -> None:
    stack.start_worker()
    job = stack.submit("train", spec(50, kind="train", model="resnet8"))
    stack.wait(job, lambda j: j.status == JobStatus.running and j.step > 0)
    with session_scope(stack.engine) as session:
        assert request_cancel(session, job) == JobStatus.cancelling
    done = stack.wait(job, ended, timeout=60)
    assert done.status == JobStatus.cancelled and done.lease_owner is None


def test_a_spec_that_fails_at_start_fails_once_with_its_reason(stack: Stack) -> None:
    stack.start_worker()
    bad = spec(1, kind="train", model="resnet8")
    bad["dataset"] = {"name": "cifar10", "root": "/nonexistent/cifar"}
    job = stack.submit("train", bad)
    done = stack.wait(job, ended, timeout=120)
    assert done.status == JobStatus.failed and done.attempt == 1
    assert "FileNotFoundError" in (done.failure_reason or "") and "cifar" in (done.failure_reason or "")
    time.sleep(3)  # the reaper runs every second: a failed job must stay failed
    assert stack.job(job).status == JobStatus.failed


def test_killed_worker_job_resumes_from_its_checkpoint_on_another(stack: Stack) -> None:
    first = stack.start_worker()
    job = stack.submit("train", spec(6, kind="train", model="resnet8"))

    def has_checkpoint(j: Job) -> bool:
        with session_scope(stack.engine) as session:
            found = select(Artifact.id).where(Artifact.job_id == j.id, Artifact.name == "last.pt.sha256")
            return session.scalar(found) is not None

    stack.wait(job, lambda j: j.status == JobStatus.running and j.epoch >= 2 and has_checkpoint(j))
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its trainer vanish: no goodbye, lease left behind
    first.wait()
    stack.start_worker()
    done = stack.wait(job, ended, timeout=300)
    assert done.status == JobStatus.succeeded, f"{done.failure_reason}\n{stack.tail_logs()}"
    assert done.attempt == 2
    assert done.result is not None and done.result["started_at_epoch"] >= 2  # resumed, not restarted
    with session_scope(stack.engine) as session:
        reasons = list(session.scalars(select(JobEvent.reason).where(JobEvent.job_id == job)))
        epochs = list(session.scalars(select(Metric.epoch).where(Metric.job_id == job).order_by(Metric.epoch)))
    assert any("lease" in (r or "") for r in reasons)
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_the_same_message_twice_runs_the_job_once(stack: Stack) -> None:
    stack.start_worker()
    stack.start_worker()
    job = stack.submit("train", spec(2, kind="train", model="resnet8"))
    from service.dispatch import send_job

    assert send_job(job, "cpu")  # a duplicate delivery (redelivery, a re-send): the lease absorbs it
    done = stack.wait(job, ended)
    assert done.status == JobStatus.succeeded and done.attempt == 1
    with session_scope(stack.engine) as session:
        reasons = session.scalars(select(JobEvent.reason).where(JobEvent.job_id == job))
        claims = [r for r in reasons if r and "claimed" in r]
    assert len(claims) == 1


def test_sigterm_checkpoints_and_the_job_resumes_on_another_worker(stack: Stack) -> None:
    first = stack.start_worker()
    job = stack.submit("train", spec(4, kind="train", model="resnet8"))
    stack.wait(job, lambda j: j.status == JobStatus.running and j.epoch >= 2 and j.step >= 1)
    os.killpg(first.pid, signal.SIGTERM)  # a deploy: warm shutdown
    assert first.wait(timeout=60) == 0, stack.tail_logs()
    handed_back = stack.job(job)
    assert handed_back.status == JobStatus.queued and handed_back.attempt == 1, handed_back.status
    stack.start_worker()
    done = stack.wait(job, ended, timeout=300)
    assert done.status == JobStatus.succeeded, f"{done.failure_reason}\n{stack.tail_logs()}"
    assert done.result is not None and done.result["started_at_epoch"] >= 2
    with session_scope(stack.engine) as session:
        reasons = list(session.scalars(select(JobEvent.reason).where(JobEvent.job_id == job)))
    assert any("shutting down" in (r or "") for r in reasons)
