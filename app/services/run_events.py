"""The run event log's SQL (issue 11): append a run's events in order, read
them from a sequence number, prune old logs, and close what a dead worker
left open.

Every append to a run's log takes the run's row lock first (PostgreSQL; on
SQLite the transaction holds the write lock: RunLog.append connects a unit
still collecting its writes first, unless that unit creates the run), so appends to one run are
serialised, and commit in the order of their sequence numbers: a reader that
has seen ``seq`` N never misses a later-committed N-1. Nothing here commits.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Text,
    TextClause,
    Update,
    bindparam,
    cast,
    column,
    delete,
    func,
    select,
    text,
)
from sqlalchemy import insert as sql_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, ids, orm
from app.bus import Entry
from app.services import core_rows, new_rows, run_state
from app.wire.events import Event

# lock()'s statements, built once on the runs' table: the run log's flusher
# sent one every flush (each 20 ms while a model streams), and the ORM's
# select, built and compiled anew each time, was most of a flush's CPU
# (issue 17); it still does on a SQLite file several processes write
# (PostgreSQL's flush takes the same lock in migration 0017's function).
# NO KEY UPDATE: appends exclude each other, but the executor's inserts of
# steps and messages (whose foreign keys share-lock the run) go on.
_RUNS = orm.Run.__table__
_LOCK_RUNS = (
    select(_RUNS.c.id)
    .where(_RUNS.c.id.in_(bindparam("run_ids", expanding=True)))
    .order_by(_RUNS.c.id)
    .with_for_update(key_share=True)
)
_LOCK_LIVE_RUNS = _LOCK_RUNS.where(_RUNS.c.status.in_(("in_progress", "cancelling")))


async def lock(session: AsyncSession, run_ids: Sequence[str], *, live_only: bool = False) -> list[str]:
    """Lock the runs' rows for this transaction (PostgreSQL; a no-op lock on
    SQLite, whose transactions hold the write lock); returns the runs found.
    ``live_only`` leaves out runs that have ended (their executor's late
    deltas are dropped)."""
    query = _LOCK_LIVE_RUNS if live_only else _LOCK_RUNS
    return list((await session.scalars(query, {"run_ids": list(run_ids)})).all())


async def lock_inserting(session: AsyncSession, run_id: str, rows: Sequence[orm.Base]) -> None:
    """lock() of one run on PostgreSQL, with ``rows`` inserted by the same
    statement (issue 17: one round trip for both). The lock is taken by a
    statement before the one that numbers the events, whose snapshot then
    sees every append that committed before it: the lock cannot go in the
    numbering statement itself (its snapshot is taken before it waits).
    A run that is gone (its thread deleted) raises
    run_state.TransitionConflict: its log has no foreign key to refuse the
    events (migration 0018), and they would outlive the delete."""
    locked = select(orm.Run.id).where(orm.Run.id == run_id).with_for_update(key_share=True).subquery("locked_run")
    statement = select(func.count()).select_from(locked)
    for index, row in enumerate(rows):
        statement = statement.add_cte(core_rows.insert_statement(row).cte(f"inserted_{index}"))
    found = (await session.execute(statement)).scalar_one()
    if not found and not any(isinstance(row, orm.Run) for row in rows):
        raise run_state.TransitionConflict(f"run {run_id} is gone")


async def last_seqs(session: AsyncSession, run_ids: Sequence[str]) -> dict[str, int]:
    """The highest logged ``seq`` of each run (0 for an empty log); call under lock()."""
    query = (
        select(orm.RunEvent.run_id, func.max(orm.RunEvent.seq))
        .where(orm.RunEvent.run_id.in_(run_ids))
        .group_by(orm.RunEvent.run_id)
    )
    found = {run_id: int(seq) for run_id, seq in (await session.execute(query)).all()}
    return {run_id: found.get(run_id, 0) for run_id in run_ids}


@dataclass(frozen=True)
class Signal:
    """A NOTIFY per run on ``channel``, telling other processes that the
    run has news. Its payload is the run id and ``origin``, the sending
    process's token: a process knows its own signals by it (their events
    reached its followers at commit), whichever server backend sent them (a
    pooler in front of PostgreSQL hands one backend to many processes)."""

    channel: str
    origin: str


# A Signal's NOTIFY for the run ``run_id`` (a column or a value), as SQL:
# its payload as parse_signal() reads it.
_SIGNAL_NOTIFY = "pg_notify(:channel, run_id || ' ' || CAST(:origin AS text))"


def parse_signal(payload: str) -> tuple[str, str]:
    """(run id, origin) of a Signal's payload, ``"<run id> <origin>"`` as
    insert() and notify() send it; a payload of a run id alone (a process
    of an earlier version) has no origin ("")."""
    run_id, _space, origin = payload.partition(" ")
    return run_id, origin


async def insert(
    session: AsyncSession, batches: dict[str, list[Event]], *, signal: Signal | None = None, wake: bool = False
) -> dict[str, int]:
    """Append each run's events after its last logged one (call under
    lock()); returns the first ``seq`` given to each run's events.

    On PostgreSQL one statement numbers and inserts (each statement sees
    what committed before it, so under the lock ``max(seq)`` is the log's
    end), and with ``signal`` the same statement NOTIFYs it once per run
    (delivered when the transaction commits, as notify() does; issue 17:
    no transaction of its own). On SQLite, whose transactions are serial and
    local, a read of the ends then one multi-row INSERT; ``signal`` is
    PostgreSQL's only, as is ``wake``: the statement wakes the workers of
    other processes too (db.notify_work() at this transaction's commit,
    without a transaction of its own; one batch)."""
    batches = {run_id: events for run_id, events in batches.items() if events}
    if not batches:
        return {}
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        assert not wake or len(batches) == 1, "one wake-up per statement"
        return await _insert_postgres(session, batches, signal, wake)
    if sum(len(events) for events in batches.values()) <= _SQLITE_ONE_STATEMENT_ROWS:
        return await _insert_sqlite(session, batches)
    firsts = {run_id: last + 1 for run_id, last in (await last_seqs(session, sorted(batches))).items()}
    now = time.time()
    values = [
        {"run_id": run_id, "seq": firsts[run_id] + n, "event": event.name, "data": _payload(event), "created_at": now}
        for run_id, events in batches.items()
        for n, event in enumerate(events)
    ]
    await session.execute(sql_insert(orm.RunEvent), values)
    return firsts


# The arrays go to unnest() through one-row subqueries (_rows_unknown), so
# that a plan made with their values (a custom plan) counts its rows as the
# generic plan does. Given the arrays themselves, PostgreSQL counts the rows
# of a custom plan exactly and those of the generic plan by a default (10):
# for a batch of fewer events (a create's 3) every custom plan then costs
# less than the generic one, and PostgreSQL plans the statement again at
# each execution (issue 17: 0.5-0.9 ms of its CPU per create, the create's
# "bind" that branch pgone could not explain). The one-row subqueries are
# evaluated once per statement.
def _rows_unknown(prefix: str = "") -> str:
    """unnest()'s arguments: the bound arrays ``run_ids``, ``ns``, ``names``
    and ``datas`` (each name after ``prefix``)."""
    arrays = (("run_ids", "text"), ("ns", "int"), ("names", "text"), ("datas", "text"))
    return ", ".join(f"(SELECT CAST(:{prefix}{name} AS {kind}[]))" for name, kind in arrays)


# The rows of the log's insert on PostgreSQL, numbered after each run's
# last logged event. That end is read once per run (``ends``, materialized:
# computed once, whatever the join's plan), not once per event: the rows
# this statement inserts are not in its snapshot, so a per-event
# ``max(seq)`` walked back over every entry inserted before it in the
# run's index range, its heap checked for each (issue 17: an end's 12
# events read the run's log 78 times, a quadratic ~70 of its ~210
# buffers; a long answer's flush of N deltas N^2/2).
def numbered_rows(prefix: str, now: str, where: str = "") -> str:
    """A SELECT (its own WITH) of the rows of the arrays bound after
    ``prefix`` (_rows_unknown), ``created_at`` bound as ``now``, filtered by
    ``where`` (a condition, or nothing)."""
    return (
        f"WITH v AS (SELECT * FROM unnest({_rows_unknown(prefix)}) AS v(run_id, n, event, data)), "  # noqa: S608 (constants)
        "ends AS MATERIALIZED (SELECT r.run_id, "
        "(SELECT coalesce(max(e.seq), 0) FROM run_events e WHERE e.run_id = r.run_id) AS last "
        "FROM (SELECT DISTINCT run_id FROM v) AS r) "
        f"SELECT v.run_id, ends.last + v.n, v.event, CAST(v.data AS json), :{now} "
        "FROM v JOIN ends ON ends.run_id = v.run_id"
        f"{f' WHERE {where}' if where else ''}"
    )


_INSERT_POSTGRES_ROWS = f"""
    WITH ins AS (
        INSERT INTO run_events (run_id, seq, event, data, created_at)
        {numbered_rows("", "now")}
        RETURNING run_id, seq
    ), firsts AS (
        SELECT run_id, min(seq) AS first FROM ins GROUP BY run_id
    )
