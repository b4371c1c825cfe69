"""The studies table.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "liptune_studies",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_liptune_studies"),
        sa.UniqueConstraint("idempotency_key", name="uq_liptune_studies_idempotency_key"),
    )
    op.create_index("ix_liptune_studies_created_at", "liptune_studies", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_liptune_studies_created_at", table_name="liptune_studies")
    op.drop_table("liptune_studies")
