"""The run engine's SQL: leases (claim, renew, release), what the reaper
looks for, and picking up a run whose worker died (issue 10).

A lease says which worker executes a run and until when. A run is
*claimable* when it is ``queued``, or ``in_progress`` with no live lease
(its worker died or shut down: it is resumed), and not past its deadline.
Nothing here changes a run's status: that is run_state.transition()'s job.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    BindParameter,
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    Update,
    all_,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from app import db, ids, orm, sqlite_driver
from app.services import common, core_rows, run_state
from app.wire import jsontext

# A queued run created by a process's API is reserved for that process's
# worker for a moment (issue 17, claim affinity): its lease_owner is this
# prefix and the worker's owner, its lease_expires_at when the reservation
# lapses. That worker claims it at once; any other claims it only once the
# reservation lapsed, as it would a lapsed lease (so a dead creator leaves
# nothing unclaimed). Not a lease: nobody executes the run yet.
RESERVED = "reserved:"


@dataclass(frozen=True)
class Reservation:
    owner: str  # RESERVED + the worker's owner
    until: float  # time.time() when other workers may claim the run
    # The worker's claims when it was taken (a claim counts the reservations
    # anew): a create refused before writing anything gives its slot back
    # only if no claim has come since (Worker.release).
    claims_before: int = 0


def reserved_for(owner: str) -> str:
    return RESERVED + owner


def is_reservation(lease_owner: str | None) -> bool:
    return lease_owner is not None and lease_owner.startswith(RESERVED)


def _lease_free(now: float | BindParameter[float]) -> ColumnElement[bool]:
    return or_(orm.Run.lease_expires_at.is_(None), orm.Run.lease_expires_at < now)


def _claimable_by_owner(dialect: str) -> ColumnElement[bool]:
    """Claimable, or queued and reserved for the claiming worker (however
    long the reservation still runs); bound: ``now``, ``now_seconds`` (its
    whole seconds) and ``reserved_owner``. Each branch of the OR tests the
    status, so that SQLite still reads the status index (an OR around the
    plain claimable test scanned the table). On PostgreSQL the statuses are
    written into the statement, not bound: its prepared claim then has a
    generic plan that reads the live runs' index (ux_runs_live_thread, whose
    predicate a bound status cannot imply; with bound statuses the generic
    plan scans the whole table), and PostgreSQL keeps that plan instead of
    planning each claim again (issue 17: planning was most of its CPU for
    the claim)."""
    now = bindparam("now", type_=Float)

    def status(value: str) -> ColumnElement[bool]:
        if dialect == "postgresql":
            return orm.Run.status == literal_column(f"'{value}'", String)
        return orm.Run.status == value

    queued = and_(status("queued"), or_(_lease_free(now), orm.Run.lease_owner == bindparam("reserved_owner")))
    resumable = and_(
        status("in_progress"),
        or_(orm.Run.expires_at.is_(None), orm.Run.expires_at > bindparam("now_seconds", type_=Integer)),
        _lease_free(now),
    )
    return or_(queued, resumable)


# A queued run's earlier messages come back with its claim only for a short
# thread: the database encodes them into one value while the claim holds its
# locks, and a prompt truncated to its last messages would not need the rest
# (a longer thread's prompt reads them as before, prompt.build).
PREFETCH_MOST_MESSAGES = 32


def _earlier_messages_column(dialect: str) -> ColumnElement[Any]:
    """For a claimed run that is queued (one the claim's transaction may
    start), the thread's last PREFETCH_MOST_MESSAGES + 1 messages before it
    as _EARLIER_MESSAGES selects them, as one JSON array of ``[seq, role,
    content]`` (in no set order; on SQLite each content as its stored text,
    decoded in Python as the column's own read does: SQLite's json() refuses
    what Python's JSON accepts, NaN, and one such message would fail every
    claim); NULL for any other run (issue 17: the first prompt's read goes
    with the claim, a round trip or a thread hop fewer). Written out:
    SQLite's compiler leaves the table's name off the columns of a
    RETURNING, and a subquery there would then compare the messages'
    columns with themselves."""
    where = "m.thread_id = runs.thread_id AND m.seq < runs.seq AND (m.run_id IS NULL OR m.run_id != runs.id)"
    sql = f"CASE WHEN runs.status = 'queued' THEN {_last_messages(dialect, where)} END"
    return type_coerce(literal_column(sql), JSON).label("earlier_messages")


def _last_messages(dialect: str, where: str) -> str:
    """A subquery: the last PREFETCH_MOST_MESSAGES + 1 messages ``where``
    selects (alias ``m``), as one JSON array of ``[seq, role, content]``
    (in no set order; decoded by _decoded)."""
    if dialect == "postgresql":
        aggregate = "json_agg(json_build_array(earlier.seq, earlier.role, earlier.content))"
    else:
        aggregate = "json_group_array(json_array(earlier.seq, earlier.role, earlier.content))"
    return (
        f"(SELECT {aggregate} FROM (SELECT m.seq, m.role, m.content FROM messages AS m "  # noqa: S608 (constants)
        f"WHERE {where} ORDER BY m.seq DESC LIMIT {PREFETCH_MOST_MESSAGES + 1}) AS earlier)"
    )


def thread_last_messages(dialect: str) -> ColumnElement[Any]:
    """The last messages of the thread a statement reads from ``threads``
    (thread_lock.with_column, thread_lock.locked_with_column), for a run
    about to be created on it: its create notes them (note_read) for a
    hand-off to this process's worker. On SQLite that transaction holds the
    write lock, so they are the thread's messages as the run is committed;
    on PostgreSQL the statement that reads them takes the thread's lock and
    may have waited for it with an older snapshot, so the run's insert
    requires them unchanged (runs._live_only_if). Either way the hand-off
    checks that they still are (claim_handed, hand_off_check). NULL for a
    thread longer than the prefetch, whose run is never handed: its messages
    are counted (an index scan of at most PREFETCH_MOST_MESSAGES + 1
    entries), not encoded into one value that note_read would throw away
    (issue 17: 0.4 ms a create at 40 messages of 2 KB, 2.9 ms at 20 KB)."""
    short = (
        "(SELECT count(*) FROM (SELECT 1 FROM messages AS c WHERE c.thread_id = threads.id "  # noqa: S608 (constants)
        f"LIMIT {PREFETCH_MOST_MESSAGES + 1}) AS counted) <= {PREFETCH_MOST_MESSAGES}"
    )
    sql = f"CASE WHEN {short} THEN {_last_messages(dialect, 'm.thread_id = threads.id')} END"
    return type_coerce(literal_column(sql), JSON).label("last_messages")


def _not_executing(dialect: str) -> ColumnElement[bool]:
    """Not one of the runs bound as ``executing``: one parameter however
    many there are (an array on PostgreSQL, a JSON array on SQLite; see
    _executing_parameter), so that the claim is one statement, prepared
    once per connection on PostgreSQL (an expanding NOT IN list is another
    statement for every length, each prepared again)."""
    if dialect == "postgresql":
        return run_state.RUNS.c.id != all_(bindparam("executing", type_=ARRAY(String)))
    listed: Select[tuple[Any]] = select(literal_column("value")).select_from(
        func.json_each(bindparam("executing", type_=String))
    )
    return run_state.RUNS.c.id.not_in(listed.scalar_subquery())


def _executing_parameter(dialect: str, executing: Collection[str]) -> list[str] | str:
    listed = sorted(executing)
    return listed if dialect == "postgresql" else json.dumps(listed)


def _build_claim(dialect: str, *, prefetch: bool) -> Update:
    """The claim, built once per dialect (issue 17: building it and its ORM
    RETURNING cost more CPU than running it); bound: _claimable_by_owner()'s
    values, ``executing``, ``limit``, ``owner`` and ``lease_until``; returns the claimed
    rows and, with ``prefetch``, each queued one's earlier messages
    (_earlier_messages_column; a claim whose caller only wants the ids
    leaves the database that work)."""
    # MATERIALIZED: chosen once. As a plain IN (subquery) PostgreSQL may
    # rescan it for each row it updates, and a rescan skips the rows this
    # statement has just updated and picks the next ones: a claim took more
    # runs than ``limit`` (issue 17).
    # ``executing``: the runs the claiming worker still executes. Its lease
    # on one may have lapsed (renewals slower than the lease, or failing
    # while the database was locked) with its execution still streaming; a
    # claim of its own would start a second execution under the same owner,
    # which no lease check tells apart from the first: the second's resume
    # deletes the first's message, and whichever ends the run leaves the
    # other's message in_progress. The first execution's renewer stamps the
    # lease again instead.
    candidates = (
        select(run_state.RUNS.c.id)
        .where(_claimable_by_owner(dialect), _not_executing(dialect))
        .order_by(run_state.RUNS.c.seq)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
        .cte("candidates")
        .prefix_with("MATERIALIZED")
    )
    claim = (
        update(run_state.RUNS)
        .where(run_state.RUNS.c.id.in_(select(candidates.c.id)), _claimable_by_owner(dialect))
        .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("lease_until", type_=Float))
    )
    if prefetch:
        return claim.returning(*run_state.RUNS.c, _earlier_messages_column(dialect))
    return claim.returning(run_state.RUNS.c.id)


# By (dialect, whether the claimed rows and their earlier messages come back).
_CLAIMS = {
    (dialect, prefetch): _build_claim(dialect, prefetch=prefetch)
    for dialect in ("postgresql", "sqlite")
    for prefetch in (True, False)
}


class EarlierMessage(NamedTuple):
    """A message of the thread from before a run, as its prompt takes it."""

    role: str
    content: list[dict[str, Any]]


# The earlier messages the claim returned with each run it claimed, until
# earlier_messages() takes them (once: a later prompt reads them again).
_PREFETCHED: weakref.WeakKeyDictionary[orm.Run, list[EarlierMessage]] = weakref.WeakKeyDictionary()


def _claim_parameters(
    dialect: str, owner: str, limit: int, lease_seconds: float, executing: Collection[str]
) -> dict[str, Any]:
    now = time.time()
    return {
        "now": now,
        "now_seconds": int(now),
        "reserved_owner": reserved_for(owner),
        "executing": _executing_parameter(dialect, executing),
        "limit": limit,
        "owner": owner,
        "lease_until": now + lease_seconds,
    }


async def claim(
    session: AsyncSession, owner: str, limit: int, lease_seconds: float, executing: Collection[str] = ()
) -> list[str]:
    """Stamp ``owner``'s lease on up to ``limit`` claimable runs, oldest first,
    none of ``executing`` (the runs ``owner`` still executes, whatever their
    lease says: see _build_claim).
    On PostgreSQL the candidates are locked with SKIP LOCKED, so concurrent
    workers pick different rows; on SQLite the single writer serialises
    claims, and the UPDATE re-checks the condition either way. Only the
    ids come back, in no set order (no rows, no earlier messages: see
    claim_runs)."""
    assert session.bind is not None
    dialect = session.bind.dialect.name
    parameters = _claim_parameters(dialect, owner, limit, lease_seconds, executing)
    return list((await session.scalars(_CLAIMS[dialect, False], parameters)).all())


async def claim_runs(
    session: AsyncSession, owner: str, limit: int, lease_seconds: float, executing: Collection[str] = ()
) -> list[orm.Run]:
    """claim(), returning the claimed runs (as the UPDATE left them, oldest
    first), so that the claim's transaction can start them without reading
    them again. They are detached instances, as if loaded by a session
    since closed: session.add() attaches one to another session as the row
    it is (never a new row to insert)."""
    assert session.bind is not None
    dialect = session.bind.dialect.name
    statement = _CLAIMS[dialect, True]
    parameters = _claim_parameters(dialect, owner, limit, lease_seconds, executing)
    # Straight to the driver without SQLAlchemy's execution and result
    # (issue 17): on SQLite with the transaction's BEGIN, in one hop; on
    # PostgreSQL through asyncpg's prepared statement.
    rows: Sequence[Mapping[Any, Any]] | None = await db.run_now(session, statement, parameters)
    if rows is None:
        rows = [row._mapping for row in await session.execute(statement, parameters)]
    runs = [_detached_run(row) for row in rows]
    return sorted(runs, key=lambda run: run.seq)  # RETURNING has no order; oldest first, as claimed


# The run's REAL columns (temperature, top_p, lease_expires_at).
_FLOAT_KEYS = tuple(
    key for key, column in run_state.RUN_COLUMNS.items() if isinstance(run_state.RUNS.c[column].type, Float)
)


def _as_floats(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each REAL column's number a float, as a SELECT reads
    it. SQLite's RETURNING gives a whole value stored in a REAL column as an
    integer (temperature 1, where a SELECT and PostgreSQL give 1.0), and a
    claimed run sent the provider ``"temperature": 1`` where the same run
    handed sent ``1.0``: another request body (a cassette's recording
    missed, app/cassettes.py) and another run object in its events."""
    for key in _FLOAT_KEYS:
        value = values[key]
        if value is not None and type(value) is not float:
            values[key] = float(value)
    return values


