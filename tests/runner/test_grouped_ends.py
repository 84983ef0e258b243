"""Provider runs' ends grouped on SQLite (issue 17, branch provgroup): an
end whose writes are all held back (Runtime.grouped_writes) joins the group
of transactions queued for the file's write lock (app/sqlite_groups.py), so
the ends that queue together share one hop, each in its own savepoint,
each told its own outcome: a miss fails that end alone (made again the way
that reads), an append of the run by another transaction before the hop (a
cancel's) withdraws the end, and a failure of the hop fails every end,
none left waiting nor holding its run's deltas; nor does an end number
its events after another append of its run that has not committed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.util import await_only as await_

from app import db, llm, orm, sqlite_driver, sqlite_groups
from app.runner import execute
from app.runtime import Runtime
from app.services import run_state
from app.wire.events import Event
from tests.runner.helpers import until
from tests.runner.test_carried_end import _ended, _logged
from tests.runner.test_quick_answer import _provider, _written_message
from tests.runner.test_straight_commit import _checked_out
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # SQLite's groups

_OWNER = "test:0:grouped"


def _answers_whole(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    async def whole(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Fine.")
        yield llm.Finish("stop", llm.Usage(3, 2))

    _provider(runtime, monkeypatch, whole)
    monkeypatch.setattr(execute, "QUICK_ANSWER_SECONDS", 30)  # taken whole: written with the end


def _answer_held_and_deliveries_noted(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event, dict[str, list[tuple[int, str]]]]:
    """The model streams "Hello", then waits for ``finish`` before the rest
    and its Finish; the deltas and a cancel's poll wait for the end; every
    entry delivered to followers is noted (seq, event) by topic. Returns
    ``finish``, an unset event for the test's cancel, and the notes."""
    monkeypatch.setattr(runtime.run_log, "flush_seconds", 60)  # the deltas wait for the end
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)
    finish = asyncio.Event()

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await finish.wait()
        yield llm.TextDelta(" world")
        yield llm.Finish("stop", llm.Usage(3, 2))

    _provider(runtime, monkeypatch, streamed)
    delivered: dict[str, list[tuple[int, str]]] = {}
    deliver = runtime.bus.deliver

    def delivered_to(topic: str, entries: Any) -> None:
        delivered.setdefault(topic, []).extend((entry.seq, entry.event.name) for entry in entries)
        deliver(topic, entries)

    monkeypatch.setattr(runtime.bus, "deliver", delivered_to)
    return finish, asyncio.Event(), delivered


async def _claimed(runtime: Runtime, count: int) -> list[execute.RunExecution]:
    executions = await execute.claim_and_start(runtime, _OWNER, count, 60.0, {})
    assert len(executions) == count and not any(execution.finished for execution in executions)
    return executions


def _writers(runtime: Runtime) -> db.SQLiteWriters:
    return db._WRITERS[runtime.engine.sync_engine]


def _open_members(runtime: Runtime) -> int:
    groups = sqlite_groups._GROUPS.get(db.writers_of(runtime.engine))
    return 0 if groups is None or groups.open is None else len(groups.open.members)