"""  # noqa: S608 (constants)
# The select list of _INSERT_POSTGRES_ROWS's statement: with a Signal,
# pg_notify once per run, sent at COMMIT (nothing if it rolls back), its
# payload as parse_signal() reads it; with ``wake``, pg_notify on the
# workers' channel (db.WORK_CHANNEL) once, as db.notify_work() does.
_WAKE_WORKERS = "pg_notify(:work_channel, '')"


@functools.cache
def _insert_postgres_statement(notify: bool, wake: bool) -> TextClause:
    returned = ["run_id", "first", *([_SIGNAL_NOTIFY] if notify else []), *([_WAKE_WORKERS] if wake else [])]
    return text(_INSERT_POSTGRES_ROWS + f"SELECT {', '.join(returned)} FROM firsts")  # noqa: S608 (constants)


async def _insert_postgres(
    session: AsyncSession, batches: dict[str, list[Event]], signal: Signal | None, wake: bool
) -> dict[str, int]:
    params = logged_arrays(batches.items(), "")
    if signal is not None:
        params["channel"], params["origin"] = signal.channel, signal.origin
    if wake:
        params["work_channel"] = db.WORK_CHANNEL
    rows = (await session.execute(_insert_postgres_statement(signal is not None, wake), params)).all()
    return {str(row[0]): int(row[1]) for row in rows}


# The run log's flush on PostgreSQL (RunLog._write_postgres): migration
# 0017's function locks the live runs, then numbers and inserts their deltas
# (a statement, and a snapshot, each), NOTIFYing with a channel; sent alone,
# autocommitted, it is the flush's whole transaction in one round trip. A
# select of it (not a text() statement), so that db.run_now can send it
# straight on asyncpg, knowing its result columns.
_FLUSH_POSTGRES = select(column("flushed_run", Text), column("first_seq", Integer)).select_from(
    text(
        "run_events_flush("
        "CAST(:run_ids AS text[]), CAST(:ns AS integer[]), CAST(:names AS text[]), CAST(:datas AS text[]), "
        "CAST(:now AS double precision), CAST(:channel AS text), CAST(:origin AS text))"
    )
)


async def flush_postgres(
    session: AsyncSession, batches: dict[str, list[Event]], signal: Signal | None
) -> dict[str, int]:
    """PostgreSQL: each run's ``batches`` logged after its last logged
    event, if the run is live (in_progress or cancelling: an ended run's
    late deltas are dropped), in one statement of its own transaction, which
    takes the live runs' locks (as lock()) before the statement that
    numbers (as insert()), and NOTIFYs ``signal`` once per run written.
    ``session`` has not begun: it holds a raw connection in autocommit
    (db.PG_AUTOCOMMIT: the statement goes straight on asyncpg), or None
    there (it connects in autocommit). Returns the first ``seq`` given to
    each live run's events; committed when it returns."""
    params = logged_arrays(batches.items(), "")
    params["channel"], params["origin"] = (signal.channel, signal.origin) if signal is not None else (None, None)
    if session.info.get(db.PG_AUTOCOMMIT) is None:
        await session.connection(execution_options=db.AUTOCOMMIT)
    db.sending_now()  # the connection held: the statement goes next
    found = await db.run_now(session, _FLUSH_POSTGRES, params)
    if found is not None:
        return {str(row["flushed_run"]): int(row["first_seq"]) for row in found}
    return {str(run_id): int(first) for run_id, first in (await session.execute(_FLUSH_POSTGRES, params)).all()}