def _detached_run(row: Mapping[Any, Any]) -> orm.Run:
    # A record (core_rows.record: none of the mapped constructor's attribute
    # events, issue 17), then detached as a loaded row would be: its values
    # are its committed state, a change made later is tracked as usual.
    values = _as_floats({key: row[column] for key, column in run_state.RUN_COLUMNS.items()})
    run = core_rows.record(orm.Run, **values)
    make_transient_to_detached(run)
    earlier: list[list[Any]] | None = row["earlier_messages"]
    # (PostgreSQL's json_agg of no rows is NULL.) A longer thread's are read by its prompt.
    if run.status == "queued" and len(earlier or []) <= PREFETCH_MOST_MESSAGES:
        _PREFETCHED[run] = [message for _seq, message in _decoded(earlier)]
    return run


def _decoded(aggregated: list[list[Any]] | None) -> list[tuple[int, EarlierMessage]]:
    """_last_messages()'s array, oldest first, each with its seq."""
    return [
        (seq, EarlierMessage(role, json.loads(content) if isinstance(content, str) else content))
        for seq, role, content in sorted(aggregated or [], key=lambda m: m[0])
    ]


@dataclass(frozen=True)
class _Earlier:
    """A created run's earlier messages, and what its hand-off's
    compare-and-set requires of them still (claim_handed)."""

    messages: list[EarlierMessage]
    seqs: list[int]  # theirs, in the same order


