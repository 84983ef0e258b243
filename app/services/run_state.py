"""The run state machine: the one table of allowed moves and the one function
that changes a run's status (DOC-DD lifecycle, wire notes 2.5).

transition() is a compare-and-set UPDATE on (id, status), and for the
executor's moves on the executor's lease too: if another worker or request
moved the run first (or another worker took the run over), it raises
TransitionConflict, carrying the run as it is now, instead of overwriting. Timestamps are stamped here and nowhere
else. apply() is how a request changes a run: its rule is re-evaluated against
the fresh run when its transition loses a race (issue 10), so a request that
loses answers what it would have answered a moment later, never a 500.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Float,
    Insert,
    Integer,
    Select,
    Table,
    Update,
    and_,
    any_,
    bindparam,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app import db, errors, ids, orm, sqlite_driver
from app.services import core_rows, new_rows

if TYPE_CHECKING:
    from app.services.run_execution import Reservation

TERMINAL = frozenset({"cancelled", "failed", "completed", "incomplete", "expired"})
LIVE = frozenset(orm.LIVE_RUN_STATUSES)
CANCELLABLE = frozenset({"queued", "in_progress", "requires_action"})

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"in_progress", "cancelling", "failed", "expired"}),
    "in_progress": frozenset({"requires_action", "completed", "incomplete", "failed", "cancelling", "expired"}),
    "requires_action": frozenset({"queued", "cancelling", "failed", "expired"}),
    # A cancel can lose the race against the run's own ending.
    "cancelling": frozenset({"cancelled", "completed", "incomplete", "failed", "expired"}),
}

_STAMP = {
    "completed": "completed_at",
    "incomplete": "completed_at",
    "failed": "failed_at",
    "cancelled": "cancelled_at",
}


class TransitionConflict(Exception):
    """The run was not in the expected status any more (someone else moved it).

    ``current`` is the run re-read after the conflict (the same object,
    refreshed, when it was loaded by this session), or None if it is gone or
    the raiser did not re-read it.
    """

    def __init__(self, message: str, current: orm.Run | None = None) -> None:
        super().__init__(message)
        self.current = current


class InvalidTransition(Exception):
    pass


RUNS = cast(Table, orm.Run.__table__)
_MESSAGES = orm.Message.__table__.c


def free_to_hand(now_parameter: str, reserved_parameter: str, *, resumed: bool = False) -> ColumnElement[bool]:
    """A hand-off's condition on the run's own row (an UPDATE of RUNS),
    SQLite's (run_execution._build_hand_off) and PostgreSQL's (_carried's
    ``handed``) alike: never started (a run back to queued after its tool
    outputs has a start time), its lease free at ``now_parameter`` or still
    the reservation ``reserved_parameter`` (the claim's condition for a
    queued run, not its resumable branch). ``resumed``: started already
    instead, a run queued again by its tool outputs (SQLite's hand-back)."""
    lapsed = RUNS.c.lease_expires_at < bindparam(now_parameter, type_=Float)
    reserved = RUNS.c.lease_owner == bindparam(reserved_parameter)
    started = RUNS.c.started_at.is_not(None) if resumed else RUNS.c.started_at.is_(None)
    return and_(started, or_(RUNS.c.lease_expires_at.is_(None), lapsed, reserved))


def earlier_unchanged(
    count_parameter: str,
    seqs_parameter: str,
    thread: ColumnElement[Any] = RUNS.c.thread_id,
    before: ColumnElement[Any] = RUNS.c.seq,
) -> ColumnElement[bool]:
    """PostgreSQL's hand-off's condition on the run's thread (an UPDATE of
    RUNS; or, given ``thread`` and ``before``, the run's thread and seq, on
    the thread a new run's insert is about to be made on: runs.create's),
    its messages before the run still number ``count_parameter``,
    each of them one of the seqs ``seqs_parameter`` (an array), as the
    create noted them (run_execution.note_earlier: one may be deleted
    meanwhile, and another written in its place by a writer outside the
    API, which refuses a message while the run is live), so that its prompt
    is the one a claim's prefetch would give (SQLite's hand-off,
    run_execution._build_hand_off, requires the same)."""
    earlier = and_(_MESSAGES.thread_id == thread, _MESSAGES.seq < before)
    noted = _MESSAGES.seq == any_(bindparam(seqs_parameter, type_=ARRAY(_MESSAGES.seq.type)))
    held_count = bindparam(count_parameter, type_=Integer)
    # Two scalar subqueries (PostgreSQL takes a row subquery only on the
    # right of a row constructor), each one scan of the thread's index.
    count = select(func.count()).where(earlier).scalar_subquery()
    of_noted = select(func.count().filter(noted)).where(earlier).scalar_subquery()
    return and_(count == held_count, of_noted == held_count)


# Each mapped attribute of a run and its column (``metadata_`` is "metadata").
RUN_COLUMNS = {attr.key: attr.columns[0].name for attr in inspect(orm.Run).column_attrs}


@functools.cache
def _update(keys: tuple[str, ...], refresh: bool, leased: bool, unchanged: bool = False) -> Update:
    """The compare-and-set UPDATE setting the attributes ``keys``, as a Core
    statement built once per shape (issue 17: SQLAlchemy's ORM-enabled UPDATE
    and its RETURNING of ORM objects cost more CPU than the statement).
    ``leased``: it also requires the run's lease to be ``lease_holder``'s;
    ``unchanged`` (SQLite): the run's metadata to be ``held_metadata``,
    both as SQLite's ``json()`` spells them (rows written before orjson had
    spaces after ``,`` and ``:``, and would never match the compact text
    bound here: review of ``sqlend``; non-ASCII written then as ``\\uXXXX``
    still does not, and such a run's end is made the way that reads it)."""
    statement = (
        update(RUNS)
        .where(RUNS.c.id == bindparam("run_id"), RUNS.c.status == bindparam("source"))
        .values({RUN_COLUMNS[key]: bindparam(f"set_{key}") for key in keys})
    )
    if leased:
        statement = statement.where(RUNS.c.lease_owner == bindparam("lease_holder"))
    if unchanged:
        held = bindparam("held_metadata", type_=RUNS.c.metadata.type)
        statement = statement.where(func.json(RUNS.c.metadata) == func.json(held))
    return statement.returning(*RUNS.c) if refresh else statement


# A compare-and-set whose caller knows it cannot miss: on SQLite it goes with
# the transaction's next statement or COMMIT, and fails the transaction if
# it changed no row after all.
_CANNOT_MISS = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1}


