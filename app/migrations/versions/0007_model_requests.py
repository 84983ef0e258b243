"""model requests: each completion as sent to the model and as answered

Revision ID: 0007_model_requests
Revises: 0005_live_run_per_thread
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007_model_requests"
down_revision = "0005_live_run_per_thread"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "model_requests",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("request", _JSON, nullable=False),
        sa.Column("response", _JSON, nullable=False),
    )
    op.create_index("ix_model_requests_run", "model_requests", ["run_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_requests_run", table_name="model_requests")
    op.drop_table("model_requests")