# A run this process's API created for its own worker, handed to it with
# its row (issue 17: no wake, tick or claim statement; execute.hand_off):
# the thread's messages from before it, as the create made or read them,
# by the create's run object, until the hand-off takes them.
_CREATED_EARLIER: weakref.WeakKeyDictionary[orm.Run, _Earlier] = weakref.WeakKeyDictionary()


def note_earlier(run: orm.Run, messages: Sequence[orm.Message]) -> None:
    """Note the thread's messages before ``run``, just created with them
    (a new thread's): the run may then be handed to this process's worker
    with its row (handable). A thread longer than the claim's prefetch is
    not noted: its prompt reads (and truncates) its messages, which the
    hand-off's transaction does not."""
    _note(run, [(message.seq, EarlierMessage(message.role, message.content)) for message in messages])


def note_read(run: orm.Run, read: list[list[Any]] | None, added: Sequence[orm.Message]) -> list[int] | None:
    """note_earlier() for a run created on an existing thread: the thread's
    last messages as its create read them (thread_last_messages, in the
    create's transaction), then ``added``, the create's own (its
    additional_messages). Only those before the run count, as its claim's
    prefetch takes them (a message of another process may have a later seq).
    Returns the seqs of the read ones noted (what PostgreSQL's insert of
    the run requires unchanged); None read, the thread longer than the
    prefetch, nothing is noted and None returned."""
    if read is None or len(read) + len(added) > PREFETCH_MOST_MESSAGES:
        return None  # (before the contents are decoded: a run not handed)
    decoded = [(seq, message) for seq, message in _decoded(read) if seq < run.seq]
    own = [(message.seq, EarlierMessage(message.role, message.content)) for message in added if message.seq < run.seq]
    _note(run, [*decoded, *own])
    return [seq for seq, _message in decoded]