class RunMoved(sqlite_driver.RoutineMismatch):
    """A move made ``unchanged`` (transition()) changed no row at the
    COMMIT: the run was no longer as its mover held it (moved by someone
    else, in another lease, its metadata changed). The transaction failed
    whole."""


# transition()'s ``unchanged`` move: sent with the COMMIT, which it fails if it misses.
_UNLESS_MOVED = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1, db.ROWCOUNT_MISMATCH: RunMoved}


def moved_elsewhere(error: BaseException) -> bool:
    """Whether ``error`` (from a transaction's COMMIT) is an ``unchanged``
    move of transition() finding the run changed (RunMoved)."""
    return sqlite_driver.raised_within(error, RunMoved)


@dataclass(frozen=True)
class HeldMove:
    """A move made in memory only (hold()): the run object shows it, the
    database does not yet. The claim's transaction holds the run's first
    move (queued -> in_progress) so that, when the run also ends in that
    transaction (an instant answer), one UPDATE writes both (issue 17: a
    statement, on PostgreSQL a round trip, fewer); else write_held() writes
    it alone. ``source``: the status the database still has."""

    source: str
    values: dict[str, Any]


def _values(run: orm.Run, to: str, fields: dict[str, Any]) -> dict[str, Any]:
    """What a move of ``run`` to ``to`` writes: ``fields`` and the stamps."""
    if to not in ALLOWED.get(run.status, frozenset()):
        raise InvalidTransition(f"{run.id}: {run.status} -> {to}")
    now = ids.now()
    values: dict[str, Any] = {"status": to, **fields}
    if to == "in_progress" and run.started_at is None:
        values["started_at"] = now
    if to in _STAMP:
        values[_STAMP[to]] = now
    if to in TERMINAL or to == "requires_action":
        # Nobody executes the run any more; its lease is released.
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    if to in TERMINAL and to != "expired":
        values["expires_at"] = None
    if to != "requires_action":
        values.setdefault("required_action", None)
    return values


