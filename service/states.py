"""The job state machine: the one place that says which status moves are legal, and makes them.

Moves that can race (a worker claiming, heartbeating or finishing a job, the reaper taking back
expired leases, a user cancelling) are single conditional UPDATE statements: the WHERE clause is
the precondition, so two writers can never both succeed. Every move writes a `job_events` row.

Functions take the caller's session and never commit; the caller commits, then sends the ids they
return (jobs that entered `queued`) to the broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, cast, func, literal, select, update
from sqlalchemy.orm import Session

from service.config import get_settings
from service.models import CallbackDelivery, Job, JobEvent, JobStatus, UTCDateTime, new_id, utcnow

S = JobStatus
ALLOWED: Mapping[JobStatus, frozenset[JobStatus]] = {
    S.queued: frozenset({S.running, S.cancelled, S.failed}),
    S.waiting: frozenset({S.queued, S.cancelled, S.failed}),
    # running -> queued: the worker gave the job back, or its lease expired (the reaper).
    S.running: frozenset({S.succeeded, S.failed, S.cancelling, S.queued}),
    # A run may end on its own before it notices the cancel request.
    S.cancelling: frozenset({S.cancelled, S.succeeded, S.failed}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
# Statuses in which a worker holds the job's lease.
ACTIVE = frozenset({S.running, S.cancelling})


class StateError(Exception):
    """Base of the errors the state machine raises."""


class InvalidTransition(StateError):
    """A status move the state machine does not allow."""


class JobNotFound(StateError, LookupError):
    """No job with that id."""


class JobAlreadyEnded(StateError):
    """The job is in a terminal status, which is final."""


class LeaseLost(StateError):
    """The worker no longer holds the job's lease (it expired and the job was taken back)."""


class TeacherNotUsable(StateError):
    """The teacher job a new job would distil from failed or was cancelled."""


@dataclass(frozen=True)
class Heartbeat:
    """Answer to a heartbeat: whether the worker still owns the job, and whether to stop."""

    owned: bool
    cancel_requested: bool

    def __bool__(self) -> bool:
        """True while the worker still holds the lease."""
        return self.owned


@dataclass(frozen=True)
class Progress:
    """Training progress a heartbeat records on the job row."""

    epoch: int
    step: int
    fraction: float
    epochs: int | None = None
    steps_per_epoch: int | None = None


def can_transition(from_status: JobStatus, to_status: JobStatus) -> bool:
    """Whether the state machine allows moving from one status to another."""
    return to_status in ALLOWED[from_status]


def _check(job_id: str, from_status: JobStatus, to_status: JobStatus) -> None:
    if can_transition(from_status, to_status):
        return
    if from_status in TERMINAL:
        raise InvalidTransition(f"job {job_id} is {from_status} (final); it cannot become {to_status}")
    allowed = ", ".join(sorted(ALLOWED[from_status]))
    raise InvalidTransition(
        f"job {job_id}: {from_status} -> {to_status} is not allowed (from {from_status}: {allowed})"
    )


def _record(
    session: Session,
    job_ids: Iterable[str],
    from_status: JobStatus | None,
    to_status: JobStatus,
    reason: str | None,
    now: datetime,
) -> None:
    job_ids = list(job_ids)
    session.add_all(
        JobEvent(job_id=job_id, from_status=from_status, to_status=to_status, reason=reason, at=now)
        for job_id in job_ids
    )
    if to_status in TERMINAL and job_ids:
        # The callback is owed from the moment the job ends: it commits (or not) with the end itself.
        specs = session.execute(select(Job.id, Job.spec).where(Job.id.in_(job_ids))).all()
        session.add_all(
            CallbackDelivery(job_id=job_id, url=str(spec["callback_url"]), next_attempt_at=now, created_at=now)
            for job_id, spec in specs
            if spec.get("callback_url")
        )


def _lease_end(now: datetime, lease_seconds: float | None) -> datetime:
    seconds = lease_seconds if lease_seconds is not None else get_settings().lease_seconds
    return now + timedelta(seconds=seconds)


def _ended(now: datetime) -> dict[str, Any]:
    """Column values every move into a terminal status sets."""
    return {"finished_at": now, "lease_owner": None, "lease_expires_at": None}


def transition(
    session: Session, job: Job, to: JobStatus, reason: str | None = None, *, now: datetime | None = None
) -> list[str]:
    """Move a loaded job to `to`, record the event and set timestamps; returns ids that entered queued.

    For moves nobody races on (a waiting job released, a queued job failed by the API); a worker ends
    its run with `finish`, which first proves it still holds the lease. Entering `running` is refused
    here: only `claim` may do it, because it takes the lease.
    """
    now = now or utcnow()
    from_status, to = JobStatus(job.status), JobStatus(to)
    _check(job.id, from_status, to)
    if to is S.running:
        raise InvalidTransition(f"job {job.id}: a job starts running only through claim(), which leases it")
    job.status = to
    if to is S.queued:
        job.queued_at = now
        job.dispatched_at = None
        job.lease_owner = job.lease_expires_at = None
    elif to is S.cancelling:
        job.cancel_requested = True
    elif to in TERMINAL:
        job.finished_at = now
        job.lease_owner = job.lease_expires_at = None
        if to is S.cancelled:
            job.cancel_requested = True
        if to is S.failed:
            job.failure_reason = reason
    _record(session, [job.id], from_status, to, reason, now)
    queued = [job.id] if to is S.queued else []
    if to in TERMINAL:
        session.flush()
        queued += _settle_dependents(session, [job.id], to, now)
    return queued


