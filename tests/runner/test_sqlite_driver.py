"""app/sqlite_driver.py: a statement is one hop to aiosqlite's thread and a
transaction's BEGIN IMMEDIATE goes with its first statement; the write lock
must still cover every statement of the transaction (issue 10), streamed or not."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only as await_

from app import db, sqlite_driver, sqlite_groups
from app.activity import ACTIVITY
from app.runtime import Runtime


def _write_lock_is_free(path: str) -> bool:
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as error:
        assert "locked" in str(error)
        return False
    finally:
        other.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_transaction_holds_the_write_lock_from_its_first_statement(runtime: Runtime, streamed: bool) -> None:
    path = make_url(runtime.settings.resolved_database_url()).database
    assert path is not None
    async with runtime.transaction() as session:
        if streamed:
            rows = [row async for row in await session.stream(text("SELECT id FROM runs"))]
        else:
            rows = list((await session.execute(text("SELECT id FROM runs"))).all())
        assert rows == []
        assert not _write_lock_is_free(path)
    assert _write_lock_is_free(path)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_statement_reports_its_rowcount_and_rows(runtime: Runtime) -> None:
    async with runtime.transaction() as session:
        await session.execute(text("CREATE TEMP TABLE t (n INTEGER)"))
        await session.execute(text("INSERT INTO t (n) VALUES (:n)"), [{"n": n} for n in range(5)])
        moved = await session.execute(text("UPDATE t SET n = n + 10 WHERE n >= 3"))
        assert moved.rowcount == 2  # type: ignore[attr-defined]  # compare-and-set relies on it
        assert (await session.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all() == [0, 1, 2, 13, 14]


async def test_the_write_lock_passes_on_only_once_the_commit_has_run(tmp_path: Any) -> None:
    """This process's next transaction may begin only once the previous one's
    COMMIT has run on its sqlite3 thread. SQLAlchemy's commit event fires
    before the COMMIT is sent: handing the lock on there let the next
    BEGIN IMMEDIATE meet SQLite's lock still held, and wait in SQLite's busy
    handler, whose naps grow to 100 ms (issue 17). With no busy timeout at
    all, such a BEGIN fails at once instead, and a slow COMMIT (a slow
    disk, simulated by the trace hook) leaves it the time to."""
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'slow-commits.db'}")

    def slow_commits_and_no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
        def trace(statement: str) -> None:
            if statement == "COMMIT":
                time.sleep(0.05)  # on the sqlite3 thread, before the COMMIT runs

        await_(dbapi_connection.driver_connection.set_trace_callback(trace))
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.close()

    event.listen(engine.sync_engine, "connect", slow_commits_and_no_busy_wait)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")

        async def insert(n: int) -> None:
            async with engine.begin() as connection:
                await connection.exec_driver_sql(f"INSERT INTO t (n) VALUES ({n})")

        await asyncio.gather(*(insert(n) for n in range(4)))
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT count(*) FROM t")).scalar() == 4
    finally:
        await engine.dispose()


async def test_a_connection_lost_in_its_transaction_fails_the_commit(tmp_path: Any) -> None:
    """Its BEGIN and INSERT sent, nothing held back, the connection closed
    under it: SQLAlchemy's COMMIT fails as on a lost connection (the
    connection invalidated: a 503 upstream), not reported committed."""
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'lost.db'}")
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")
        async with engine.connect() as connection:
            await connection.begin()
            await connection.exec_driver_sql("INSERT INTO t (n) VALUES (1)")
            driver = (await connection.get_raw_connection()).dbapi_connection
            assert isinstance(driver, sqlite_driver.OneHopConnection)
            assert not driver.held_back and driver.begin_deferred is None  # sent, not held
            await driver._connection.close()
            with pytest.raises(DBAPIError) as raised:
                await connection.commit()
            assert raised.value.connection_invalidated
        async with engine.connect() as connection:  # a new connection: the closed one was not handed out again
            assert (await connection.exec_driver_sql("SELECT count(*) FROM t")).scalar() == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_held_back_writes_run_in_order_before_what_follows_them(runtime: Runtime) -> None:
    """A write marked WRITE_BEHIND goes with the transaction's next statement
    or its COMMIT: the next statement sees it, a rollback drops it, and a
    held-back write that fails fails the transaction, whole."""
    behind = text("INSERT INTO t (n) VALUES (:n)").execution_options(**db.WRITE_BEHIND)
    async with runtime.transaction() as session:
        await session.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
    async with runtime.transaction() as session:
        await session.execute(behind, {"n": 1})
        await session.execute(behind, {"n": 2})
        assert (await session.execute(text("SELECT group_concat(n) FROM t"))).scalar() == "1,2"
        await session.execute(behind, {"n": 3})  # written by the COMMIT
    with pytest.raises(ZeroDivisionError):
        async with runtime.transaction() as session:
            await session.execute(behind, {"n": 4})
            raise ZeroDivisionError
    with pytest.raises(IntegrityError):
        async with runtime.transaction() as session:
            await session.execute(behind, {"n": 5})
            await session.execute(behind, {"n": 1})  # a duplicate: fails at the COMMIT
    with pytest.raises(IntegrityError):
        async with runtime.transaction() as session:
            await session.execute(behind, {"n": 6})
            await session.execute(behind, {"n": 2})  # fails with the next statement
            await session.execute(text("SELECT 1"))
    async with runtime.transaction() as session:
        assert (await session.execute(text("SELECT group_concat(n) FROM t"))).scalar() == "1,2,3"
        await session.execute(text("DROP TABLE t"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_held_back_write_hands_back_its_rows_and_can_insist_on_its_rowcount(runtime: Runtime) -> None:
    """RETURNED_ROWS_TO: the rows of a held-back INSERT … RETURNING arrive by
    the COMMIT. EXPECT_ROWCOUNT: a held-back compare-and-set that changes
    another number of rows fails its transaction."""
    async with runtime.transaction() as session:
        await session.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY, s TEXT)"))
    returned: list[Any] = []
    insert = text("INSERT INTO t (n, s) VALUES (:n, 'a') RETURNING n")
    async with runtime.transaction() as session:
        await session.execute(insert, {"n": 1}, execution_options={**db.WRITE_BEHIND, db.RETURNED_ROWS_TO: returned})
        assert returned == []  # not sent yet
    assert [tuple(row) for row in returned] == [(1,)]
    cas = text("UPDATE t SET s = 'b' WHERE n = :n AND s = 'a'")
    one_row = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1}
    async with runtime.transaction() as session:
        await session.execute(cas, {"n": 1}, execution_options=one_row)
    with pytest.raises(IntegrityError, match="changed 0 rows, not 1"):
        async with runtime.transaction() as session:
            await session.execute(cas, {"n": 1}, execution_options=one_row)  # s is 'b' now
            await session.execute(text("INSERT INTO t (n, s) VALUES (2, 'a')"))  # rolled back with it
    async with runtime.transaction() as session:
        assert (await session.execute(text("SELECT group_concat(n || s) FROM t"))).scalar() == "1b"
        await session.execute(text("DROP TABLE t"))


def _counting_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs sent to aiosqlite's thread from now on, by function name."""
    hops: list[str] = []
    original = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn.__name__)
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return hops


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_savepoint_goes_with_the_statement_it_guards(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAVEPOINT and RELEASE wait for the next statement: a nested
    transaction around one INSERT costs no hop of its own, and one whose
    INSERT fails still rolls back to its savepoint alone."""
    async with runtime.transaction() as session:
        await session.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
    hops = _counting_hops(monkeypatch)
    insert = text("INSERT INTO t (n) VALUES (:n)")
    async with runtime.transaction() as session, session.begin_nested():
        await session.execute(insert, {"n": 1})
    assert hops == ["_run", "_commit"]  # BEGIN, SAVEPOINT and INSERT; RELEASE and COMMIT
    async with runtime.transaction() as session:
        with pytest.raises(IntegrityError):
            async with session.begin_nested():
                await session.execute(insert, {"n": 1})
        await session.execute(insert, {"n": 2})
    async with runtime.transaction() as session:
        assert (await session.execute(text("SELECT group_concat(n) FROM t"))).scalar() == "1,2"
        await session.execute(text("DROP TABLE t"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_savepoint_behind_a_failing_held_back_write_reports_that_write(runtime: Runtime) -> None:
    """A SAVEPOINT that follows held-back writes is sent with them, so one of
    them failing fails the SAVEPOINT itself: the caller sees that write's
    IntegrityError, not an OperationalError from rolling back to a
    savepoint SQLite never saw (the ORM emits SAVEPOINT lazily, with the
    nested block's first statement)."""
    behind = text("INSERT INTO t (n) VALUES (:n)").execution_options(**db.WRITE_BEHIND)
    async with runtime.transaction() as session:
        await session.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
        await session.execute(text("INSERT INTO t (n) VALUES (1)"))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        async with runtime.transaction() as session:
            await session.execute(behind, {"n": 1})  # a duplicate, held back
            async with session.begin_nested():
                await session.execute(text("INSERT INTO t (n) VALUES (2)"))
    async with runtime.transaction() as session:
        assert (await session.execute(text("SELECT group_concat(n) FROM t"))).scalar() == "1"
        await session.execute(text("DROP TABLE t"))


async def test_a_poll_reads_on_the_event_loop_thread_and_waits_for_a_busy_file_on_its_own(tmp_path: Any) -> None:
    """db.create_poll_engine: a poll's statement runs on the calling thread
    (no hop to a connection thread: issue 17), and never waits there. Where
    a WAL reader must wait (here a writer in exclusive locking mode holds
    the file), SQLite's busy timeout of 0 answers at once and the statement
    waits on the connection's own thread while the event loop runs on; it
    reads once the file is free."""
    path = tmp_path / "polls.db"
    url = f"sqlite+aiosqlite:///{path}"
    engine = db.create_engine(url)
    poller = db.create_poll_engine(url)
    assert poller is not None

    def thread_ids(dbapi_connection: Any, _record: Any) -> None:
        await_(dbapi_connection.driver_connection.create_function("thread_ident", 0, threading.get_ident))

    event.listen(poller.sync_engine, "connect", thread_ids)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")
            await connection.exec_driver_sql("INSERT INTO t (n) VALUES (7)")
        async with poller.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT thread_ident()")).scalar() == threading.get_ident()
            assert (await connection.exec_driver_sql("SELECT n FROM t")).scalar() == 7

        # Exclusive locking mode needs the file to itself: close the pools' connections.
        await engine.dispose()
        await poller.dispose()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE t SET n = 8")
        holder.execute("COMMIT")  # the exclusive lock stays until the connection closes

        async def read() -> int:
            async with poller.connect() as connection:
                return int((await connection.exec_driver_sql("SELECT n FROM t")).scalar_one())

        reading = asyncio.create_task(read())
        ticks = 0
        async with asyncio.timeout(10):
            while ticks < 5:  # the loop turns while the read waits
                await asyncio.sleep(0.01)
                assert not reading.done(), reading
                ticks += 1
        holder.close()
        async with asyncio.timeout(10):
            assert await reading == 8
    finally:
        await poller.dispose()
        await engine.dispose()


async def _engine_noting_threads(path: Path, checkpoint_pages: int | None = None) -> AsyncEngine:
    """A SQLite engine whose connections know ``thread_ident()`` (the thread
    a statement runs on), with a table ``t`` of (label, thread); its WAL
    checkpoint threshold ``checkpoint_pages`` if given."""
    engine = db.create_engine(f"sqlite+aiosqlite:///{path}")

    def connected(dbapi_connection: Any, _record: Any) -> None:
        await_(dbapi_connection.driver_connection.create_function("thread_ident", 0, threading.get_ident))
        if checkpoint_pages is not None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA wal_autocheckpoint={checkpoint_pages}")
            cursor.close()

    event.listen(engine.sync_engine, "connect", connected)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("CREATE TABLE t (label TEXT PRIMARY KEY, thread INTEGER, body BLOB)")
    return engine


def _noted(label: str, body: bytes = b"") -> sqlite_driver.Statement:
    return sqlite_driver.Statement("INSERT INTO t VALUES (?, thread_ident(), ?)", (label, body), False)


async def _threads(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        return {label: thread for label, thread in await connection.exec_driver_sql("SELECT label, thread FROM t")}


async def test_a_lone_processs_commit_runs_on_the_event_loops_thread_a_busier_ones_on_aiosqlites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole, small transaction of held-back writes commits on the event
    loop's thread when the process serves one request and one run at most
    (app/activity.py; issue 17: no hop to wait for), whether it goes
    straight to the driver (sqlite_groups.commit_collected) or through a
    session's commit; with more going on, on aiosqlite's thread, beside
    the loop. Either way it is committed."""
    engine = await _engine_noting_threads(tmp_path / "lone.db")
    loop_thread = threading.get_ident()
    maker = db.create_sessionmaker(engine)
    try:
        assert ACTIVITY.lone()
        await sqlite_groups.commit_collected(engine, [_noted("collected, lone")])
        async with maker() as session, session.begin():
            await session.execute(
                text("INSERT INTO t VALUES ('session, lone', thread_ident(), NULL)"),
                execution_options={sqlite_driver.WRITE_BEHIND: True},
            )
        monkeypatch.setattr(ACTIVITY, "requests", 2)
        await sqlite_groups.commit_collected(engine, [_noted("collected, busier")])
        stored = await _threads(engine)
        assert stored.pop("collected, busier") != loop_thread
        assert stored == {"collected, lone": loop_thread, "session, lone": loop_thread}
    finally:
        await engine.dispose()


async def test_a_lone_commit_that_finds_another_processs_lock_waits_for_it_on_aiosqlites_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock: the lone commit's BEGIN
    IMMEDIATE is answered "busy" at once on the loop's thread (the loop
    never waits out the busy timeout, 30 s), and the transaction goes to
    aiosqlite's thread, which waits there while the loop turns; it commits
    once the lock is freed. The connection's busy timeout is its own again
    afterwards."""
    path = tmp_path / "busy.db"
    engine = await _engine_noting_threads(path)
    loop = asyncio.get_running_loop()
    on_thread = asyncio.Event()
    real_commit = sqlite_driver._commit

    def commit(connection: sqlite3.Connection, *args: Any) -> None:
        if threading.get_ident() != loop_thread:
            loop.call_soon_threadsafe(on_thread.set)
        real_commit(connection, *args)

    loop_thread = threading.get_ident()
    monkeypatch.setattr(sqlite_driver, "_commit", commit)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        committing = asyncio.create_task(sqlite_groups.commit_collected(engine, [_noted("waited")]))
        async with asyncio.timeout(10):
            await on_thread.wait()  # sent to aiosqlite's thread while the lock is held
        assert time.monotonic() - started < 5, "the loop waited for the lock"
        assert not committing.done()
        holder.execute("ROLLBACK")
        async with asyncio.timeout(10):
            await committing
        assert (await _threads(engine))["waited"] != loop_thread
        async with engine.connect() as connection:
            timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        assert timeout == db.SQLITE_BUSY_TIMEOUT_MS
    finally:
        holder.close()
        await engine.dispose()


async def test_a_lone_commit_that_fails_is_rolled_back_on_the_loops_thread(tmp_path: Path) -> None:
    """A held-back write that breaks a constraint fails the lone commit
    with SQLAlchemy's error for it, nothing of its transaction stored, the
    connection out of any transaction: the next commit goes through."""
    engine = await _engine_noting_threads(tmp_path / "failing.db")
    try:
        await sqlite_groups.commit_collected(engine, [_noted("a")])
        with pytest.raises(IntegrityError):
            await sqlite_groups.commit_collected(engine, [_noted("b"), _noted("a")])
        await sqlite_groups.commit_collected(engine, [_noted("c")])
        assert sorted(await _threads(engine)) == ["a", "c"]
    finally:
        await engine.dispose()


async def test_lone_commits_leave_the_wal_checkpoints_to_aiosqlites_thread_and_bounded(tmp_path: Path) -> None:
    """Commits on the loop's thread turn SQLite's automatic checkpoint off
    for themselves (its fsyncs never stall the loop); every few, one goes to
    aiosqlite's thread, where the checkpoint runs: the WAL stays near its
    threshold rather than growing with every lone commit. The connection's
    threshold is its own again afterwards."""
    path = tmp_path / "wal.db"
    engine = await _engine_noting_threads(path, checkpoint_pages=20)
    loop_thread = threading.get_ident()
    try:
        database_bytes = path.stat().st_size  # the database file grows only when a checkpoint copies the WAL in
        for number in range(60):  # about 6 pages each: 360 pages of WAL unless checkpointed
            await sqlite_groups.commit_collected(engine, [_noted(str(number), bytes(20_000))])
            if number == 6:  # 7 commits on the loop's thread, 40-odd pages: past the threshold, not checkpointed
                assert path.stat().st_size == database_bytes
        threads = await _threads(engine)
        on_loop = sum(thread == loop_thread for thread in threads.values())
        assert 0 < len(threads) - on_loop < on_loop, "most on the loop's thread, some on aiosqlite's"
        async with engine.connect() as connection:
            page_size = (await connection.exec_driver_sql("PRAGMA page_size")).scalar_one()
            assert (await connection.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar() == 20
        frames = (tmp_path / "wal.db-wal").stat().st_size / (page_size + 24)
        assert frames < 150, f"{frames:.0f} frames in the WAL"
    finally:
        await engine.dispose()


_NOTE = text("INSERT INTO t VALUES (:label, thread_ident(), NULL)")
_BRIEF_NOTE = _NOTE.execution_options(**db.BRIEF)
_BRIEF_READ = text("SELECT thread_ident()").execution_options(**db.BRIEF)


async def test_a_lone_transaction_that_reads_briefly_first_runs_on_the_event_loops_thread_from_that_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone process's transaction whose first statement, marked brief
    (db.BRIEF: a run's create on a thread reads the thread first), is sent
    before its COMMIT: its BEGIN IMMEDIATE and that statement, its other
    brief statements, its held-back writes and its COMMIT run on the event
    loop's thread (issue 17), no hop at all; it holds SQLite's write lock
    from that first statement, and is committed. A first statement not
    marked brief (its cost unknown), or a busier process's transaction,
    goes to aiosqlite's thread, as before."""
    path = tmp_path / "reads.db"
    engine = await _engine_noting_threads(path)
    maker = db.create_sessionmaker(engine)
    loop_thread = threading.get_ident()
    try:
        assert ACTIVITY.lone()
        await _threads(engine)  # (the pool's connection opened: its set-up is not counted)
        hops = _counting_hops(monkeypatch)
        async with maker() as session, session.begin():
            assert (await session.execute(_BRIEF_READ)).scalar() == loop_thread
            assert not _write_lock_is_free(str(path))
            await session.execute(_BRIEF_NOTE, {"label": "lone, sent"})
            await session.execute(_NOTE, {"label": "lone, held back"}, execution_options=db.WRITE_BEHIND)
        assert hops == []
        async with maker() as session, session.begin():
            assert (await session.execute(text("SELECT thread_ident()"))).scalar() != loop_thread
            await session.execute(_BRIEF_NOTE, {"label": "lone, not brief first"})
        assert hops == ["_run", "_run", "_commit"]
        monkeypatch.setattr(ACTIVITY, "requests", 2)
        async with maker() as session, session.begin():
            assert (await session.execute(_BRIEF_READ)).scalar() != loop_thread
            await session.execute(_BRIEF_NOTE, {"label": "busier"})
        assert hops == ["_run", "_run", "_commit"] * 2
        stored = await _threads(engine)
        assert stored.pop("busier") != loop_thread
        assert stored.pop("lone, not brief first") != loop_thread
        assert stored == {"lone, sent": loop_thread, "lone, held back": loop_thread}
        assert _write_lock_is_free(str(path))
    finally:
        await engine.dispose()


async def test_a_transaction_begun_on_the_loop_sends_to_the_thread_what_it_may_not_run_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Begun on the loop's thread, a transaction's statement not marked
    brief, a brief one of more than a few rows, or any once the process is
    no longer lone, goes to aiosqlite's thread (the transaction's lock
    held, it waits for nothing there either); the transaction is one all
    the same, and commits."""
    engine = await _engine_noting_threads(tmp_path / "mixed.db")
    maker = db.create_sessionmaker(engine)
    loop_thread = threading.get_ident()
    many = [{"label": f"many {n}"} for n in range(sqlite_driver.LOOP_COMMIT_MOST_ROWS + 1)]
    try:
        await _threads(engine)
        hops = _counting_hops(monkeypatch)
        async with maker() as session, session.begin():
            await session.execute(_BRIEF_READ)  # begun here
            await session.execute(_NOTE, {"label": "not brief"})
            await session.execute(_BRIEF_NOTE, many)
            await session.execute(_BRIEF_NOTE, {"label": "brief"})
            monkeypatch.setattr(ACTIVITY, "requests", 2)
            await session.execute(_BRIEF_NOTE, {"label": "busier"})
        assert hops == ["_run", "_run", "_run", "_commit"]
        stored = await _threads(engine)
        assert stored.pop("brief") == loop_thread
        assert len(stored) == len(many) + 2 and loop_thread not in stored.values()
    finally:
        await engine.dispose()


async def test_a_failing_statement_of_a_transaction_begun_on_the_loop_is_rolled_back_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A brief statement that breaks a constraint in a transaction begun on
    the loop's thread raises SQLAlchemy's error for it; the rollback runs
    there too (no hop), nothing of the transaction is stored, the write
    lock is free, and the next transaction goes through."""
    path = tmp_path / "failing.db"
    engine = await _engine_noting_threads(path)
    maker = db.create_sessionmaker(engine)
    try:
        await sqlite_groups.commit_collected(engine, [_noted("a")])
        hops = _counting_hops(monkeypatch)
        with pytest.raises(IntegrityError):
            async with maker() as session, session.begin():
                await session.execute(_BRIEF_READ)
                await session.execute(_BRIEF_NOTE, {"label": "b"})
                await session.execute(_BRIEF_NOTE, {"label": "a"})
        assert hops == []
        assert _write_lock_is_free(str(path))
        async with maker() as session, session.begin():
            await session.execute(_BRIEF_READ)
            await session.execute(_BRIEF_NOTE, {"label": "c"})
        assert sorted(await _threads(engine)) == ["a", "c"]
    finally:
        await engine.dispose()


async def test_a_transaction_that_reads_briefly_first_and_finds_another_processs_lock_waits_on_aiosqlites_thread(
    tmp_path: Path,
) -> None:
    """Another process holds SQLite's write lock: the BEGIN IMMEDIATE of a
    lone transaction's brief first statement is answered "busy" at once on
    the loop's thread, and the statement goes to aiosqlite's thread with
    it, waiting there while the loop turns; once the lock is freed it
    runs, and the transaction commits. The busy timeout is the
    connection's own afterwards."""
    path = tmp_path / "busy_read.db"
    engine = await _engine_noting_threads(path)
    maker = db.create_sessionmaker(engine)
    loop_thread = threading.get_ident()
    read_on: list[int] = []

    async def reading_then_writing() -> None:
        async with maker() as session, session.begin():
            read_on.append((await session.execute(_BRIEF_READ)).scalar_one())
            await session.execute(_BRIEF_NOTE, {"label": "waited"})

    try:
        await _threads(engine)
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            writing = asyncio.create_task(reading_then_writing())
            for _ in range(50):  # the loop turns while the transaction waits
                await asyncio.sleep(0.001)
            assert time.monotonic() - started < 5, "the loop waited for the lock"
            assert not writing.done() and read_on == []
            holder.execute("ROLLBACK")
            async with asyncio.timeout(10):
                await writing
        finally:
            holder.close()
        assert read_on[0] != loop_thread
        assert (await _threads(engine))["waited"] != loop_thread
        async with engine.connect() as connection:
            timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        assert timeout == db.SQLITE_BUSY_TIMEOUT_MS
    finally:
        await engine.dispose()
