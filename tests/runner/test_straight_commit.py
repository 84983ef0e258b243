"""db.commit_straight (issue 17): a SQLite transaction whose writes are all
held back or sent straight (the claim's where Runtime.claims_raw() is
false, else its raw transaction, which commits on the driver as well; the
claim tests run on both) commits on the driver, without SQLAlchemy's
commit, and keeps every guarantee of the commit it replaces: all or nothing, the write lock and the connection
given back, a lost connection answered 503 with the run claimable again, a
lock another process holds answered as SQLAlchemy's commit answers it, a
cancellation mid-hop seen through. Each runs on asyncio and on uvloop (the
server's loop), through tests/runner/conftest.py's loop-factory hook."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import closing, contextmanager
from typing import Any

import pytest
from sqlalchemy import bindparam, event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, PendingRollbackError
from sqlalchemy.orm.exc import StaleDataError

from app import db, orm, run_log, sqlite_driver
from app.api.handlers import unexpected_error
from app.runner import execute
from app.runtime import Runtime
from app.services import core_rows, run_state
from app.settings import Settings
from app.wire.events import Event
from tests.runner.test_worker import _make_runs, _statuses

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])]
# The straight commit is SQLite's (db.commit_straight); PostgreSQL's commit is SQLAlchemy's.
_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

_OWNER = "test:0:straight"

# The claim's tests run on both of its SQLite paths: the raw transaction
# (Runtime.claiming, a file this process alone writes) and a session's
# transaction committed by db.commit_straight (where claims_raw() is false:
# several server processes on one file, a `file:` URI, scripted rules that
# read a thread's metadata), each path's failures its own.
_EITHER_CLAIM = pytest.mark.parametrize("claim", ["raw", "session"])


def _claiming(runtime: Runtime, claim: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if claim == "session":
        monkeypatch.setattr(runtime, "claims_raw", lambda: False)
    assert runtime.claims_raw() is (claim == "raw")


def _lock_free(runtime: Runtime) -> None:
    """SQLite's write lock is free: another connection takes it at once."""
    with sqlite3.connect(str(make_url(runtime.settings.database_url).database), timeout=0) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")


