"""The records on both backends: job defaults, timestamps, JSON, constraints and the two upserts."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from service.db import session_scope
from service.models import (
    Artifact,
    Job,
    JobEvent,
    JobStatus,
    Metric,
    TeacherUpload,
    new_id,
    record_artifact,
    record_metrics,
    utcnow,
)
from service.states import create_job

AddJob = Callable[..., Job]


def test_new_ids_are_hex_and_sort_by_creation() -> None:
    first = new_id()
    later = [new_id() for _ in range(50)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in [first, *later])
    assert len(set(later)) == 50
    assert all(first[:12] <= i[:12] for i in later)


def test_created_job_defaults(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITRD_MAX_ATTEMPTS", "5")
    from service.config import get_settings

    get_settings.cache_clear()
    job = create_job(session, kind="train", spec={"model": "resnet8"}, owner="alice")
    session.commit()
    session.expire_all()
    job = session.get_one(Job, job.id)
    assert (job.status, job.attempt, job.max_attempts, job.owner) == (JobStatus.queued, 1, 5, "alice")
    assert (job.epoch, job.step, job.fraction, job.cancel_requested) == (0, 0, 0.0, False)
    assert job.lease_owner is None and job.started_at is None and job.finished_at is None
    assert job.queued_at == job.created_at
    event = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).one()
    assert (event.from_status, event.to_status, event.reason) == (None, JobStatus.queued, "created")


def test_timestamps_round_trip_as_aware_utc(session: Session, add_job: AddJob) -> None:
    local = datetime(2025, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    job = add_job(created_at=local)
    session.expire_all()
    stored = session.get_one(Job, job.id).created_at
    assert stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
    assert stored == local and stored.hour == 12
    with pytest.raises(StatementError, match="naive datetime"):
        add_job(created_at=datetime(2025, 3, 1, 12, 0))


def test_spec_and_result_json_round_trip(session: Session, add_job: AddJob) -> None:
    spec = {"model": "wrn_16_2", "method": {"name": "itrd", "params": {"alpha": 1.01}}, "epochs": [1, 2.5]}
    job = add_job(spec=spec, result={"top1": 73.2, "per_class": None, "name": "ünïcode"})
    session.expire_all()
    job = session.get_one(Job, job.id)
    assert job.spec == spec
    assert job.result == {"top1": 73.2, "per_class": None, "name": "ünïcode"}


def test_metrics_upsert_replaces_a_redone_epoch(session: Session, add_job: AddJob) -> None:
    job = add_job(JobStatus.running)
    record_metrics(session, job.id, 1, {"loss": 2.0, "top1": 30.0})
    record_metrics(session, job.id, 2, {"loss": 1.5, "top1": 40.0})
    session.commit()
    # The worker died after epoch 2 was recorded; the resumed run redoes epoch 2.
    record_metrics(session, job.id, 2, {"loss": 1.4, "top1": 41.0})
    session.commit()
    session.expire_all()
    rows = session.scalars(select(Metric).where(Metric.job_id == job.id).order_by(Metric.epoch)).all()
    assert [(m.epoch, m.values) for m in rows] == [
        (1, {"loss": 2.0, "top1": 30.0}),
        (2, {"loss": 1.4, "top1": 41.0}),
    ]
    assert session.get_one(Job, job.id).latest_metrics == {"loss": 1.4, "top1": 41.0}
    session.add(Metric(job_id=job.id, epoch=1, values={}))
    with pytest.raises(IntegrityError):
        session.commit()


def test_artifact_upsert_keeps_one_row_per_name(session: Session, add_job: AddJob) -> None:
    job = add_job()
    record_artifact(session, job.id, "last.ckpt", 10, "a" * 64)
    record_artifact(session, job.id, "best.ckpt", 20, "b" * 64)
    record_artifact(session, job.id, "last.ckpt", 30, "c" * 64)
    session.commit()
    rows = session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)).all()
    assert [(a.name, a.size, a.sha256) for a in rows] == [
        ("best.ckpt", 20, "b" * 64),
        ("last.ckpt", 30, "c" * 64),
    ]
    assert all(a.created_at.tzinfo is not None for a in rows)


def test_database_refuses_unknown_status(engine: Engine, add_job: AddJob) -> None:
    job = add_job()
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text("UPDATE jobs SET status = 'paused' WHERE id = :id"), {"id": job.id})


def test_foreign_keys_are_enforced(session: Session, add_job: AddJob) -> None:
    with pytest.raises(IntegrityError):
        add_job(teacher_upload_id="0" * 32)
    session.rollback()
    upload = TeacherUpload(architecture="resnet32x4", num_classes=100, size=1, sha256="0" * 64,
                           storage_key="uploads/x/teacher.safetensors", owner="bob")
    session.add(upload)
    session.commit()
    job = add_job(teacher_upload_id=upload.id)
    assert job.teacher_upload_id == upload.id and upload.created_at.tzinfo is UTC


def test_deleting_a_job_deletes_its_records(session: Session, add_job: AddJob) -> None:
    job = create_job(session, kind="train", spec={})
    session.commit()
    record_metrics(session, job.id, 1, {"loss": 1.0})
    record_artifact(session, job.id, "last.ckpt", 1, "0" * 64)
    session.commit()
    session.delete(job)
    session.commit()
    for model in (JobEvent, Metric, Artifact):
        assert session.scalar(select(func.count()).select_from(model)) == 0


def test_session_scope_commits_or_rolls_back(engine: Engine) -> None:
    with session_scope(engine) as session:
        kept = create_job(session, kind="train", spec={}).id
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        create_job(session, kind="train", spec={})
        raise RuntimeError("boom")
    with session_scope(engine) as session:
        assert session.scalars(select(Job.id)).all() == [kept]
        job = session.get_one(Job, kept)
    # expire_on_commit=False: the row stays readable after the session ends.
    assert job.kind == "train" and job.created_at <= utcnow()
