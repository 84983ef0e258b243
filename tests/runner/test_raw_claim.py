"""The worker's claim as a raw SQLite transaction (Runtime.claiming, issue
17): on a connection checked out of the pool raw, with no SQLAlchemy
Connection, transaction or greenlet, its claim sent with BEGIN IMMEDIATE
and its writes held back to one COMMIT hop. Every failure leaves nothing
of the claim, the write lock free and the connection back (or closed): a
failing statement, a lost connection (503), a cancellation mid-hop, a
read through the session (refused at once rather than after the lock's
timeout). A failing held-back write and the COMMIT hop's own failures
(lost, cancelled, refused, an overflow connection) are
test_straight_commit's: its claims take this path. Each runs on asyncio
and on uvloop (the server's loop), through tests/runner/conftest.py's
loop-factory hook."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from sqlalchemy import bindparam, event, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app import db, ids, orm, sqlite_driver
from app.api.handlers import unexpected_error
from app.runner import execute
from app.runtime import Runtime
from app.services import run_events
from tests.runner.test_straight_commit import (
    _cancelled_in_its_straight_commit,
    _checked_out,
    _commits,
    _engine_events,
    _lock_free,
)
from tests.runner.test_worker import _make_runs, _statuses

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"]),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

_OWNER = "test:0:raw"
_RUNS = orm.Run.__table__
_STAMP = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(lease_owner="w").returning(_RUNS.c.id)
_MISS = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(status="failed")


@contextmanager
def _before_send(hook: Callable[[sqlite_driver.OneHopConnection], Awaitable[None]]) -> Iterator[None]:
    """Every statement sent straight (run_now: the claim's) first awaits ``hook`` with its driver connection."""
    real = sqlite_driver.OneHopConnection.send

    async def send(self: sqlite_driver.OneHopConnection, statement: sqlite_driver.Statement) -> Any:
        await hook(self)
        return await real(self, statement)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_driver.OneHopConnection, "send", send)
        yield


async def _lose(driver: sqlite_driver.OneHopConnection) -> None:
    await driver._connection.close()


async def _thread_longer_than_the_prefetch(session: AsyncSession, run: orm.Run) -> None:
    """40 messages before ``run`` in its thread: its prompt needs a read."""
    for n in range(40):
        session.add(
            orm.Message(
                id=ids.new_id(ids.MESSAGE, ids.next_seq()),
                seq=run.seq - 100 + n,  # before the run
                created_at=1,
                thread_id=run.thread_id,
                role="user",
                content=[{"type": "text", "text": {"value": f"m{n}", "annotations": []}}],
                attachments=[],
                metadata_={},
                status="completed",
            )
        )