def _hops_of_each(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The transactions in each grouped hop (commit_each) from now on."""
    sizes: list[int] = []
    real = sqlite_driver.OneHopConnection.commit_each

    def counted(self: sqlite_driver.OneHopConnection, begin: str, transactions: list[Any], *args: Any) -> Any:
        sizes.append(len(transactions))
        return real(self, begin, transactions, *args)

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_each", counted)
    return sizes


def _elsewhere(runtime: Runtime, change: str) -> None:
    """``change`` written to the file by another connection (the process's write lock is not SQLite's)."""
    other = sqlite3.connect(str(make_url(str(runtime.engine.url)).database), timeout=5.0)
    try:
        other.execute(change)
        other.commit()
    finally:
        other.close()


def _contiguous(logged: list[tuple[int, str, Any]]) -> bool:
    return [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))


async def test_ends_queued_for_the_lock_share_one_hop_and_a_miss_fails_its_own_end_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three provider runs end while the write lock is held: their ends go
    in one hop; the one whose run was cancelled meanwhile misses its
    compare-and-set, rolled back to its savepoint alone, and is made again
    reading (ended cancelled); the other two complete; every log 1..n."""
    _answers_whole(runtime, monkeypatch)
    run_ids = await _make_runs(runtime, 3)
    executions = await _claimed(runtime, 3)
    hops = _hops_of_each(monkeypatch)
    writers = _writers(runtime)
    await writers.hold()
    try:
        running = [asyncio.create_task(execute.run(execution)) for execution in executions]
        await until(lambda: _open_members(runtime) == 3, "the three ends in one group")
        missed = executions[1].run_id
        _elsewhere(runtime, f"UPDATE runs SET status = 'cancelling' WHERE id = '{missed}'")
    finally:
        writers.free()
    async with asyncio.timeout(30):
        await asyncio.gather(*running)
    assert hops[0] == 3
    for run_id in run_ids:
        status, last_error, text = await _ended(runtime, run_id)
        assert (status, last_error, text) == ("cancelled" if run_id == missed else "completed", None, "Fine.")
        logged = await _logged(runtime, run_id)
        assert _contiguous(logged) and logged[-1][1] == f"thread.run.{status}"
    assert runtime.run_log._unlocked == {} and _checked_out(runtime) == 0


async def test_a_cancel_appending_before_a_grouped_ends_hop_withdraws_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel's transaction that holds the write lock when a streamed
    answer's end (its deltas numbered and buffered) joins its group: the
    cancel's append takes the end out of the group (nothing of it sent), the
    deltas going in the cancel's append, numbered as followers saw them; the
    end made again reading ends the run cancelled, its text kept, the log
    1..n, nothing renumbered."""
    runs: list[str] = []
    monkeypatch.setattr(runtime.run_log, "flush_seconds", 60)  # the deltas wait for an append
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)  # no read of the run before its end
    finish = asyncio.Event()

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await until(lambda: bool(runtime.run_log._buffer.get(runs[0])), "the first delta published")
        yield llm.TextDelta(" world")
        await finish.wait()
        yield llm.Finish("stop", llm.Usage(3, 2))

    _provider(runtime, monkeypatch, streamed)
    runs.extend(await _make_runs(runtime, 1))
    (execution,) = await _claimed(runtime, 1)
    hops = _hops_of_each(monkeypatch)
    commits: list[int] = []
    real_join = sqlite_groups._join

    def joined(engine: Any, member: Any) -> None:
        commits.append(len(member.statements))
        real_join(engine, member)

    monkeypatch.setattr(sqlite_groups, "_join", joined)

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, runs[0])  # queued for the lock, ahead of the end's group
            assert run is not None
            name = await run_state.transition(session, run, "cancelling")
            await runtime.run_log.append(session, runs[0], [Event(name, {"id": runs[0]})], run_locked=True)

    writers = _writers(runtime)
    caplog.set_level(logging.WARNING, logger="app.run_log")
    ending = asyncio.create_task(execute.run(execution))
    try:
        await _written_message(runtime, runs[0])  # mid-answer, before the lock is held
        await until(lambda: len(runtime.run_log._buffer.get(runs[0], [])) == 2, "both deltas numbered, buffered")
        assert all(seq is not None for seq, _event in runtime.run_log._buffer[runs[0]])
        await writers.hold()
        try:
            cancelling = asyncio.create_task(cancel())
            await until(lambda: len(writers._lock._waiters) == 1, "the cancel queued for the lock")
            finish.set()
            await until(lambda: _open_members(runtime) == 1, "the end in its group")
        finally:
            writers.free()
    finally:
        finish.set()
    async with asyncio.timeout(30):
        await asyncio.gather(cancelling, ending)
    assert commits and hops == []  # the end joined, and was left out of its hop
    assert await _ended(runtime, runs[0]) == ("cancelled", None, "Hello world")
    logged = await _logged(runtime, runs[0])
    assert _contiguous(logged)
    names = [name for _seq, name, _data in logged]
    assert names.index("thread.run.cancelling") < names.index("thread.run.cancelled")
    deltas = [data["delta"]["content"][0]["text"]["value"] for _s, name, data in logged if name.endswith(".delta")]
    assert "".join(deltas) == "Hello world"
    assert [record.getMessage() for record in caplog.records if record.name == "app.run_log"] == []
    assert runtime.run_log._unlocked == {} and runtime.run_log._early_unwritten == 0


async def test_a_failed_hop_fails_every_grouped_end_and_leaves_each_run_as_it_was(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's hop fails whole (a disk error): each end is told (the
    database's error: its run stays in_progress, resumed later), none is
    left waiting, nothing of them is written, and none leaves its run
    marked appending or withdrawable (its next append numbered as before)."""
    _answers_whole(runtime, monkeypatch)
    run_ids = await _make_runs(runtime, 3)
    executions = await _claimed(runtime, 3)
    before = {run_id: await _logged(runtime, run_id) for run_id in run_ids}
    failed: list[int] = []

    async def broken(self: sqlite_driver.OneHopConnection, begin: str, transactions: list[Any], *args: Any) -> Any:
        failed.append(len(transactions))
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_each", broken)
    writers = _writers(runtime)
    await writers.hold()
    try:
        running = [asyncio.create_task(execute.run(execution)) for execution in executions]
        await until(lambda: _open_members(runtime) == 3, "the three ends in one group")
    finally:
        writers.free()
    async with asyncio.timeout(30):
        outcomes = await asyncio.gather(*running, return_exceptions=True)
    assert failed == [3]
    assert all(isinstance(outcome, OperationalError) for outcome in outcomes), outcomes
    for run_id in run_ids:
        assert await _logged(runtime, run_id) == before[run_id]
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, run_id)
            assert run is not None and (run.status, run.lease_owner) == ("in_progress", _OWNER)
    assert runtime.run_log._unlocked == {} and runtime.run_log._appending == {}
    assert _checked_out(runtime) == 0


