"""app/sqlite_groups.py's groups of collected transactions (issue 17): SQLite
transactions of held-back writes alone that queue for the write lock
together go in one hop, each in a savepoint of its own, and each learns its
own outcome: a failing write undoes its own transaction alone, a member
cancelled before the hop is left out, one cancelled during it waits for it,
and a lost connection fails them all, invalidated. SQLite-only by nature
(a unit collects only on a SQLite file); on both loops, the server's among
them, since cancellations and the order of waiters matter here."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db, sqlite_driver, sqlite_groups
from app.api.handlers import unexpected_error

pytestmark = [pytest.mark.timeout(30), pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'groups.db'}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE t (v TEXT PRIMARY KEY)"))
    yield engine
    await engine.dispose()


def _groups(engine: AsyncEngine) -> sqlite_groups._Groups:
    """The engine's groups: the one taking members, and their tasks."""
    return sqlite_groups._GROUPS[db.writers_of(engine)]


def _insert(value: str) -> sqlite_driver.Statement:
    return sqlite_driver.Statement("INSERT INTO t VALUES (?)", (value,), False)


async def _stored(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return list((await connection.execute(text("SELECT v FROM t ORDER BY rowid"))).scalars())


async def _ticks(count: int = 20) -> None:
    """Turns of the event loop (no wall-clock wait): tasks blocked on
    asyncio futures alone (the write lock, a group's outcome) get there."""
    for _ in range(count):
        await asyncio.sleep(0)


@asynccontextmanager
async def _queued(
    engine: AsyncEngine, *transactions: list[sqlite_driver.Statement]
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """A commit_collected() task per transaction, started while the write
    lock is held and given turns of the loop to join their group; the lock
    freed on leaving (the group's hop then goes)."""
    writers = db._WRITERS[engine.sync_engine]
    await writers.hold()
    try:
        tasks = [asyncio.create_task(sqlite_groups.commit_collected(engine, statements)) for statements in transactions]
        await _ticks()
        yield tasks
    finally:
        writers.free()


async def _queued_then_freed(
    engine: AsyncEngine, *transactions: list[sqlite_driver.Statement]
) -> list[asyncio.Task[None]]:
    """_queued(), the lock freed at once."""
    async with _queued(engine, *transactions) as tasks:
        return tasks


@asynccontextmanager
async def _sent_behind_another_process(
    engine: AsyncEngine, path: Path, values: str
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """A member per value, their group's hop sent and waiting on the
    connection's thread (its BEGIN IMMEDIATE) for another process's SQLite
    lock, which is freed on leaving: the hop then goes on."""
    writers = db._WRITERS[engine.sync_engine]
    holder = sqlite3.connect(str(path), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        members = await _queued_then_freed(engine, *([_insert(value)] for value in values))
        await _ticks()
        assert writers._lock._held and _groups(engine).open is None, "the hop is sent"
        yield members
    finally:
        holder.close()


async def _written_though_the_group_was_cancelled(
    engine: AsyncEngine, members: list[asyncio.Task[None]], group_task: asyncio.Task[None]
) -> None:
    """Each member told it was written, both stored, the group's task ended cancelled."""
    async with asyncio.timeout(10):
        await asyncio.gather(*members)
    async with asyncio.timeout(10):
        await asyncio.wait({group_task})
    assert group_task.cancelled()
    assert await _stored(engine) == ["a", "b"]


def _counting_hops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the groups sent in one hop of several transactions."""
    sizes: list[int] = []
    each: Callable[..., Any] = sqlite_driver._commit_each

    def counted(
        connection: sqlite3.Connection, begin: str, transactions: list[list[sqlite_driver.Statement]], told: Any
    ) -> Any:
        sizes.append(len(transactions))
        return each(connection, begin, transactions, told)

    monkeypatch.setattr(sqlite_driver, "_commit_each", counted)
    return sizes


async def test_transactions_queued_for_the_lock_go_in_one_hop_a_failing_one_undone_alone(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three collected transactions queue while the write lock is held: one
    hop carries them; the second's last write breaks a constraint, which
    undoes its first write too and fails it alone, with SQLAlchemy's error
    for it; the others are written."""
    sizes = _counting_hops(monkeypatch)
    queued = _queued(engine, [_insert("a")], [_insert("b"), _insert("a")], [_insert("c"), _insert("d")])
    async with queued as (first, failing, third):
        group = _groups(engine).open
        assert group is not None and len(group.members) == 3
    async with asyncio.timeout(10):
        await asyncio.wait({first, failing, third})
    assert first.exception() is None and third.exception() is None
    assert isinstance(failing.exception(), IntegrityError)
    assert sizes == [3]
    assert await _stored(engine) == ["a", "c", "d"]
    assert _groups(engine).open is None and engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_parameter_that_cannot_be_bound_fails_its_own_transaction_alone(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write whose parameter SQLite cannot bind (an int beyond 64 bits:
    OverflowError, no sqlite3.Error) fails its own transaction alone, with
    that error as it would alone; the others in its hop are written (before
    the fix: all failed with it, answered 500)."""
    sizes = _counting_hops(monkeypatch)
    unbindable = sqlite_driver.Statement("INSERT INTO t VALUES (?)", (2**63,), False)
    first, failing, third = await _queued_then_freed(engine, [_insert("a")], [_insert("b"), unbindable], [_insert("c")])
    async with asyncio.timeout(10):
        await asyncio.wait({first, failing, third})
    assert first.exception() is None and third.exception() is None
    assert isinstance(failing.exception(), OverflowError)
    assert sizes == [3]
    assert await _stored(engine) == ["a", "c"]


async def test_a_held_back_check_that_misses_fails_its_own_transaction_alone(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compare-and-set held back with EXPECT_ROWCOUNT (and its
    ROWCOUNT_MISMATCH kind) that misses inside a group: its own transaction
    fails with that kind as the error's ``orig``, as it would alone."""
    sizes = _counting_hops(monkeypatch)
    missing = sqlite_driver.Statement(
        "UPDATE t SET v = 'x' WHERE v = 'none'", None, False, None, 1, sqlite_driver.RoutineMismatch
    )
    written, missed = await _queued_then_freed(engine, [_insert("a")], [_insert("b"), missing])
    async with asyncio.timeout(10):
        await asyncio.wait({written, missed})
    error = missed.exception()
    assert isinstance(error, IntegrityError) and isinstance(error.orig, sqlite_driver.RoutineMismatch)
    assert written.exception() is None
    assert sizes == [2]
    assert await _stored(engine) == ["a"]


async def test_a_transaction_cancelled_before_its_hop_is_left_out_at_once(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its group waits for the lock, a transaction ends at
    once (not once the lock comes) and the hop carries the others alone."""
    sizes = _counting_hops(monkeypatch)
    async with _queued(engine, [_insert("a")], [_insert("c")], [_insert("b")]) as (first, third, cancelled):
        cancelled.cancel()
        done, _pending = await asyncio.wait({cancelled}, timeout=2)  # the lock is still held
        assert done == {cancelled} and cancelled.cancelled()
    async with asyncio.timeout(10):
        await asyncio.gather(first, third)
    assert sizes == [2]
    assert await _stored(engine) == ["a", "c"]


async def test_a_transaction_cancelled_during_its_hop_waits_for_it_and_is_written(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """Cancelled once its group's hop is sent (its BEGIN IMMEDIATE waiting
    on the connection's thread for another process's lock), a transaction
    waits for the hop's outcome before its cancellation ends it, and is
    written with the others, as a lone one's seen-through commit is."""
    async with _sent_behind_another_process(engine, tmp_path / "groups.db", "ab") as (cancelled, other):
        cancelled.cancel()
        await _ticks()
        assert not cancelled.done(), "it waits for the hop"
    async with asyncio.timeout(10):
        await asyncio.wait({cancelled, other})
    assert cancelled.cancelled() and other.exception() is None
    assert await _stored(engine) == ["a", "b"]


async def test_a_connection_lost_under_a_group_fails_each_member_invalidated(engine: AsyncEngine) -> None:
    """The group's connection closed under it: every member fails with an
    error of its own saying the connection was invalidated (answered 503),
    and the broken connection does not go back to the pool."""
    pooled = await engine.raw_connection()
    await pooled.dbapi_connection._connection.close()  # type: ignore[union-attr]
    pooled.close()  # back in the pool, handed out next (LIFO)
    members = await _queued_then_freed(engine, [_insert("a")], [_insert("b")])
    async with asyncio.timeout(10):
        await asyncio.wait(members)
    errors = [member.exception() for member in members]
    for error in errors:
        assert isinstance(error, DBAPIError) and error.connection_invalidated
        assert unexpected_error(error).status == 503
    assert errors[0] is not errors[1]
    await sqlite_groups.commit_collected(engine, [_insert("c")])  # no broken connection handed out
    assert await _stored(engine) == ["c"]


async def test_a_group_takes_group_at_most_members_and_the_next_one_the_rest(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group takes GROUP_AT_MOST members at most: a transaction that
    finds it full opens the next group, sent after it."""
    monkeypatch.setattr(sqlite_groups, "GROUP_AT_MOST", 2)
    sizes = _counting_hops(monkeypatch)
    tasks = await _queued_then_freed(engine, *([_insert(value)] for value in "abc"))
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert sorted(sizes) == [2]  # "c", a group of one, went without savepoints
    assert await _stored(engine) == ["a", "b", "c"]


async def test_the_lock_is_handed_on_once_the_thread_has_committed(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's and a raw transaction's write lock goes to the next writer
    as soon as the connection's thread has committed: that writer runs
    before the committing task has resumed (the group's connection still
    checked out; the raw transaction's commit() not yet returned), not a
    turn of the loop after it. (A lone process's COMMIT runs on the loop's
    thread instead, and frees the lock as it returns: not this path.)"""
    monkeypatch.setattr(sqlite_driver, "COMMITS_ON_LOOP", False)
    writers = db._WRITERS[engine.sync_engine]
    pool: Any = engine.sync_engine.pool
    seen: list[Any] = []
    returned: list[bool] = []

    async def next_writer(what: Callable[[], Any]) -> None:
        await writers.hold()
        seen.append(what())
        writers.free()

    async with _queued(engine, [_insert("a")]) as (group,):
        waiter = asyncio.create_task(next_writer(pool.checkedout))
        await _ticks()
    async with asyncio.timeout(10):
        await asyncio.gather(group, waiter)
    assert seen == [1], "the next writer ran while the group still held its connection"

    raw = await db.RawTransaction.begin(engine)
    raw.driver.held_back.append(_insert("b"))
    waiter = asyncio.create_task(next_writer(lambda: list(returned)))
    await _ticks()
    maker = db.create_sessionmaker(engine)
    async with maker() as session:
        await raw.commit(session, seen_through=False)
    returned.append(True)
    await raw.end()
    async with asyncio.timeout(10):
        await waiter
    assert seen == [1, []], "the next writer ran before the raw transaction's commit() returned"
    assert await _stored(engine) == ["a", "b"]


async def test_a_member_abandoned_during_its_hop_leaves_the_others_told(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member cancelled once its group's hop is sent stops waiting for it
    after COMMIT_OUTCOME_WAIT_SECONDS (its outcome cancelled); when the hop
    then commits, the members after it still learn theirs (before the fix
    they waited for good: their requests hung, though committed)."""
    monkeypatch.setattr(db, "COMMIT_OUTCOME_WAIT_SECONDS", 0.2)
    writers = db._WRITERS[engine.sync_engine]
    async with _sent_behind_another_process(engine, tmp_path / "groups.db", "ab") as (abandoned, other):
        abandoned.cancel()
        async with asyncio.timeout(5):
            await asyncio.wait({abandoned})
        assert abandoned.cancelled() and not other.done()
    async with asyncio.timeout(10):
        await other
    assert await _stored(engine) == ["a", "b"]
    async with asyncio.timeout(10):
        await writers.hold()  # the lock was freed
    writers.free()


async def test_a_cancelled_raw_commit_holds_the_lock_until_its_thread_has_finished(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """A raw transaction's commit() cancelled while its hop runs on the
    connection's thread (its BEGIN IMMEDIATE waiting for another process's
    lock) keeps the process's write lock until the thread has finished (the
    connection closed behind it) and end() has run (before the fix it was
    freed at the cancellation: the next writer met SQLite's lock still
    held)."""
    writers = db._WRITERS[engine.sync_engine]
    maker = db.create_sessionmaker(engine)
    raw = await db.RawTransaction.begin(engine)
    raw.driver.held_back.append(_insert("a"))

    async def commit() -> None:
        async with maker() as session:
            await raw.commit(session, seen_through=False)

    await _cancelled_while_its_thread_waits(engine, tmp_path / "groups.db", commit)
    await raw.end()
    assert not writers._lock._held


async def _cancelled_while_its_thread_waits(
    engine: AsyncEngine, path: Path, commit: Callable[[], Awaitable[Any]]
) -> None:
    """``commit`` in a task, cancelled while its hop waits on the
    connection's thread for another process's SQLite lock: the write lock
    is held meanwhile; the other lock freed, the task ends cancelled."""
    writers = db._WRITERS[engine.sync_engine]
    holder = sqlite3.connect(str(path), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        committing = asyncio.ensure_future(commit())
        await _ticks()
        committing.cancel()
        await _ticks()
        assert not committing.done(), "it waits for the thread"
        assert writers._lock._held, "the lock is held while the thread has not finished"
    finally:
        holder.close()  # the other process's lock freed: the thread goes on
    async with asyncio.timeout(10):
        await asyncio.wait({committing})
    assert committing.cancelled()


async def test_a_cancelled_straight_commit_holds_the_lock_until_its_thread_has_finished(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """As a raw one: a SQLAlchemy transaction's commit_straight() cancelled
    while its hop waits on the thread keeps the write lock until the
    connection, invalidated, has closed behind the thread (before the fix
    the pool's invalidate event, which fires before the close, freed it)."""
    writers = db._WRITERS[engine.sync_engine]
    session = db.create_sessionmaker(engine)()
    await session.connection()  # the lock taken, BEGIN IMMEDIATE deferred
    await session.execute(text("INSERT INTO t VALUES ('a')"), execution_options={sqlite_driver.WRITE_BEHIND: True})
    await _cancelled_while_its_thread_waits(
        engine, tmp_path / "groups.db", lambda: db.commit_straight(session, seen_through=False)
    )
    await session.close()
    assert not writers._lock._held


async def test_a_cancelled_straight_commit_whose_hop_then_fails_frees_the_lock_at_its_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(review of sqfix) A cancelled commit_straight() whose hop then fails
    on the thread (another process keeps its lock past the busy timeout):
    no commit tells the lock to go on, and only the connection's close
    (OneHopConnection.terminate, after the thread) frees it."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 300)  # read at each connect
    path = tmp_path / "busy.db"
    engine = db.create_engine(f"sqlite+aiosqlite:///{path}")
    holder = sqlite3.connect(str(path), isolation_level=None)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE t (v TEXT PRIMARY KEY)"))
        writers = db._WRITERS[engine.sync_engine]
        holder.execute("BEGIN IMMEDIATE")  # kept: the hop fails after the busy timeout
        session = db.create_sessionmaker(engine)()
        await session.connection()
        await session.execute(text("INSERT INTO t VALUES ('a')"), execution_options={sqlite_driver.WRITE_BEHIND: True})
        committing = asyncio.ensure_future(db.commit_straight(session, seen_through=False))
        await _ticks()
        committing.cancel()
        async with asyncio.timeout(10):
            await asyncio.wait({committing})
        assert committing.cancelled()
        await session.close()
        assert not writers._lock._held
    finally:
        holder.close()
        await engine.dispose()


async def test_a_group_cancelled_before_its_first_step_is_closed_and_its_members_told(engine: AsyncEngine) -> None:
    """The group's task cancelled before it ran at all (a shutdown): its
    member ends, cancelled (nothing was sent), the group takes no more
    members, and a later transaction is written by a group of its own
    (before the fix it joined the dead group and waited for good)."""
    member = asyncio.create_task(sqlite_groups.commit_collected(engine, [_insert("a")]))
    await asyncio.sleep(0)  # the member has joined: its group's task is created, not started
    (task,) = _groups(engine).tasks
    task.cancel()
    async with asyncio.timeout(10):
        await asyncio.wait({member})
    assert member.cancelled() and _groups(engine).open is None and not _groups(engine).tasks
    async with asyncio.timeout(10):
        await sqlite_groups.commit_collected(engine, [_insert("b")])
    assert await _stored(engine) == ["b"]


async def test_a_group_cancelled_during_its_hop_tells_its_members_the_hops_outcome(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """The group's task cancelled once its hop is sent (a shutdown): it
    waits for the hop, and each member learns its outcome (written), not
    "cancelled" (a committed create taken for a rolled-back one)."""
    async with _sent_behind_another_process(engine, tmp_path / "groups.db", "ab") as members:
        (task,) = _groups(engine).tasks
        task.cancel()
        await _ticks()
        assert not any(member.done() for member in members)
    await _written_though_the_group_was_cancelled(engine, members, task)


async def test_a_group_cancelled_during_a_hop_longer_than_the_outcome_wait_still_tells_its_outcome(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's task cancelled (a shutdown) while its hop waits on the
    thread past COMMIT_OUTCOME_WAIT_SECONDS: the hop is waited for to its
    end, and members whose own callers were not cancelled learn it was
    written (before the fix the hop was given up after that wait and every
    member told "cancelled", though their creates were stored)."""
    monkeypatch.setattr(db, "COMMIT_OUTCOME_WAIT_SECONDS", 0.1)
    async with _sent_behind_another_process(engine, tmp_path / "groups.db", "ab") as members:
        (task,) = _groups(engine).tasks
        task.cancel()
        # Past the outcome wait (which the group does not use now), the
        # other process still holding its lock: nothing is settled yet.
        done, _pending = await asyncio.wait(members, timeout=0.4)
        assert not done
    await _written_though_the_group_was_cancelled(engine, members, task)


async def test_an_error_that_ends_the_whole_transaction_fails_every_member(engine: AsyncEngine) -> None:
    """A write whose error ends SQLite's transaction itself (a trigger's
    RAISE(ROLLBACK)), not just its statement: no savepoint is left to roll
    back to, so every member of the hop fails, nothing is stored, and the
    write lock is free."""
    async with engine.begin() as connection:
        await connection.execute(
            text("CREATE TRIGGER refuse BEFORE INSERT ON t WHEN NEW.v = 'x' BEGIN SELECT RAISE(ROLLBACK, 'no x'); END")
        )
    writers = db._WRITERS[engine.sync_engine]
    members = await _queued_then_freed(engine, *([_insert(value)] for value in "axb"))
    async with asyncio.timeout(10):
        await asyncio.wait(members)
    for member in members:
        error = member.exception()
        assert isinstance(error, DBAPIError) and "no x" in str(error.orig)
    assert await _stored(engine) == []
    assert not writers._lock._held and engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