# The log's insert of _INSERT_POSTGRES_ROWS as a data-modifying CTE of another
# statement (insert_carrying), numbering as that one does; ``guarded``: only
# with the row new_rows.with_inserts() guards, or the run a move carried
# alone moved (run_state.MOVED_CTE: their CTE is named the same).
def _logged_sql(guarded: bool) -> str:
    only_with = f"EXISTS (SELECT FROM {new_rows.GUARDED_CTE})" if guarded else ""
    return (
        "INSERT INTO run_events (run_id, seq, event, data, created_at) "
        f"{numbered_rows('log_', 'log_now', only_with)} "
        "RETURNING seq"
    )


_LOGGED = text(_logged_sql(False)).columns(column("seq")).cte("logged")
_LOGGED_GUARDED = text(_logged_sql(True)).columns(column("seq")).cte("logged")


@functools.lru_cache(maxsize=256)
def _carrying(carrier: Update | Select[Any], notify: bool) -> Update | Select[Any]:
    """``carrier`` (run_state.carried_move's) with the log's insert as a CTE,
    returning the first seq written and, with ``notify``, NOTIFYing the
    Signal bound as ``log_channel`` and ``log_origin``. A carrier alone
    (a SELECT of the moved run: CarriedMove.alone) logs only if the run
    moved, and returns no row, NOTIFYing nothing, if it did not."""
    logged = _LOGGED_GUARDED if isinstance(carrier, Select) else _LOGGED
    moved_id = carrier.selected_columns[0] if isinstance(carrier, Select) else run_state.RUNS.c.id
    returned: list[ColumnElement[Any]] = [select(func.min(logged.c.seq)).scalar_subquery()]
    if notify:
        origin = cast(bindparam("log_origin"), Text)
        returned.append(func.pg_notify(bindparam("log_channel"), moved_id + " " + origin))
    if isinstance(carrier, Select):
        return carrier.add_cte(logged).add_columns(*returned)
    return carrier.add_cte(logged).returning(*returned)


