"""What the API does with jobs: submit (checking what a spec may reach), look up, list, cancel.

`owner` is threaded through every lookup so that a caller sees only its own jobs (the API always
passes the owner of the caller's key); None, for internal callers, means no filter.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, func, select, true
from sqlalchemy.orm import Session

from itrd.spec import JobSpec
from service.config import Settings
from service.db import get_engine
from service.dispatch import dispatch
from service.idempotency import IdempotencyClaim
from service.logs import request_id as current_request_id
from service.models import Artifact, Job, JobStatus, Metric, TeacherUpload
from service.states import JobNotFound, TeacherNotUsable, create_job, request_cancel
from service.storage import ArtifactNotFound

# Where a job's teacher weights live in the artifact store.
UPLOAD_WEIGHTS = "weights.safetensors"
TRAINED_WEIGHTS = "student.safetensors"  # what the engine exports from every run, teacher training included
# Class counts of the datasets that fix theirs; an ImageFolder has one class per train/ directory.
FIXED_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


class Rejected(ValueError):
    """A request the service refuses (HTTP 422), with the location of the field at fault."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = tuple(loc)


class TeacherNotFound(LookupError):
    """No uploaded teacher with that id."""


def upload_store_id(upload_id: str) -> str:
    """The artifact-store job id that holds an uploaded teacher's weights."""
    return f"upload-{upload_id}"


def teacher_weights_location(job: Job) -> tuple[str, str] | None:
    """(store job id, artifact name) of the weights a distill job's teacher loads; None without a teacher."""
    if job.teacher_upload_id is not None:
        return upload_store_id(job.teacher_upload_id), UPLOAD_WEIGHTS
    if job.teacher_job_id is not None:
        return job.teacher_job_id, TRAINED_WEIGHTS
    return None


def dataset_num_classes(name: str, root: str | None) -> int | None:
    """How many classes a dataset has, or None when that cannot be known without loading it."""
    if name in FIXED_CLASSES:
        return FIXED_CLASSES[name]
    train_dir = Path(root) / "train" if root else None
    if name == "imagefolder" and train_dir is not None and train_dir.is_dir():
        return sum(1 for d in train_dir.iterdir() if d.is_dir())
    return None


def resolve_dataset_root(root: str | None, data_dirs: Sequence[Path]) -> str:
    """The dataset root made absolute, refused unless it resolves (symlinks followed) inside a data dir.

    A relative root is taken relative to the first data dir, and no root means that dir itself.
    """
    allowed = [Path(d).resolve() for d in data_dirs]
    where = ", ".join(map(str, allowed))
    candidate = allowed[0] / root if root else allowed[0]
    try:
        resolved = candidate.resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise Rejected(("body", "dataset", "root"), f"dataset root {root!r} cannot be resolved: {exc}") from exc
    if not any(resolved.is_relative_to(d) for d in allowed):
        raise Rejected(("body", "dataset", "root"),
                       f"dataset root {root!r} resolves to {resolved}, outside the data directories the "
                       f"service may read: {where} (give a path inside one, or relative to the first)")
    return str(resolved)


def visible_to(model: type[Job] | type[TeacherUpload], owner: str | None) -> ColumnElement[bool]:
    """The filter of the records `owner` may see: all of them for internal callers (None)."""
    return true() if owner is None else model.owner == owner


def _check_classes(spec: JobSpec, num_classes: int | None, what: str) -> None:
    expected = dataset_num_classes(spec.dataset.name, spec.dataset.root)
    if num_classes is not None and expected is not None and num_classes != expected:
        raise Rejected(("body", "dataset", "name"),
                       f"{what} classifies {num_classes} classes, but dataset {spec.dataset.name!r} has {expected}")


def _check_teacher_job(session: Session, spec: JobSpec, owner: str | None) -> str:
    assert spec.teacher is not None and spec.teacher.job is not None
    job_id, loc = spec.teacher.job, ("body", "teacher", "job")
    teacher = session.scalar(select(Job).where(Job.id == job_id, visible_to(Job, owner)))
    if teacher is None:
        raise Rejected(loc, f"teacher job {job_id} does not exist")
    if teacher.kind != "train":
        raise Rejected(loc, f"job {job_id} is a {teacher.kind!r} job; a teacher comes from a 'train' job")
    if teacher.spec.get("model") != spec.teacher.architecture:
        raise Rejected(("body", "teacher", "architecture"),
                       f"teacher job {job_id} trains {teacher.spec.get('model')!r}, "
                       f"not {spec.teacher.architecture!r}")
    if teacher.status in (JobStatus.failed, JobStatus.cancelled):
        raise Rejected(loc, f"teacher job {job_id} is {teacher.status}: it will never produce weights")
    data = teacher.spec.get("dataset") or {}
    _check_classes(spec, dataset_num_classes(str(data.get("name")), data.get("root")), f"teacher job {job_id}")
    return job_id


