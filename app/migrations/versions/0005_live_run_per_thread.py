"""runs: at most one live run per thread, kept by a partial unique index

Databases written before it may hold threads with several live runs (SQLite
let concurrent creates through, issue 10): all but the oldest live run of
such a thread are failed first, with a last_error that says why.

Revision ID: 0005_live_run_per_thread
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005_live_run_per_thread"
down_revision = "0004"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_LIVE = "status IN ('queued', 'in_progress', 'requires_action', 'cancelling')"
_LAST_ERROR = {
    "code": "server_error",
    "message": "The run was failed by an upgrade: another run was already active on its thread.",
}


def upgrade() -> None:
    _fail_extra_live_runs()
    op.create_index(
        "ux_runs_live_thread",
        "runs",
        ["thread_id"],
        unique=True,
        sqlite_where=sa.text(_LIVE),
        postgresql_where=sa.text(_LIVE),
    )


def _fail_extra_live_runs() -> None:
    bind = op.get_bind()
    extra = bind.execute(
        sa.text(
            f"SELECT r.id FROM runs r WHERE r.{_LIVE} AND EXISTS ("
            f"SELECT 1 FROM runs o WHERE o.thread_id = r.thread_id AND o.{_LIVE} AND o.seq < r.seq)"
        )
    ).scalars().all()
    if not extra:
        return
    runs = sa.table(
        "runs",
        sa.column("id", sa.String),
        sa.column("status", sa.String),
        sa.column("failed_at", sa.BigInteger),
        sa.column("expires_at", sa.BigInteger),
        sa.column("required_action", _JSON),
        sa.column("lease_owner", sa.String),
        sa.column("lease_expires_at", sa.Float),
        sa.column("last_error", _JSON),
    )
    bind.execute(
        runs.update()
        .where(runs.c.id.in_(extra))
        .values(
            status="failed",
            failed_at=int(time.time()),
            expires_at=None,
            required_action=None,
            lease_owner=None,
            lease_expires_at=None,
            last_error=_LAST_ERROR,
        )
    )


def downgrade() -> None:
    op.drop_index("ux_runs_live_thread", table_name="runs")