def logged_arrays(batches: Iterable[tuple[str, Sequence[Event]]], prefix: str) -> dict[str, Any]:
    """The parameters of numbered_rows(prefix, prefix + "now") for each
    run's events in ``batches`` (run id, events): the arrays of their rows,
    each run's numbered from 1, and the time they are logged at."""
    params: dict[str, Any] = {f"{prefix}{name}": [] for name in ("run_ids", "ns", "names", "datas")}
    params[f"{prefix}now"] = time.time()
    run_ids, ns, names, datas = (params[f"{prefix}{name}"] for name in ("run_ids", "ns", "names", "datas"))
    for run_id, events in batches:
        for n, event in enumerate(events, start=1):
            run_ids.append(run_id)
            ns.append(n)
            names.append(event.name)
            datas.append(logged_text(event))
    return params


def _logged_params(run_id: str, events: Sequence[Event]) -> dict[str, Any]:
    """The parameters of one run's events in the _LOGGED insert (its
    ``log_*`` arrays), for the statements that carry it."""
    return {
        "log_now": time.time(),
        "log_run_ids": [run_id] * len(events),
        "log_ns": list(range(1, len(events) + 1)),
        "log_names": [event.name for event in events],
        "log_datas": [logged_text(event) for event in events],
    }


async def _first_row(
    session: AsyncSession, statement: Select[Any] | Update, params: dict[str, Any]
) -> Sequence[Any] | None:
    """The first row of a cached PostgreSQL statement, its columns in order:
    sent straight on asyncpg where db.run_now takes it (issue 17: without
    SQLAlchemy's execution and result, the same round trip), else by
    ``session.execute``."""
    rows = await db.run_now(session, statement, params)
    if rows is None:
        return (await session.execute(statement, params)).first()
    return tuple(rows[0].values()) if rows else None


async def insert_carrying(
    session: AsyncSession,
    run_id: str,
    events: list[Event],
    carrier: run_state.CarriedMove,
    *,
    signal: Signal | None = None,
) -> int:
    """insert() of one run's events on PostgreSQL as part of ``carrier``:
    an UPDATE of that run's row that returns its id and must change it, or,
    after the claim, a SELECT from that UPDATE as the statement's first CTE
    (``guarded_row``), every other write guarded by it
    (run_state.carried_move; issue 17: one round trip for the move, its
    rows and its events). In the claim's transaction the row was locked in
    an earlier statement, so the numbering sees every append committed
    before. After the claim it is not: the statement's snapshot predates its
    wait for the row, and an append committed meanwhile collides with the
    numbers it takes on (run_id, seq), an IntegrityError the caller answers
    by making the end again the way that locks the run first (a flush of
    the run's own deltas in flight when the end began is waited for first:
    RunLog.holding). With ``signal``, NOTIFYs it as insert() does.
    Returns the first ``seq``; raises run_state.TransitionConflict if the
    UPDATE changed no row: in the claim's transaction, that transaction to
    be rolled back; carried alone (autocommitted), nothing was written."""
    params: dict[str, Any] = {**carrier.params, **_logged_params(run_id, events)}
    if signal is not None:
        params["log_channel"], params["log_origin"] = signal.channel, signal.origin
    row = await _first_row(session, _carrying(carrier.statement, signal is not None), params)
    if row is None:
        raise run_state.TransitionConflict(f"{run_id} moved or changed hands under its transaction's lock")
    return int(row[1])