def _check_teacher_upload(session: Session, spec: JobSpec, owner: str | None) -> str:
    assert spec.teacher is not None and spec.teacher.upload is not None
    upload_id = spec.teacher.upload
    query = select(TeacherUpload).where(TeacherUpload.id == upload_id, visible_to(TeacherUpload, owner))
    upload = session.scalar(query)
    if upload is None:
        raise Rejected(("body", "teacher", "upload"), f"uploaded teacher {upload_id} does not exist")
    if upload.architecture != spec.teacher.architecture:
        raise Rejected(("body", "teacher", "architecture"),
                       f"uploaded teacher {upload_id} is a {upload.architecture!r}, "
                       f"not a {spec.teacher.architecture!r}")
    _check_classes(spec, upload.num_classes, f"uploaded teacher {upload_id}")
    return upload_id


def submit(session: Session, spec: JobSpec, settings: Settings, owner: str | None = None,
           idempotency: IdempotencyClaim | None = None) -> Job:
    """Check and store a new job, commit it, then hand it to the broker (a broker that is down is fine).

    With `idempotency`, its record commits with the job, or IdempotencyRace says another request won.
    """
    spec = spec.model_copy(deep=True)
    spec.dataset.root = resolve_dataset_root(spec.dataset.root, settings.data_dirs)
    teacher_job_id = teacher_upload_id = None
    if spec.teacher is not None:
        if spec.teacher.path is not None:
            raise Rejected(("body", "teacher", "path"),
                           "teacher 'path' is for the CLI only; the service takes a teacher 'job' id "
                           "(a teacher trained here) or an 'upload' id (POST /v1/teachers): use job or upload")
        if spec.teacher.job is not None:
            teacher_job_id = _check_teacher_job(session, spec, owner)
        else:
            teacher_upload_id = _check_teacher_upload(session, spec, owner)
    try:
        job = create_job(session, kind=spec.kind, spec=spec.model_dump(mode="json"), owner=owner,
                         teacher_job_id=teacher_job_id, teacher_upload_id=teacher_upload_id,
                         max_attempts=settings.max_attempts, queue=settings.queue_for_device(spec.device))
    except TeacherNotUsable as exc:  # the teacher ended badly between our check and the insert
        raise Rejected(("body", "teacher", "job"), str(exc)) from exc
    job.request_id = current_request_id.get()  # the worker logs under the id of the request that made it
    if idempotency is not None:
        idempotency.record(session, job.id)
    session.commit()
    if job.status is JobStatus.queued:
        dispatch([job.id], get_engine(settings.database_url), settings)
        session.refresh(job)
    return job


def get_job(session: Session, job_id: str, owner: str | None = None) -> Job:
    """The job with this id (visible to `owner`); raises JobNotFound."""
    job = session.scalar(select(Job).where(Job.id == job_id, visible_to(Job, owner)))
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return job


def queue_position(session: Session, job: Job) -> int | None:
    """1 + the queued jobs of the same queue created before this one; None unless it is queued."""
    if job.status is not JobStatus.queued:
        return None
    earlier = (Job.created_at < job.created_at) | ((Job.created_at == job.created_at) & (Job.id < job.id))
    ahead = session.scalar(select(func.count()).select_from(Job)
                           .where(Job.status == JobStatus.queued, Job.queue == job.queue, earlier))
    return int(ahead or 0) + 1


def encode_cursor(job: Job) -> str:
    """An opaque cursor pointing just past `job` in newest-first order."""
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise Rejected(("query", "cursor"), "invalid cursor: pass back a next_cursor the API returned") from exc


def list_jobs(
    session: Session, *, owner: str | None = None, statuses: Sequence[JobStatus] = (), kind: str | None = None,
    limit: int = 20, offset: int = 0, cursor: str | None = None,
) -> tuple[list[Job], int, str | None]:
    """A page of jobs, newest first: (jobs, total matching, cursor of the next page or None)."""
    if cursor is not None and offset:
        raise Rejected(("query", "offset"), "page with either offset or cursor, not both")
    query = select(Job).where(visible_to(Job, owner))
    if statuses:
        query = query.where(Job.status.in_(list(statuses)))
    if kind is not None:
        query = query.where(Job.kind == kind)
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    if cursor is not None:
        created, job_id = _decode_cursor(cursor)
        query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).offset(offset).limit(limit + 1)))
    jobs = rows[:limit]
    return jobs, total, encode_cursor(jobs[-1]) if len(rows) > limit else None


def cancel(session: Session, job_id: str, owner: str | None = None) -> Job:
    """Ask a job to stop (queued/waiting: cancelled now; running: cancelling) and commit; returns it."""
    job = get_job(session, job_id, owner)
    request_cancel(session, job_id, reason="cancelled through the API")
    session.commit()
    session.refresh(job)
    return job


def metric_series(session: Session, job_id: str, owner: str | None = None) -> list[dict[str, Any]]:
    """The job's per-epoch metrics, ordered by epoch, each as {epoch, ...values}."""
    get_job(session, job_id, owner)
    rows = session.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.epoch))
    return [{"epoch": m.epoch, **{k: v for k, v in m.values.items() if k != "epoch"}} for m in rows]


def list_artifacts(session: Session, job_id: str, owner: str | None = None) -> list[Artifact]:
    """The recorded artifacts of a job, by name."""
    get_job(session, job_id, owner)
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, job_id: str, name: str, owner: str | None = None) -> Artifact:
    """The recorded artifact `name` of a job; raises JobNotFound or ArtifactNotFound."""
    get_job(session, job_id, owner)
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
    return row
