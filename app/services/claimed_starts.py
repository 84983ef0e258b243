"""PostgreSQL: the starts of the runs one claim took, in one statement
(issue 17). Each run's held start (run_state.hold: queued -> in_progress)
and its events are written by one UPDATE ... FROM unnest() of the runs'
values and one INSERT of the log's rows, both data-modifying CTEs of one
SELECT: a round trip and a statement for the claim's starts, where each
run's start was a statement of its own (bench/README, branch pgbatch).

The statement runs in the claim's transaction, after the claim's UPDATE
locked every run it names: the compare-and-set (each run's status as the
claim returned it, the claimer's lease) cannot miss there, and the log's
numbering (run_events' ``ends``) sees every append committed before it, as
the one-run carried start's did (run_events.insert_carrying). A miss all
the same raises run_state.TransitionConflict, for the transaction to be
rolled back (every run of the claim claimable again), as a carried start's
miss does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, Select, String, Text, bindparam, cast, column, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, orm
from app.services import run_events, run_state
from app.wire.events import Event

# What a held start writes (run_state._values for queued -> in_progress):
# the status, the start time (the run's own if it ran before: a run queued
# again after its tool outputs keeps it), the required action cleared.
_START_KEYS = frozenset({"status", "started_at", "required_action"})

# The runs' moves. The arrays go to unnest() through one-row subqueries, as
# run_events' (_rows_unknown): a custom plan counts their rows as the
# generic plan does, so the prepared statement keeps its generic plan.
# The outer CAST in ``= ANY(...)`` is not redundant: without it the
# parenthesised SELECT is read as ANY's subquery (rows of text[], compared
# with each id: "operator does not exist"), with it as one array.
# ``required_action`` is bound with the column's type, so that it is
# written as the one-run start writes it (JSON's ``null``).
_MOVED = (
    text(
        "UPDATE runs SET status = 'in_progress', started_at = s.started_at, "
        "required_action = :start_required_action "
        "FROM unnest((SELECT CAST(:start_ids AS text[])), (SELECT CAST(:start_sources AS text[])), "
        "(SELECT CAST(:start_started AS bigint[]))) AS s(id, source, started_at) "
        "WHERE runs.id = ANY(CAST((SELECT CAST(:start_ids AS text[])) AS text[])) AND runs.id = s.id "
        "AND runs.status = s.source AND runs.lease_owner = :start_owner "
        "RETURNING runs.id"
    )
    .bindparams(bindparam("start_required_action", type_=orm.Run.__table__.c.required_action.type))
    .columns(column("id", String))
    .cte("moved")
)

# The runs' events, numbered after each run's last logged one (run_events'
# numbering: each run's end read once), every run's in one INSERT.
_LOGGED = (
    text(
        "INSERT INTO run_events (run_id, seq, event, data, created_at) "
        f"{run_events.numbered_rows('log_', 'log_now')} "
        "RETURNING run_id, seq"
    )
    .columns(column("run_id", String), column("seq", Integer))
    .cte("logged")
)


@functools.cache
def _statement(notify: bool) -> Select[Any]:
    """The moves and the events as CTEs of one SELECT, a row per run logged:
    its id, its first seq, the ids of the runs that moved, and with ``notify`` a
    NOTIFY of the Signal bound as ``log_channel`` and ``log_origin`` for
    the run (delivered at the transaction's COMMIT, as run_events.insert's)."""
    moved = select(func.array_agg(_MOVED.c.id)).scalar_subquery()
    returned: list[Any] = [
        _LOGGED.c.run_id.label("run_id"),
        func.min(_LOGGED.c.seq).label("first"),
        moved.label("moved"),
    ]
    if notify:
        payload = _LOGGED.c.run_id + " " + cast(bindparam("log_origin"), Text)
        returned.append(func.pg_notify(bindparam("log_channel"), payload).label("notified"))
    return select(*returned).add_cte(_MOVED).add_cte(_LOGGED).group_by(_LOGGED.c.run_id)


@dataclass(frozen=True)
class Start:
    """One claimed run's held start and the events its log gets with it
    (as RunExecution.start_claimed leaves it: the start's events; as
    RunLog.append_starts writes it: the run's buffered deltas, if any,
    first)."""

    run: orm.Run
    held: run_state.HeldMove
    events: list[Event]


def batchable(held: run_state.HeldMove) -> bool:
    """Whether ``held`` is a start the statement writes (queued -> in_progress)."""
    return held.source == "queued" and held.values.get("status") == "in_progress" and set(held.values) <= _START_KEYS


async def insert_starting(
    session: AsyncSession, starts: Sequence[Start], lease_owner: str, *, signal: run_events.Signal | None = None
) -> dict[str, int]:
    """Write ``starts`` (each batchable(), runs whose rows this transaction
    holds under ``lease_owner``'s lease, each with events) in one
    statement; returns each run's first seq. Raises
    run_state.TransitionConflict if a run did not move (the transaction
    must then be rolled back: the events went in all the same)."""
    params: dict[str, Any] = {
        "start_ids": [start.run.id for start in starts],
        "start_sources": [start.held.source for start in starts],
        # The run's start time as the hold left it (its own, or the hold's).
        "start_started": [start.run.started_at for start in starts],
        "start_owner": lease_owner,
        "start_required_action": None,
        **run_events.logged_arrays(((start.run.id, start.events) for start in starts), "log_"),
    }
    if signal is not None:
        params["log_channel"], params["log_origin"] = signal.channel, signal.origin
    statement = _statement(signal is not None)
    rows: Sequence[Any] | None = await db.run_now(session, statement, params)
    if rows is None:
        rows = [row._mapping for row in await session.execute(statement, params)]
    firsts = {str(row["run_id"]): int(row["first"]) for row in rows}
    # Every run's events are logged, moved or not: the runs missed are those
    # the moves did not return.
    moved = set(rows[0]["moved"] or ()) if rows else set()
    missed = sorted({start.run.id for start in starts} - moved)
    if missed or len(firsts) != len(starts):
        raise run_state.TransitionConflict(
            f"claimed runs {missed} did not move to in_progress under the claim ({len(moved)} of {len(starts)} moved)"
        )
    return firsts
