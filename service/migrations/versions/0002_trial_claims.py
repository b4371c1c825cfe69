"""The trial claims table of the workers (:mod:`worker.study._claims`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Databases from before this revision may already have the table (workers created it
themselves): it is kept as it is, its schema being this one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = "liptune_trial_claims"


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("claim_id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_name", sa.String(512), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=True),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=False, server_default=sa.func.now()),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index(f"ix_{TABLE}_study_name", TABLE, ["study_name"])
    op.create_index(
        f"ix_{TABLE}_live_slot",
        TABLE,
        ["study_name", "slot"],
        unique=True,
        sqlite_where=sa.text("state != 'failed'"),
        postgresql_where=sa.text("state != 'failed'"),
    )


def downgrade() -> None:
    op.drop_index(f"ix_{TABLE}_live_slot", table_name=TABLE)
    op.drop_index(f"ix_{TABLE}_study_name", table_name=TABLE)
    op.drop_table(TABLE)