def _checked_out(runtime: Runtime) -> int:
    return int(runtime.engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


@contextmanager
def _engine_events(runtime: Runtime, name: str) -> Iterator[list[object]]:
    """The connections of the write engine's ``name`` events, while within."""
    seen: list[object] = []

    def fired(connection: object) -> None:
        seen.append(connection)

    event.listen(runtime.engine.sync_engine, name, fired)
    try:
        yield seen
    finally:
        event.remove(runtime.engine.sync_engine, name, fired)


def _commits(runtime: Runtime) -> Any:
    """SQLAlchemy's commits on the engine, while within."""
    return _engine_events(runtime, "commit")


@contextmanager
def _before_straight_commit(hook: Callable[[sqlite_driver.OneHopConnection], Awaitable[None]]) -> Iterator[None]:
    """Every straight commit first awaits ``hook`` with its driver connection."""
    real = sqlite_driver.OneHopConnection.commit_straight

    async def commit_straight(self: sqlite_driver.OneHopConnection, **options: bool) -> None:
        await hook(self)
        await real(self, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_driver.OneHopConnection, "commit_straight", commit_straight)
        yield


async def _cancelled_in_its_straight_commit(
    work: Coroutine[Any, Any, Any],
    before: Callable[[Callable[[sqlite_driver.OneHopConnection], Awaitable[None]]], Any] = _before_straight_commit,
) -> None:
    """``work`` in a task cancelled while its straight COMMIT (or the hop
    ``before`` hooks: test_raw_claim's claim statement) waits for the
    connection's thread (busy, as under load, until the cancel is made;
    the thread then runs the hop whatever the task does): the task must
    end cancelled."""
    release = threading.Event()
    committing = asyncio.Event()
    busy: list[asyncio.Future[Any]] = []

    async def stall(driver: sqlite_driver.OneHopConnection) -> None:
        busy.append(asyncio.ensure_future(driver._connection._execute(release.wait, 30.0)))
        await asyncio.sleep(0)  # that job reaches the thread's queue first
        committing.set()

    with before(stall):
        task = asyncio.create_task(work)
        await committing.wait()
        task.cancel()
        release.set()
        done, _pending = await asyncio.wait({task}, timeout=10)
    assert done == {task} and task.cancelled()
    await asyncio.gather(*busy)


@_SQLITE
@_EITHER_CLAIM
async def test_a_claims_transaction_commits_straight_on_the_driver(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    """An instant answer ends in the claim's transaction, committed without
    SQLAlchemy's commit; its connection and SQLite's lock are given back,
    its events logged and streamed."""
    _claiming(runtime, claim, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    with _commits(runtime) as commits:
        (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.finished and commits == []
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)
    async with runtime.transaction() as session:
        names = (await session.scalars(select(orm.RunEvent.event).where(orm.RunEvent.run_id == run_id))).all()
    assert names[0] == "thread.run.in_progress" and names[-1] == "thread.run.completed"


@_SQLITE
@pytest.mark.parametrize("kind", ["transaction", "claiming"])
async def test_a_failing_held_back_write_rolls_the_straight_commit_back_whole(runtime: Runtime, kind: str) -> None:
    """A held-back compare-and-set that misses fails the straight COMMIT:
    the statement sent straight before it (run_now) and the other writes
    are rolled back with it, its events never reach the log, and the lock
    and the connection are free again; in the claim's raw transaction
    (Runtime.claiming) too."""
    runs = orm.Run.__table__
    stamp = update(runs).where(runs.c.id == bindparam("run_id")).values(lease_owner="w").returning(runs.c.id)
    miss = update(runs).where(runs.c.id == bindparam("run_id")).values(status="failed")

    (run_id,) = await _make_runs(runtime, 1)
    with pytest.raises(IntegrityError):
        async with runtime.claiming() if kind == "claiming" else runtime.transaction() as session:
            assert await db.run_now(session, stamp, {"run_id": run_id}) == [{"id": run_id}]
            await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {"x": 1})])
            assert await db.hold_back(session, miss, {"run_id": "run_none"}, {db.EXPECT_ROWCOUNT: 1})
    assert _checked_out(runtime) == 0
    _lock_free(runtime)
    async with runtime.transaction() as session:
        assert await session.scalar(select(orm.Run.lease_owner).where(orm.Run.id == run_id)) is None
        assert (await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id))).all() == []
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})  # nothing left held
    assert execution.finished and await _statuses(runtime, [run_id]) == {run_id: "completed"}


@_SQLITE
@_EITHER_CLAIM
async def test_a_connection_lost_at_the_claims_commit_is_a_503_and_the_run_is_claimed_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    """The connection closed under the claim's straight COMMIT: the error
    says it was invalidated (503), the broken connection is not handed out
    again, nothing of the claim stays, and the next claim runs the run."""
    _claiming(runtime, claim, monkeypatch)

    async def lose(driver: sqlite_driver.OneHopConnection) -> None:
        await driver._connection.close()

    (run_id,) = await _make_runs(runtime, 1)
    with _before_straight_commit(lose), pytest.raises(DBAPIError) as raised:
        await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert raised.value.connection_invalidated
    assert unexpected_error(raised.value).status == 503
    assert await _statuses(runtime, [run_id]) == {run_id: "queued"}
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.finished and await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


@_SQLITE
@_EITHER_CLAIM
async def test_a_claim_cancelled_during_its_straight_commit_is_seen_through(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    """Cancelled while its COMMIT waits for the connection's thread: the
    COMMIT still runs there, and the claim's task waits for it before it is
    cancelled, so the ended run's events reach the log once and the run
    log's numbering goes on after them."""
    _claiming(runtime, claim, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    await _cancelled_in_its_straight_commit(execute.claim_and_start(runtime, _OWNER, 1, 60.0, {}))
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    async with runtime.transaction() as session:
        seqs = (await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id))).all()
    assert seqs == list(range(1, len(seqs) + 1))
    assert not runtime.run_log._appending  # committed, not left pending
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