@functools.lru_cache(maxsize=256)  # a shape per number of new rows (new_rows.MAX_ROWS_TOGETHER at most), a few times
def _logging_rows(shape: new_rows.Shape, notify: bool, wake: bool, condition: new_rows.Condition | None) -> Select[Any]:
    """The log's insert (as insert_carrying's) with an INSERT CTE per new
    row of ``shape`` (new_rows.with_inserts, all only if ``condition``
    holds), returning the first seq written (no row: none) and, with
    ``notify``, NOTIFYing the Signal bound as ``log_channel`` and
    ``log_origin`` for the run bound as ``log_run_id``, and with ``wake``
    the workers' channel bound as ``work_channel`` (see insert())."""
    logged = _LOGGED if condition is None else _LOGGED_GUARDED
    returned: list[ColumnElement[Any]] = [func.min(logged.c.seq)]
    if notify:
        origin = cast(bindparam("log_origin"), Text)
        returned.append(func.pg_notify(bindparam("log_channel"), cast(bindparam("log_run_id"), Text) + " " + origin))
    if wake:
        returned.append(func.pg_notify(bindparam("work_channel", type_=Text), ""))
    statement = select(*returned).select_from(logged)
    if condition is not None:
        # Refused, it returns no row and so NOTIFYs nothing (the aggregate's
        # one row would call pg_notify over no events): a statement run
        # alone (autocommit) commits its NOTIFYs even when it writes nothing.
        statement = statement.having(func.count() > 0)
    return new_rows.with_inserts(statement, shape, condition)


def can_insert_with_rows(session: AsyncSession, rows: Sequence[orm.Base]) -> bool:
    """Whether insert_with_rows() takes ``rows`` (PostgreSQL, a few rows)."""
    return (
        session.bind is not None
        and session.bind.dialect.name == "postgresql"
        and 0 < len(rows) <= new_rows.MAX_ROWS_TOGETHER
    )


async def insert_with_rows(
    session: AsyncSession,
    run_id: str,
    events: list[Event],
    rows: Sequence[orm.Base],
    *,
    signal: Signal | None = None,
    wake: bool = False,
    only_if: new_rows.OnlyIf | None = None,
) -> int:
    """insert() of one run's events on PostgreSQL by the statement that
    inserts ``rows``, the new rows they announce (see can_insert_with_rows;
    issue 17: a new thread, its messages, its run and their opening events
    in one round trip). Call it where the numbering needs no lock of its
    own: the run's row is locked by this transaction, or is among ``rows``
    (no other transaction sees the run before this one commits). Foreign
    keys are checked at the statement's end, so an event may belong to the
    run inserted beside it. Returns the first ``seq``. With ``only_if``,
    nothing at all goes in unless its condition holds for the last row (the
    run): else nothing is NOTIFYd either, and what its ``refused()`` says is
    raised, the transaction to be rolled back. ``wake``: as insert()'s."""
    shape, params = new_rows.shape_of(rows)
    params |= _logged_params(run_id, events)
    if signal is not None:
        params |= {"log_channel": signal.channel, "log_origin": signal.origin, "log_run_id": run_id}
    if wake:
        params["work_channel"] = db.WORK_CHANNEL
    condition = None
    if only_if is not None:
        condition = only_if.condition
        params |= only_if.parameters
    statement = _logging_rows(shape, signal is not None, wake, condition)
    found = await _first_row(session, statement, params)
    if found is None:
        assert only_if is not None, "events logged"
        raise await only_if.refused(session)
    return int(found[0])


# Up to this many events, SQLite numbers and inserts them in one statement
# (a run's append, most flushes); a larger flush reads the ends first.
_SQLITE_ONE_STATEMENT_ROWS = 256


