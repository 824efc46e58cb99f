"""Jobs remember the request id of the submit that made them (structured logs follow it into the worker).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add jobs.request_id."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_id", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop jobs.request_id."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_id")