@_SQLITE
async def test_a_transaction_cancelled_during_its_straight_commit_without_events_leaves_nothing_open(
    runtime: Runtime,
) -> None:
    """Not seen through (no run events): the cancelled transaction leaves
    no connection in a transaction and SQLite's lock free for the next
    one. (The hop's BEGIN, writes and COMMIT or ROLLBACK are one function
    on the connection's thread, so a cancelled hop cannot leave the
    connection mid-transaction; invalidating it on the cancellation is a
    second guard this test does not tell apart.)"""

    async def writing(runtime: Runtime) -> None:
        async with runtime.transaction() as session:
            await core_rows.insert_row(session, core_rows.record(orm.Thread, **_thread("thread_cancelled")))
            await session.execute(select(orm.Thread.id))  # connected, the insert sent

    await _cancelled_in_its_straight_commit(writing(runtime))
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_thread("thread_next")))
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


def _thread(thread_id: str) -> dict[str, Any]:
    return {"id": thread_id, "project_id": orm.DEFAULT_PROJECT_ID, "seq": 1, "created_at": 1, "metadata_": {}}


@_SQLITE
@_EITHER_CLAIM
async def test_a_data_error_at_the_claims_straight_commit_holds_no_claim_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    """The claim's straight COMMIT refused for the data (an integrity error
    there, as SQLAlchemy raises it): nothing of the claim stays, and the run
    is then taken the streamed way, in transactions of its own, rather than
    claimed and refused again and again."""
    _claiming(runtime, claim, monkeypatch)
    refusals: list[int] = []

    async def refuse(_driver: sqlite_driver.OneHopConnection) -> None:
        if not refusals:
            refusals.append(1)
            raise sqlite3.IntegrityError("a constraint refused it")

    (run_id,) = await _make_runs(runtime, 1)
    with _before_straight_commit(refuse):
        with pytest.raises(IntegrityError):
            await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
        assert await _statuses(runtime, [run_id]) == {run_id: "queued"}
        (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
        assert not execution.finished  # not answered in its claim again
        await execute.run(execution)
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


@_SQLITE
async def test_a_straight_commit_that_finds_the_write_lock_taken_fails_as_locked_and_leaves_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock past the busy timeout when
    a transaction whose writes are all held back commits straight (BEGIN
    IMMEDIATE, the writes and COMMIT in its one hop): it fails as
    SQLAlchemy's commit fails there (OperationalError "database is locked",
    answered a retryable 503, the connection kept, not invalidated),
    nothing of it is written, its connection and this process's turn at the
    lock are given back, and once the other process lets go the next
    transaction commits on the same pool."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # this test's connections wait 0.2 s, not 30
    runtime = await Runtime.start(settings)
    try:
        other = sqlite3.connect(str(make_url(settings.database_url).database), timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            with _commits(runtime) as commits, pytest.raises(OperationalError) as raised:
                async with runtime.transaction() as session:
                    locked = core_rows.record(orm.Thread, **_thread("thread_locked"))
                    await core_rows.insert_row(session, locked, write_behind=True)
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert commits == []  # the straight commit's hop, not SQLAlchemy's commit
        assert "database is locked" in str(raised.value.orig) and not raised.value.connection_invalidated
        assert unexpected_error(raised.value).status == 503
        assert _checked_out(runtime) == 0
        _lock_free(runtime)
        async with runtime.transaction() as session:
            await core_rows.insert_row(
                session, core_rows.record(orm.Thread, **_thread("thread_next")), write_behind=True
            )
        async with runtime.transaction() as session:
            stored = (await session.scalars(select(orm.Thread.id).where(orm.Thread.id.like("thread_%")))).all()
        assert stored == ["thread_next"]
        assert _checked_out(runtime) == 0
    finally:
        await runtime.close()


@_SQLITE
@_EITHER_CLAIM
async def test_a_straight_commit_whose_connection_the_pool_may_close_closes_it_through_the_greenlet(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    """The pool full (an overflow connection, closed at its return: I/O):
    SQLAlchemy's transaction is closed through the greenlet, inside the
    seen-through hop; the run ends and nothing stays checked out."""
    _claiming(runtime, claim, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    pool: Any = runtime.engine.sync_engine.pool
    monkeypatch.setattr(pool, "checkedin", lambda: pool.size())
    with _commits(runtime) as commits:
        (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    monkeypatch.undo()
    assert execution.finished and commits == []
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


@_SQLITE
async def test_a_rollback_cancelled_after_a_failed_body_still_hands_its_deltas_back(runtime: Runtime) -> None:
    """A transaction whose body raised after logging run events, cancelled
    while its ROLLBACK waits for the connection's thread (busy, as under
    load): the run log is told all the same, so the deltas the append
    drained go back to be logged later and the run is no longer appending
    (its deltas would otherwise never be logged, nor delivered early again)."""
    (run_id,) = await _make_runs(runtime, 1)
    release = threading.Event()
    rolling = asyncio.Event()
    stalls: list[asyncio.Future[Any]] = []
    event.listen(runtime.engine.sync_engine, "rollback", lambda _connection: rolling.set())

    async def failing() -> None:
        async with runtime.run_log.holding(run_id):
            runtime.run_log.publish(run_id, [Event("thread.message.delta", {"n": 1})])
            async with runtime.transaction() as session:
                await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {"x": 1})])
                connection = await session.connection()
                driver = connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
                # The thread kept busy: the ROLLBACK queues behind this.
                stalls.append(asyncio.ensure_future(driver._connection._execute(release.wait, 30.0)))
                await asyncio.sleep(0)
                raise ValueError("the body failed")

    task = asyncio.create_task(failing())
    try:
        await rolling.wait()
        task.cancel()
    finally:
        release.set()
    await asyncio.wait({task})
    await asyncio.gather(*stalls, return_exceptions=True)
    assert task.cancelled()
    assert run_id not in runtime.run_log._appending
    assert [event.name for _seq, event in runtime.run_log._buffer.get(run_id, [])] == ["thread.message.delta"]


async def test_events_logged_in_a_transaction_rolled_back_within_never_reach_streams(runtime: Runtime) -> None:
    """A flush failing inside the transaction (caught by its body) after run
    events were logged rolls the transaction back: the transaction raises
    as SQLAlchemy's commit did (PendingRollbackError), its events are not
    handed to followers as committed, and the delta its append drained goes
    back to be logged later."""
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        thread_id = await session.scalar(select(orm.Run.thread_id).where(orm.Run.id == run_id))
    async with runtime.run_log.holding(run_id), runtime.bus.follow(run_id) as delivered:
        runtime.run_log.publish(run_id, [Event("thread.message.delta", {"n": 1})])
        with pytest.raises(PendingRollbackError):
            async with runtime.transaction() as session:
                await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {"x": 1})])
                duplicate = orm.Thread(
                    id=thread_id, project_id=orm.DEFAULT_PROJECT_ID, seq=1, created_at=1, metadata_={}
                )
                session.add(duplicate)
                with pytest.raises(IntegrityError):
                    await session.flush()
        assert delivered.empty()
        assert [event.name for _seq, event in runtime.run_log._buffer.get(run_id, [])] == ["thread.message.delta"]
    async with runtime.transaction() as session:
        logged = await session.scalar(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id).limit(1))
    assert logged is None