# lock(live_only=True)'s condition as _insert_sqlite_statement's filter: the
# rows of runs still running (a late delta of an ended run is dropped).
_LIVE_RUN = " WHERE EXISTS (SELECT 1 FROM runs r WHERE r.id = v.run_id AND r.status IN ('in_progress', 'cancelling'))"


@functools.cache
def _insert_sqlite_statement(rows: int, live_only: bool = False) -> TextClause:
    """As _INSERT_POSTGRES_ROWS, for ``rows`` events: SQLite runs the SELECT to
    its end before inserting (it reads the table written), so every row's
    ``max(seq)`` is the log's end before this statement (issue 17: one
    statement and one thread hop per append instead of two). ``live_only``:
    only the rows of runs still running."""
    values = ", ".join(f"(:r{i}, :n{i}, :e{i}, :d{i})" for i in range(rows))
    return text(
        f"WITH v(run_id, n, event, data) AS (VALUES {values}) "  # noqa: S608 (placeholders only)
        "INSERT INTO run_events (run_id, seq, event, data, created_at) "
        "SELECT v.run_id, (SELECT coalesce(max(e.seq), 0) FROM run_events e WHERE e.run_id = v.run_id) + v.n, "
        f"v.event, v.data, :now FROM v{_LIVE_RUN if live_only else ''} RETURNING run_id, seq"
    )


@functools.cache
def _row_names(row: int) -> tuple[str, str, str, str]:
    """The parameter names of _insert_sqlite_statement's row ``row``: made
    once (issue 17: four f-strings and a dict merged per event were a
    tenth of an instant answer's log insert)."""
    return f"r{row}", f"n{row}", f"e{row}", f"d{row}"


def _sqlite_params(batches: dict[str, list[Event]]) -> tuple[int, dict[str, Any]]:
    """The rows of _insert_sqlite_statement and its parameters."""
    params: dict[str, Any] = {"now": time.time()}
    row = 0
    for run_id, events in batches.items():
        for n, event in enumerate(events, start=1):
            run_name, n_name, event_name, data_name = _row_names(row)
            params[run_name] = run_id
            params[n_name] = n
            params[event_name] = event.name
            params[data_name] = logged_text(event)
            row += 1
    return row, params


async def _insert_sqlite(session: AsyncSession, batches: dict[str, list[Event]]) -> dict[str, int]:
    rows, params = _sqlite_params(batches)
    firsts: dict[str, int] = {}
    for run_id, seq in (await session.execute(_insert_sqlite_statement(rows), params)).all():
        firsts[run_id] = min(seq, firsts.get(run_id, seq))
    return firsts


def can_insert_behind(session: AsyncSession, events: int) -> bool:
    """Whether insert_behind() may take ``events`` events (SQLite): up to
    one statement's rows, or any number in the claim's raw transaction or a
    grouped end, which cannot read the log's end for insert()
    (db.RawSessionConnected)."""
    if session.bind is None or session.bind.dialect.name != "sqlite":
        return False
    return events <= _SQLITE_ONE_STATEMENT_ROWS or db.RAW in session.info or db.GROUPED in session.info


async def insert_behind(session: AsyncSession, run_id: str, events: list[Event], returned: list[Any]) -> None:
    """insert() for one run on SQLite (see can_insert_behind), sent with the
    transaction's next statement or its COMMIT rather than alone
    (db.WRITE_BEHIND; issue 17). Each statement numbers its events after
    the log's end (a batch of more than one statement's rows goes in
    several, in order, each after the one before), so the log is right
    whatever the caller expected; the ``(run_id, seq)`` rows written arrive
    in ``returned`` once they have run, for the caller to check its
    expectation against."""
    options = {**db.WRITE_BEHIND, db.RETURNED_ROWS_TO: returned}
    for start in range(0, len(events), _SQLITE_ONE_STATEMENT_ROWS):
        rows, params = _sqlite_params({run_id: events[start : start + _SQLITE_ONE_STATEMENT_ROWS]})
        await db.write_behind(session, _insert_sqlite_statement(rows), params, options)


