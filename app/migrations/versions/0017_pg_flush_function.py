"""pg flush function: the run log's flush on PostgreSQL in one statement

While a model streams, the run log's flusher writes the buffered deltas of
every live run about every 20 ms (app/run_log.py). On PostgreSQL that was a
transaction of three round trips: BEGIN with a lock of the live runs' rows
(FOR NO KEY UPDATE, as every append takes it), the insert that numbers
each run's deltas after its last logged event (and NOTIFYs other
processes), then COMMIT. The lock cannot go in the numbering statement: a
statement's snapshot is taken before it waits for a lock, so it would
number over the events of the transaction it waited for. Two statements,
then, and a transaction around them.

``run_events_flush`` runs both in one call: under READ COMMITTED each
statement of a VOLATILE PL/pgSQL function takes a snapshot of its own, so
the insert sees whatever committed while the lock waited, as the second
statement of the transaction did. Called as the only statement of an
autocommitted round trip, it is its own transaction: the locks held to its
end, its NOTIFYs delivered when it commits (issue 17: one round trip a
flush, no BEGIN or COMMIT).

Arguments: the rows as four arrays (each run's events numbered from 1 in
``ns``), their ``created_at``, and the NOTIFY's channel and origin (a NULL
channel: no NOTIFY, the process's notifier tells the others). Returns the
first ``seq`` written for each live run; runs that ended (or are gone) are
left out, their deltas dropped, as before. The arrays reach unnest() through
one-row subqueries so that each call's plan counts their rows as the
generic plan does (app/services/run_events.py, _rows_unknown: otherwise
PostgreSQL plans the statement again at every call).

SQLite: nothing (its flush is one thread hop already). Servers of an
earlier version on the migrated database keep their own flush, which does
not call the function; downgrading drops it.

Revision ID: 0017_pg_flush_function
Revises: 0016_pgjson
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0017_pg_flush_function"
down_revision = "0016_pgjson"
branch_labels = None
depends_on = None

_CREATE = """
CREATE FUNCTION run_events_flush(
    run_ids text[], ns integer[], names text[], datas text[],
    logged_at double precision, channel text, origin text
) RETURNS TABLE (flushed_run text, first_seq integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    live text[];
BEGIN
    -- The live runs' rows locked first, in a statement of its own.
    SELECT array_agg(locked.id) INTO live FROM (
        SELECT r.id FROM runs AS r
        WHERE r.id = ANY (run_ids) AND r.status IN ('in_progress', 'cancelling')
        ORDER BY r.id FOR NO KEY UPDATE
    ) AS locked;
    IF live IS NULL THEN
        RETURN;
    END IF;
    -- A snapshot taken after that wait: each run's end is the log's.
    FOR flushed_run, first_seq IN
        WITH v AS (
            SELECT * FROM unnest((SELECT run_ids), (SELECT ns), (SELECT names), (SELECT datas))
                AS u(run_id, n, event, data)
            WHERE u.run_id = ANY (live)
        ), ends AS MATERIALIZED (
            SELECT d.run_id,
                (SELECT coalesce(max(e.seq), 0) FROM run_events AS e WHERE e.run_id = d.run_id) AS last
            FROM (SELECT DISTINCT v.run_id FROM v) AS d
        ), ins AS (
            INSERT INTO run_events (run_id, seq, event, data, created_at)
            SELECT v.run_id, ends.last + v.n, v.event, CAST(v.data AS json), logged_at
            FROM v JOIN ends ON ends.run_id = v.run_id
            RETURNING run_events.run_id, run_events.seq
        )
        SELECT ins.run_id, min(ins.seq) FROM ins GROUP BY ins.run_id ORDER BY ins.run_id
    LOOP
        IF channel IS NOT NULL THEN
            PERFORM pg_notify(channel, flushed_run || ' ' || origin);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS run_events_flush(text[], integer[], text[], text[], double precision, text, text)")