def _failing_commits(monkeypatch: pytest.MonkeyPatch, failure: str) -> list[bool]:
    """While the returned list is not empty, every COMMIT on the driver
    fails: ``failed`` as SQLite's disk I/O error (rolled back on the
    thread, as _commit rolls back a failed COMMIT), ``lost`` as a
    connection lost under it ("no active connection": invalidated)."""
    failing: list[bool] = []
    if failure == "failed":
        real_commit = sqlite_driver._commit

        def commit(connection: sqlite3.Connection, *args: Any) -> None:
            if failing:
                connection.rollback()
                raise sqlite3.OperationalError("disk I/O error")
            real_commit(connection, *args)

        monkeypatch.setattr(sqlite_driver, "_commit", commit)
    else:

        async def lost(driver: sqlite_driver.OneHopConnection) -> None:
            if failing:
                await driver._connection.close()

        monkeypatch.setattr(
            sqlite_driver.OneHopConnection, "commit_straight", _hooked_commit_straight(lost), raising=True
        )
    return failing


def _hooked_commit_straight(
    hook: Callable[[sqlite_driver.OneHopConnection], Awaitable[None]],
) -> Callable[..., Awaitable[None]]:
    real = sqlite_driver.OneHopConnection.commit_straight

    async def commit_straight(self: sqlite_driver.OneHopConnection, **options: bool) -> None:
        await hook(self)
        await real(self, **options)

    return commit_straight