def _set(run: orm.Run, values: dict[str, Any]) -> None:
    for key, value in values.items():
        set_committed_value(run, key, value)


# Where transition() and carried_move() keep the attributes their move set
# (InstanceState.info): moved_keys().
_MOVED_KEYS = "run_state.moved"


def _set_moved(run: orm.Run, values: dict[str, Any], *, whole_row: bool = False) -> None:
    """_set() of a move's ``values``, noting what it set for moved_keys()."""
    _set(run, values)
    inspect(run).info[_MOVED_KEYS] = None if whole_row else tuple(values)


def moved_keys(run: orm.Run) -> tuple[str, ...] | None:
    """The attributes of ``run`` the last move made on it by transition()
    or carried_move() set, and nothing else of it changed by that move;
    None when no such move was made on it, or when the move read the whole
    row back (``refresh``: any attribute may have changed)."""
    keys: tuple[str, ...] | None = inspect(run).info.get(_MOVED_KEYS)
    return keys


def hold(run: orm.Run, to: str) -> tuple[str, HeldMove]:
    """Move ``run`` to ``to`` in memory only (see HeldMove); the caller
    holds the run's row (the claim's UPDATE locked it and returned its
    status) and writes the move later, with the run's next move or alone.
    Returns the event name to publish and the held move."""
    source = run.status
    values = _values(run, to, {})
    _set(run, values)
    return f"thread.run.{to}", HeldMove(source, values)


def start_in_create(run: orm.Run, lease_owner: str, lease_until: float) -> None:
    """Move ``run``, a new run not yet inserted (queued, as its create
    made it), to in_progress in memory, leased to ``lease_owner`` until
    ``lease_until`` as a claim leases it: its create's insert then writes
    it started (a lone provider run: Worker.prepare; issue 17,
    the start's statement and its WAL flush folded into the create's),
    and its create logs ``thread.run.in_progress`` (api/runs.py). The
    attributes it set are kept on the run's instance state for
    write_started_in_create() (whatever _values() sets is written, no list
    kept by hand)."""
    values = _values(run, "in_progress", {"lease_owner": lease_owner, "lease_expires_at": lease_until})
    _set(run, values)
    inspect(run).info[_STARTED_KEYS] = tuple(values)


# Where start_in_create() keeps the attributes it set (InstanceState.info).
_STARTED_KEYS = "run_state.started_in_create"


def started_in_create_keys(run: orm.Run) -> tuple[str, ...]:
    """The attributes start_in_create() set on ``run``."""
    keys: tuple[str, ...] = inspect(run).info[_STARTED_KEYS]
    return keys


async def write_started_in_create(session: AsyncSession, run: orm.Run) -> None:
    """SQLite: ``run``, moved by start_in_create() after its create's
    change had already held back its INSERT (as queued: its parameters
    taken then), written started in the same transaction: an UPDATE by id
    of exactly the attributes start_in_create() set, held back to the
    COMMIT after that INSERT (the same hop; no other transaction can see
    the run before it commits, so nothing to compare and set)."""
    keys: tuple[str, ...] = inspect(run).info[_STARTED_KEYS]
    await core_rows.update_row(session, run, keys, write_behind=True)


async def write_held(session: AsyncSession, run: orm.Run, held: HeldMove, *, lease_owner: str) -> None:
    """Write a held move alone: the compare-and-set that cannot miss (on
    SQLite sent with the transaction's next statement)."""
    keys = tuple(held.values)
    params = {"run_id": run.id, "source": held.source, "lease_holder": lease_owner}
    params |= {f"set_{key}": value for key, value in held.values.items()}
    rowcount = await db.write_behind(session, _update(keys, False, True), params, _CANNOT_MISS)
    if rowcount not in (-1, 1):  # -1: held back (SQLite), the driver checks the count
        raise TransitionConflict(f"{run.id} is no longer {held.source}")


# The CTE of a move carried alone (carried_move()'s ``unchanged``): the
# statement's other writes are made only if it returns the run (core_rows'
# ``guard``; run_events' log insert names the same CTE in its SQL text).
MOVED_CTE = new_rows.GUARDED_CTE


