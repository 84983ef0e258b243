"""SQLite's grouped commits (issue 17): the transactions of held-back
writes alone that never connected (held_back.COLLECTED) and queue together
for a SQLite file's write lock, sent together in one hop, each in a
savepoint of its own, each told its own outcome.

Apart from app/db.py, which keeps engines, sessions, connections and the
write lock itself: this module builds on those (db.raw_write_connection,
db.HeldLock, db.give_back, db.seen_through) and db needs nothing of it.
Runtime.unit_of_work's commit of a collected unit comes here
(commit_collected_seen_through)."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import NamedTuple, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection

from app import db, held_back, sqlite_driver

T = TypeVar("T")


async def commit_collected(
    engine: AsyncEngine, statements: list[sqlite_driver.Statement], session: AsyncSession | None = None
) -> None:
    """A SQLite transaction that never connected (held_back.COLLECTED):
    its writes, between BEGIN IMMEDIATE and COMMIT, in one hop on a
    connection checked out of the pool raw, under the process's write lock
    as any transaction (issue 17: no Connection, SQLAlchemy transaction or
    greenlet but the checkout's), with the others that queued for the lock
    meanwhile (_Group). Rolled back whole if one of its writes fails, with
    the error SQLAlchemy would raise for it (an IntegrityError for a
    ROWCOUNT_MISMATCH, say). Cancelled before its hop is sent, it stops at
    once; after, it waits for the hop's outcome, as seen_through(), and,
    committed, notes it on ``session`` if given
    (db.committed_despite_cancellation())."""
    outcome, sending = _joined(engine, statements)
    if session is None:
        await db.seen_through(outcome, "a cancelled transaction's COMMIT", sending=sending, expected=db.routine_miss)
    else:
        await db.commit_noted_through(session, outcome, sending)


async def commit_collected_seen_through(session: AsyncSession, engine: AsyncEngine) -> None:
    """commit_collected() of the session's collected writes, noted on the
    session as db.commit_seen_through() notes a commit carried through a
    cancellation (db.committed_despite_cancellation())."""
    await commit_collected(engine, session.info.pop(db.COLLECTED), session)


class Withdrawn(RuntimeError):
    """A grouped end (Runtime.grouped_writes) taken out of its group before
    its hop was sent, by another append of its run (RunLog._withdraw_unlocked):
    nothing of it was written; its caller makes it again, as after a miss."""


async def commit_grouped(
    session: AsyncSession, engine: AsyncEngine, joined: Callable[[Callable[[], bool]], bool]
) -> None:
    """commit_collected_seen_through() of a grouped end (db.GROUPED): its
    collected writes in the open group, each withdrawable until its hop is
    sent (``joined``, RunLog.joined for the session, is given how; False:
    withdrawn already, Withdrawn raised, nothing sent)."""
    member = _Member(session.info.pop(db.COLLECTED), asyncio.get_running_loop().create_future(), db.Sending())
    if not joined(functools.partial(_withdraw, member.outcome, member.sending)):
        raise Withdrawn("withdrawn before joining its group")
    _join(engine, member)
    await db.commit_noted_through(session, member.outcome, member.sending, expected=_grouped_miss)


def _grouped_miss(error: BaseException) -> bool:
    """commit_grouped()'s ``expected`` (db.seen_through): a routine miss, or
    the end withdrawn by another append of its run (Withdrawn), which its
    caller makes again, are only noted when its caller was cancelled."""
    return isinstance(error, Withdrawn) or db.routine_miss(error)


def _withdraw(outcome: asyncio.Future[None], sending: db.Sending) -> bool:
    """A member taken out of its group while its hop is unsent (the group
    leaves out a member whose outcome is set), or after its hop if it
    failed there (its outcome set to the failure, the lock freed after,
    its task maybe not resumed yet to undo what it took): True, to be
    undone now (RunLog._withdraw_unlocked). False while its hop holds the
    lock, once it committed, and if its outcome is unknown (cancelled: the
    hop may have committed it)."""
    if sending.sent:
        return outcome.done() and not outcome.cancelled() and outcome.exception() is not None
    if not outcome.done():
        outcome.set_exception(Withdrawn("withdrawn from its group by another append of its run"))
    return True


# How many collected transactions one hop carries at most (_Group): more
# start a group of their own, queued behind it.
GROUP_AT_MOST = 32


class _Member(NamedTuple):
    """A collected transaction in a _Group: its writes, its outcome (set by
    the group; cancelled by its caller before the hop is sent: left out),
    and whether the hop carrying it was sent."""

    statements: list[sqlite_driver.Statement]
    outcome: asyncio.Future[None]
    sending: db.Sending


class _Group:
    """Collected transactions (commit_collected) that wait together for a
    SQLite file's write lock, then go in one hop: BEGIN IMMEDIATE, each in a
    savepoint of its own, COMMIT (sqlite_driver._commit_each; one alone
    goes as before, without a savepoint).

    Issue 17: with 16 clients the write lock, not the CPU, bounded the runs
    a second (bench/README.md, branch sqcreate, has the numbers); each
    create held it for its own hop and the turns of the event loop on
    either side of it (granted to a task that runs a turn later, freed a
    turn after its thread has committed). Creates that queue
    while a claim holds it now share one holding. A group opens when a
    collected transaction finds none open and takes in those that come
    until the lock is its own (or it is full); its task then checks no more
    in, leaves out those cancelled meanwhile (nothing of theirs was sent),
    and sends the others. Each learns its own outcome: a statement that
    fails (a DB-API error, or another such as a parameter SQLite cannot
    bind) rolls back its own transaction alone (to its savepoint); a
    failure of the whole hop (a lost connection: invalidated, 503; an
    error that ends SQLite's transaction; the COMMIT) fails them all, a
    DB-API error made again for each (_settle_all). A member cancelled
    after the hop is sent waits for its outcome up to
    db.COMMIT_OUTCOME_WAIT_SECONDS (db.seen_through), as a lone commit does.
    On SQLite only POST /threads/runs's create collects (carried moves
    collect only on PostgreSQL)."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: list[_Member] = []


class _Groups:
    """A SQLite file's groups: the one still taking members, if any, and the
    tasks of those not done yet, referenced until done (the loop keeps only
    weak references)."""

    __slots__ = ("open", "tasks")

    def __init__(self) -> None:
        self.open: _Group | None = None
        self.tasks: set[asyncio.Task[None]] = set()


# Each SQLite file engine's groups, by its write lock (db.writers_of).
_GROUPS: weakref.WeakKeyDictionary[db.SQLiteWriters, _Groups] = weakref.WeakKeyDictionary()


def _joined(engine: AsyncEngine, statements: list[sqlite_driver.Statement]) -> tuple[asyncio.Future[None], db.Sending]:
    """``statements`` (a collected transaction) in the engine's open _Group,
    or in a new one, whose task is started: its outcome and its Sending."""
    member = _Member(statements, asyncio.get_running_loop().create_future(), db.Sending())
    _join(engine, member)
    return member.outcome, member.sending


def _join(engine: AsyncEngine, member: _Member) -> None:
    """``member`` in the engine's open _Group, or in a new one, whose task is started."""
    writers = db.writers_of(engine)
    groups = _GROUPS.get(writers)
    if groups is None:
        groups = _GROUPS[writers] = _Groups()
    loop = asyncio.get_running_loop()
    group = groups.open
    if group is None or len(group.members) >= GROUP_AT_MOST:
        group = groups.open = _Group()
        task = loop.create_task(_send_group(engine, groups, group))
        groups.tasks.add(task)
        task.add_done_callback(functools.partial(_group_ended, groups, group, engine.sync_engine.dialect))
    group.members.append(member)


async def _send_group(engine: AsyncEngine, groups: _Groups, group: _Group) -> None:
    """_Group's task: a connection, then the write lock (db.raw_write_connection),
    then the members not cancelled meanwhile, in one hop; each member's
    outcome set. Its own failures are theirs: only a cancellation (a
    shutdown's) ends the task with more than its members' outcomes."""
    dialect = engine.sync_engine.dialect
    try:
        pooled, writers = await db.raw_write_connection(engine)
    except BaseException as error:  # the lock's timeout, a failed connect, a shutdown's cancellation
        _close(groups, group)
        _settle_all(group.members, error, dialect)
        if isinstance(error, Exception):
            return
        raise
    _close(groups, group)
    members = [member for member in group.members if not member.outcome.done()]
    for member in members:
        member.sending.sent = True
    held = db.HeldLock(writers)
    # In a task of its own: the group's task cancelled (a shutdown) while
    # the hop runs waits for its outcome (_waited_out) and tells each
    # member its own (a committed create reported "cancelled" would be
    # rolled back in the run log).
    hop = asyncio.ensure_future(_hop(pooled, members, held, dialect))
    try:
        _settle_each(members, await _waited_out(hop), dialect)
    except BaseException as error:
        if hop.done() and not hop.cancelled():
            outcome = hop.exception()
            if outcome is None:
                _settle_each(members, hop.result(), dialect)
            else:
                _settle_all(members, outcome, dialect)
        else:
            _settle_all(members, error, dialect)  # the hop itself cancelled (the loop torn down): its outcome unknown
        if not isinstance(error, Exception):
            raise
    finally:
        held.free()  # its transaction has ended, on the connection's thread (if not freed from there already)
        # Whatever went wrong above, no member is left waiting: its caller
        # (an HTTP request) would wait for good.
        _settle_all(members, _Unsettled("the group's hop ended without this transaction's outcome"), dialect)
        await db.give_back(engine, pooled)


async def _waited_out(hop: asyncio.Future[T]) -> T:
    """``hop``'s outcome, waited for to its end even if the group's task is
    cancelled meanwhile (a shutdown), that cancellation raised after. Not
    seen_through()'s COMMIT_OUTCOME_WAIT_SECONDS: stopping the hop would not
    end it sooner (its connection's invalidation waits for the thread, up to
    SQLite's busy timeout) and would leave every member's outcome unknown,
    creates that committed taken for rolled-back ones (review of sqfix)."""
    try:
        return await asyncio.shield(hop)
    except asyncio.CancelledError:
        while not hop.done():
            with suppress(asyncio.CancelledError):  # re-raised below, once the outcome is known
                await asyncio.wait({hop})
        raise


async def _hop(
    pooled: PoolProxiedConnection, members: list[_Member], held: db.HeldLock, dialect: Dialect
) -> list[Exception | None]:
    """_send_group's hop: the members' transactions, each one's failure
    (None: written); a failure of them all raised."""
    driver: object = pooled.dbapi_connection
    assert isinstance(driver, sqlite_driver.OneHopConnection)
    if len(members) == 1:
        hop = driver.commit_now("BEGIN IMMEDIATE", members[0].statements, held.free)
        await held_back.sent(hop, "COMMIT", None, dialect, pooled.invalidate)
        return [None]
    if not members:
        return []
    each = driver.commit_each("BEGIN IMMEDIATE", [member.statements for member in members], held.free)
    return await held_back.sent(each, "COMMIT", None, dialect, pooled.invalidate)


def _settle_each(members: list[_Member], failures: list[Exception | None], dialect: Dialect) -> None:
    """The hop's outcome, each member's own (``failures``, in order)."""
    for member, failure in zip(members, failures, strict=True):
        if member.outcome.done():
            # Its caller, cancelled during the hop, stopped waiting for
            # it (seen_through's COMMIT_OUTCOME_WAIT_SECONDS) and
            # cancelled its outcome: the others are still told theirs.
            continue
        if failure is None:
            member.outcome.set_result(None)
        else:
            member.outcome.set_exception(held_back.worded(failure, "COMMIT", None, dialect))


def _group_ended(groups: _Groups, group: _Group, dialect: Dialect, task: asyncio.Task[None]) -> None:
    """The group's task done, however: cancelled before its first step
    (a shutdown), _send_group never ran, so the group is closed here (else
    later creates would join it and wait for good) and its members told."""
    groups.tasks.discard(task)
    _close(groups, group)
    error = asyncio.CancelledError() if task.cancelled() else task.exception()
    _settle_all(
        group.members, error or _Unsettled("the group's task ended without this transaction's outcome"), dialect
    )


class _Unsettled(RuntimeError):
    """A group member whose outcome its group's task failed to set (a bug):
    failed rather than left waiting."""


def _close(groups: _Groups, group: _Group) -> None:
    """``group`` takes no more members: the next collected transaction opens another."""
    if groups.open is group:
        groups.open = None


def _settle_all(members: list[_Member], error: BaseException, dialect: Dialect) -> None:
    """The group's failure, the outcome of each of its ``members`` not
    settled yet (nor cancelled by its caller): a cancellation of the
    group's task before its hop is sent, or of the hop itself (the loop
    torn down: its outcome unknown), cancels them; a DB-API error is
    made again for each but the first (held_back.worded; one exception raised in several
    tasks would gather all their tracebacks); any other error (one that is
    not the driver's, a parameter SQLite cannot bind, say, raised by a lone
    member's hop) is set as it is."""
    first = True
    for member in members:
        if member.outcome.done():
            continue  # cancelled by its caller before the hop was sent
        if isinstance(error, asyncio.CancelledError):
            member.outcome.cancel()
        elif first or not isinstance(error, sa_exc.DBAPIError) or error.orig is None:
            member.outcome.set_exception(error)
        else:
            member.outcome.set_exception(
                held_back.worded(error.orig, error.statement, error.params, dialect, lost=error.connection_invalidated)
            )
        first = False