def _note(run: orm.Run, messages: list[tuple[int, EarlierMessage]]) -> None:
    if len(messages) <= PREFETCH_MOST_MESSAGES:
        ordered = sorted(messages, key=lambda message: message[0])
        seqs = [seq for seq, _message in ordered]
        _CREATED_EARLIER[run] = _Earlier([message for _seq, message in ordered], seqs)


# A resumed run's earlier messages, the thread's last before it, newest
# first: one more than the prefetch takes, to tell a longer thread.
_LAST_EARLIER_MESSAGES = (
    select(orm.Message.seq, orm.Message.role, orm.Message.content)
    .where(orm.Message.thread_id == bindparam("thread_id"), orm.Message.seq < bindparam("run_seq"))
    .order_by(orm.Message.seq.desc())
    .limit(PREFETCH_MOST_MESSAGES + 1)
)


async def note_resumed(reader: AsyncSession, run: orm.Run) -> bool:
    """note_earlier() for ``run`` queued again by its tool outputs (a
    hand-back, execute.hand_off: the submit read none of its thread's
    messages), from ``reader`` (a WAL reader: the hand-off's compare-and-set
    requires at its COMMIT that they are still these); False, nothing
    noted, for a thread longer than the claim's prefetch."""
    params = {"thread_id": run.thread_id, "run_seq": run.seq}
    rows = (await reader.execute(_LAST_EARLIER_MESSAGES, params)).all()
    _note(run, [(row.seq, EarlierMessage(row.role, row.content)) for row in rows])  # (not noted: a longer thread)
    return handable(run)


