"""pg runs status index: PostgreSQL keeps no index on runs.status

Every status a PostgreSQL reader filters runs on is a live one (the claim,
the reaper, the queue metric), and the partial unique index on the live
runs' thread (ux_runs_live_thread, migration 0005) answers those: its
predicate holds only live runs, a few rows however long the history. The
claim writes its statuses into the statement for that (its generic plan
reads the partial index); the reaper's and the metric's bound statuses get
custom plans that read it (their generic plans, a table scan, cost far
more, so PostgreSQL keeps planning them: once per poll interval). An index
on every run's status is then only written: each run's moves (queued, in
progress, completed) are updates that change an indexed column, so each
adds an entry to it, on the run's hot path (issue 17: dropped by hand
together with ix_run_events_created_at, which stays, the two saved 0.2-0.4
ms of PostgreSQL's CPU per run; this one alone was below what a loaded
machine's bench resolves: the evidence is the plans, bench/README.md,
branch pgthru). Dropping it is instant, but takes the table's lock: a
start-up that migrates waits for open transactions on runs.

SQLite keeps it: its claim's plan reads the status index
(run_execution._claimable_by_owner).

Revision ID: 0015_pg_runs_status_index
Revises: 0014_store_file_seq
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0015_pg_runs_status_index"
down_revision = "0014_store_file_seq"
branch_labels = None
depends_on = None

INDEX = "ix_runs_status"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index(INDEX, table_name="runs", if_exists=True)  # (already dropped by hand: fine)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(INDEX, "runs", ["status"], if_not_exists=True)
