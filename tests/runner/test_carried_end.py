"""A run's end after its claim (issue 17): on PostgreSQL the turn's rows,
the run's move and its events are one statement, the move a compare-and-set
that also requires the run as the execution holds it; when it misses, the
end is made again the way that reads the run first, and nothing is lost or
numbered twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import event, insert, make_url, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from app import db, ids, llm, orm, sqlite_driver
from app.activity import ACTIVITY
from app.runner import execute
from app.runtime import Runtime
from app.services import core_rows, run_events, run_state
from app.wire.events import Event
from app.worker import Worker
from tests.runner.helpers import until
from tests.runner.test_quick_answer import _message, _provider, _written_message
from tests.runner.test_raw_autocommit import raw_checkouts, refused_checkouts
from tests.runner.test_straight_commit import _checked_out, _commits, _engine_events, _lock_free
from tests.runner.test_worker import _make_runs

_OWNER = "test:0:carried"


async def _started(runtime: Runtime, run_id: str) -> execute.RunExecution:
    """The run claimed and started (in_progress committed), not ended: its
    answer is streamed."""
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.run_id == run_id and not execution.finished
    return execution


async def _logged(runtime: Runtime, run_id: str) -> list[tuple[int, str, Any]]:
    async with runtime.transaction() as session:
        query = select(orm.RunEvent.seq, orm.RunEvent.event, orm.RunEvent.data).where(orm.RunEvent.run_id == run_id)
        return [(seq, name, data) for seq, name, data in (await session.execute(query.order_by(orm.RunEvent.seq)))]


def _sent(runtime: Runtime, *fragments: str) -> list[str]:
    """The statements containing every one of ``fragments`` sent from now on
    (until the runtime closes)."""
    seen: list[str] = []

    def before(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if all(fragment in statement for fragment in fragments):
            seen.append(statement)

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", before)
    return seen


# The end's way that reads the run first; a move carried by the events'
# insert that requires the run's metadata unchanged.
_READ_LOCKED = ("FROM runs", "FOR UPDATE")
_CARRIED_END = ("INSERT INTO run_events", "CAST(runs.metadata AS JSONB) =")
# SQLite: the end's compare-and-set, held back to the COMMIT, also requiring
# the run's metadata as the execution holds it.
_HELD_BACK_END = ("UPDATE runs", "json(runs.metadata) = json(")


def _answers_quickly(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model streams its whole answer at once, as a provider's (never
    answered in the claim): written with the run's end, however loaded the
    machine (no message written while the model is silent)."""

    async def quick(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        yield llm.Finish("stop", llm.Usage(3, 1))

    _provider(runtime, monkeypatch, quick)
    monkeypatch.setattr(execute, "QUICK_ANSWER_SECONDS", 30)


def _answers_slowly(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The model streams "Hello", then " world" once the returned event is
    set: its message is written mid-answer, its deltas buffered."""
    go_on = asyncio.Event()

    async def slow(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await go_on.wait()
        yield llm.TextDelta(" world")
        yield llm.Finish("stop", llm.Usage(3, 2))

    _provider(runtime, monkeypatch, slow)
    return go_on


async def test_metadata_changed_while_a_run_executes_is_in_its_end_event(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completed event carries the run as it is when it ends: metadata
    updated during its execution included (on PostgreSQL the carried move
    misses on it, and the end reads the run)."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_={"stage": "late"}))
    reads, carried = _sent(runtime, *_READ_LOCKED), _sent(runtime, *_CARRIED_END)
    held, read = _sent(runtime, *_HELD_BACK_END), _sent(runtime, "FROM runs")
    await execute.run(execution)
    if runtime.run_log.postgres:
        assert carried and reads  # tried carried, made again reading first
    else:
        assert held and read  # tried held back, failed at the COMMIT, made again reading first
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    (completed,) = [data for _seq, name, data in logged if name == "thread.run.completed"]
    assert completed["status"] == "completed" and completed["metadata"] == {"stage": "late"}


async def test_metadata_reordered_while_a_run_executes_is_in_its_end_event_in_the_new_order(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same metadata posted again in another key order while the run
    executes: the end event gives the new order, as a GET does (PostgreSQL's
    jsonb equality is blind to order; the end's check must not be)."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_={"a": "1", "b": "2"}))
    execution = await _started(runtime, run_id)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_={"b": "2", "a": "1"}))
    await execute.run(execution)
    (completed,) = [data for _seq, name, data in await _logged(runtime, run_id) if name == "thread.run.completed"]
    assert list(completed["metadata"]) == ["b", "a"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has one writer at a time
async def test_an_end_that_waited_for_a_concurrent_append_numbers_its_events_after_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append committed while the end's statement waited for the run's
    row (its snapshot taken before): the statement's numbering collides with
    it and fails, and the end is made again, reading first: every event
    logged once, in order after the other append's, the run completed."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    reads, carried = _sent(runtime, *_READ_LOCKED), _sent(runtime, *_CARRIED_END)
    async with runtime.engine.connect() as other:
        await other.execute(select(orm.Run.id).where(orm.Run.id == run_id).with_for_update())
        next_seq = text("SELECT max(seq) + 1 FROM run_events WHERE run_id = :run_id")
        seq = (await other.execute(next_seq, {"run_id": run_id})).scalar()
        inserted = {"run_id": run_id, "seq": seq, "event": "thread.run.other", "data": {}, "created_at": 0}
        await other.execute(insert(orm.RunEvent).values(**inserted))
        ending = asyncio.create_task(execute.run(execution))
        async with asyncio.timeout(20):
            while not await _end_waits_for_the_row(runtime):  # noqa: ASYNC110 (another process's state)
                await asyncio.sleep(0.01)
        await other.commit()
    async with asyncio.timeout(20):
        await ending
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    names = [name for _seq, name, _data in logged]
    assert names.index("thread.run.other") < names.index("thread.run.step.created")
    assert names[-1] == "thread.run.completed" and names.count("thread.message.completed") == 1
    assert carried and reads  # tried carried, made again reading first


async def _end_waits_for_the_row(runtime: Runtime) -> bool:
    """Whether the end's statement (its move carried by the events' insert,
    after the turn's rows: the text pg_stat_activity keeps is cut short) waits
    for a lock."""
    async with runtime.engine.connect() as watcher:
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH guarded_row AS%'"
        )
        return bool((await watcher.execute(waiting)).scalar())


async def test_an_end_after_the_claim_is_carried_when_nothing_changed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case takes the one statement on PostgreSQL, with no read
    of the run first (a guard that always missed would cost every run a
    failed statement and a second transaction, unseen by the other tests)."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    reads, carried = _sent(runtime, *_READ_LOCKED), _sent(runtime, *_CARRIED_END)
    await execute.run(execution)
    logged = await _logged(runtime, run_id)
    assert logged[-1][1] == "thread.run.completed"
    if runtime.run_log.postgres:
        assert len(carried) == 1 and reads == []


async def test_a_cancel_requested_mid_run_ends_it_cancelled(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(status="cancelling"))
    await execute.run(execution)
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == "thread.run.cancelled"
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and run.status == "cancelled"


async def test_a_run_taken_over_mid_run_is_left_as_the_other_worker_has_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)

    async def take_over() -> None:
        async with runtime.transaction() as session:
            await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(lease_owner="test:1:other"))

    await _runs_taken_over(runtime, execution, take_over)


async def _runs_taken_over(
    runtime: Runtime, execution: execute.RunExecution, take_over: Callable[[], Awaitable[None]]
) -> None:
    """``take_over()`` (the run's lease given to test:1:other, at once or
    later), then ``execution`` run: the lease lost, it stops with nothing
    written, the run as the other worker has it."""
    run_id = execution.run_id
    before = await _logged(runtime, run_id)
    messages = select(orm.Message.id).join(orm.Run, orm.Run.thread_id == orm.Message.thread_id)
    messages = messages.where(orm.Run.id == run_id)
    async with runtime.transaction() as session:
        messages_before = (await session.execute(messages)).scalars().all()
    await take_over()
    await execute.run(execution)  # the lease lost: stopped here, nothing written
    assert await _logged(runtime, run_id) == before
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and (run.status, run.lease_owner) == ("in_progress", "test:1:other")
        assert (await session.execute(messages)).scalars().all() == messages_before


def _autocommitted(runtime: Runtime, *fragments: str) -> list[bool]:
    """For each statement containing every one of ``fragments`` sent from
    now on (until the runtime closes): whether it was sent outside a
    transaction block (autocommit: no BEGIN before it, no COMMIT after)."""
    seen: list[bool] = []

    def before(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if all(fragment in statement for fragment in fragments):
            # No SQLAlchemy Connection: sent on one checked out raw in
            # autocommit (db.autocommit_connection, a unit of work's one statement).
            seen.append(connection is None or connection.connection.dbapi_connection.autocommit)

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", before)
    return seen


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_an_end_after_the_claim_is_one_round_trip(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end's one statement is its own transaction (autocommit): no
    BEGIN, no COMMIT, no read of the run (issue 17: 3 round trips -> 1)."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    reads, carried = _sent(runtime, *_READ_LOCKED), _autocommitted(runtime, *_CARRIED_END)
    raw = raw_checkouts(monkeypatch)
    await execute.run(execution)
    assert (carried, reads) == ([True], [])
    assert len(raw) == 1 and raw[0] is not None  # on a connection checked out raw (db.autocommit_connection)
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == "thread.run.completed"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_an_end_beside_other_runs_metadata_is_still_one_round_trip(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end's check of the run's metadata key order reads this run's
    metadata alone: other runs with other keys make it miss nothing (an
    uncorrelated subquery read every run's keys: every end missed and was
    made again reading, at a scan of the table each)."""
    _answers_quickly(runtime, monkeypatch)
    run_ids = await _make_runs(runtime, 2)
    async with runtime.transaction() as session:
        for run_id, metadata in zip(run_ids, ({"a": "1"}, {"k": "v", "b": "2"}), strict=True):
            await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_=metadata))
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    reads, carried = _sent(runtime, *_READ_LOCKED), _autocommitted(runtime, *_CARRIED_END)
    await execute.run(execution)
    assert (carried, reads) == ([True], [])


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_a_move_carried_alone_that_misses_writes_nothing(runtime: Runtime) -> None:
    """A move carried alone (after the claim), sent outside a transaction
    block, that finds the run in another lease: its rows and its events are
    not written, though nothing rolls the statement back."""
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        run_state.hold(run, "in_progress")  # as its execution holds it; the database has it queued
    seq = ids.next_seq()
    step = core_rows.record(
        orm.RunStep, id=ids.new_id(ids.STEP, seq), seq=seq, run_id=run_id, thread_id=run.thread_id,
        assistant_id=run.assistant_id, type="message_creation", status="completed", step_details={}, created_at=0,
    )  # fmt: skip
    write = core_rows.insert_write(step, "w0_", guard=run_state.MOVED_CTE)
    name, carried = run_state.carried_move(
        run, "completed", held=None, lease_owner=_OWNER, alongside=[write], unchanged=True
    )
    assert carried.alone
    with pytest.raises(run_state.TransitionConflict):
        async with runtime.unit_of_work() as session:
            await session.connection(execution_options=db.AUTOCOMMIT)
            await run_events.insert_carrying(session, run_id, [Event(name, {"id": run_id})], carried)
    async with runtime.transaction() as session:
        steps = (await session.scalars(select(orm.RunStep.id).where(orm.RunStep.run_id == run_id))).all()
        logged = (await session.scalars(select(orm.RunEvent.event).where(orm.RunEvent.run_id == run_id))).all()
    assert steps == [] and name not in logged


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_a_streamed_answers_end_is_one_round_trip(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer streamed while the model was slow (its message and step
    written mid-answer, updated at the end) ends in one statement too, its
    own transaction: the rows' updates carried (their parameters no longer
    taken by SQLAlchemy for an update of their run_id column)."""
    go_on = _answers_slowly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    running = asyncio.ensure_future(execute.run(execution))
    try:
        await _written_message(runtime, run_id)
        reads, carried = _sent(runtime, *_READ_LOCKED), _autocommitted(runtime, *_CARRIED_END)
        updated = _sent(runtime, *_CARRIED_END, "UPDATE messages", "UPDATE run_steps")
    finally:
        go_on.set()
    async with asyncio.timeout(20):
        await running
    assert (carried, reads, len(updated)) == ([True], [], 1)
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == "thread.run.completed"
    async with runtime.transaction() as session:
        message = (await session.scalars(select(orm.Message).where(orm.Message.run_id == run_id))).one()
    assert message.status == "completed" and message.content[0]["text"]["value"] == "Hello world"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_an_end_cancelled_while_its_statement_commits_hands_on_what_it_wrote(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The execution cancelled (shutdown, a lost lease) while its end's
    autocommitted statement is in flight: the statement's outcome is waited
    for, so what it committed is handed on as committed; the deltas it
    logged are not taken back and written again after the run's last event."""
    committed, resume = asyncio.Event(), asyncio.Event()
    original = run_events.insert_carrying

    async def in_flight(*args: Any, **kwargs: Any) -> int:
        first = await original(*args, **kwargs)
        committed.set()
        await resume.wait()  # as if the statement's answer were still on its way
        return first

    go_on = _answers_slowly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    running = asyncio.ensure_future(execute.run(execution))
    await _written_message(runtime, run_id)
    monkeypatch.setattr(run_events, "insert_carrying", in_flight)
    delivered: list[str] = []
    deliver = runtime.run_log.bus.deliver

    def delivering(topic: str, entries: Any) -> None:
        delivered.extend(entry.event.name for entry in entries if topic == run_id)
        deliver(topic, entries)

    monkeypatch.setattr(runtime.run_log.bus, "deliver", delivering)
    go_on.set()
    async with asyncio.timeout(20):
        await committed.wait()
        running.cancel()
        await asyncio.sleep(0)  # the cancellation delivered
        resume.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        await runtime.run_log.flush()
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == "thread.run.completed"
    assert delivered[-1:] == ["thread.run.completed"]  # handed to followers as committed