def handable(run: orm.Run) -> bool:
    """Whether ``run`` (as its create made it) may be handed to this
    process's worker with its row: its earlier messages are known."""
    return run in _CREATED_EARLIER


class HandOffLost(sqlite_driver.RoutineMismatch):
    """A hand-off's compare-and-set (claim_handed) changed no row at the
    COMMIT: the run was no longer claimable by the worker it was reserved
    for, as created (claimed by a tick, cancelled, its metadata changed,
    reaped). The whole transaction rolled back: the run is claimed as any
    other, if it still is claimable."""


def hand_off_lost(error: BaseException) -> bool:
    """Whether ``error`` (from the hand-off's COMMIT) is its compare-and-set's miss."""
    return sqlite_driver.raised_within(error, HandOffLost)


def _build_hand_off(*, resumed: bool = False) -> Update:
    """The claim's lease stamp for one run still queued as created: its
    status queued, never started (a run back to queued after its tool
    outputs has a start time: run_state sets it at the first in_progress;
    ``resumed``, such a run, queued again by this process's API: started),
    its lease free or still the reservation (the claim's condition for a
    queued run; not its resumable branch, a run another worker has started
    since), its metadata unchanged since the create
    (the one column others change on a queued run), so that the row the
    hand-off goes on with is the run's as a claim would return it; and the
    thread's messages before it still those the create noted, so that its
    prompt is the one a claim's prefetch would give: as many, each of them
    one of the noted seqs (one may be deleted meanwhile, or added behind the
    API's back: as many, the same last, another in between), in one scan of
    the thread's index (seqs are unique: a message's id encodes its seq).
    Bound: ``run_id``, ``now``, ``reserved_owner``, ``held_metadata``,
    ``held_count``, ``held_seqs`` (a JSON array), ``owner``,
    ``lease_until``."""
    runs = run_state.RUNS
    held = bindparam("held_metadata", type_=runs.c.metadata.type)
    earlier = and_(_MESSAGES.thread_id == runs.c.thread_id, _MESSAGES.seq < runs.c.seq)
    noted: Select[tuple[Any]] = select(literal_column("value")).select_from(
        func.json_each(bindparam("held_seqs", type_=String))
    )
    counts = select(func.count(), func.count(case((_MESSAGES.seq.in_(noted.scalar_subquery()), 1)))).where(earlier)
    held_count = bindparam("held_count", type_=Integer)
    return (
        update(runs)
        .where(runs.c.id == bindparam("run_id"), runs.c.status == "queued")
        .where(run_state.free_to_hand("now", "reserved_owner", resumed=resumed))
        .where(func.json(runs.c.metadata) == func.json(held))
        .where(counts.scalar_subquery() == tuple_(held_count, held_count))
        .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("lease_until", type_=Float))
    )


