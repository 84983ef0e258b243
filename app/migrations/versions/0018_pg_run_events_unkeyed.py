"""pg run events unkeyed: run_events.run_id loses its foreign key on PostgreSQL

Every event a run logs was checked against ``runs`` by the foreign key's
trigger, one ``SELECT ... FOR KEY SHARE`` of the run's row per event row:
9-10 µs of PostgreSQL's CPU a row, and a run logs 15-20 events (a create's
four, its turn's and end's), in the two statements every run waits on
(issue 17; bench/README.md, "run_events without its foreign key on
PostgreSQL"). What the key did, the server now does where it writes:

- every append holds the run's row: the statement that inserts the run,
  a compare-and-set UPDATE, or its own lock, which fails the append when
  the run is gone (run_events.lock_inserting), as the key failed it; the
  flush locks the live runs it numbers for (0017's function);
- a thread's delete locks its runs, then the thread (a run being created
  in it commits first, or fails), deletes its runs, then their logs (an
  append that held a run committed first, or finds it gone), where the
  key's cascade deleted the logs (app/services/threads.py);
- the prune takes a log whose run is gone (app/services/run_events.py), as
  it did on SQLite without the foreign keys pragma: the logs an older
  server version leaves when it deletes a thread on the migrated database
  go once older than the retention (a day by default).

SQLite keeps its key: its check is an index probe in C, and dropping it
would copy the table.

The constraint is found by what it is (run_events' foreign key), not by a
name PostgreSQL chose. Downgrading deletes the logs of runs that are gone,
then adds the key again.

Revision ID: 0018_pg_run_events_unkeyed
Revises: 0017_pg_flush_function
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0018_pg_run_events_unkeyed"
down_revision = "0017_pg_flush_function"
branch_labels = None
depends_on = None

_FOREIGN_KEYS = text(
    "SELECT conname FROM pg_constraint WHERE conrelid = 'run_events'::regclass AND contype = 'f' ORDER BY conname"
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for name in bind.execute(_FOREIGN_KEYS).scalars().all():
        op.drop_constraint(name, "run_events", type_="foreignkey")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("DELETE FROM run_events AS e WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.id = e.run_id)")
    op.create_foreign_key("run_events_run_id_fkey", "run_events", "runs", ["run_id"], ["id"], ondelete="CASCADE")