async def test_an_append_held_after_a_flush_took_the_runs_deltas_waits_for_that_flush(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher took a run's deltas (it holds the run's row) just before
    the executor's end holds the run: the end waits for that flush, and
    numbers its events after the deltas. Sent at once, PostgreSQL's
    one-statement end, its snapshot taken before the row's lock, numbered
    over them, failed and was made again the slow way (review of pgend: a
    streamed answer's end usually comes right after its last delta)."""
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    run_log = runtime.run_log
    await run_log.flush()  # (nothing buffered yet: the run's log as it is)
    inserting, go_on = asyncio.Event(), asyncio.Event()

    def held_up(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def inserted(*args: Any, **kwargs: Any) -> Any:
            inserting.set()
            await go_on.wait()
            return await original(*args, **kwargs)

        return inserted

    # (A SQLite file's flush inserts in a raw transaction: insert_live_behind;
    # PostgreSQL's is one statement: flush_postgres.)
    for name in ("insert", "insert_live_behind", "flush_postgres"):
        monkeypatch.setattr(run_events, name, held_up(getattr(run_events, name)))
    run_log.publish(run_id, [Event("thread.message.delta", {"id": "msg_x", "delta": {}})])
    flushing = asyncio.ensure_future(run_log.flush())
    entered = asyncio.Event()

    async def end() -> None:
        async with run_log.holding(run_id):
            entered.set()
            async with runtime.transaction() as session:
                await run_log.append(session, run_id, [Event("thread.run.completed", {"id": run_id})])

    tasks = [flushing]
    try:
        async with asyncio.timeout(20):
            await inserting.wait()  # the deltas taken, the flush's statement on its way
            tasks.append(asyncio.ensure_future(end()))
            await until(lambda: run_id in run_log._held, "the end to hold the run")
            assert not entered.is_set()  # waiting for the flush that took the deltas
            go_on.set()
            await asyncio.gather(*tasks)
    finally:
        go_on.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    logged = await _logged(runtime, run_id)
    assert [(seq, name) for seq, name, _data in logged][-2:] == [
        (logged[-2][0], "thread.message.delta"),
        (logged[-2][0] + 1, "thread.run.completed"),
    ]


def _hops_during_commits(monkeypatch: pytest.MonkeyPatch, *, lone_on_loop: bool = False) -> list[int]:
    """For each RunExecution._commit from now on: the statements it sent to
    aiosqlite's thread (hops: the deferred BEGIN and held-back writes go
    with a statement or the COMMIT, not alone). Unless ``lone_on_loop``,
    every COMMIT goes to the thread, as in a process serving several
    clients: a lone process's goes on the event loop's (no hop at all)."""
    if not lone_on_loop:
        monkeypatch.setattr(sqlite_driver, "COMMITS_ON_LOOP", False)
    counts: list[int] = []
    hop = aiosqlite.Connection._execute
    commit = execute.RunExecution._commit
    counting: list[int] = []

    async def hopping(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if counting:
            counting[-1] += 1
        return await hop(self, fn, *args, **kwargs)

    async def committing(self: execute.RunExecution, *args: Any, **kwargs: Any) -> None:
        counting.append(0)
        try:
            await commit(self, *args, **kwargs)
        finally:
            counts.append(counting.pop())

    monkeypatch.setattr(aiosqlite.Connection, "_execute", hopping)
    monkeypatch.setattr(execute.RunExecution, "_commit", committing)
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)  # no read of the watch among them
    return counts


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL: one statement (above)
async def test_an_end_after_the_claim_is_one_hop_on_sqlite(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The turn's rows, the run's move and its events go to aiosqlite's
    thread with the COMMIT: one hop, no read of the run, no statement whose
    outcome comes back before it (issue 17: 2 hops -> 1). The run's
    metadata, as stored and as bound for the move's check, compares equal."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    metadata = {"stage": "early", "note": 'café \u2028 "quoted"', "n": "1"}
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(metadata_=metadata))
    execution = await _started(runtime, run_id)
    hops = _hops_during_commits(monkeypatch)
    reads, held = _sent(runtime, "FROM runs"), _sent(runtime, *_HELD_BACK_END)
    await execute.run(execution)
    assert (hops, reads, len(held)) == ([1], [], 1)
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == "thread.run.completed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_lone_processs_end_commits_on_the_event_loops_thread_with_no_hop(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client's run in the process (app/activity.py): the end's one
    transaction, BEGIN IMMEDIATE to COMMIT, runs on the event loop's thread
    (sqlite_driver.COMMITS_ON_LOOP; issue 17), not on aiosqlite's, and is
    committed all the same."""
    assert ACTIVITY.lone()
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    hops = _hops_during_commits(monkeypatch, lone_on_loop=True)
    await execute.run(execution)
    assert hops == [0]
    logged = await _logged(runtime, run_id)
    assert logged[-1][1] == "thread.run.completed"
    async with runtime.transaction() as session:
        assert (await session.scalar(select(orm.Run.status).where(orm.Run.id == run_id))) == "completed"


async def test_the_worker_counts_the_runs_it_executes_and_none_once_they_end(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """app/activity.py's count of runs executing in a task (a lone
    process's SQLite commits go on the loop's thread): up while they run,
    back to zero once they have ended; a count left behind would keep every
    later commit off that path."""
    _answers_quickly(runtime, monkeypatch)
    run_ids = await _make_runs(runtime, 3)
    counted: list[int] = []
    start = Worker._start

    def counting_start(self: Worker, *args: Any) -> None:
        start(self, *args)
        counted.append(ACTIVITY.runs)

    monkeypatch.setattr(Worker, "_start", counting_start)
    await asyncio.wait_for(Worker(runtime, concurrency=4).run_until_idle(), 30)
    assert len(counted) == len(run_ids) and min(counted) >= 1
    assert ACTIVITY.runs == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL: one statement (above)
async def test_an_end_after_the_claim_takes_no_sqlalchemy_connection_on_sqlite(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its writes all held back, nothing read: the end goes on a raw
    transaction, as the claim does (Runtime.raw_writes; issue 17: no
    SQLAlchemy Connection checked out and begun, no SQLAlchemy commit),
    and leaves the connection back and the write lock free."""
    assert runtime.claims_raw()
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    held = _sent(runtime, *_HELD_BACK_END)
    with _engine_events(runtime, "engine_connect") as made, _commits(runtime) as commits:
        await execute.run(execution)
    assert (made, commits, len(held)) == ([], [], 1)
    assert _checked_out(runtime) == 0
    _lock_free(runtime)
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == "thread.run.completed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the raw end is SQLite's
async def test_a_long_streamed_answers_end_on_the_raw_transaction_logs_every_delta_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More deltas than one SQLite insert takes, streamed (too many to be
    taken at once), those the flusher has not written going with the end:
    on the raw transaction, which cannot read the log's end, they are still
    numbered 1..n in order, the text whole, the run completed."""
    words = [f"w{n} " for n in range(run_events._SQLITE_ONE_STATEMENT_ROWS + 100)]

    async def long(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        for word in words:
            yield llm.TextDelta(word)
        yield llm.Finish("stop", llm.Usage(3, len(words)))

    _provider(runtime, monkeypatch, long)
    monkeypatch.setattr(execute, "QUICK_ANSWER_SECONDS", 30)  # all of it comes before the first is published
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    raw_batches: list[int] = []
    original = run_events.insert_behind

    async def noted(session: Any, run: str, events: list[Event], returned: list[Any]) -> None:
        if db.RAW in session.info or db.GROUPED in session.info:  # the raw end, or its grouped one
            raw_batches.append(len(events))
        await original(session, run, events, returned)

    monkeypatch.setattr(run_events, "insert_behind", noted)
    async with asyncio.timeout(30):
        await execute.run(execution)
    # The end went raw, with more events than one insert takes.
    assert raw_batches and max(raw_batches) > run_events._SQLITE_ONE_STATEMENT_ROWS
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    deltas = [data["delta"]["content"][0]["text"]["value"] for _s, name, data in logged if name.endswith(".delta")]
    assert "".join(deltas) == "".join(words)
    assert logged[-1][1] == "thread.run.completed"
    assert _checked_out(runtime) == 0
    _lock_free(runtime)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL compares as jsonb
async def test_metadata_stored_with_the_stdlibs_spacing_still_ends_in_one_hop(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows written before orjson spelled JSON with spaces after ``:`` and
    ``,``: the held-back move compares the metadata as SQLite's json()
    spells it, not as text, or every end of such a run missed (review)."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        spaced = '{"stage": "early", "n": "1"}'
        await session.execute(text("UPDATE runs SET metadata = :m WHERE id = :id"), {"m": spaced, "id": run_id})
    execution = await _started(runtime, run_id)
    hops = _hops_during_commits(monkeypatch)
    reads = _sent(runtime, "FROM runs")
    await execute.run(execution)
    assert (hops, reads) == ([1], [])
    logged = await _logged(runtime, run_id)
    assert logged[-1][1] == "thread.run.completed" and logged[-1][2]["metadata"] == {"stage": "early", "n": "1"}


def _elsewhere_after_the_end_is_built(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, change: str) -> list[bool]:
    """Another process's write (``change``, SQL on the runs table) made once,
    when the end's events are added to its transaction (the end built, not
    committed); the returned list gets True once it is made. It must not
    wait for the end's transaction: SQLite's lock is not the end's before
    its COMMIT (a second's busy timeout, else "database is locked")."""
    made: list[bool] = []
    original = run_events.insert_behind
    path = make_url(runtime.settings.database_url).database
    assert path is not None

    async def then_elsewhere(*args: Any, **kwargs: Any) -> None:
        await original(*args, **kwargs)
        if made:
            return
        other = sqlite3.connect(path, timeout=1.0)
        try:
            other.execute(change)
            other.commit()
        finally:
            other.close()
        made.append(True)

    monkeypatch.setattr(run_events, "insert_behind", then_elsewhere)
    return made


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # another process's write to the file
async def test_a_cancel_landing_before_the_ends_commit_ends_it_cancelled(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel committed between the end's build and its COMMIT (an
    answer streamed while the model was slow: a message written, deltas
    buffered): the COMMIT fails whole, and the end made again reading the
    run ends it cancelled (the turn's rows written, as a cancel seen
    before the commit leaves them), every delta logged once, in order."""
    go_on = _answers_slowly(runtime, monkeypatch)
    monkeypatch.setattr(execute, "CANCEL_POLL_SECONDS", 60)  # the cancel is not seen before the end
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    running = asyncio.ensure_future(execute.run(execution))
    try:
        await _written_message(runtime, run_id)
        made = _elsewhere_after_the_end_is_built(
            runtime, monkeypatch, f"UPDATE runs SET status = 'cancelling' WHERE id = '{run_id}'"
        )
        held, reads = _sent(runtime, *_HELD_BACK_END), _sent(runtime, "FROM runs")
    finally:
        go_on.set()
    async with asyncio.timeout(20):
        await running
    assert made and len(held) == 1 and reads  # tried held back, made again reading first
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    names = [name for _seq, name, _data in logged]
    assert names[-1] == "thread.run.cancelled" and "thread.run.completed" not in names
    deltas = [data["delta"]["content"][0]["text"]["value"] for _s, name, data in logged if name.endswith(".delta")]
    assert "".join(deltas) == "Hello world"
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and (run.status, run.lease_owner) == ("cancelled", None)
        message = (await session.scalars(select(orm.Message).where(orm.Message.run_id == run_id))).one()
    # The turn ended before the cancel was seen: its message is written whole, as before the move.
    assert message.status == "completed" and message.content[0]["text"]["value"] == "Hello world"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # another process's write to the file
async def test_a_takeover_landing_before_the_ends_commit_leaves_the_run_to_the_other_worker(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease taken over between the end's build and its COMMIT: nothing
    of the end stays (its rows, its move, its events), the run as the
    other worker has it."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    taking_over = f"UPDATE runs SET lease_owner = 'test:1:other' WHERE id = '{run_id}'"
    made = _elsewhere_after_the_end_is_built(runtime, monkeypatch, taking_over)
    held = _sent(runtime, *_HELD_BACK_END)

    async def when_the_end_is_built() -> None:
        pass  # the hook above takes the lease over then

    await _runs_taken_over(runtime, execution, when_the_end_is_built)
    assert made and len(held) == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite's end is held back to its COMMIT
async def test_a_cancel_while_the_end_waits_for_a_connection_does_not_wait_for_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cancelled (shutdown, a lost lease) while its end waits for a
    pool's connection stops at once: nothing was sent, so there is no
    outcome to wait for (db.seen_through waited for the checkout too, up to
    COMMIT_OUTCOME_WAIT_SECONDS)."""
    _answers_quickly(runtime, monkeypatch)
    # Beyond the deadline below: waiting for the checkout would fail the test there.
    monkeypatch.setattr(db, "COMMIT_OUTCOME_WAIT_SECONDS", 30.0)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    before = await _logged(runtime, run_id)
    sent = _sent(runtime, *_CARRIED_END)
    checking_out, never = asyncio.Event(), asyncio.Event()
    connection = runtime.unit_of_work

    @contextlib.asynccontextmanager
    async def pool_exhausted() -> AsyncIterator[Any]:
        # As a checkout queued behind a busy pool: it never gets a connection.
        checking_out.set()
        await never.wait()
        async with connection() as session:
            yield session

    monkeypatch.setattr(runtime, "unit_of_work", pool_exhausted)
    ending = asyncio.create_task(execute.run(execution))
    async with asyncio.timeout(10):
        await checking_out.wait()
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await ending
    assert sent == [] and await _logged(runtime, run_id) == before


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite's end is held back to its COMMIT
async def test_a_cancel_during_an_end_that_misses_is_no_warning(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run cancelled while its end's statement is in flight waits for its
    outcome; a miss (the run taken over meanwhile: written nothing) is the
    routine outcome the end would have answered, not a warning (shutdown
    logged one per such run); the run stays the other worker's."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    before = await _logged(runtime, run_id)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(lease_owner="test:1:other"))
    carrying = run_events.insert_carrying
    ending: list[asyncio.Task[Any]] = []

    async def cancelled_in_flight(*args: Any, **kwargs: Any) -> int:
        ending[0].cancel()  # delivered while the statement below is in flight
        return await carrying(*args, **kwargs)

    monkeypatch.setattr(run_events, "insert_carrying", cancelled_in_flight)
    ending.append(asyncio.create_task(execute.run(execution)))
    with caplog.at_level(logging.DEBUG, logger="app"), pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await ending[0]
    assert f"run {run_id}'s end failed" in caplog.text  # seen through, and noted
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert await _logged(runtime, run_id) == before
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and (run.status, run.lease_owner) == ("in_progress", "test:1:other")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # the end that is seen through is PostgreSQL's
async def test_only_a_miss_or_a_numbering_collision_is_a_routine_end_failure(runtime: Runtime) -> None:
    """What a cancelled end's failure is logged as: a move that missed, or
    its events numbered over an append's (the retry's business: noted), but
    any other constraint's refusal, a turn's row without its run, is a
    warning."""
    (run_id,) = await _make_runs(runtime, 1)
    logged = insert(orm.RunEvent.__table__).values(
        run_id=run_id, seq=99, event="thread.run.step.delta", data={}, created_at=0.0
    )
    async with runtime.transaction() as session:
        await session.execute(logged)
    refusals: list[IntegrityError] = []
    for statement in (
        logged,  # its number again
        insert(orm.Message.__table__).values(
            id="msg_x", seq=0, created_at=0, thread_id="thread_none", role="user", content=[], status="completed"
        ),
    ):
        with pytest.raises(IntegrityError) as refused:
            async with runtime.transaction() as session:
                await session.execute(statement)
        refusals.append(refused.value)
    collision, orphan = refusals
    assert execute._missed(run_state.TransitionConflict(run_id)) and execute._missed(collision)
    assert not execute._missed(orphan) and not execute._missed(RuntimeError("the connection dropped"))


async def _ended(runtime: Runtime, run_id: str) -> tuple[str, Any, str]:
    """The run's status and last_error, and its answer's text."""
    message = await _message(runtime, run_id)
    assert message is not None
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        return run.status, run.last_error, "".join(part["text"]["value"] for part in message.content)


async def _a_delta_logged(runtime: Runtime, run_id: str) -> bool:
    return any(name == "thread.message.delta" for _seq, name, _data in await _logged(runtime, run_id))


def _buffered_without_a_number(runtime: Runtime, run_id: str) -> bool:
    return any(seq is None for seq, _event in runtime.run_log._buffer.get(run_id, []))


def _raw_ends_that_met_a_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each db.RawSessionConnected raised from now on: a raw end that met a
    read, a wasted attempt the guard (RunLog.numbers_unread) avoids."""
    met: list[str] = []
    real_init = db.RawSessionConnected.__init__

    def noted(self: db.RawSessionConnected, *args: Any) -> None:
        met.append(str(args[0]) if args else "")
        real_init(self, *args)

    monkeypatch.setattr(db.RawSessionConnected, "__init__", noted)
    return met


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("foreseen", [True, False], ids=["foreseen", "met in the raw end"])
async def test_an_end_behind_a_delta_buffered_without_a_number_is_made_the_way_that_reads(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, foreseen: bool
) -> None:
    """The run's log counter forgotten while it streams (as past
    run_log.MAX_TRACKED_RUNS), after its first delta was written: the next
    is buffered without a number, which only the log's insert gives (a
    read). The end cannot go on the raw transaction, which reads nothing:
    the run completes, its events numbered 1..n (review of provcpu).
    Unforeseen (as if another process had opened the file while the end
    waited for the write lock): the raw end meets the read, sends nothing,
    and the end is made again the way that reads."""
    runs: list[str] = []
    if not foreseen:
        monkeypatch.setattr(runtime.run_log, "numbers_unread", lambda _run_id: True)
    met = _raw_ends_that_met_a_read(monkeypatch)

    async def forgetting(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        # Streamed (this waits past QUICK_ANSWER_SECONDS); the flusher writes "Hello".
        await until(lambda: _a_delta_logged(runtime, runs[0]), "the first delta written")
        runtime.run_log._next.pop(runs[0], None)
        yield llm.TextDelta(" world")
        yield llm.Finish("stop", llm.Usage(3, 2))

    _provider(runtime, monkeypatch, forgetting)
    runs.extend(await _make_runs(runtime, 1))
    execution = await _started(runtime, runs[0])
    async with asyncio.timeout(30):
        await execute.run(execution)
    assert await _ended(runtime, runs[0]) == ("completed", None, "Hello world")
    logged = await _logged(runtime, runs[0])
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert len(met) == (0 if foreseen else 1)  # foreseen: no raw attempt wasted


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_end_whose_log_stops_being_numbered_here_while_it_waits_for_the_lock_is_made_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process opens the file while the raw end waits for the write
    lock (``deliver_early`` off from then on): the end's buffered delta can
    only be numbered by a read, which the raw transaction meets; it sent
    nothing, and the end is made again the way that reads: the run
    completes, numbered 1..n, no delta left counted unwritten (re-review of
    provcpu)."""
    runs: list[str] = []
    monkeypatch.setattr(runtime.run_log, "flush_seconds", 60)  # the deltas wait for the end

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await until(lambda: bool(runtime.run_log._buffer.get(runs[0])), "the first delta published")
        yield llm.TextDelta(" world")
        yield llm.Finish("stop", llm.Usage(3, 2))

    real_begin = db.RawTransaction.begin.__func__  # type: ignore[attr-defined]

    async def begin(cls: Any, engine: Any) -> Any:
        raw = await real_begin(cls, engine)
        runtime.run_log.deliver_early = False  # another process opened the file meanwhile
        return raw

    _provider(runtime, monkeypatch, streamed)
    runs.extend(await _make_runs(runtime, 1))
    execution = await _started(runtime, runs[0])
    monkeypatch.setattr(db.RawTransaction, "begin", classmethod(begin))
    async with asyncio.timeout(30):
        await execute.run(execution)
    assert await _ended(runtime, runs[0]) == ("completed", None, "Hello world")
    logged = await _logged(runtime, runs[0])
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert runtime.run_log._early_unwritten == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_end_after_a_cancel_appended_while_the_answer_streamed_keeps_the_answer(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel's transaction, its append not committed yet, while the
    answer's last delta is published: that delta is buffered without a
    number (the cancel's are the log's only once it commits). The end that
    follows is made the way that reads: the run cancelled, its answer's
    text kept in its message (review of provcpu: on the raw end the text was
    lost)."""
    runs: list[str] = []
    appended, committing = asyncio.Event(), asyncio.Event()

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, runs[0])
            assert run is not None
            name = await run_state.transition(session, run, "cancelling")
            await runtime.run_log.append(session, runs[0], [Event(name, {"id": runs[0]})], run_locked=True)
            appended.set()
            async with asyncio.timeout(30):
                await committing.wait()

    cancelling: list[asyncio.Task[None]] = []

    async def cancelled_meanwhile(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        try:
            yield llm.TextDelta("Hello")
            await until(lambda: _a_delta_logged(runtime, runs[0]), "the first delta written")
            cancelling.append(asyncio.create_task(cancel()))
            await appended.wait()
            yield llm.TextDelta(" world")
            await until(lambda: _buffered_without_a_number(runtime, runs[0]), "the last delta published")
        finally:
            committing.set()  # the cancel commits while the end begins (or the test fails)
        yield llm.Finish("stop", llm.Usage(3, 2))

    _provider(runtime, monkeypatch, cancelled_meanwhile)
    runs.extend(await _make_runs(runtime, 1))
    execution = await _started(runtime, runs[0])
    met = _raw_ends_that_met_a_read(monkeypatch)
    try:
        async with asyncio.timeout(30):
            await execute.run(execution)
    finally:
        async with asyncio.timeout(30):
            await asyncio.gather(*cancelling)
    assert await _ended(runtime, runs[0]) == ("cancelled", None, "Hello world")
    assert met == []  # foreseen: no raw attempt wasted
    logged = await _logged(runtime, runs[0])
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))


def _answering(script: list[llm.Event]) -> Callable[[llm.ChatRequest], AsyncIterator[llm.Event]]:
    async def stream(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        for step in script:
            yield step

    return stream


_TOOL_CALLED = [
    llm.TextDelta("Let me look."),
    llm.ToolCallDelta(0, id="call_1", name="get_weather", arguments='{"city": '),
    llm.ToolCallDelta(0, arguments='"Paris"}'),
    llm.Finish("tool_calls", llm.Usage(3, 4)),
]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("script", "status"),
    [
        (_TOOL_CALLED, "requires_action"),
        ([llm.TextDelta("Cut sh"), llm.Finish("length", llm.Usage(3, 2))], "incomplete"),
        ([llm.TextDelta("Fine."), llm.Finish("stop", llm.Usage(3, 2))], "completed"),
    ],
    ids=["requires_action", "incomplete", "completed"],
)
@pytest.mark.parametrize("counter", ["known", "forgotten"])
async def test_each_end_of_a_provider_run_goes_on_the_raw_transaction(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, script: list[llm.Event], status: str, counter: str
) -> None:
    """A tool call's, a cut answer's and a whole answer's end after the claim
    on SQLite, with the run's log counter known or forgotten (nothing
    buffered: the raw end guesses and checks at the COMMIT): each connects
    nothing through SQLAlchemy and ends as it does the way that reads, its
    events numbered 1..n (review of provcpu)."""
    _provider(runtime, monkeypatch, _answering(script))
    monkeypatch.setattr(execute, "QUICK_ANSWER_SECONDS", 30)  # taken whole: nothing buffered
    (run_id,) = await _make_runs(runtime, 1)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    async with runtime.transaction() as session:
        await session.execute(
            update(orm.Run)
            .where(orm.Run.id == run_id)
            .values(tools=[tool], max_completion_tokens=2 if status == "incomplete" else None)
        )
    execution = await _started(runtime, run_id)
    if counter == "forgotten":
        runtime.run_log._next.pop(run_id, None)
    with _engine_events(runtime, "engine_connect") as made:
        async with asyncio.timeout(30):
            await execute.run(execution)
    assert made == []
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and (run.status, run.last_error) == (status, None)
        assert (run.required_action is not None) == (status == "requires_action")
        assert (run.incomplete_details is not None) == (status == "incomplete")
    logged = await _logged(runtime, run_id)
    assert [seq for seq, _name, _data in logged] == list(range(1, len(logged) + 1))
    assert logged[-1][1] == f"thread.run.{status}" and logged[-1][2]["status"] == status


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no raw checkout
async def test_an_end_whose_raw_checkout_the_database_refuses_leaves_the_run_to_be_resumed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL refusing the end's connection (a restart, a failover, too
    many connections) is the database failing, not the run: it stays
    in_progress, to be resumed, not failed (server_error)."""
    _answers_quickly(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    execution = await _started(runtime, run_id)
    checkout = db.autocommit_connection
    refused = refused_checkouts(runtime, monkeypatch)
    with pytest.raises(DBAPIError, match="starting up"):  # to the worker, which releases the run
        await execute.run(execution)
    assert refused
    monkeypatch.setattr(db, "autocommit_connection", checkout)
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and run.status == "in_progress", f"the refusal left the run {run and run.status}"
