"""The service's tables as SQLAlchemy 2 typed models, and the two record upserts the worker uses."""

from __future__ import annotations

import enum
import os
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of datetime the records hold)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A 32-hex-digit id that sorts by creation time: 48 bits of milliseconds, then 80 random bits."""
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware, SQLite included."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes (their zone is a guess) and store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use service.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """SQLite drops the zone on the way in; put UTC back on the way out."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on Postgres (indexable, compact); plain JSON text elsewhere.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql").with_variant(sqlite.JSON(), "sqlite")


class JobStatus(enum.StrEnum):
    """Where a job is in its life; the legal moves between them live in service.states."""

    queued = "queued"
    waiting = "waiting"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


def status_type(name: str) -> Enum:
    """A VARCHAR status column with a CHECK on the known statuses (`name` names the constraint)."""
    return Enum(
        JobStatus,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )

# Named constraints, so a later migration can address them by name on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table; `Base.metadata` is what Alembic compares against."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class TeacherUpload(Base):
    """A teacher checkpoint a user uploaded, to distil from without training it here."""

    __tablename__ = "teacher_uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    architecture: Mapped[str] = mapped_column(String(64))
    num_classes: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One training or distillation job: its spec, where it is in the state machine, and its progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("attempt >= 1", name="attempt_positive"),
        CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
        # The reaper scans running jobs by lease expiry.
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[JobStatus] = mapped_column(status_type("status"), default=JobStatus.queued)
    spec: Mapped[dict[str, Any]]
    owner: Mapped[str | None] = mapped_column(String(128), index=True)

    attempt: Mapped[int] = mapped_column(default=1)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The broker queue (by device kind) and when the broker last accepted this job's message; a queued
    # job with no dispatched_at is re-sent by the reaper (the broker was down, or a process died).
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    dispatched_at: Mapped[datetime | None]
    # X-Request-ID of the submit that made the job: the worker logs under it too.
    request_id: Mapped[str | None] = mapped_column(String(64))

    epoch: Mapped[int] = mapped_column(default=0)
    epochs: Mapped[int | None]
    step: Mapped[int] = mapped_column(default=0)
    steps_per_epoch: Mapped[int | None]
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    latest_metrics: Mapped[dict[str, Any] | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]

    teacher_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    teacher_upload_id: Mapped[str | None] = mapped_column(ForeignKey("teacher_uploads.id"), index=True)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    # The job-end callback's delivery (see service.notify); read only when a job is shown.
    callback_delivery: Mapped[CallbackDelivery | None] = relationship(viewonly=True, lazy="select")


class JobEvent(Base):
    """One move of a job between statuses (from_status is None for the job's creation)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[JobStatus | None] = mapped_column(status_type("from_status"))
    to_status: Mapped[JobStatus] = mapped_column(status_type("to_status"))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Metric(Base):
    """The metrics of one finished epoch; a redone epoch after a resume replaces its row."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    values: Mapped[dict[str, Any]]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A file a job produced (checkpoint, metrics export) held in the artifact store."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key of an owner: only the sha256 of the secret is kept, found again by its public prefix."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class IdempotencyRecord(Base):
    """What an `Idempotency-Key` of an owner was first used for: the request's hash and the resource made.

    The unique constraint is what makes concurrent retries of one request create one resource.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner", "scope", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _upsert(session: Session, model: type[Base], keys: tuple[str, ...], row: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE on Postgres and SQLite alike."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg_insert = postgresql.insert(model).values(**row)
        updates = {k: pg_insert.excluded[k] for k in row if k not in keys}
        session.execute(pg_insert.on_conflict_do_update(index_elements=list(keys), set_=updates))
    elif dialect == "sqlite":
        lite_insert = sqlite.insert(model).values(**row)
        updates = {k: lite_insert.excluded[k] for k in row if k not in keys}
        session.execute(lite_insert.on_conflict_do_update(index_elements=list(keys), set_=updates))
    else:
        raise ValueError(f"records need PostgreSQL or SQLite, not {dialect!r}")


def record_metrics(
    session: Session, job_id: str, epoch: int, values: dict[str, Any], *, now: datetime | None = None
) -> None:
    """Store an epoch's metrics (replacing a redone epoch's) and make them the job's latest."""
    now = now or utcnow()
    row = {"job_id": job_id, "epoch": epoch, "values": values, "recorded_at": now}
    _upsert(session, Metric, ("job_id", "epoch"), row)
    job = session.get(Job, job_id)
    if job is not None:
        job.latest_metrics = dict(values)


def record_artifact(
    session: Session, job_id: str, name: str, size: int, sha256: str, *, now: datetime | None = None
) -> None:
    """Record a stored artifact, replacing the row of an earlier file of the same name."""
    _upsert(
        session,
        Artifact,
        ("job_id", "name"),
        {"job_id": job_id, "name": name, "size": size, "sha256": sha256, "created_at": now or utcnow()},
    )


class CallbackDelivery(Base):
    """The outbox row of one job-end callback, written in the same transaction that ends the job.

    Whoever ends a job (a worker, the API, the reaper) can die right after; the row cannot be lost
    with it. Any process running the reaper delivers due rows, taking a short lease on each first.
    """

    __tablename__ = "callback_deliveries"
    __table_args__ = (Index(None, "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
