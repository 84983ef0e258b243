"""The worker's claim as a raw SQLite transaction (Runtime.claiming, issue
17): on a connection checked out of the pool raw, with no SQLAlchemy
Connection, transaction or greenlet, its claim sent with BEGIN IMMEDIATE
and its writes held back to one COMMIT hop. Every failure leaves nothing
of the claim, the write lock free and the connection back (or closed):
a failing statement, a cancellation mid-hop, a read through the session
(refused at once rather than after the lock's timeout). Each is run on
asyncio and on uvloop (the server's loop). test_straight_commit runs the
rest on the raw claim too: a failing held-back write, a lost connection
(503) at the claim's statement and at its COMMIT, the COMMIT cancelled or
refused for its data, an overflow connection."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db, ids, orm
from app.runner import execute
from app.runtime import Runtime
from app.settings import Settings
from tests.runner.test_straight_commit import (
    LOOPS,
    _checked_out,
    _lock_free,
    _on,
    before_send,
    cancelled_in_its_hop,
    engine_events,
    lose_connection,
)
from tests.runner.test_worker import _make_runs, _statuses

pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

_OWNER = "test:0:raw"
_RUNS = orm.Run.__table__
_STAMP = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(lease_owner="w").returning(_RUNS.c.id)
_MISS = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(status="failed")


async def _nothing_left(runtime: Runtime, run_id: str) -> None:
    """The run as before the claim, the connection back, the lock free; the
    next claim answers it."""
    assert await _statuses(runtime, [run_id]) == {run_id: "queued"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.finished and await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failing_statement_after_held_back_writes_rolls_back_what_it_carried(settings: Settings, loop: str) -> None:
    """A statement sent straight fails (a constraint) after writes held
    back and an earlier statement: the transaction is rolled back on the
    connection's thread, none of them stays."""

    async def body(runtime: Runtime) -> None:
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

    _on(loop, settings, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_claim_cancelled_during_its_statements_hop_leaves_nothing(settings: Settings, loop: str) -> None:
    """Cancelled while its BEGIN IMMEDIATE and claim wait for the
    connection's thread (busy, as under load): the thread may still run
    them after the task has gone, so the connection is closed with them
    (invalidated), the lock freed, and the run claimed again afterwards."""

    async def body(runtime: Runtime) -> None:
        (run_id,) = await _make_runs(runtime, 1)
        await cancelled_in_its_hop(execute.claim_and_start(runtime, _OWNER, 1, 60.0, {}), before_send)
        await _nothing_left(runtime, run_id)

    _on(loop, settings, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_read_through_the_raw_session_is_refused_at_once(settings: Settings, loop: str) -> None:
    """The session would wait for the write lock its own transaction
    holds: refused at once, and the transaction rolled back."""

    async def body(runtime: Runtime) -> None:
        (run_id,) = await _make_runs(runtime, 1)
        async with asyncio.timeout(5):
            with pytest.raises(db.RawSessionConnected):
                async with runtime.claiming() as session:
                    assert await db.run_now(session, _STAMP, {"run_id": run_id}) == [{"id": run_id}]
                    await session.execute(select(orm.Run.id))
        await _nothing_left(runtime, run_id)

    _on(loop, settings, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_run_with_a_longer_thread_than_the_claim_reads_is_answered_in_it(settings: Settings, loop: str) -> None:
    """Its prompt needs a read the raw claim's session cannot make: a WAL
    reader makes it, and the run is answered in the claim as any other,
    the claim's next run too (the refused read left its transaction good)."""

    async def body(runtime: Runtime) -> None:
        run_id, other_id = await _make_runs(runtime, 2)
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, run_id)
            assert run is not None
            for n in range(40):  # past the claim's prefetch
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
        with engine_events(runtime, "engine_connect") as connections:
            executions = await execute.claim_and_start(runtime, _OWNER, 2, 60.0, {})
        assert [(execution.run_id, execution.finished) for execution in executions] == [
            (run_id, True),
            (other_id, True),
        ]
        assert connections == []  # (the reader's are the read engine's)
        assert await _statuses(runtime, [run_id, other_id]) == {run_id: "completed", other_id: "completed"}
        chat = executions[0]._started[1] if executions[0]._started is not None else []
        said = [message["content"] for message in chat if message["role"] == "user"]
        assert said == ["hi", *(f"m{n}" for n in range(40))]  # the whole thread, past the prefetch
        assert _checked_out(runtime) == 0

    _on(loop, settings, body)


def test_a_run_whose_log_this_process_has_not_seen_is_numbered_after_it_quietly(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The raw claim reads nothing, so a run whose log's end this process
    does not know (created before a restart) is guessed to have an empty
    log; its insert numbers it after the real end, and the counter and the
    entries are corrected at the commit, without a warning."""

    async def body(runtime: Runtime) -> None:
        (run_id,) = await _make_runs(runtime, 1)
        async with runtime.transaction() as session:
            session.add(orm.RunEvent(run_id=run_id, seq=1, event="thread.run.created", data={}, created_at=1.0))
        execute.not_at_once(run_id)  # streamed: its deltas numbered from the counter the claim corrected
        (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
        await execute.run(execution)
        assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
        async with runtime.transaction() as session:
            seqs = (await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id))).all()
        assert sorted(seqs) == list(range(1, len(seqs) + 1))

    with caplog.at_level(logging.WARNING, logger="app.run_log"):
        _on("asyncio", settings, body)
    assert not [record for record in caplog.records if "renumbered" in record.getMessage()]


@pytest.mark.parametrize("loop", LOOPS)
def test_the_claims_checkout_takes_an_idle_connection_without_the_greenlet(
    settings: Settings, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle, open connection is checked out without SQLAlchemy's
    greenlet; an empty pool, or a connection invalidated (a lost one),
    goes through it (it opens a connection: I/O), and the claim works."""
    through_greenlet: list[object] = []
    real = AsyncEngine.raw_connection

    async def raw_connection(self: AsyncEngine) -> Any:
        through_greenlet.append(self)
        return await real(self)

    monkeypatch.setattr(AsyncEngine, "raw_connection", raw_connection)

    async def body(runtime: Runtime) -> None:
        (run_id,) = await _make_runs(runtime, 1)  # (leaves an idle connection in the pool)
        assert await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {}) != []
        assert through_greenlet == []
        with before_send(lose_connection), pytest.raises(DBAPIError):
            await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})  # nothing claimable: the claim alone
        assert through_greenlet == []
        await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})  # the invalidated one reconnects
        assert through_greenlet == [runtime.engine]
        assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
        assert _checked_out(runtime) == 0
        _lock_free(runtime)

    _on(loop, settings, body)