async def insert_live_behind(session: AsyncSession, batches: dict[str, list[Event]], returned: list[Any]) -> None:
    """The run log flusher's insert() on SQLite, in a raw transaction
    (db.RawTransaction, which holds the write lock: the lock() of SQLite):
    each run's events after its log's end, held back to go with the COMMIT
    (issue 17: a flush in one thread hop, not three), and only for runs
    still running, as lock(live_only=True) would have found them. The
    ``(run_id, seq)`` rows written arrive in ``returned`` once they have
    run; a run with none had ended."""
    options = {**db.WRITE_BEHIND, db.RETURNED_ROWS_TO: returned}
    if sum(len(events) for events in batches.values()) <= _SQLITE_ONE_STATEMENT_ROWS:
        parts = [batches]  # the usual flush: one statement for every run
    else:  # each run's in order, a statement's rows at a time
        parts = [
            {run_id: events[start : start + _SQLITE_ONE_STATEMENT_ROWS]}
            for run_id, events in batches.items()
            for start in range(0, len(events), _SQLITE_ONE_STATEMENT_ROWS)
        ]
    for part in parts:
        rows, params = _sqlite_params(part)
        if rows:
            await db.write_behind(session, _insert_sqlite_statement(rows, live_only=True), params, options)


def logged_text(event: Event) -> str:
    """The event's JSON as logged: the text its SSE frame sends too, encoded once."""
    _payload(event)
    return event.json


def _payload(event: Event) -> dict[str, Any]:
    # Every logged event carries an object; "[DONE]" is never logged (api/sse.py adds it).
    assert isinstance(event.data, dict), event.name
    return event.data


# Built once, its result column named (db.run_now sends no bare text():
# it caches what it sends by the statement, and names the rows' columns).
_NOTIFY = text(
    f"SELECT {_SIGNAL_NOTIFY} AS notified FROM unnest(CAST(:run_ids AS text[])) AS run_id"  # noqa: S608 (constants)
).columns(column("notified"))


async def notify(session: AsyncSession, signal: Signal, run_ids: Sequence[str]) -> None:
    """``signal`` once per run (PostgreSQL), sent when the transaction commits
    (the run log's notifier: its own autocommitted statement). Sent straight
    on asyncpg where db.run_now takes it (issue 17: without SQLAlchemy's
    execution and result, the same round trip)."""
    params = {"channel": signal.channel, "origin": signal.origin, "run_ids": list(run_ids)}
    if await db.run_now(session, _NOTIFY, params) is None:
        await session.execute(_NOTIFY, params)


# Built once with bound parameters: its cache key is memoized on the
# statement (every stream reads through it).
_READ = (
    select(orm.RunEvent.seq, orm.RunEvent.event, orm.RunEvent.data)
    .where(orm.RunEvent.run_id == bindparam("run_id"), orm.RunEvent.seq > bindparam("after"))
    .order_by(orm.RunEvent.seq)
    .limit(bindparam("limit"))
)


async def read(session: AsyncSession, run_id: str, after: int, limit: int = 1000) -> list[Entry]:
    """The run's events with ``seq`` greater than ``after``, oldest first."""
    found = await session.execute(_READ, {"run_id": run_id, "after": after, "limit": limit})
    return [Entry(seq, Event(name, data)) for seq, name, data in found.all()]


async def size(session: AsyncSession, run_id: str) -> tuple[int, int]:
    """(rows, bytes of event payload as JSON text) of a run's log (bench)."""
    rows = (await session.execute(select(orm.RunEvent.data).where(orm.RunEvent.run_id == run_id))).scalars().all()
    return len(rows), sum(len(json.dumps(row, separators=(",", ":"))) for row in rows)


async def prune(session: AsyncSession, older_than: float, batch: int = 500) -> int:
    """Delete the whole logs of up to ``batch`` ended runs whose last event is
    older than ``older_than`` (unix seconds); returns the rows deleted.

    Candidates come from the created_at index (only old rows are looked at),
    so a prune that finds nothing costs one short index range."""
    candidates = (
        await session.scalars(
            select(orm.RunEvent.run_id).where(orm.RunEvent.created_at < older_than).distinct().limit(batch)
        )
    ).all()
    if not candidates:
        return 0
    ended = select(orm.Run.id).where(orm.Run.id.in_(candidates), orm.Run.status.in_(run_state.TERMINAL))
    recent = (
        select(orm.RunEvent.run_id)
        .where(orm.RunEvent.run_id.in_(candidates))
        .group_by(orm.RunEvent.run_id)
        .having(func.max(orm.RunEvent.created_at) >= older_than)
    )
    # A run deleted with its thread takes its log with it (threads.delete);
    # a log whose run row is gone anyway goes too (SQLite without the
    # cascade; PostgreSQL, whose run_events has no foreign key (migration
    # 0018), a thread deleted by an older server version).
    gone = select(orm.RunEvent.run_id).where(
        orm.RunEvent.run_id.in_(candidates), ~orm.RunEvent.run_id.in_(select(orm.Run.id))
    )
    doomed = set((await session.scalars(ended)).all()) - set((await session.scalars(recent)).all())
    doomed |= set((await session.scalars(gone)).all())
    if not doomed:
        return 0
    result = await session.execute(delete(orm.RunEvent).where(orm.RunEvent.run_id.in_(doomed)))
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- a resumed run: closing what the dead worker's stream left open ---------

