"""Workers with real parts: PostgreSQL, Redis as the broker, Celery worker processes, trainer processes."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from hook_support import Receiver, verify
from safetensors.torch import load_file
from sqlalchemy import select
from stack_support import Stack, ended, spec

from itrd.models import create_model
from service.config import get_settings
from service.db import session_scope
from service.models import Artifact, Job, JobEvent, JobStatus, Metric
from service.notify import callback_secret
from service.states import request_cancel
from service.storage import store_from_settings

pytestmark = pytest.mark.slow


def test_teacher_then_dependent_student_both_succeed(stack: Stack) -> None:
    stack.start_worker()
    # Eight epochs: long enough that a poll sees the progress between 0 and 1 on a fast machine too.
    teacher = stack.submit("train", spec(8, kind="train", model="resnet8"))
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
    receiver = Receiver()
    try:
        stack.start_worker()
        bad = spec(1, kind="train", model="resnet8", callback_url=receiver.url)
        bad["dataset"] = {"name": "cifar10", "root": "/nonexistent/cifar"}
        job = stack.submit("train", bad)
        done = stack.wait(job, ended, timeout=120)
        assert done.status == JobStatus.failed and done.attempt == 1
        assert "FileNotFoundError" in (done.failure_reason or "") and "cifar" in (done.failure_reason or "")
        time.sleep(3)  # the reaper runs every second: a failed job must stay failed
        assert stack.job(job).status == JobStatus.failed
        # The worker process that ended the job sent its callback, once.
        [(headers, body)] = receiver.requests
        assert json.loads(body)["id"] == job and json.loads(body)["status"] == "failed"
        assert verify(callback_secret(get_settings()), headers, body)
    finally:
        receiver.server.shutdown()


def test_killed_worker_job_resumes_from_its_checkpoint_on_another(stack: Stack) -> None:
    first = stack.start_worker()
    job = stack.submit("train", spec(20, kind="train", model="resnet8"))  # cannot end before the kill

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
    assert epochs == list(range(1, 21))


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
    # Long enough that the run cannot finish in the seconds a warm shutdown takes, on a fast CPU too.
    job = stack.submit("train", spec(20, kind="train", model="resnet8"))
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