def _held_at_each_undo(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether this process's write lock was still held at each undo of a
    logged session's run log appends (RunLog.rolled_back) from now on."""
    writers = db.writers_of(runtime.engine)
    held: list[bool] = []
    real = runtime.run_log.rolled_back

    def rolled_back(session: Any) -> None:
        if run_log.logged(session):
            held.append(writers._lock._held)
        real(session)

    monkeypatch.setattr(runtime.run_log, "rolled_back", rolled_back)
    return held


@_SQLITE
@pytest.mark.parametrize("failure", ["failed", "lost"])
@pytest.mark.parametrize("path", ["straight", "session_commit", "unit_of_work"])
async def test_a_logged_transaction_whose_commit_fails_is_undone_before_the_write_lock_is_handed_on(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, path: str, failure: str
) -> None:
    """A transaction that read its run, moved it and logged the move (a
    cancel's), whose COMMIT fails: committed straight on the driver
    (db.commit_straight), through session.commit() (transaction() where it
    cannot commit straight: ORM changes, say), or by a unit_of_work() that
    connected (which commits through session.commit()). Its run log
    appends are undone while the write lock is still this transaction's: a
    writer let in before would number its appends after the failed ones.
    Without the fixes the lock was handed on first: by the driver's failed
    COMMIT under session.commit() (``failed``), by the invalidation of a
    connection lost there (``lost``: db._undone_at_error). Either way the
    lock is free and the connection given back once it has raised."""
    (run_id,) = await _make_runs(runtime, 1)
    held_at_undo = _held_at_each_undo(runtime, monkeypatch)
    if path == "session_commit":
        monkeypatch.setattr(db, "_straight_committable", lambda _session: None)
    failing = _failing_commits(monkeypatch, failure)
    async with asyncio.timeout(30):
        with _commits(runtime) as commits, pytest.raises(DBAPIError) as raised:
            async with runtime.unit_of_work() if path == "unit_of_work" else runtime.transaction() as session:
                run = await session.get(orm.Run, run_id)  # connected
                assert run is not None
                name = await run_state.transition(session, run, "cancelling")
                await runtime.run_log.append(session, run_id, [Event(name, {"id": run_id})], run_locked=True)
                failing.append(True)
        failing.clear()
    assert len(commits) == (path != "straight")  # the path meant: SQLAlchemy's commit, or none
    assert raised.value.connection_invalidated is (failure == "lost")
    assert ("disk I/O error" in str(raised.value)) is (failure == "failed")
    assert held_at_undo[:1] == [True]  # (a second undo, after the hook's, finds nothing logged)
    assert db.writers_of(runtime.engine).idle() and _checked_out(runtime) == 0
    _lock_free(runtime)
    assert await _statuses(runtime, [run_id]) == {run_id: "queued"}
    async with runtime.transaction() as session:
        logged = await session.scalar(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id).limit(1))
    assert logged is None
    assert runtime.run_log._unlocked == {} and run_id not in runtime.run_log._appending


