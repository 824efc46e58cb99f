"""The job state machine on both backends: the transition table, leases, cancellation, teachers."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.models import Job, JobEvent, JobStatus, utcnow
from service.states import (
    ALLOWED,
    TERMINAL,
    InvalidTransition,
    JobAlreadyEnded,
    JobNotFound,
    LeaseLost,
    Progress,
    TeacherNotUsable,
    claim,
    create_job,
    finish,
    heartbeat,
    release,
    request_cancel,
    requeue_expired,
    transition,
)

S = JobStatus
AddJob = Callable[..., Job]


def events(session: Session, job_id: str) -> list[tuple[JobStatus | None, JobStatus, str | None]]:
    """The job's recorded moves, oldest first."""
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
    return [(e.from_status, e.to_status, e.reason) for e in rows]


def reload(session: Session, job_id: str) -> Job:
    """The job as committed in the database."""
    session.expire_all()
    job = session.get(Job, job_id)
    assert job is not None
    return job


def test_table_covers_every_status_and_terminals_are_final() -> None:
    assert set(ALLOWED) == set(JobStatus)
    assert all(not ALLOWED[s] for s in TERMINAL)
    assert all(ALLOWED[s] for s in set(JobStatus) - TERMINAL)


@pytest.mark.parametrize(("from_status", "to_status"), list(itertools.product(JobStatus, JobStatus)))
def test_transition(session: Session, add_job: AddJob, from_status: JobStatus, to_status: JobStatus) -> None:
    job = add_job(from_status)
    if to_status is S.running:
        # Only claim() may start a job; transition() refuses even the legal queued -> running.
        with pytest.raises(InvalidTransition):
            transition(session, job, to_status)
        session.rollback()
        assert claim(session, job.id, "w1") is (from_status is S.queued)
        session.commit()
        assert reload(session, job.id).status is (S.running if from_status is S.queued else from_status)
        return
    if to_status not in ALLOWED[from_status]:
        with pytest.raises(InvalidTransition, match=f"{from_status}.*{to_status}|final"):
            transition(session, job, to_status, "nope")
        session.rollback()
        assert reload(session, job.id).status is from_status
        assert events(session, job.id) == []
        return

    queued = transition(session, job, to_status, "because")
    session.commit()
    job = reload(session, job.id)
    assert job.status is to_status
    assert events(session, job.id) == [(from_status, to_status, "because")]
    assert queued == ([job.id] if to_status is S.queued else [])
    if to_status in TERMINAL:
        assert job.finished_at is not None and job.finished_at.tzinfo is not None
        assert job.lease_owner is None and job.lease_expires_at is None
    else:
        assert job.finished_at is None
    if to_status is S.queued:
        assert job.lease_owner is None and job.queued_at is not None
    assert job.failure_reason == ("because" if to_status is S.failed else None)
    assert job.cancel_requested is (to_status in (S.cancelling, S.cancelled))


def test_claim_takes_a_lease_and_only_once(session: Session, add_job: AddJob) -> None:
    job = add_job()
    now = utcnow()
    assert claim(session, job.id, "w1", now=now, lease_seconds=30)
    session.commit()
    assert not claim(session, job.id, "w2", now=now)
    assert not claim(session, "0" * 32, "w2")
    job = reload(session, job.id)
    assert (job.status, job.lease_owner, job.attempt) == (S.running, "w1", 1)
    assert job.lease_expires_at == now + timedelta(seconds=30)
    assert job.started_at == now and job.heartbeat_at == now
    assert events(session, job.id) == [(S.queued, S.running, "claimed by w1")]