async def test_a_grouped_end_beside_an_uncommitted_append_of_its_run_is_made_after_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel's transaction has appended to the run (its deltas taken,
    numbered) and not committed when the run's end comes (the lock held:
    grouped): the end does not number after an append that may still roll
    back; it is made again reading, after the cancel, which here rolls
    back: the run completes, its deltas logged once under the numbers
    followers saw, the log 1..n, nothing renumbered."""
    runs: list[str] = []
    monkeypatch.setattr(runtime.run_log, "flush_seconds", 60)  # the deltas wait for an append
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)
    finish, appended, roll_back = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await finish.wait()
        yield llm.Finish("stop", llm.Usage(3, 1))

    class _RolledBack(Exception):
        pass

    async def cancel_that_fails() -> None:
        with pytest.raises(_RolledBack):
            async with runtime.transaction() as session:
                run = await session.get(orm.Run, runs[0])
                assert run is not None
                name = await run_state.transition(session, run, "cancelling")
                await runtime.run_log.append(session, runs[0], [Event(name, {"id": runs[0]})], run_locked=True)
                appended.set()
                await roll_back.wait()
                raise _RolledBack

    _provider(runtime, monkeypatch, streamed)
    runs.extend(await _make_runs(runtime, 1))
    (execution,) = await _claimed(runtime, 1)
    caplog.set_level(logging.WARNING, logger="app.run_log")
    ending = asyncio.create_task(execute.run(execution))
    writers = _writers(runtime)
    try:
        await _written_message(runtime, runs[0])
        await until(lambda: bool(runtime.run_log._buffer.get(runs[0])), "the delta numbered, buffered")
        cancelling = asyncio.create_task(cancel_that_fails())
        async with asyncio.timeout(30):
            await appended.wait()
        finish.set()
        await until(lambda: len(writers._lock._waiters) == 1, "the end made again, queued for the lock")
    finally:
        finish.set()
        roll_back.set()
    async with asyncio.timeout(30):
        await asyncio.gather(cancelling, ending)
    assert await _ended(runtime, runs[0]) == ("completed", None, "Hello")
    logged = await _logged(runtime, runs[0])
    assert _contiguous(logged) and logged[-1][1] == "thread.run.completed"
    assert [name for _seq, name, _data in logged].count("thread.message.delta") == 1
    assert [record.getMessage() for record in caplog.records if record.name == "app.run_log"] == []
    assert runtime.run_log._unlocked == {} and runtime.run_log._early_unwritten == 0


async def test_a_cancel_let_in_after_a_grouped_hop_numbers_after_its_missed_end_is_undone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Three streamed answers' ends go in one hop while a cancel of one of
    them queues behind it for the write lock; that run's metadata changed
    from another connection, its end misses. The lock goes to the cancel
    only once every end's outcome is set (not at the hop's COMMIT), and the
    cancel's append undoes the missed end (its counter, its deltas back in
    the buffer) before it numbers, even if the end's task has not yet: the
    events followers were given are those logged, under their numbers,
    nothing renumbered. The windows are widened by events (without the
    fixes: the cancel numbered after the failed end's deltas, followers
    given the deltas and the cancel under one number)."""
    caplog.set_level(logging.WARNING, logger="app.run_log")
    finish, cancel_appended, delivered = _answer_held_and_deliveries_noted(runtime, monkeypatch)
    runs: list[str] = []
    real_hop, real_noted = sqlite_groups._hop, db.commit_noted_through

    async def hop_then_lock_handed(pooled: Any, members: Any, held: db.HeldLock, dialect: Any) -> Any:
        failures = await real_hop(pooled, members, held, dialect)
        if len(members) == 3 and not held._held:  # the lock handed on before the outcomes are set
            await cancel_appended.wait()  # the cancel that got it appends first
        return failures

    async def noted_after_the_cancel(session: Any, outcome: Any, *sending: Any, **expected: Any) -> None:
        try:
            await real_noted(session, outcome, *sending, **expected)
        except Exception:
            await cancel_appended.wait()  # the missed end's task resumes after the cancel's append
            raise

    monkeypatch.setattr(sqlite_groups, "_hop", hop_then_lock_handed)
    monkeypatch.setattr(db, "commit_noted_through", noted_after_the_cancel)
    runs.extend(await _make_runs(runtime, 3))
    executions = await _claimed(runtime, 3)
    writers = _writers(runtime)
    running = [asyncio.create_task(execute.run(execution)) for execution in executions]
    for run_id in runs:
        await _written_message(runtime, run_id)
    await until(lambda: all(runtime.run_log._buffer.get(run_id) for run_id in runs), "the deltas buffered")
    victim = runs[1]

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, victim)
            assert run is not None
            name = await run_state.transition(session, run, "cancelling")
            await runtime.run_log.append(session, victim, [Event(name, {"id": victim})], run_locked=True)
            cancel_appended.set()

    await writers.hold()
    try:
        finish.set()
        await until(lambda: _open_members(runtime) == 3, "the three ends in one group")
        await until(lambda: len(writers._lock._waiters) == 1, "the group queued for the lock")
        _elsewhere(runtime, f"UPDATE runs SET metadata = '{{\"k\": \"v\"}}' WHERE id = '{victim}'")
        cancelling = asyncio.create_task(cancel())
        await until(lambda: len(writers._lock._waiters) == 2, "the cancel queued behind the group")
    finally:
        finish.set()
        writers.free()
    async with asyncio.timeout(30):
        await asyncio.gather(cancelling, *running)
    for run_id in runs:
        logged = await _logged(runtime, run_id)
        assert _contiguous(logged)
        names = {seq: name for seq, name, _data in logged}
        assert [(seq, name) for seq, name in delivered[run_id] if names.get(seq) != name] == []
    assert (await _ended(runtime, victim))[0] == "cancelled"
    assert [record.getMessage() for record in caplog.records if record.name == "app.run_log"] == []
    assert runtime.run_log._unlocked == {} and runtime.run_log._early_unwritten == 0
    assert _checked_out(runtime) == 0