_MESSAGES = orm.Message.__table__.c


_HAND_OFF = _build_hand_off()
_HAND_BACK = _build_hand_off(resumed=True)
# Held back to the COMMIT, which fails whole (HandOffLost) if it changes no row.
_HAND_OFF_OPTIONS = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1, db.ROWCOUNT_MISMATCH: HandOffLost}


async def claim_handed(session: AsyncSession, created: orm.Run, owner: str, lease_seconds: float) -> orm.Run:
    """The claim of one run this process's API has just created (or queued
    again with its tool outputs: a hand-back, _HAND_BACK), reserved
    for ``owner`` (SQLite): its compare-and-set, held back to the
    transaction's COMMIT (sent first there, before the writes that follow
    it: a miss fails the COMMIT with HandOffLost, the whole transaction
    rolled back), and the run as the claim leaves it, from the create's own
    values (a detached instance with its earlier messages, as claim_runs
    gives one). The transaction holds SQLite's write lock from its BEGIN on,
    so the rows it writes after the stamp see the run as stamped."""
    now = time.time()
    lease_until = now + lease_seconds
    earlier = _CREATED_EARLIER[created]  # (handable)
    parameters = {
        "now": now,
        "reserved_owner": reserved_for(owner),
        "run_id": created.id,
        "held_metadata": created.metadata_,
        "held_count": len(earlier.seqs),
        "held_seqs": json.dumps(earlier.seqs),
        "owner": owner,
        "lease_until": lease_until,
    }
    statement = _HAND_OFF if created.started_at is None else _HAND_BACK
    await db.write_behind(session, statement, parameters, _HAND_OFF_OPTIONS)
    return handed_run(created, owner, lease_until)


def handed_run(created: orm.Run, owner: str, lease_until: float) -> orm.Run:
    """``created`` as a hand-off's claim leaves it (claim_handed's, or on
    PostgreSQL the one statement that claims and starts it and, with an
    instant answer, ends it: hand_off_check):
    a detached instance with ``owner``'s lease and its earlier messages, as
    claim_runs gives one, value for value: its JSON values as stored and
    read back (both databases keep the text as written, its keys' order and
    its numbers: migration 0016_pgjson; the offline model's answer to a
    json_schema follows its properties' order; a provider is sent the
    request these values serialise to; a cassette is keyed by the values,
    their numbers' types among them, app/cassettes.py)."""
    values = _as_floats({key: created.__dict__.get(key) for key in run_state.RUN_COLUMNS})
    values.update(lease_owner=owner, lease_expires_at=lease_until)
    for key in _JSON_KEYS:
        if isinstance(values[key], dict | list) and values[key]:
            # As written and read back (db.JSON_CODEC): NaN, which the API
            # takes in a function's parameters, is null to a claimed run (a
            # string, a number or an empty container reads back as it is).
            values[key] = jsontext.loads(jsontext.dumps(values[key]))
    run = core_rows.record(orm.Run, **values)
    make_transient_to_detached(run)
    earlier = _CREATED_EARLIER.get(created)
    if earlier is not None:
        _PREFETCHED[run] = list(earlier.messages)
    return run