def test_eight_workers_race_to_claim_one_job(engine: Engine, session: Session, add_job: AddJob) -> None:
    job_id = add_job().id
    start = threading.Barrier(8)
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with Session(engine) as own:
                start.wait()
                results[name] = claim(own, job_id, name)
                own.commit()
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    winners = [name for name, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    job = reload(session, job_id)
    assert job.lease_owner == winners[0]
    assert events(session, job_id) == [(S.queued, S.running, f"claimed by {winners[0]}")]


def test_heartbeat_extends_only_the_owners_lease(session: Session, add_job: AddJob) -> None:
    job = add_job()
    t0 = utcnow()
    assert claim(session, job.id, "w1", now=t0, lease_seconds=60)
    session.commit()

    stranger = heartbeat(session, job.id, "w2", now=t0 + timedelta(seconds=10))
    assert not stranger and not stranger.owned
    session.commit()
    assert reload(session, job.id).lease_expires_at == t0 + timedelta(seconds=60)

    beat = heartbeat(
        session, job.id, "w1", now=t0 + timedelta(seconds=10), lease_seconds=60,
        progress=Progress(epoch=2, step=5, fraction=0.25, epochs=8, steps_per_epoch=10),
    )
    session.commit()
    assert beat and not beat.cancel_requested
    job = reload(session, job.id)
    assert job.lease_expires_at == t0 + timedelta(seconds=70)
    assert (job.epoch, job.step, job.fraction, job.epochs, job.steps_per_epoch) == (2, 5, 0.25, 8, 10)

    assert request_cancel(session, job.id) is S.cancelling
    session.commit()
    beat = heartbeat(session, job.id, "w1")
    assert beat.owned and beat.cancel_requested


def test_lost_worker_is_requeued_until_max_attempts_then_failed(session: Session, add_job: AddJob) -> None:
    job = add_job(max_attempts=3)
    now = utcnow()
    for attempt in (1, 2, 3):
        worker = f"w{attempt}"
        assert claim(session, job.id, worker, now=now, lease_seconds=60)
        session.commit()
        assert requeue_expired(session, now=now + timedelta(seconds=59)) == []
        session.commit()
        assert reload(session, job.id).status is S.running
        now += timedelta(seconds=61)
        requeued = requeue_expired(session, now=now)
        session.commit()
        job = reload(session, job.id)
        # The worker that lost its lease can no longer act on the job.
        assert not heartbeat(session, job.id, worker, now=now)
        with pytest.raises(LeaseLost):
            finish(session, job.id, worker, S.succeeded)
        session.rollback()
        if attempt < 3:
            assert requeued == [job.id]
            assert (job.status, job.attempt, job.lease_owner) == (S.queued, attempt + 1, None)
        else:
            assert requeued == []
            assert (job.status, job.attempt) == (S.failed, 3)
            assert job.failure_reason == "lost its worker 3 times"
            assert job.finished_at == now
    moves = [(f, t, r) for f, t, r in events(session, job.id) if t is not S.running]
    assert moves == [
        (S.running, S.queued, "lease expired"),
        (S.running, S.queued, "lease expired"),
        (S.running, S.failed, "lost its worker 3 times"),
    ]


def test_expired_cancelling_job_is_cancelled(session: Session, add_job: AddJob) -> None:
    now = utcnow()
    job = add_job(S.cancelling, lease_expires_at=now - timedelta(seconds=1))
    fresh = add_job(S.running, lease_expires_at=now + timedelta(seconds=5))
    assert requeue_expired(session, now=now) == []
    session.commit()
    assert reload(session, job.id).status is S.cancelled
    assert reload(session, fresh.id).status is S.running
    assert events(session, job.id) == [(S.cancelling, S.cancelled, "lease expired while cancelling")]


def test_finish_by_the_owner(session: Session, add_job: AddJob) -> None:
    job = add_job()
    assert claim(session, job.id, "w1")
    session.commit()
    with pytest.raises(InvalidTransition, match="not an end status"):
        finish(session, job.id, "w1", S.queued)
    with pytest.raises(LeaseLost):
        finish(session, job.id, "w2", S.succeeded)
    session.rollback()
    assert finish(session, job.id, "w1", S.succeeded, result={"top1": 71.5}) == []
    session.commit()
    job = reload(session, job.id)
    assert (job.status, job.result, job.lease_owner) == (S.succeeded, {"top1": 71.5}, None)
    with pytest.raises(LeaseLost):
        finish(session, job.id, "w1", S.failed)


def test_finish_cancelled_after_cancel_request(session: Session, add_job: AddJob) -> None:
    job = add_job()
    assert claim(session, job.id, "w1")
    # Without a cancel request a run cannot end as cancelled.
    with pytest.raises(InvalidTransition):
        finish(session, job.id, "w1", S.cancelled)
    session.rollback()
    assert claim(session, job.id, "w1")
    assert request_cancel(session, job.id) is S.cancelling
    assert finish(session, job.id, "w1", S.cancelled, "stopped at epoch 3") == []
    session.commit()
    assert reload(session, job.id).status is S.cancelled


def test_release_gives_the_job_back(session: Session, add_job: AddJob) -> None:
    job = add_job()
    assert claim(session, job.id, "w1")
    assert release(session, job.id, "w2") is None
    assert release(session, job.id, "w1") is S.queued
    session.commit()
    job = reload(session, job.id)
    assert (job.status, job.attempt, job.lease_owner) == (S.queued, 1, None)
    assert claim(session, job.id, "w2")
    assert request_cancel(session, job.id) is S.cancelling
    assert release(session, job.id, "w2") is S.cancelled


@pytest.mark.parametrize("status", [S.queued, S.waiting])
def test_cancel_before_running_is_immediate(session: Session, add_job: AddJob, status: JobStatus) -> None:
    job = add_job(status)
    assert request_cancel(session, job.id, "user asked") is S.cancelled
    session.commit()
    job = reload(session, job.id)
    assert job.status is S.cancelled and job.cancel_requested and job.finished_at is not None
    assert events(session, job.id) == [(status, S.cancelled, "user asked")]
    assert not claim(session, job.id, "w1")


def test_cancel_running_asks_the_worker(session: Session, add_job: AddJob) -> None:
    job = add_job()
    assert claim(session, job.id, "w1")
    assert request_cancel(session, job.id) is S.cancelling
    assert request_cancel(session, job.id) is S.cancelling
    session.commit()
    assert [t for _, t, _ in events(session, job.id)] == [S.running, S.cancelling]


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_cancel_ended_job_raises(session: Session, add_job: AddJob, status: JobStatus) -> None:
    job = add_job(status)
    with pytest.raises(JobAlreadyEnded, match=str(status)):
        request_cancel(session, job.id)
    with pytest.raises(JobNotFound):
        request_cancel(session, "f" * 32)


def test_student_waits_for_its_teacher_then_queues(session: Session) -> None:
    teacher = create_job(session, kind="train", spec={})
    session.commit()
    assert claim(session, teacher.id, "w1")
    session.commit()
    student = create_job(session, kind="distill", spec={}, teacher_job_id=teacher.id)
    session.commit()
    assert reload(session, student.id).status is S.waiting
    assert not claim(session, student.id, "w2")
    assert finish(session, teacher.id, "w1", S.succeeded) == [student.id]
    session.commit()
    student = reload(session, student.id)
    assert student.status is S.queued and student.queued_at is not None
    assert events(session, student.id) == [
        (None, S.waiting, "created"),
        (S.waiting, S.queued, f"teacher job {teacher.id} succeeded"),
    ]
    late = create_job(session, kind="distill", spec={}, teacher_job_id=teacher.id)
    assert late.status is S.queued


def test_failed_teacher_fails_the_whole_chain(session: Session) -> None:
    teacher = create_job(session, kind="train", spec={})
    student = create_job(session, kind="distill", spec={}, teacher_job_id=teacher.id)
    grandchild = create_job(session, kind="distill", spec={}, teacher_job_id=student.id)
    other = create_job(session, kind="train", spec={})
    session.commit()
    assert claim(session, teacher.id, "w1")
    assert finish(session, teacher.id, "w1", S.failed, "diverged") == []
    session.commit()
    for job, parent in ((student, teacher), (grandchild, student)):
        job = reload(session, job.id)
        assert job.status is S.failed
        assert job.failure_reason == f"teacher job {parent.id} failed"
    assert reload(session, other.id).status is S.queued
    with pytest.raises(TeacherNotUsable):
        create_job(session, kind="distill", spec={}, teacher_job_id=teacher.id)
    session.rollback()
    with pytest.raises(JobNotFound):
        create_job(session, kind="distill", spec={}, teacher_job_id="0" * 32)


def test_cancelled_or_lost_teacher_fails_waiting_students(session: Session) -> None:
    now = utcnow()
    cancelled = create_job(session, kind="train", spec={})
    lost = create_job(session, kind="train", spec={}, max_attempts=1)
    s1 = create_job(session, kind="distill", spec={}, teacher_job_id=cancelled.id)
    s2 = create_job(session, kind="distill", spec={}, teacher_job_id=lost.id)
    session.commit()
    assert request_cancel(session, cancelled.id) is S.cancelled
    assert claim(session, lost.id, "w1", now=now, lease_seconds=1)
    session.commit()
    assert requeue_expired(session, now=now + timedelta(seconds=2)) == []
    session.commit()
    assert reload(session, s1.id).failure_reason == f"teacher job {cancelled.id} cancelled"
    assert reload(session, s2.id).failure_reason == f"teacher job {lost.id} failed"