@_SQLITE
async def test_a_session_closed_after_its_commit_failed_frees_the_write_lock_at_the_check_in(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """session.commit()'s failed COMMIT leaves the write lock to what ends
    the transaction (its caller undoes its run log appends first): a
    session closed then without a rollback gives its connection back, and
    the pool's reset at the check-in frees the lock (db.SQLiteWriters'
    reset listener); the next transaction commits."""
    (run_id,) = await _make_runs(runtime, 1)
    writers = db.writers_of(runtime.engine)
    failing = _failing_commits(monkeypatch, "failed")
    async with asyncio.timeout(30):
        async with runtime.sessionmaker() as session:
            await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_={"k": "v"}))
            driver = (await session.connection()).sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
            assert isinstance(driver, sqlite_driver.OneHopConnection) and driver.on_transaction_end is not None
            failing.append(True)
            with pytest.raises(OperationalError, match="disk I/O error"):
                await session.commit()
            failing.clear()
            assert writers._lock._held  # left to the transaction's end: not handed on by the failure
        assert writers.idle() and _checked_out(runtime) == 0
        # The reset sends the driver no ROLLBACK (SQLAlchemy's transaction
        # ended with the failed COMMIT): it freed the lock itself, and the
        # pooled connection carries no transaction's callback on.
        assert driver.on_transaction_end is None
        _lock_free(runtime)
        async with runtime.transaction() as session:
            await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_={"k": "w"}))
        async with runtime.transaction() as session:
            assert await session.scalar(select(orm.Run.metadata_).where(orm.Run.id == run_id)) == {"k": "w"}
    assert writers.idle() and _checked_out(runtime) == 0


@_SQLITE
async def test_a_connection_whose_commit_failed_begins_again_after_its_rollback(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Connection whose COMMIT failed, rolled back and used again: its
    rollback finds SQLAlchemy's transaction inactive and sends nothing to
    the driver, so the write lock its failed transaction still holds is
    freed as the next one begins (db.SQLiteWriters.begin), not waited for
    by the connection that holds it (until the lock's timeout)."""
    (run_id,) = await _make_runs(runtime, 1)
    writers = db.writers_of(runtime.engine)
    failing = _failing_commits(monkeypatch, "failed")
    change = update(orm.Run).where(orm.Run.id == run_id)
    async with asyncio.timeout(10):
        async with runtime.engine.connect() as connection:
            await connection.execute(change.values(metadata_={"k": "v"}))
            failing.append(True)
            with pytest.raises(OperationalError, match="disk I/O error"):
                await connection.commit()
            failing.clear()
            await connection.rollback()
            await connection.execute(change.values(metadata_={"k": "w"}))
            await connection.commit()
        assert writers.idle() and _checked_out(runtime) == 0
        async with runtime.transaction() as session:
            assert await session.scalar(select(orm.Run.metadata_).where(orm.Run.id == run_id)) == {"k": "w"}


async def test_a_lost_commits_invalidation_runs_even_if_the_undo_before_it_raises() -> None:
    """db.lost_after_undo: a lost connection (an error) is undone, then
    invalidated even if the undo raises (a lost connection never goes back
    to the pool), the undo's error raised; a cancellation (None) is only
    invalidated (its COMMIT may still commit: nothing is undone)."""
    session: Any = object()
    undone: list[object] = []
    invalidated: list[BaseException | None] = []

    def undo(undone_session: Any) -> None:
        undone.append(undone_session)
        raise RuntimeError("the undo failed")

    lost = db.lost_after_undo(session, undo, invalidated.append)
    error = sqlite3.OperationalError("no active connection")
    with pytest.raises(RuntimeError, match="the undo failed"):
        lost(error)
    assert undone == [session] and invalidated == [error]
    lost(None)
    assert undone == [session] and invalidated == [error, None]


@_SQLITE
async def test_a_connection_lost_in_session_commit_whose_undo_raises_is_invalidated_all_the_same(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """db._undone_at_error's undo raising: SQLAlchemy still invalidates the
    lost connection (the write lock handed on by its close, nothing left
    checked out), and the undo's error is raised."""
    (run_id,) = await _make_runs(runtime, 1)
    monkeypatch.setattr(db, "_straight_committable", lambda _session: None)  # through session.commit()
    failing = _failing_commits(monkeypatch, "lost")
    real = runtime.run_log.rolled_back
    writers = db.writers_of(runtime.engine)
    raised: list[bool] = []  # whether the write lock was held when the undo raised

    def rolled_back(session: Any) -> None:
        real(session)
        if failing and not raised:  # the first undo alone (Runtime's, after it, does not raise)
            raised.append(writers._lock._held)
            raise RuntimeError("the undo failed")

    monkeypatch.setattr(runtime.run_log, "rolled_back", rolled_back)
    invalidated: list[object] = []
    pool = runtime.engine.sync_engine.pool

    def invalidating(_dbapi: Any, _record: Any, error: BaseException | None) -> None:
        invalidated.append(error)

    event.listen(pool, "invalidate", invalidating)
    try:
        async with asyncio.timeout(30):
            with pytest.raises(RuntimeError, match="the undo failed") as undo_error:
                async with runtime.transaction() as session:
                    await session.get(orm.Run, run_id)
                    await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {"x": 1})])
                    failing.append(True)
            failing.clear()
    finally:
        event.remove(pool, "invalidate", invalidating)
    # Raised by the listener's undo, before the invalidation handed the lock
    # on (SQLAlchemy raises a handle_error listener's error from the
    # statement's), not by Runtime's after it.
    assert raised == [True] and isinstance(undo_error.value.__cause__, sqlite3.OperationalError)
    assert len(invalidated) == 1 and "no active connection" in str(invalidated[0])
    assert db.writers_of(runtime.engine).idle() and _checked_out(runtime) == 0
    _lock_free(runtime)
    assert await _statuses(runtime, [run_id]) == {run_id: "queued"}