# The run's JSON columns (orm.JSONType).
_JSON_KEYS = tuple(
    key for key, column in run_state.RUN_COLUMNS.items() if isinstance(run_state.RUNS.c[column].type, JSON)
)


def hand_off_check(created: orm.Run, owner: str) -> run_state.HandedFrom:
    """_build_hand_off's condition for ``owner``'s hand-off of ``created``
    (handable), now, for the statement that starts a handed run on
    PostgreSQL in place of its claim (and, with an instant answer, ends it:
    run_state.carried_move's ``handed``, else carried_handed_start's): its
    earlier messages as the create noted them."""
    earlier = _CREATED_EARLIER[created]
    return run_state.HandedFrom(reserved_for(owner), time.time(), len(earlier.seqs), list(earlier.seqs))


async def renew(session: AsyncSession, owner: str, run_ids: list[str], lease_seconds: float) -> list[str]:
    """Extend ``owner``'s leases on ``run_ids`` (one statement for all);
    returns the runs whose lease ``owner`` still held."""
    if not run_ids:
        return []
    statement = (
        update(orm.Run)
        .where(common.one_of(session, orm.Run.id, run_ids), orm.Run.lease_owner == owner)
        .values(lease_expires_at=time.time() + lease_seconds)
        .returning(orm.Run.id)
        .execution_options(synchronize_session=False)
    )
    return list((await session.scalars(statement)).all())


async def taken_over(session: AsyncSession, owner: str, run_ids: list[str]) -> list[str]:
    """Those of ``run_ids`` another worker now executes (``owner``'s lease
    lapsed and the run was claimed again): ``owner`` must stop working on
    them. A run whose lease was cleared because it left the executor's hands
    (requires_action, a final status) or was released is not taken over."""
    if not run_ids:
        return []
    query = select(orm.Run.id).where(
        common.one_of(session, orm.Run.id, run_ids), orm.Run.lease_owner.is_not(None), orm.Run.lease_owner != owner
    )
    return list((await session.scalars(query)).all())


async def release(session: AsyncSession, owner: str, run_ids: list[str] | None = None) -> list[str]:
    """Give up ``owner``'s leases (all of them, or those on ``run_ids``) so
    another worker resumes the runs at once; returns the runs released."""
    statement = update(orm.Run).where(orm.Run.lease_owner == owner)
    if run_ids is not None:
        statement = statement.where(common.one_of(session, orm.Run.id, run_ids))
    statement = statement.values(lease_owner=None, lease_expires_at=None).returning(orm.Run.id)
    return list((await session.scalars(statement.execution_options(synchronize_session=False))).all())


@dataclass
class ReapCandidates:
    """Runs the reaper must end, each locked for this transaction."""

    # cancelling, and nobody executes it any more: it becomes cancelled.
    abandoned_cancels: list[orm.Run]
    # in_progress, its worker gone, and too late to resume: it fails.
    unresumable: list[orm.Run]
    # past expires_at while queued, requires_action or executing: it expires.
    overdue: list[orm.Run]


def _reap_query(*conditions: ColumnElement[bool]) -> Select[orm.Run]:
    return select(orm.Run).where(*conditions).order_by(orm.Run.seq).with_for_update(skip_locked=True)