@dataclass(frozen=True)
class CarriedMove:
    """carried_move()'s statement (built once per shape; it returns the
    run's id) and its bound values. ``alone``: a SELECT from the UPDATE as
    its first CTE (MOVED_CTE), whose other writes are made only if the run
    moves, so that a miss writes nothing even outside a transaction block
    (PostgreSQL's autocommit); else the UPDATE itself, whose CTEs write
    whatever it does (its transaction must then fail)."""

    statement: Update | Select[Any]
    params: dict[str, Any]
    alone: bool = False


@dataclass(frozen=True)
class HandedFrom:
    """The condition of a hand-off (a run this process's API has just
    created, reserved for its worker: run_execution.claim_handed's) for a
    move carried alone in place of the claim (PostgreSQL; issue 17: the
    run's start one statement, carried_handed_start's, or with an instant
    answer its whole worker side, carried_move's): the run still queued, never
    started, its lease free at ``now`` or still ``reserved_owner``'s
    reservation, the thread's messages before it still ``held_count``, each
    one of ``held_seqs`` (as the create noted them: one may be deleted
    meanwhile, and the answer is from those), and (as any move carried
    alone) its metadata unchanged."""

    reserved_owner: str
    now: float
    held_count: int
    held_seqs: list[int]


# carried_move()'s parameters are named as no column is: SQLAlchemy compiles
# an INSERT or UPDATE with a SET or VALUES entry for every parameter that
# names a column of its table, CTEs included (``run_id`` made each updated
# row of a turn, a message or a step, an UPDATE of its run_id to a value
# left unbound: the statement failed).
_CARRIED_RUN_ID = "carried_run_id"


@functools.lru_cache(maxsize=256)
def _carried(
    keys: tuple[str, ...], writes: tuple[Insert | Update, ...], unchanged: bool = False, handed: bool = False
) -> Update | Select[Any]:
    """The compare-and-set of carried_move() setting ``keys``, under the
    lease, with ``writes`` (core_rows.Write statements) as CTEs; with
    ``unchanged``, only if the run's metadata is still ``held_metadata``,
    and carried alone (CarriedMove.alone: ``writes`` guarded by MOVED_CTE);
    ``handed`` (with ``unchanged``): under HandedFrom's condition instead
    of the lease (the lease free at ``carried_now``, or the reservation
    ``carried_lease_holder``), the run never started, the thread's
    messages before it ``carried_held_count``, each one of
    ``carried_held_seqs``."""
    lease = RUNS.c.lease_owner == bindparam("carried_lease_holder")
    if handed:
        lease = and_(
            free_to_hand("carried_now", "carried_lease_holder"),
            earlier_unchanged("carried_held_count", "carried_held_seqs"),
        )
    statement = (
        update(RUNS)
        .where(RUNS.c.id == bindparam(_CARRIED_RUN_ID), RUNS.c.status == bindparam("carried_source"), lease)
        .values({RUN_COLUMNS[key]: bindparam(f"set_{key}") for key in keys})
        .returning(RUNS.c.id)
    )
    if unchanged:
        # As jsonb (json has no ``=``), and in the same key order: jsonb's
        # equality is blind to order, and a user who posted the same
        # metadata reordered must see the new order in the run's end event,
        # as on SQLite (whose ``json() = json()`` compares the text).
        # Metadata's values are strings: its top-level keys are all the
        # order there is.
        held = bindparam("held_metadata", type_=RUNS.c.metadata.type)
        stored_keys = func.array(select(func.json_object_keys(RUNS.c.metadata)).correlate(RUNS).scalar_subquery())
        held_keys = func.array(select(func.json_object_keys(held)).scalar_subquery())
        statement = statement.where(RUNS.c.metadata.cast(JSONB) == held.cast(JSONB), stored_keys == held_keys)
        moved = statement.cte(MOVED_CTE)
        # The move's CTE first: PostgreSQL's WITH names only what precedes.
        alone = select(moved.c.id).add_cte(moved)
        for index, write in enumerate(writes):
            alone = alone.add_cte(write.cte(f"alongside_{index}"))
        return alone
    for index, write in enumerate(writes):
        statement = statement.add_cte(write.cte(f"alongside_{index}"))
    return statement


