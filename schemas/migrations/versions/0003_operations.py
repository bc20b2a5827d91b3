"""operations: lost deliveries, job origin and updated_at, resumable backfills

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column(
                "lost_deliveries", sa.Integer(), nullable=False, server_default="0"
            )
        )
        batch.add_column(sa.Column("origin", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_index("ix_jobs_state_updated", "jobs", ["state", "updated_at"])
    op.create_table(
        "backfills",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column(
            "arguments",
            sa.JSON().with_variant(
                postgresql.JSONB(astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("cursor", sa.String(length=128), nullable=True),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backfills")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("backfills")
    op.drop_index("ix_jobs_state_updated", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("origin")
        batch.drop_column("lost_deliveries")