async def _nothing_left(runtime: Runtime, run_id: str) -> None:
    """The run as before the claim, the connection back, the lock free; the
    next claim answers it."""
    assert await _statuses(runtime, [run_id]) == {run_id: "queued"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.finished and await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0


async def test_an_instant_answer_is_claimed_and_ended_without_a_sqlalchemy_connection(runtime: Runtime) -> None:
    assert runtime.claims_raw()
    (run_id,) = await _make_runs(runtime, 1)
    with _engine_events(runtime, "engine_connect") as made, _commits(runtime) as commits:
        (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.finished and made == [] and commits == []
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


async def test_a_failing_statement_after_held_back_writes_rolls_back_what_it_carried(runtime: Runtime) -> None:
    """A statement sent straight fails (a constraint) after writes held
    back and an earlier statement: the transaction is rolled back on the
    connection's thread, none of them stays."""
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        thread_id = await session.scalar(select(orm.Run.thread_id).where(orm.Run.id == run_id))
    threads = orm.Thread.__table__
    clash = threads.insert().returning(threads.c.id)
    same = {"id": thread_id, "project_id": orm.DEFAULT_PROJECT_ID, "seq": 1, "created_at": 1, "metadata": {}}
    with pytest.raises(IntegrityError):
        async with runtime.claiming() as session:
            assert await db.run_now(session, _STAMP, {"run_id": run_id}) == [{"id": run_id}]
            assert await db.hold_back(session, _MISS, {"run_id": run_id}, db.WRITE_BEHIND)
            await db.run_now(session, clash, same)
    async with runtime.transaction() as session:
        assert await session.scalar(select(orm.Run.lease_owner).where(orm.Run.id == run_id)) is None
    await _nothing_left(runtime, run_id)


async def test_a_connection_lost_at_the_claims_statement_is_a_503_and_the_run_is_claimed_again(
    runtime: Runtime,
) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    with _before_send(_lose), pytest.raises(DBAPIError) as raised:
        await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert raised.value.connection_invalidated
    assert unexpected_error(raised.value).status == 503
    await _nothing_left(runtime, run_id)


async def test_a_claim_cancelled_during_its_statements_hop_leaves_nothing(runtime: Runtime) -> None:
    """Cancelled while its BEGIN IMMEDIATE and claim wait for the
    connection's thread (busy, as under load): the thread may still run
    them after the task has gone, so the connection is closed with them
    (invalidated), the lock freed, and the run claimed again afterwards."""
    (run_id,) = await _make_runs(runtime, 1)
    await _cancelled_in_its_straight_commit(execute.claim_and_start(runtime, _OWNER, 1, 60.0, {}), _before_send)
    await _nothing_left(runtime, run_id)


async def test_a_read_through_the_raw_session_is_refused_at_once(runtime: Runtime) -> None:
    """The session would wait for the write lock its own transaction
    holds: refused at once, and the transaction rolled back."""
    (run_id,) = await _make_runs(runtime, 1)
    with pytest.raises(db.RawSessionConnected):
        async with runtime.claiming() as session:
            assert await db.run_now(session, _STAMP, {"run_id": run_id}) == [{"id": run_id}]
            await session.execute(select(orm.Run.id))
    await _nothing_left(runtime, run_id)


async def test_a_run_with_a_longer_thread_than_the_claim_reads_is_answered_in_it(runtime: Runtime) -> None:
    """Its prompt needs a read the raw claim's session cannot make: a WAL
    reader makes it, and the run is answered in the claim as any other,
    the claim's next run too (the refused read left its transaction good)."""
    run_id, other_id = await _make_runs(runtime, 2)
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        await _thread_longer_than_the_prefetch(session, run)
    with _engine_events(runtime, "engine_connect") as made:
        executions = await execute.claim_and_start(runtime, _OWNER, 2, 60.0, {})
    assert [(execution.run_id, execution.finished) for execution in executions] == [(run_id, True), (other_id, True)]
    assert made == []  # (the reader's are the read engine's)
    assert await _statuses(runtime, [run_id, other_id]) == {run_id: "completed", other_id: "completed"}
    chat = executions[0]._started[1] if executions[0]._started is not None else []
    said = [message["content"] for message in chat if message["role"] == "user"]
    assert said == ["hi", *(f"m{n}" for n in range(40))]  # the whole thread, past the prefetch
    assert _checked_out(runtime) == 0


async def test_a_run_whose_log_this_process_has_not_seen_is_numbered_after_it_quietly(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """The raw claim reads nothing, so a run whose log's end this process
    does not know (created before a restart) is guessed to have an empty
    log; its insert numbers it after the real end, and the counter and the
    entries are corrected at the commit, without a warning."""
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        session.add(orm.RunEvent(run_id=run_id, seq=1, event="thread.run.created", data={}, created_at=1.0))
    execute.not_at_once(run_id)  # streamed: its deltas numbered from the counter the claim corrected
    async with runtime.bus.follow(run_id) as delivered:
        with caplog.at_level(logging.WARNING, logger="app.run_log"):
            (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
            await execute.run(execution)
        handed = [entry.seq for entries in _drained(delivered) for entry in entries]
    assert not [record for record in caplog.records if "renumbered" in record.getMessage()]
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    async with runtime.transaction() as session:
        seqs = (await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id))).all()
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    # A follower is handed the numbers as written, the guess corrected
    # before anyone saw it: everything after the one logged before.
    assert handed == list(range(2, len(seqs) + 1))


async def test_the_claims_checkout_takes_an_idle_connection_without_the_greenlet(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle, open connection is checked out without SQLAlchemy's
    greenlet; a connection invalidated (a lost one) is reopened through it
    (I/O), and the claim works."""
    through_greenlet = _checkouts_through_the_greenlet(monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)  # (leaves an idle connection in the pool)
    assert await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {}) != []
    assert through_greenlet == []
    with _before_send(_lose), pytest.raises(DBAPIError):
        await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})  # nothing claimable: the claim alone
    assert through_greenlet == []
    await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})  # the invalidated one reconnects
    assert through_greenlet == [runtime.engine]
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


async def test_a_failing_read_on_the_wal_reader_leaves_the_run_to_start_and_the_claim_goes_on(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's error says nothing of the claim's connection: its run
    is left to start() (which reads in a transaction of its own), the
    claim's other run is answered in it."""
    run_id, other_id = await _make_runs(runtime, 2)
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        await _thread_longer_than_the_prefetch(session, run)

    @asynccontextmanager
    async def failing_reader() -> AsyncIterator[Any]:
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))
        yield

    with monkeypatch.context() as patch:
        patch.setattr(runtime, "reading", failing_reader)
        executions = await execute.claim_and_start(runtime, _OWNER, 2, 60.0, {})
    assert [(execution.run_id, execution.finished) for execution in executions] == [
        (run_id, False),
        (other_id, True),
    ]
    await execute.run(executions[0])
    assert await _statuses(runtime, [run_id, other_id]) == {run_id: "completed", other_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


async def test_an_instant_answer_longer_than_one_insert_is_logged_in_the_raw_claim(runtime: Runtime) -> None:
    """More events than one SQLite insert statement takes: the raw claim
    cannot read the log's end for a larger insert, so its events go in
    several held-back inserts, in order; the claim commits, both runs
    answered in it, the log numbered 1..n with no gap."""
    (short_id,) = await _make_runs(runtime, 1)
    (long_id,) = await _make_runs(runtime, 1, text="[[tokens 400]]")
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, long_id)
        assert run is not None
        run.max_completion_tokens = 256
    executions = await execute.claim_and_start(runtime, _OWNER, 2, 60.0, {})
    assert sorted((execution.run_id, execution.finished) for execution in executions) == sorted(
        [(short_id, True), (long_id, True)]
    )
    assert await _statuses(runtime, [short_id, long_id]) == {short_id: "completed", long_id: "incomplete"}
    async with runtime.transaction() as session:
        seqs = (await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == long_id))).all()
        last = await session.scalar(
            select(orm.RunEvent.event).where(orm.RunEvent.run_id == long_id).order_by(orm.RunEvent.seq.desc()).limit(1)
        )
    assert len(seqs) > run_events._SQLITE_ONE_STATEMENT_ROWS
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert last == "thread.run.incomplete"
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