@pytest.mark.parametrize("lost", [False, True], ids=["failed", "lost"])
@pytest.mark.parametrize("path", ["raw", "connected"])
async def test_a_cancel_queued_behind_an_end_whose_commit_fails_numbers_after_it_is_undone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, path: str, lost: bool
) -> None:
    """The end of a streamed answer made alone (the lock idle: raw_writes,
    a db.RawTransaction; or, where claims_raw() is false, transaction()
    committed straight on the driver) while a cancel of its run queues
    behind it for the write lock; the run's metadata changed from another
    connection, its COMMIT fails. The lock goes to the cancel only once the
    end's run log appends are undone (its counter, its deltas back in the
    buffer): the events followers were given are those logged, under their
    numbers, nothing renumbered. The windows are widened: the end's task
    resumes from its failed COMMIT, and a raw end gives its connection
    back, only after the cancel's append if the lock has been handed on by
    then (without the fix: at the failed COMMIT, or a raw end's lock freed
    before its run log undone, the cancel numbered after the end's deltas,
    followers given a delta and the cancel under one number). ``lost``: the
    COMMIT fails as a lost connection instead ("no active connection"), whose
    invalidation closes the driver connection, and the close hands the lock
    on (without db.lost_after_undo: before the end's appends are undone)."""
    caplog.set_level(logging.WARNING, logger="app.run_log")
    finish, cancel_appended, delivered = _answer_held_and_deliveries_noted(runtime, monkeypatch)
    writers = _writers(runtime)
    real_noted, real_give_back = db.commit_noted_through, db.give_back
    failed: list[bool] = []
    queued = asyncio.Event()  # the cancel queued behind the end

    async def after_the_cancel() -> None:
        if queued.is_set() and not writers._lock._waiters:  # the lock handed on to the cancel
            async with asyncio.timeout(10):
                await cancel_appended.wait()

    async def noted_after_the_cancel(session: Any, outcome: Any, *sending: Any, **expected: Any) -> None:
        try:
            await real_noted(session, outcome, *sending, **expected)
        except Exception:
            failed.append(db.RAW in session.info)
            await after_the_cancel()  # the end's task resumes from its failed COMMIT
            raise

    async def given_back_after_the_cancel(engine: Any, pooled: Any) -> None:
        await after_the_cancel()  # RawTransaction.end() goes on after freeing the lock
        await real_give_back(engine, pooled)

    monkeypatch.setattr(db, "commit_noted_through", noted_after_the_cancel)
    monkeypatch.setattr(db, "give_back", given_back_after_the_cancel)
    monkeypatch.setattr(type(writers), "idle", lambda self: True)  # made alone, not grouped
    real_straight = sqlite_driver.OneHopConnection.commit_straight
    lost_once: list[bool] = []

    async def connection_lost(self: sqlite_driver.OneHopConnection, **options: bool) -> None:
        if queued.is_set() and not lost_once:  # the end's COMMIT, the first let in after the cancel queued
            lost_once.append(True)
            await self._connection.close()  # the connection lost under the COMMIT: "no active connection"
        await real_straight(self, **options)

    if lost:
        monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_straight", connection_lost)
    real_rollback = sqlite_driver.OneHopConnection.rollback

    def rolled_back_after_the_cancel(self: sqlite_driver.OneHopConnection) -> None:
        real_rollback(self)  # hands the lock on (a failed straight COMMIT left it to the rollback)
        if queued.is_set() and not writers._lock._waiters and not cancel_appended.is_set():
            # The end's task goes on from its ROLLBACK only after the cancel's
            # append, as it would when its session's close yields (an overflow
            # connection closed at the checkin: I/O): Runtime._roll_back's undo
            # must come before the rollback (without it, the cancel numbered
            # after the end's deltas).
            await_(after_the_cancel())

    if path == "connected":
        monkeypatch.setattr(sqlite_driver.OneHopConnection, "rollback", rolled_back_after_the_cancel)
    runs = await _make_runs(runtime, 1)
    executions = await _claimed(runtime, 1)
    if path == "connected":
        monkeypatch.setattr(runtime, "claims_raw", lambda: False)  # the end in transaction()
    running = [asyncio.create_task(execute.run(execution)) for execution in executions]
    victim = runs[0]
    await _written_message(runtime, victim)
    await until(lambda: bool(runtime.run_log._buffer.get(victim)), "the deltas buffered")

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, victim)
            assert run is not None
            name = await run_state.transition(session, run, "cancelling")
            await runtime.run_log.append(session, victim, [Event(name, {"id": victim})], run_locked=True)
            cancel_appended.set()

    await writers.hold()
    try:
        finish.set()
        await until(lambda: len(writers._lock._waiters) == 1, "the end queued for the lock")
        if not lost:
            _elsewhere(runtime, f"UPDATE runs SET metadata = '{{\"k\": \"v\"}}' WHERE id = '{victim}'")
        cancelling = asyncio.create_task(cancel())
        await until(lambda: len(writers._lock._waiters) == 2, "the cancel queued behind the end")
        queued.set()
    finally:
        writers.free()
    async with asyncio.timeout(30):
        outcomes = await asyncio.gather(cancelling, *running, return_exceptions=lost)
    assert failed[:1] == [path == "raw"]  # the end's COMMIT failed, on the path meant
    if lost:  # the end's failure is the executor's (the run left cancelling, to recovery)
        assert lost_once == [True] and outcomes[0] is None
        assert isinstance(outcomes[1], OperationalError) and outcomes[1].connection_invalidated
    logged = await _logged(runtime, victim)
    assert _contiguous(logged)
    names = {seq: name for seq, name, _data in logged}
    assert [(seq, name) for seq, name in delivered[victim] if names.get(seq) != name] == []
    assert (await _ended(runtime, victim))[0] == ("cancelling" if lost else "cancelled")
    assert [record.getMessage() for record in caplog.records if record.name == "app.run_log"] == []
    assert runtime.run_log._unlocked == {} and runtime.run_log._early_unwritten == 0
    assert _checked_out(runtime) == 0