@contextmanager
def _run_updates_refused(runtime: Runtime, refusal: str) -> Iterator[None]:
    """While within, a trigger on the database file answers an UPDATE of a
    run whose metadata mentions "refused" with ``refusal`` (SQLite's
    ``RAISE(ABORT, ...)``: an ordinary database error, standing for a disk
    I/O error or a constraint; ``RAISE(IGNORE)``: the row left unchanged,
    which the ORM's flush takes for a stale row)."""
    database = str(make_url(runtime.settings.database_url).database)

    def run(statement: str) -> None:
        with closing(sqlite3.connect(database)) as other:
            other.execute(statement)
            other.commit()

    run(
        "CREATE TRIGGER refuse_runs BEFORE UPDATE ON runs WHEN NEW.metadata LIKE '%refused%' "
        f"BEGIN SELECT {refusal}; END"
    )
    try:
        yield
    finally:
        run("DROP TRIGGER refuse_runs")


@_SQLITE
@pytest.mark.parametrize("failure", ["error", "stale"])
@pytest.mark.parametrize("path", ["transaction", "unit_of_work"])
async def test_a_logged_transaction_whose_flush_fails_in_its_commit_is_undone_before_the_write_lock_is_handed_on(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, path: str, failure: str
) -> None:
    """A logged transaction with an ORM change left to session.commit()'s
    flush, whose UPDATE fails there: an ordinary database error
    (``error``), or a row the UPDATE left unchanged (``stale``: the ORM's
    StaleDataError, no database error). SQLAlchemy rolls the connection
    back inside session.commit(), and the driver's rollback hands the write
    lock on: the run log appends are undone before it (db._undone_at_error,
    db._undone_at_rollback), not after it by Runtime (a writer let in first
    would number its appends after the failed ones)."""
    (run_id,) = await _make_runs(runtime, 1)
    held_at_undo = _held_at_each_undo(runtime, monkeypatch)
    refusal = "RAISE(ABORT, 'refused')" if failure == "error" else "RAISE(IGNORE)"
    with _run_updates_refused(runtime, refusal), _engine_events(runtime, "rollback") as rollbacks:
        async with asyncio.timeout(30):
            with pytest.raises(IntegrityError if failure == "error" else StaleDataError):
                async with runtime.unit_of_work() if path == "unit_of_work" else runtime.transaction() as session:
                    run = await session.get(orm.Run, run_id)  # connected
                    assert run is not None
                    await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {"x": 1})])
                    run.metadata_ = {"k": "refused"}  # flushed by session.commit()
                    rollbacks.clear()
        assert len(rollbacks) == 1  # the flush's, inside session.commit(): the path meant
    assert held_at_undo[:1] == [True]  # (a second undo, Runtime's, finds nothing logged)
    assert db.writers_of(runtime.engine).idle() and _checked_out(runtime) == 0
    _lock_free(runtime)
    async with runtime.transaction() as session:
        assert await session.scalar(select(orm.Run.metadata_).where(orm.Run.id == run_id)) != {"k": "refused"}
        logged = await session.scalar(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id).limit(1))
    assert logged is None
    assert runtime.run_log._unlocked == {} and run_id not in runtime.run_log._appending