def carried_move(
    run: orm.Run,
    to: str,
    *,
    held: HeldMove | None,
    lease_owner: str,
    alongside: Sequence[core_rows.Write] = (),
    unchanged: bool = False,
    handed: HandedFrom | None = None,
    **fields: Any,
) -> tuple[str, CarriedMove]:
    """transition() for a run whose status this transaction knows (the
    claim's, which holds its row, or after it with ``unchanged``: see
    below; PostgreSQL), as a statement for another
    to carry (the event log's insert, run_events.insert_carrying; issue 17:
    one round trip for the move, the turn's rows and the events). The
    compare-and-set and the lease are still in its WHERE, and it returns
    the run's id: no row back means it missed, and the transaction must
    fail. ``alongside``: rows written by the same statement (their
    parameters named apart: core_rows.Write; with ``unchanged``, guarded
    by MOVED_CTE). ``held``: the run's held
    first move, written by the same UPDATE. ``unchanged`` (a run whose row
    this transaction does not hold): the move also requires the run's
    metadata (the one column others change while it executes) to be as
    ``run`` has it, so that ``run`` is the row the move leaves, as a read
    would give it; and it is carried alone (CarriedMove.alone: a miss
    writes nothing, so the statement may be its own transaction). ``handed``
    (with ``unchanged`` and ``held``, the run's start): the move is a
    hand-off's, its compare-and-set HandedFrom's rather than the lease's
    (``lease_owner`` not asked for; a move out of the executor's hands
    leaves no lease). ``run``
    shows the move at once. Returns the event name and the move."""
    values = _values(run, to, fields)
    source = run.status
    if held is not None:
        source, values = held.source, {**held.values, **values}
    assert handed is None or (unchanged and held is not None), "a hand-off's move is carried alone, with its start"
    holder = lease_owner if handed is None else handed.reserved_owner
    carried = _carried_values(run.id, source, values, holder, alongside, unchanged, handed is not None)
    if handed is not None:
        _bind_handed(carried, handed)
    if unchanged:
        carried.params["held_metadata"] = run.metadata_
    _set_moved(run, values)
    return f"thread.run.{to}", carried


def carried_handed_start(run: orm.Run, held: HeldMove, handed: HandedFrom) -> CarriedMove:
    """A handed run's start alone (PostgreSQL; issue 17: a provider's run,
    whose answer is not instant): its held move to in_progress and the
    lease ``run`` shows (run_execution.handed_run's, its worker's), under
    ``handed``'s compare-and-set in place of the claim's, its metadata
    unchanged, as a statement for the events' insert to carry alone (a miss
    writes nothing: CarriedMove.alone). From then on the run is as a
    claimed one: its next moves are under its worker's lease."""
    values = {**held.values, "lease_owner": run.lease_owner, "lease_expires_at": run.lease_expires_at}
    carried = _carried_values(run.id, held.source, values, handed.reserved_owner, (), unchanged=True, handed=True)
    _bind_handed(carried, handed)
    carried.params["held_metadata"] = run.metadata_
    return carried


def _bind_handed(carried: CarriedMove, handed: HandedFrom) -> None:
    carried.params["carried_now"] = handed.now
    carried.params["carried_held_count"] = handed.held_count
    carried.params["carried_held_seqs"] = handed.held_seqs


def carried_held(run: orm.Run, held: HeldMove, *, lease_owner: str) -> CarriedMove:
    """write_held() as a statement for the event log's insert to carry
    (PostgreSQL, the claim's transaction: a run started there and not ended
    in it; issue 17: its start and its event in one round trip). As
    carried_move()'s, no row back means it missed."""
    return _carried_values(run.id, held.source, held.values, lease_owner, ())


def _carried_values(
    run_id: str,
    source: str,
    values: dict[str, Any],
    lease_owner: str,
    alongside: Sequence[core_rows.Write],
    unchanged: bool = False,
    handed: bool = False,
) -> CarriedMove:
    params: dict[str, Any] = {_CARRIED_RUN_ID: run_id, "carried_source": source, "carried_lease_holder": lease_owner}
    params |= {f"set_{key}": value for key, value in values.items()}
    for write in alongside:
        params |= write.params
    statement = _carried(tuple(values), tuple(write.statement for write in alongside), unchanged, handed)
    return CarriedMove(statement, params, alone=unchanged)


