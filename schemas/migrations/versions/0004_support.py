"""support: per-statement support of each summary and its rate

Revision ID: 0004
Revises: 0003 (0003_operations)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("summaries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("support_rate", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "support",
                sa.JSON().with_variant(
                    postgresql.JSONB(astext_type=sa.Text()), "postgresql"
                ),
                nullable=True,
            )
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("summaries", schema=None) as batch_op:
        batch_op.drop_column("support")
        batch_op.drop_column("support_rate")