@_SQLITE
async def test_a_commit_abandoned_in_session_commit_is_undone_by_its_caller_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logged transaction's session.commit() (commit_seen_through), its
    COMMIT stuck past COMMIT_OUTCOME_WAIT_SECONDS after the caller was
    cancelled: its task is cancelled, which SQLAlchemy takes for a lost
    connection. The COMMIT may still commit, so the commit's task does not
    undo the run log appends (db._undone_at_error: not for a
    cancellation); the caller judges (Runtime._ended_badly)."""
    (run_id,) = await _make_runs(runtime, 1)
    monkeypatch.setattr(db, "_straight_committable", lambda _session: None)  # through session.commit()
    monkeypatch.setattr(db, "COMMIT_OUTCOME_WAIT_SECONDS", 0.2)
    undone_in: list[asyncio.Task[Any] | None] = []
    real = runtime.run_log.rolled_back

    def rolled_back(session: Any) -> None:
        if run_log.logged(session):
            undone_in.append(asyncio.current_task())
        real(session)

    monkeypatch.setattr(runtime.run_log, "rolled_back", rolled_back)
    committing = asyncio.Event()
    stuck = asyncio.Event()  # never set

    async def stick(_driver: sqlite_driver.OneHopConnection) -> None:
        committing.set()
        await stuck.wait()

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_straight", _hooked_commit_straight(stick))

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, run_id)
            assert run is not None
            name = await run_state.transition(session, run, "cancelling")
            await runtime.run_log.append(session, run_id, [Event(name, {"id": run_id})], run_locked=True)

    async with asyncio.timeout(20):
        task = asyncio.create_task(cancel())
        await committing.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert undone_in == [task]  # Runtime's undo alone, in the caller's task
    assert db.writers_of(runtime.engine).idle() and _checked_out(runtime) == 0
    _lock_free(runtime)


@_SQLITE
async def test_the_flusher_woken_by_session_commits_undo_does_not_inherit_the_undo(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The undo run inside a failed session.commit() (db._undone_at_error)
    puts the deltas its append drained back and wakes the run log's
    flusher: a task started there, in the commit's task, whose context
    must not carry the commit's undo (its own failures would run it)."""
    (run_id,) = await _make_runs(runtime, 1)
    monkeypatch.setattr(db, "_straight_committable", lambda _session: None)  # through session.commit()
    held_at_undo = _held_at_each_undo(runtime, monkeypatch)
    log = runtime.run_log
    log.publish(run_id, [Event("thread.message.delta", {"d": 1})])  # buffered: drained by the append below
    flusher = log._flusher
    assert flusher is not None
    flusher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flusher
    inherited: list[object] = []
    started = asyncio.Event()

    async def flush_forever() -> None:
        inherited.append(db._UNDO_AT_FAILURE.get())
        started.set()

    monkeypatch.setattr(log, "_flush_forever", flush_forever)
    failing = _failing_commits(monkeypatch, "failed")
    async with asyncio.timeout(20):
        with pytest.raises(OperationalError, match="disk I/O error"):
            async with runtime.transaction() as session:
                await session.get(orm.Run, run_id)
                await log.append(session, run_id, [Event("thread.run.step.created", {"x": 1})])
                failing.append(True)
        failing.clear()
        await started.wait()
    assert held_at_undo[:1] == [True]  # undone in the commit's task (its lock still held)
    assert inherited == [None]
    assert db.writers_of(runtime.engine).idle() and _checked_out(runtime) == 0