async def test_a_cancellation_giving_the_connection_back_after_the_commit_tells_the_log_committed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled in RawTransaction.end()'s give-back (an overflow
    connection's close is I/O) after its COMMIT: the run log is told the
    transaction committed (its events delivered, its counters kept), not
    rolled back."""
    (run_id,) = await _make_runs(runtime, 1)
    execute.not_at_once(run_id)  # started in the claim, streamed after: its events logged in it
    real = db.give_back
    giving_back = asyncio.Event()

    async def held_give_back(engine: AsyncEngine, pooled: Any) -> None:
        giving_back.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await real(engine, pooled)

    told: list[str] = []
    log = runtime.run_log
    committed, rolled_back = log.committed, log.rolled_back

    def tell_committed(session: Any) -> None:
        told.append("committed")
        committed(session)

    def tell_rolled_back(session: Any) -> None:
        told.append("rolled_back")
        rolled_back(session)

    monkeypatch.setattr(log, "committed", tell_committed)
    monkeypatch.setattr(log, "rolled_back", tell_rolled_back)
    async with runtime.bus.follow(run_id) as delivered:
        with monkeypatch.context() as patch:
            patch.setattr(db, "give_back", held_give_back)
            task = asyncio.create_task(execute.claim_and_start(runtime, _OWNER, 1, 60.0, {}))
            await asyncio.wait_for(giving_back.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert told == ["committed"]
        handed = [entry.seq for entries in _drained(delivered) for entry in entries]
    async with runtime.transaction() as session:
        seqs = (await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id))).all()
    assert seqs and handed == sorted(seqs)
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


async def test_a_raw_claims_orm_changes_are_refused_and_rolled_back(runtime: Runtime) -> None:
    """Nothing flushes a raw transaction's ORM changes: a real error (not
    an assert, gone under ``python -O``), the claim rolled back."""
    (run_id,) = await _make_runs(runtime, 1)
    with pytest.raises(RuntimeError, match="ORM changes"):
        async with runtime.claiming() as session:
            assert await db.run_now(session, _STAMP, {"run_id": run_id}) == [{"id": run_id}]
            session.add(orm.RunEvent(run_id=run_id, seq=1, event="thread.run.created", data={}, created_at=1.0))
    await _nothing_left(runtime, run_id)


@pytest.mark.parametrize("ending", ["failed", "committed"])
async def test_a_session_close_that_raises_still_frees_the_lock_and_gives_the_connection_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The raw transaction's session close (no I/O, but SQLAlchemy's code)
    raises, after the claim failed or after it committed: end() runs all the
    same, the write lock freed and the connection given back (before, a
    close that raised skipped end(), on either path)."""
    (run_id,) = await _make_runs(runtime, 1)
    closing = type(runtime.sessionmaker().sync_session)
    real_close = closing.close
    raised: list[bool] = []

    def close_raising_once(self: Any) -> None:
        if not raised:
            raised.append(True)
            raise OSError("close failed")
        real_close(self)

    with pytest.raises(OSError, match="close failed"):
        async with runtime.claiming() as session:
            assert await db.run_now(session, _STAMP, {"run_id": run_id}) == [{"id": run_id}]
            monkeypatch.setattr(closing, "close", close_raising_once)
            if ending == "failed":
                raise RuntimeError("the claim fails")
    assert raised == [True]
    assert _checked_out(runtime) == 0
    assert db.writers_of(runtime.engine).idle()
    _lock_free(runtime)
    claimed = {"failed": None, "committed": "w"}[ending]
    async with runtime.transaction() as session:
        assert await session.scalar(select(orm.Run.lease_owner).where(orm.Run.id == run_id)) == claimed


