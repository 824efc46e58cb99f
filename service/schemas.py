"""What the API answers with: the public shapes of jobs, artifacts, teachers and the catalogue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.models import Artifact, Job, JobStatus, TeacherUpload


class Progress(BaseModel):
    """How far a job's training has come (epochs count from 1; `fraction` is of the whole run)."""

    epoch: int
    epochs: int | None
    step: int
    steps_per_epoch: int | None
    fraction: float


class CallbackPublic(BaseModel):
    """Where the delivery of a job's end callback stands."""

    state: str = Field(description="pending (being sent or waiting to retry), delivered, or failed (gave up)")
    attempts: int
    last_error: str | None = Field(description="what the last failed attempt got; null once delivered")
    next_attempt_at: datetime | None = Field(description="when a pending delivery is tried next")
    delivered_at: datetime | None


class JobPublic(BaseModel):
    """A job as the API shows it."""

    id: str
    kind: str
    status: JobStatus
    spec: dict[str, Any] = Field(description="the resolved spec: every default written in")
    queue: str
    queue_position: int | None = Field(description="1 = next to run in its queue; null unless queued")
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    latest_metrics: dict[str, Any] | None
    failure_reason: str | None
    result: dict[str, Any] | None = Field(
        None, description="a finished run's summary: final_top1, best_top1, teacher_top1, epochs, wall_seconds, ...")
    teacher_job_id: str | None
    teacher_upload_id: str | None
    created_at: datetime
    queued_at: datetime | None
    dispatched_at: datetime | None = Field(description="when the broker took the job; null: not sent yet")
    started_at: datetime | None
    finished_at: datetime | None
    callback: CallbackPublic | None = Field(
        None, description="the delivery of the job-end callback; null until the job ends, or without callback_url")

    @classmethod
    def from_job(cls, job: Job, queue_position: int | None = None) -> JobPublic:
        """The public view of a job row."""
        progress = Progress(epoch=job.epoch, epochs=job.epochs, step=job.step,
                            steps_per_epoch=job.steps_per_epoch, fraction=job.fraction)
        return cls(
            id=job.id, kind=job.kind, status=job.status, spec=job.spec, queue=job.queue,
            queue_position=queue_position, attempt=job.attempt, max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested, progress=progress, latest_metrics=job.latest_metrics,
            failure_reason=job.failure_reason, result=job.result, teacher_job_id=job.teacher_job_id,
            teacher_upload_id=job.teacher_upload_id, created_at=job.created_at, queued_at=job.queued_at,
            dispatched_at=job.dispatched_at, started_at=job.started_at, finished_at=job.finished_at,
            callback=_callback(job),
        )


def _callback(job: Job) -> CallbackPublic | None:
    row = job.callback_delivery
    if row is None:
        return None
    return CallbackPublic(state=row.state, attempts=row.attempts, last_error=row.last_error,
                          next_attempt_at=row.next_attempt_at if row.state == "pending" else None,
                          delivered_at=row.delivered_at)


class JobsPublic(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobPublic]
    total: int = Field(description="jobs matching the filters, over all pages")
    limit: int
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class ArtifactPublic(BaseModel):
    """A file a job produced, and where to download it."""

    name: str
    size: int
    sha256: str
    created_at: datetime
    url: str

    @classmethod
    def from_row(cls, row: Artifact, url: str) -> ArtifactPublic:
        """The public view of an artifact row."""
        return cls(name=row.name, size=row.size, sha256=row.sha256, created_at=row.created_at, url=url)


class ArtifactsPublic(BaseModel):
    """A job's artifacts, by name."""

    items: list[ArtifactPublic]


class TeacherPublic(BaseModel):
    """An uploaded teacher; distil from it with `teacher: {architecture, upload: id}`."""

    id: str
    architecture: str
    num_classes: int
    size: int
    sha256: str = Field(description="of the stored safetensors file")
    created_at: datetime

    @classmethod
    def from_row(cls, row: TeacherUpload) -> TeacherPublic:
        """The public view of a teacher_uploads row."""
        return cls(id=row.id, architecture=row.architecture, num_classes=row.num_classes, size=row.size,
                   sha256=row.sha256, created_at=row.created_at)


class TeachersPublic(BaseModel):
    """One page of uploaded teachers, newest first."""

    items: list[TeacherPublic]
    total: int


class ModelInfo(BaseModel):
    """An architecture the service can train, and its family (which picks ITRD's alpha)."""

    name: str
    family: str


class MethodInfo(BaseModel):
    """A distillation method and its hyper-parameters' defaults."""

    name: str
    needs_teacher: bool
    defaults: dict[str, float]


class PresetInfo(BaseModel):
    """A built-in teacher/student pair, with the specs that train the teacher and distil the student."""

    name: str
    teacher: str
    student: str
    dataset: str
    spec: dict[str, Any] = Field(description="the distillation spec (the CLI's; the API wants teacher job/upload)")
    teacher_spec: dict[str, Any] = Field(description="the spec that trains the teacher")


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """The answer of /readyz when every check passed."""

    status: str
    checks: dict[str, Check]