async def test_a_grouped_end_withdrawn_as_its_caller_is_cancelled_is_no_warning(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A grouped end withdrawn by a cancel's append (sqlite_groups.Withdrawn)
    in the very step its caller is cancelled: db.seen_through finds the
    outcome already set, a withdrawal its caller would have made again,
    which is noted, not warned of as a failed COMMIT; nothing of the end
    written, its delta back in the buffer, the cancel committed."""
    runs: list[str] = []
    monkeypatch.setattr(runtime.run_log, "flush_seconds", 60)  # the delta waits for an append
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)
    finish = asyncio.Event()

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await finish.wait()
        yield llm.Finish("stop", llm.Usage(3, 1))

    _provider(runtime, monkeypatch, streamed)
    runs.extend(await _make_runs(runtime, 1))
    (execution,) = await _claimed(runtime, 1)
    ending = asyncio.create_task(execute.run(execution))
    withdraw = runtime.run_log._withdraw_unlocked

    def withdrawn_and_cancelled(run_id: str, session: Any) -> None:
        grouped = runtime.run_log._unlocked.get(run_id)
        withdraw(run_id, session)
        if grouped is not None and grouped.session is not session:
            ending.cancel()  # its caller cancelled before it resumes to learn it was withdrawn

    monkeypatch.setattr(runtime.run_log, "_withdraw_unlocked", withdrawn_and_cancelled)

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, runs[0])
            assert run is not None
            name = await run_state.transition(session, run, "cancelling")
            await runtime.run_log.append(session, runs[0], [Event(name, {"id": runs[0]})], run_locked=True)

    writers = _writers(runtime)
    caplog.set_level(logging.DEBUG, logger="app.db")
    try:
        await _written_message(runtime, runs[0])
        await until(lambda: bool(runtime.run_log._buffer.get(runs[0])), "the delta numbered, buffered")
        await writers.hold()
        try:
            cancelling = asyncio.create_task(cancel())
            await until(lambda: len(writers._lock._waiters) == 1, "the cancel queued for the lock")
            finish.set()
            await until(lambda: _open_members(runtime) == 1, "the end in its group")
        finally:
            writers.free()
    finally:
        finish.set()
    async with asyncio.timeout(30):
        await cancelling
        with pytest.raises(asyncio.CancelledError):
            await ending
    noted = [record for record in caplog.records if "a cancelled transaction's COMMIT" in record.getMessage()]
    assert [record.levelno for record in noted] == [logging.DEBUG] and "withdrawn" in noted[0].getMessage()
    logged = await _logged(runtime, runs[0])
    assert _contiguous(logged) and [name for _seq, name, _data in logged][-2:] == [
        "thread.message.delta",
        "thread.run.cancelling",
    ]
    assert runtime.run_log._unlocked == {} and runtime.run_log._appending == {}
    assert _checked_out(runtime) == 0


@pytest.mark.parametrize("when", ["unsent", "sent"])
async def test_a_cancelled_caller_of_a_grouped_end(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Two streamed answers' ends grouped; the first's caller cancelled.
    Before its hop is sent: left out of it, nothing of it written, the run
    still in progress, its delta back in the buffer. Once sent: its commit
    seen through (db.seen_through), the run completed, its log 1..n. The
    other end commits either way."""
    monkeypatch.setattr(runtime.run_log, "flush_seconds", 60)  # the deltas wait for the end
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)
    finish = asyncio.Event()
    runs: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    hops: list[int] = []

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await finish.wait()
        yield llm.Finish("stop", llm.Usage(3, 1))

    _provider(runtime, monkeypatch, streamed)
    real_hop = sqlite_groups._hop

    async def cancelled_in_flight(pooled: Any, members: Any, held: db.HeldLock, dialect: Any) -> Any:
        hops.append(len(members))
        if when == "sent":
            assert all(member.sending.sent for member in members)
            tasks[0].cancel()  # delivered while the hop's thread works: the loop turns before its answer
        return await real_hop(pooled, members, held, dialect)

    monkeypatch.setattr(sqlite_groups, "_hop", cancelled_in_flight)
    runs.extend(await _make_runs(runtime, 2))
    executions = await _claimed(runtime, 2)
    tasks.extend(asyncio.create_task(execute.run(execution)) for execution in executions)
    for run_id in runs:
        await _written_message(runtime, run_id)
    await until(lambda: all(runtime.run_log._buffer.get(run_id) for run_id in runs), "the deltas buffered")
    before = await _logged(runtime, runs[0])
    writers = _writers(runtime)
    await writers.hold()
    try:
        finish.set()
        await until(lambda: _open_members(runtime) == 2, "the two ends in one group")
        if when == "unsent":
            tasks[0].cancel()
            async with asyncio.timeout(30):
                await asyncio.gather(tasks[0], return_exceptions=True)
    finally:
        finish.set()
        writers.free()
    async with asyncio.timeout(30):
        await asyncio.gather(*tasks, return_exceptions=True)
    assert tasks[0].cancelled()
    assert hops == ([1] if when == "unsent" else [2])
    assert await _ended(runtime, runs[1]) == ("completed", None, "Hello")
    after = await _logged(runtime, runs[0])
    if when == "unsent":
        assert after == before
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, runs[0])
            assert run is not None and run.status == "in_progress"
        assert [event.name for _seq, event in runtime.run_log._buffer.get(runs[0], [])] == ["thread.message.delta"]
    else:
        assert await _ended(runtime, runs[0]) == ("completed", None, "Hello")
        assert _contiguous(after) and after[-1][1] == "thread.run.completed"
        assert not runtime.run_log._buffer.get(runs[0])  # its delta logged, not put back to go again
    assert runtime.run_log._unlocked == {} and runtime.run_log._appending == {}
    assert _checked_out(runtime) == 0