def _settle_dependents(
    session: Session, teacher_ids: list[str], teacher_status: JobStatus, now: datetime
) -> list[str]:
    """Jobs waiting on ended teachers: queue them (teacher succeeded) or fail them; returns queued ids."""
    queued: list[str] = []
    for teacher_id in teacher_ids:
        waiting = (Job.teacher_job_id == teacher_id) & (Job.status == S.waiting)
        reason = f"teacher job {teacher_id} {teacher_status}"
        if teacher_status is S.succeeded:
            ids = list(
                session.scalars(
                    update(Job)
                    .where(waiting)
                    .values(status=S.queued, queued_at=now, dispatched_at=None)
                    .returning(Job.id)
                )
            )
            _record(session, ids, S.waiting, S.queued, reason, now)
            queued += ids
        else:
            ids = list(
                session.scalars(
                    update(Job)
                    .where(waiting)
                    .values(status=S.failed, failure_reason=reason, **_ended(now))
                    .returning(Job.id)
                )
            )
            _record(session, ids, S.waiting, S.failed, reason, now)
            # A chain of distillations fails all the way down.
            _settle_dependents(session, ids, S.failed, now)
    return queued


def create_job(
    session: Session,
    *,
    kind: str,
    spec: dict[str, Any],
    owner: str | None = None,
    teacher_job_id: str | None = None,
    teacher_upload_id: str | None = None,
    max_attempts: int | None = None,
    queue: str = "cpu",
    now: datetime | None = None,
) -> Job:
    """Add a new job: queued, or waiting when its teacher job has not succeeded yet.

    Raises JobNotFound for an unknown teacher job and TeacherNotUsable for one that failed or was
    cancelled. The caller commits, then sends the job id to the broker if the job is queued.
    """
    now = now or utcnow()
    job = Job(
        id=new_id(),
        kind=kind,
        spec=spec,
        owner=owner,
        status=S.queued,
        attempt=1,
        max_attempts=max_attempts or get_settings().max_attempts,
        teacher_job_id=teacher_job_id,
        teacher_upload_id=teacher_upload_id,
        queue=queue,
        created_at=now,
        queued_at=now,
    )
    if teacher_job_id is not None:
        if session.scalar(select(Job.id).where(Job.id == teacher_job_id)) is None:
            raise JobNotFound(f"teacher job {teacher_job_id} does not exist")
        job.status, job.queued_at = S.waiting, None
        # Write first, then read the teacher under a lock: the teacher's worker cannot end it in
        # between, so either we see it ended or its ending sees (and settles) this job.
        session.add(job)
        session.flush()
        teacher_status = session.scalar(select(Job.status).where(Job.id == teacher_job_id).with_for_update())
        if teacher_status in (S.failed, S.cancelled):
            raise TeacherNotUsable(f"teacher job {teacher_job_id} is {teacher_status}")
        if teacher_status is S.succeeded:
            job.status, job.queued_at = S.queued, now
    session.add(job)
    _record(session, [job.id], None, job.status, "created", now)
    return job


def claim(
    session: Session, job_id: str, worker_id: str, *, now: datetime | None = None,
    lease_seconds: float | None = None,
) -> bool:
    """Take a queued job for `worker_id` (queued -> running with a lease); False if anyone else has it."""
    now = now or utcnow()
    _check(job_id, S.queued, S.running)
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == S.queued,
            Job.lease_owner.is_(None) | (Job.lease_expires_at < now),
        )
        .values(
            status=S.running,
            lease_owner=worker_id,
            lease_expires_at=_lease_end(now, lease_seconds),
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
        )
        .returning(Job.id)
    ).first()
    if claimed is None:
        return False
    _record(session, [job_id], S.queued, S.running, f"claimed by {worker_id}", now)
    return True


def heartbeat(
    session: Session, job_id: str, worker_id: str, *, progress: Progress | None = None,
    now: datetime | None = None, lease_seconds: float | None = None,
) -> Heartbeat:
    """Extend the lease if `worker_id` still owns the job (and record progress); says if cancel was asked."""
    now = now or utcnow()
    values: dict[str, Any] = {"lease_expires_at": _lease_end(now, lease_seconds), "heartbeat_at": now}
    if progress is not None:
        values.update(
            epoch=progress.epoch, step=progress.step, fraction=progress.fraction,
            epochs=progress.epochs, steps_per_epoch=progress.steps_per_epoch,
        )
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(ACTIVE))
        .values(**values)
        .returning(Job.cancel_requested)
    ).first()
    if row is None:
        return Heartbeat(owned=False, cancel_requested=False)
    return Heartbeat(owned=True, cancel_requested=bool(row[0]))