async def test_a_pool_with_a_checkout_listener_is_checked_out_through_the_greenlet(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout listener may do I/O, which needs SQLAlchemy's greenlet:
    the idle connection is not taken without it then."""
    through_greenlet = _checkouts_through_the_greenlet(monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)  # (leaves an idle connection in the pool)
    checked: list[object] = []
    pool = runtime.engine.sync_engine.pool
    listener = lambda dbapi_connection, record, proxy: checked.append(dbapi_connection)  # noqa: E731
    event.listen(pool, "checkout", listener)
    try:
        (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    finally:
        event.remove(pool, "checkout", listener)
    assert execution.finished and through_greenlet == [runtime.engine] and checked
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    _lock_free(runtime)


def _checkouts_through_the_greenlet(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The engines whose raw checkout goes through SQLAlchemy's greenlet, from now on."""
    through_greenlet: list[object] = []
    real = AsyncEngine.raw_connection

    async def raw_connection(self: AsyncEngine) -> Any:
        through_greenlet.append(self)
        return await real(self)

    monkeypatch.setattr(AsyncEngine, "raw_connection", raw_connection)
    return through_greenlet


def _drained(queue: asyncio.Queue[Any]) -> Iterator[Any]:
    """What ``queue`` holds now, without waiting; a nudge (None) fails: every entry is handed over."""
    while not queue.empty():
        item = queue.get_nowait()
        assert item is not None, "a nudge: entries not handed over"
        yield item