async def transition(
    session: AsyncSession,
    run: orm.Run,
    to: str,
    *,
    refresh: bool = False,
    locked: bool = False,
    lease_owner: str | None = None,
    held: HeldMove | None = None,
    unchanged: bool = False,
    reservation: Reservation | None = None,
    **fields: Any,
) -> str:
    """Move ``run`` to status ``to``; returns the event name to publish.
    With ``refresh`` the UPDATE also returns the whole row, so ``run`` is
    then as the database has it: a caller that did not read the run in this
    transaction still publishes it as it is. ``locked``: the caller read the
    run's status in this transaction, under the row's lock (the claim's
    UPDATE), so the compare-and-set cannot miss; on SQLite the UPDATE is
    then sent with the transaction's next statement (issue 17), and fails
    the transaction if it changed no row.
    ``lease_owner``: the executor making the move; the run moves only while
    that worker's lease is on it (a worker whose lease was taken over must
    not end the run its successor executes), else TransitionConflict. The
    API and the reaper move runs whoever holds the lease and pass None.
    ``held``: the run's held move (hold()), written by this UPDATE too (the
    compare-and-set is then from the status the database still has).
    ``unchanged`` (SQLite, not with ``refresh``: a run this transaction has
    not read): the move also requires the run's metadata (the one column
    others change while it executes) as ``run`` has it, so that ``run`` is
    the row the move leaves, as a read would give it; the UPDATE is sent
    with the COMMIT (issue 17: the end of an execution in one thread hop),
    and a miss fails the COMMIT with RunMoved (moved_elsewhere()), the
    whole transaction rolled back, rather than raise TransitionConflict.
    ``reservation``: a run moved back to queued is kept for that worker,
    as a create keeps a new run (run_execution.Reservation)."""
    source = run.status
    values = _values(run, to, fields)
    if reservation is not None:
        values.update(lease_owner=reservation.owner, lease_expires_at=reservation.until)
    if held is not None:
        source, values = held.source, {**held.values, **values}
    keys = tuple(values)
    params = {"run_id": run.id, "source": source, **{f"set_{key}": value for key, value in values.items()}}
    leased = lease_owner is not None
    if leased:
        params["lease_holder"] = lease_owner
    if unchanged:
        params["held_metadata"] = run.metadata_
    if session.new or session.dirty or session.deleted:
        await session.flush()  # what an ORM-enabled UPDATE would have flushed first
    assert not (unchanged and refresh), "an unchanged move is checked at the COMMIT"
    if refresh:
        row = (await session.execute(_update(keys, True, leased), params)).first()
        moved = 0 if row is None else 1
        if row is not None:
            _set(run, {key: row._mapping[column] for key, column in RUN_COLUMNS.items()})
    elif locked or unchanged:
        options = _UNLESS_MOVED if unchanged else _CANNOT_MISS
        rowcount = await db.write_behind(session, _update(keys, False, leased, unchanged), params, options)
        moved = 1 if rowcount < 0 else rowcount  # held back (SQLite): the driver checks the count
    else:
        moved = (await session.execute(_update(keys, False, leased), params)).rowcount  # type: ignore[attr-defined]
    if moved != 1:
        # On PostgreSQL the winner has committed (the UPDATE waited for its
        # row lock), so this read sees the status it left.
        current = await session.get(orm.Run, run.id, populate_existing=True)
        raise TransitionConflict(f"{run.id} is no longer {source}", current)
    _set_moved(run, values, whole_row=refresh)
    return f"thread.run.{to}"


T = TypeVar("T")

# Every retry follows a change someone else committed, and a run makes few
# moves before it ends (then rules answer 400 without a transition).
_ATTEMPTS = 10


async def apply(run: orm.Run, rule: Callable[[orm.Run], Awaitable[T]]) -> T:
    """Apply a request's ``rule`` to ``run``: the rule checks the status (an
    APIError if the request is not allowed in it) and transitions the run.

    When its transition loses a race (a worker started or ended the run, a
    second request got there first), the rule runs again against the run as
    it is now. So the rule must write nothing before its first transition;
    after it, on PostgreSQL the row stays locked by this transaction, and on
    SQLite no other writer runs until the commit.
    """
    for _ in range(_ATTEMPTS - 1):
        try:
            return await rule(run)
        except TransitionConflict as conflict:
            if conflict.current is None:
                raise errors.not_found("run", run.id) from conflict
            run = conflict.current
    return await rule(run)