# The reaper's three reads, built once (issue 17: built on each of the
# worker's reaps, once a poll interval, they took about 0.8 ms of loop time
# a reap); bound: ``now`` and ``now_seconds`` (its whole seconds,
# expires_at's unit).
_NOW = bindparam("now", type_=Float)
_DEADLINE_PASSED = and_(orm.Run.expires_at.is_not(None), orm.Run.expires_at <= bindparam("now_seconds", type_=Integer))
_ABANDONED_CANCELS = _reap_query(orm.Run.status == "cancelling", _lease_free(_NOW))
_UNRESUMABLE = _reap_query(orm.Run.status == "in_progress", _lease_free(_NOW), _DEADLINE_PASSED)
_OVERDUE = _reap_query(
    _DEADLINE_PASSED,
    or_(
        orm.Run.status == "requires_action",
        # a queued run just claimed is left to its executor, which starts
        # it or finds it expired; an executing one is stopped here
        and_(orm.Run.status == "queued", _lease_free(_NOW)),
        and_(orm.Run.status == "in_progress", orm.Run.lease_expires_at >= _NOW),
    ),
)


async def reap_candidates(session: AsyncSession) -> ReapCandidates:
    now = time.time()
    params = {"now": now, "now_seconds": int(now)}

    async def rows(query: Select[orm.Run]) -> list[orm.Run]:
        return list((await session.scalars(query, params)).all())

    return ReapCandidates(
        abandoned_cancels=await rows(_ABANDONED_CANCELS),
        unresumable=await rows(_UNRESUMABLE),
        overdue=await rows(_OVERDUE),
    )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def resume_point(session: AsyncSession, run: orm.Run) -> Usage:
    """Prepare an ``in_progress`` run whose worker died for another worker.

    What the run committed up to its last finished tool round stays; the rows
    of the model call that was interrupted (its open message and steps, and a
    message closed before a tool call in that same call) are removed, since
    that call is issued again and would otherwise be answered twice. Returns
    the usage of what stays (each finished model call recorded its usage on
    its step)."""
    boundary = await session.scalar(
        select(func.max(orm.RunStep.seq)).where(
            orm.RunStep.run_id == run.id, orm.RunStep.type == "tool_calls", orm.RunStep.status == "completed"
        )
    )
    after = boundary or 0
    await session.execute(delete(orm.RunStep).where(orm.RunStep.run_id == run.id, orm.RunStep.seq > after))
    await session.execute(
        delete(orm.Message).where(
            orm.Message.thread_id == run.thread_id, orm.Message.run_id == run.id, orm.Message.seq > after
        )
    )
    prompt_tokens = completion_tokens = 0
    for usage in (await session.scalars(select(orm.RunStep.usage).where(orm.RunStep.run_id == run.id))).all():
        if usage:
            prompt_tokens += int(usage.get("prompt_tokens", 0))
            completion_tokens += int(usage.get("completion_tokens", 0))
    return Usage(prompt_tokens, completion_tokens)


# What a prompt takes from each earlier message, as a prebuilt Core SELECT:
# no ORM object per message of the thread's history on every model call
# (issue 17).
_EARLIER_MESSAGES = (
    select(_MESSAGES.role, _MESSAGES.content)
    .where(_MESSAGES.thread_id == bindparam("thread_id"), _MESSAGES.seq < bindparam("run_seq"))
    .where(or_(_MESSAGES.run_id.is_(None), _MESSAGES.run_id != bindparam("run_id")))
    .order_by(_MESSAGES.seq)
)


async def earlier_messages(session: AsyncSession, run: orm.Run) -> Sequence[EarlierMessage]:
    """The thread's messages from before ``run``, oldest first (its prompt's
    history): their ``role`` and ``content``. Read by the claim in the same
    transaction when ``run`` was claimed queued (claim_runs)."""
    prefetched = _PREFETCHED.pop(run, None)
    if prefetched is not None:
        return prefetched
    # additional_messages are inserted just before the run row, so seq < run.seq holds for them too.
    params = {"thread_id": run.thread_id, "run_seq": run.seq, "run_id": run.id}
    return [EarlierMessage(row.role, row.content) for row in await session.execute(_EARLIER_MESSAGES, params)]


def is_past_deadline(run: orm.Run) -> bool:
    return run.expires_at is not None and run.expires_at <= ids.now()