STEP_RETRIED = {
    "code": "server_error",
    "message": "The worker executing this step stopped; the run resumed from its last completed step.",
}


async def close_abandoned(session: AsyncSession, run_id: str) -> list[Event]:
    """Events that close the message and steps a dead worker's stream opened
    and never finished (issue 11): ``thread.message.incomplete`` with the text
    its deltas had logged, then ``thread.run.step.failed``. The resumed run
    then streams a new step and message, as OpenAI streams a retried step, so
    a client holding the stream sees each delta once and every object it was
    told about closed (what the SDKs' stream helpers require). The rows of
    the interrupted call are removed by run_execution.resume_point()."""
    tracker = OpenObjects()
    for entry in await read(session, run_id, 0, limit=1_000_000):
        tracker.feed(entry.event)
    return tracker.closing_events(ids.now())


@dataclass
class _Open:
    snapshot: dict[str, Any]
    content: list[dict[str, Any]]


class OpenObjects:
    """Follows a run's logged events and remembers which messages and steps
    were created and not yet closed, with the content their deltas streamed."""

    def __init__(self) -> None:
        self.messages: dict[str, _Open] = {}
        self.steps: dict[str, _Open] = {}

    def feed(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        name = event.name
        if name == "thread.message.created":
            self.messages[data["id"]] = _Open(dict(data), [])
        elif name == "thread.message.delta" and data.get("id") in self.messages:
            _merge_parts(self.messages[data["id"]].content, data.get("delta", {}).get("content") or [])
        elif name in ("thread.message.completed", "thread.message.incomplete"):
            self.messages.pop(data.get("id", ""), None)
        elif name == "thread.run.step.created":
            self.steps[data["id"]] = _Open(dict(data), [])
        elif name.startswith("thread.run.step.") and name.rsplit(".", 1)[1] in _STEP_ENDS:
            self.steps.pop(data.get("id", ""), None)

    def closing_events(self, now: int) -> list[Event]:
        events: list[Event] = []
        for message in self.messages.values():
            closed = {
                **message.snapshot,
                "status": "incomplete",
                "incomplete_at": now,
                "incomplete_details": {"reason": "run_failed"},
                "content": [{k: v for k, v in part.items() if k != "index"} for part in message.content],
            }
            events.append(Event("thread.message.incomplete", closed))
        for step in self.steps.values():
            closed = {**step.snapshot, "status": "failed", "failed_at": now, "last_error": STEP_RETRIED}
            events.append(Event("thread.run.step.failed", closed))
        return events


_STEP_ENDS = frozenset({"completed", "failed", "cancelled", "expired"})


def _merge_parts(content: list[dict[str, Any]], parts: list[dict[str, Any]]) -> None:
    """Accumulate message-delta content parts the way the SDKs do: by
    ``index``; text values and refusals concatenated, annotations appended."""
    for part in parts:
        index = int(part.get("index", 0))
        while len(content) <= index:
            content.append({"index": len(content)})
        target = content[index]
        if part.get("type") == "text":
            text = target.setdefault("text", {"value": "", "annotations": []})
            target["type"] = "text"
            text["value"] += part.get("text", {}).get("value", "")
            text["annotations"] += part.get("text", {}).get("annotations") or []
        elif part.get("type") == "refusal":
            # A refusal streams in pieces too: each delta carries the next one.
            target["type"] = "refusal"
            target["refusal"] = target.get("refusal", "") + (part.get("refusal") or "")
        else:
            target.update({k: v for k, v in part.items()})
