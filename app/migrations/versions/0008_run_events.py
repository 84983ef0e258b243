"""run events: every run's stream events, in order, for SSE from any replica

Revision ID: 0008_run_events
Revises: 0011_search_index
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008_run_events"
down_revision = "0011_search_index"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "run_events",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("event", sa.String(48), nullable=False),
        sa.Column("data", _JSON, nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    # Pruning finds old rows by age (app/services/run_events.py).
    op.create_index("ix_run_events_created_at", "run_events", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_run_events_created_at", table_name="run_events")
    op.drop_table("run_events")