def _drop_lease(session: Session, job_id: str, worker_id: str) -> Job | None:
    """Clear the lease if `worker_id` holds it; returns the job (reloaded) or None if it does not."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(ACTIVE))
        .values(lease_owner=None, lease_expires_at=None)
        .returning(Job.id)
    ).first()
    if row is None:
        return None
    return session.get(Job, job_id, populate_existing=True)


def finish(
    session: Session, job_id: str, worker_id: str, to: JobStatus, reason: str | None = None, *,
    result: dict[str, Any] | None = None, now: datetime | None = None,
) -> list[str]:
    """End the worker's run: succeeded, failed or cancelled; returns dependant job ids now queued.

    Raises LeaseLost if the worker no longer holds the lease (the job was taken back meanwhile).
    """
    if to not in TERMINAL:
        raise InvalidTransition(f"job {job_id}: finish() ends a run, and {to} is not an end status")
    job = _drop_lease(session, job_id, worker_id)
    if job is None:
        raise LeaseLost(f"worker {worker_id} no longer holds job {job_id}")
    if result is not None:
        job.result = result
    return transition(session, job, to, reason, now=now)


def release(
    session: Session, job_id: str, worker_id: str, reason: str = "released by its worker", *,
    now: datetime | None = None,
) -> JobStatus | None:
    """Give a job back un-run: running -> queued (same attempt), cancelling -> cancelled.

    Returns the job's new status (send it to the broker again if queued), or None if `worker_id`
    does not hold the lease.
    """
    job = _drop_lease(session, job_id, worker_id)
    if job is None:
        return None
    to = S.queued if job.status == S.running else S.cancelled
    transition(session, job, to, reason, now=now)
    return to


def requeue_expired(session: Session, *, now: datetime | None = None) -> list[str]:
    """Take back jobs whose worker stopped heartbeating; returns the ids queued again (to re-send).

    A running job goes back to queued with attempt + 1, or fails once it has lost its worker
    `max_attempts` times; a cancelling one is simply cancelled.
    """
    now = now or utcnow()
    expired = Job.lease_expires_at < now
    running = (Job.status == S.running) & expired
    _check("*", S.running, S.queued)
    requeued = list(
        session.scalars(
            update(Job)
            .where(running, Job.attempt < Job.max_attempts)
            .values(status=S.queued, attempt=Job.attempt + 1, lease_owner=None, lease_expires_at=None,
                    queued_at=now, dispatched_at=None)
            .returning(Job.id)
        )
    )
    _record(session, requeued, S.running, S.queued, "lease expired", now)

    _check("*", S.running, S.failed)
    lost = literal("lost its worker ") + cast(Job.attempt, String) + literal(" times")
    failed = session.execute(
        update(Job)
        .where(running, Job.attempt >= Job.max_attempts)
        .values(status=S.failed, failure_reason=lost, **_ended(now))
        .returning(Job.id, Job.attempt)
    ).all()
    for job_id, attempt in failed:
        _record(session, [job_id], S.running, S.failed, f"lost its worker {attempt} times", now)

    _check("*", S.cancelling, S.cancelled)
    cancelled = list(
        session.scalars(
            update(Job)
            .where(Job.status == S.cancelling, expired)
            .values(status=S.cancelled, **_ended(now))
            .returning(Job.id)
        )
    )
    _record(session, cancelled, S.cancelling, S.cancelled, "lease expired while cancelling", now)

    session.flush()
    _settle_dependents(session, [job_id for job_id, _ in failed], S.failed, now)
    _settle_dependents(session, cancelled, S.cancelled, now)
    return requeued


def request_cancel(
    session: Session, job_id: str, reason: str = "cancel requested", *, now: datetime | None = None
) -> JobStatus:
    """Ask a job to stop: queued/waiting -> cancelled now, running -> cancelling; returns the new status.

    Asking again while cancelling is a no-op; raises JobAlreadyEnded for an ended job, JobNotFound
    for an unknown id.
    """
    now = now or utcnow()
    for from_status in (S.queued, S.waiting):
        _check(job_id, from_status, S.cancelled)
        hit = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == from_status)
            .values(status=S.cancelled, cancel_requested=True, **_ended(now))
            .returning(Job.id)
        ).first()
        if hit is not None:
            _record(session, [job_id], from_status, S.cancelled, reason, now)
            session.flush()
            _settle_dependents(session, [job_id], S.cancelled, now)
            return S.cancelled
    _check(job_id, S.running, S.cancelling)
    hit = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == S.running)
        .values(status=S.cancelling, cancel_requested=True)
        .returning(Job.id)
    ).first()
    if hit is not None:
        _record(session, [job_id], S.running, S.cancelling, reason, now)
        return S.cancelling
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(f"job {job_id} does not exist")
    if status == S.cancelling:
        return S.cancelling
    raise JobAlreadyEnded(f"job {job_id} already {status}")
