"""Initial schema: jobs, their events, metrics and artifacts, and teacher uploads.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a new status is a new migration, not an edit of this one.
STATUSES = ("queued", "waiting", "running", "succeeded", "failed", "cancelling", "cancelled")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _timestamp(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _status(column: str, table: str, nullable: bool = False) -> tuple[sa.Column, sa.CheckConstraint]:
    allowed = ", ".join(f"'{s}'" for s in STATUSES)
    return (
        sa.Column(column, sa.String(16), nullable=nullable),
        sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{column}")),
    )


def upgrade() -> None:
    """Create the tables."""
    op.create_table(
        "teacher_uploads",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("architecture", sa.String(64), nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teacher_uploads")),
    )
    op.create_index(op.f("ix_teacher_uploads_owner"), "teacher_uploads", ["owner"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        *_status("status", "jobs"),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        _timestamp("lease_expires_at"),
        _timestamp("heartbeat_at"),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("queue", sa.String(32), nullable=False),
        _timestamp("dispatched_at"),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("steps_per_epoch", sa.Integer(), nullable=True),
        sa.Column("fraction", sa.Float(), nullable=False),
        sa.Column("latest_metrics", JSON, nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("teacher_job_id", sa.String(32), nullable=True),
        sa.Column("teacher_upload_id", sa.String(32), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("queued_at"),
        _timestamp("started_at"),
        _timestamp("finished_at"),
        sa.CheckConstraint("attempt >= 1", name=op.f("ck_jobs_attempt_positive")),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_jobs_max_attempts_positive")),
        sa.ForeignKeyConstraint(["teacher_job_id"], ["jobs.id"], name=op.f("fk_jobs_teacher_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["teacher_upload_id"],
            ["teacher_uploads.id"],
            name=op.f("fk_jobs_teacher_upload_id_teacher_uploads"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_owner"), "jobs", ["owner"])
    op.create_index(op.f("ix_jobs_teacher_job_id"), "jobs", ["teacher_job_id"])
    op.create_index(op.f("ix_jobs_teacher_upload_id"), "jobs", ["teacher_upload_id"])
    op.create_index(op.f("ix_jobs_status_lease_expires_at"), "jobs", ["status", "lease_expires_at"])

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        *_status("from_status", "job_events", nullable=True),
        *_status("to_status", "job_events"),
        sa.Column("reason", sa.Text(), nullable=True),
        _timestamp("at", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index(op.f("ix_job_events_job_id"), "job_events", ["job_id"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("values", JSON, nullable=False),
        _timestamp("recorded_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_metrics_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
        sa.UniqueConstraint("job_id", "epoch", name=op.f("uq_metrics_job_id_epoch")),
    )

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_artifacts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_artifacts_job_id_name")),
    )


def downgrade() -> None:
    """Drop the tables, dependants first."""
    for table in ("artifacts", "metrics", "job_events", "jobs", "teacher_uploads"):
        op.drop_table(table)
