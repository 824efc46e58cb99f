"""Job-end callbacks go through an outbox table written with the job's end, so none is lost.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create callback_deliveries."""
    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_callback_deliveries_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_deliveries")),
        sa.UniqueConstraint("job_id", name=op.f("uq_callback_deliveries_job_id")),
    )
    op.create_index(op.f("ix_callback_deliveries_state_next_attempt_at"), "callback_deliveries",
                    ["state", "next_attempt_at"])


def downgrade() -> None:
    """Drop callback_deliveries."""
    op.drop_index(op.f("ix_callback_deliveries_state_next_attempt_at"), table_name="callback_deliveries")
    op.drop_table("callback_deliveries")
