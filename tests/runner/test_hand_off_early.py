"""PostgreSQL: a lone run's hand-off is built while its create's statement is
out (issue 17: Worker.prepare), its statement sent only once the create has
committed (db.gate). What is built is thrown away, nothing sent, when the
create fails; a run cancelled or changed between the create's commit and the
hand-off's statement is left to the claim, answered once, as before."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, held_back, orm
from app.api import runs as api_runs
from app.runner import execute
from app.runtime import Runtime
from app.services import new_rows, run_defaults, runs
from app.services.projects import Project
from app.settings import Settings
from app.wire.events import Event
from app.wire.runs import ThreadAndRunCreate
from app.worker import Worker
from tests.runner.helpers import DEADLINE, statements_sent, streamed_to_end, until
from tests.runner.test_hand_off import _ANSWERED, _assert_numbered_once, _assistant, _count_hand_offs, _row
from tests.runner.test_instant_answer import _event_names
from tests.runner.test_raw_autocommit import raw_checkouts

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

_PROJECT = Project(id=orm.DEFAULT_PROJECT_ID, name="default")


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with handing_runtime(settings) as rt:
        yield rt


@asynccontextmanager
async def handing_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A runtime with a worker attached as the server's (runs created
    through the API are handed to it), its loop not started: each test
    drives its ticks."""
    rt = await Runtime.start(settings)
    worker = Worker(rt)
    rt.attach_worker(worker)
    worker._looping = True  # as while run_forever() goes round: it hands runs only then
    try:
        yield rt
    finally:
        await worker.stop()
        await rt.close()


def _worker(runtime: Runtime) -> Worker:
    assert runtime.worker is not None
    return runtime.worker


async def _queue(
    runtime: Runtime, assistant_id: str, thread_metadata: dict[str, str] | None = None, *, remembered: bool = False
) -> orm.Run:
    """POST /threads/runs's create as the API makes it (api/runs.py's
    _queue_run, answered as JSON); the run returned. With ``remembered``
    made from the assistant's remembered defaults (the API's usual create:
    one autocommitted statement on a raw connection, db.PG_AUTOCOMMIT),
    read first here; else the assistant is read in the create's
    transaction (BEGIN, the statement, COMMIT)."""
    thread = {"messages": [{"role": "user", "content": "hi"}], "metadata": thread_metadata or {}}
    body = ThreadAndRunCreate.model_validate({"assistant_id": assistant_id, "thread": thread})
    if remembered and run_defaults.remembered(_PROJECT, assistant_id) is None:
        async with runtime.transaction() as session:
            await run_defaults.read(session, _PROJECT, assistant_id)
    made: list[orm.Run] = []
    await api_runs._queue_run(runtime, False, _making(runtime, body, made, remembered))
    return made[0]


def _making(runtime: Runtime, body: ThreadAndRunCreate, made: list[orm.Run], remembered: bool) -> api_runs.QueueRun:
    """_queue_run's ``change``: the thread and run of ``body``, the run
    noted in ``made``."""

    async def change(session: AsyncSession, unwritten: new_rows.Unwritten) -> tuple[orm.Run, list[Event]]:
        _thread, run, events = await runs.create_thread_and_run(
            session,
            _PROJECT,
            body,
            expires_in=600,
            reservation=runtime.run_reservation(),
            remembered=remembered,
            unwritten=unwritten,
        )
        made.append(run)
        return run, events

    return change


def _holding_the_create(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, then: Any = None) -> list[str]:
    """The create's append (its one statement) waits, up to the deadline,
    until its run's hand-off has come to wait at its gate (db.passed, which
    the gate's listener and run_log.append await) or has sent a statement
    all the same, then runs ``then`` (an async function of the session and
    run id) in its place, or as itself. Returns the order of what happened:
    "answered" (the instant answer asked for), "at gate", "created" (the
    create's statement committed), "checkout" (a hand-off's raw connection
    checked out, db.autocommit_connection), "sent" (each statement of a
    hand-off's gated session, through SQLAlchemy's cursor or straight on
    asyncpg, on its session's connection or its raw one)."""
    order: list[str] = []
    waiting = asyncio.Event()  # at the gate, or past it without waiting
    real_answer = runtime.llm.answer_at_once

    async def answer(request: Any) -> Any:
        order.append("answered")
        return await real_answer(request)

    monkeypatch.setattr(runtime.llm, "answer_at_once", answer)
    gated: list[AsyncSession] = []
    real_gate, real_passed = db.gate, db.passed

    def gate(session: AsyncSession, opened: asyncio.Future[None], **kwargs: Any) -> None:
        gated.append(session)
        real_gate(session, opened, **kwargs)

    async def passed(session: AsyncSession) -> None:
        opened = session.info.get(db.GATE)
        if opened is not None and not opened.done():
            order.append("at gate")
            waiting.set()
        await real_passed(session)

    monkeypatch.setattr(db, "gate", gate)
    monkeypatch.setattr(db, "passed", passed)
    bind = runtime.engine.sync_engine

    def note_if_handing(dbapi_connection: object) -> None:
        for session in gated:
            # The session's own connection, or the one its unit of work
            # checked out raw for its one autocommitted statement
            # (db.PG_AUTOCOMMIT: the hand-off's start, the instant answer).
            connection = held_back.connection_of(session, bind)
            raw = session.info.get(db.PG_AUTOCOMMIT)
            if (connection is not None and connection.connection.dbapi_connection is dbapi_connection) or (
                isinstance(raw, held_back.PostgresRaw) and raw.adapted is dbapi_connection
            ):
                order.append("sent")
                waiting.set()  # (not held back: the create need not wait on)

    worker = _worker(runtime)
    handing: contextvars.ContextVar[bool] = contextvars.ContextVar("handing", default=False)
    real_take_handed = worker._take_handed

    async def take_handed(*args: Any) -> None:
        handing.set(True)  # (in the hand-off's task, and the tasks it starts: their context is a copy)
        await real_take_handed(*args)

    monkeypatch.setattr(worker, "_take_handed", take_handed)
    real_checkout = db.autocommit_connection

    async def checkout(engine: Any) -> Any:
        # A raw checkout for a hand-off (its ping or reconnect may reach
        # PostgreSQL) is of what the gate holds too.
        if handing.get():
            order.append("checkout")
            waiting.set()
        return await real_checkout(engine)

    monkeypatch.setattr(db, "autocommit_connection", checkout)

    def before(connection: Any, *_args: Any) -> None:
        # (A statement sent straight is told here too, its connection
        # given: it is noted twice, here and in fetched() below.)
        if connection is not None:
            note_if_handing(connection.connection.dbapi_connection)

    real_fetched = held_back._fetched_on_asyncpg

    async def fetched(adapted: Any, *args: Any) -> Any:
        note_if_handing(adapted)
        return await real_fetched(adapted, *args)

    monkeypatch.setattr(held_back, "_fetched_on_asyncpg", fetched)
    event.listen(bind, "before_cursor_execute", before)  # (the engine is this test's runtime's alone)
    log = runtime.run_log
    real_append = log.append

    async def append(session: Any, run_id: str, events: list[Event], **kwargs: Any) -> Any:
        if not any(event.name == "thread.run.created" for event in events):
            return await real_append(session, run_id, events, **kwargs)
        # (Without an early hand-off nothing comes to a gate: the deadline fails the test.)
        await asyncio.wait_for(waiting.wait(), DEADLINE / 2)
        if then is not None:
            return await then(session, run_id, events, real_append, **kwargs)
        entries = await real_append(session, run_id, events, **kwargs)
        order.append("created")
        return entries

    monkeypatch.setattr(log, "append", append)
    return order


def committing_then_cancelled(committed: list[str]) -> Callable[..., Awaitable[Any]]:
    """A ``then`` for the create's held append (_holding_the_create): its
    statement committed (its unit of work's commit, before the cancellation
    reaches it), the request then cancelled, so that the API takes the
    outcome for a rollback; each run id committed so noted in ``committed``."""

    async def then(session: Any, run_id: str, events: list[Event], append: Any, **kwargs: Any) -> Any:
        await append(session, run_id, events, **kwargs)
        await session.commit()
        committed.append(run_id)
        raise asyncio.CancelledError

    return then


def _assert_sent_after_the_create(order: list[str]) -> None:
    """The hand-off was built and came to its gate while the create's
    statement was out, and sent its statements only after its commit."""
    assert order[:3] == ["answered", "at gate", "created"], order
    assert "sent" in order[3:] and set(order[3:]) <= {"checkout", "sent"}, order


async def test_a_lone_runs_answer_is_built_while_its_create_is_out_and_sent_after_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    handed = _count_hand_offs(monkeypatch)
    order = _holding_the_create(runtime, monkeypatch)
    run = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    # Built during the create's statement, its statement sent only after the create's commit.
    _assert_sent_after_the_create(order)
    assert [execution.finished for execution in handed] == [True]
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None
    assert await _event_names(runtime, run.id) == _ANSWERED  # the create's events first
    await _assert_numbered_once(runtime, run.id)
    assert not worker._gates and not worker._handing and worker._reserved == 0


async def test_a_streamed_create_answers_once_its_built_hand_off_is_sent_and_a_polled_one_before(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker.answer_after: a streamed create's head is written while the
    hand-off's statement (the run's whole worker side) is out, not ahead of
    it; one answered as JSON answers first, for the SDK's poll that follows
    to be held while that statement is out."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    thread = {"messages": [{"role": "user", "content": "hi"}]}
    body = ThreadAndRunCreate.model_validate({"assistant_id": assistant, "thread": thread})
    for streamed in (True, False):
        order = _holding_the_create(runtime, monkeypatch)
        made: list[orm.Run] = []
        response = await api_runs._queue_run(runtime, streamed, _making(runtime, body, made, False))
        order.append("create answered")
        names = await streamed_to_end(response) if streamed else []
        await asyncio.wait_for(worker._handed(), DEADLINE)
        _assert_sent_after_the_create([step for step in order if step != "create answered"])
        if streamed:
            assert order.index("sent") < order.index("create answered"), order
            assert names[0] == "thread.created" and names[-2:] == ["thread.run.completed", "done"], names
        else:
            assert order.index("create answered") < order.index("sent"), order
        assert (await _row(runtime, made[0].id)).status == "completed"
        assert not worker._under_way and not worker._gates and not worker._handing
        monkeypatch.undo()


async def test_a_create_from_remembered_defaults_goes_raw_and_its_hand_off_after_its_commit(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's usual create (one autocommitted statement on a raw
    connection): the hand-off built meanwhile sends nothing before it."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    handed = _count_hand_offs(monkeypatch)
    order = _holding_the_create(runtime, monkeypatch)
    run = await _queue(runtime, assistant, remembered=True)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    _assert_sent_after_the_create(order)
    assert [execution.finished for execution in handed] == [True]
    assert (await _row(runtime, run.id)).status == "completed"
    await _assert_numbered_once(runtime, run.id)


async def test_a_raw_create_cancelled_with_its_statement_out_gives_its_connection_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create's raw statement held by PostgreSQL (another transaction
    locks the runs table) when the request is cancelled: its connection is
    given back, the built hand-off dropped unsent, the worker woken."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    handed = _count_hand_offs(monkeypatch)
    checkouts = raw_checkouts(monkeypatch)
    pool = runtime.engine.sync_engine.pool
    checked_out_before = pool.checkedout()

    async def waiting_for_the_lock() -> bool:
        async with runtime.engine.connect() as probe:
            waiting = "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
            return bool((await probe.execute(text(waiting))).scalar())

    async with runtime.engine.connect() as locker:
        await locker.execute(text("LOCK TABLE runs IN SHARE MODE"))  # (in the transaction it begins)
        create = asyncio.create_task(_queue(runtime, assistant, remembered=True))
        await until(waiting_for_the_lock, "the create's statement waiting for the lock")
        assert worker._gates, "a hand-off was prepared"
        create.cancel()
        with pytest.raises(asyncio.CancelledError):
            await create
        await locker.rollback()
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert checkouts and checkouts[0] is not None, checkouts  # (the create's, raw)
    assert not worker._gates and not worker._handing and not handed
    assert worker._wakeup.is_set()
    assert pool.checkedout() == checked_out_before


async def test_a_create_refused_for_stale_defaults_drops_its_hand_off_and_its_retry_is_answered_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create from remembered defaults refused on its raw connection
    (the assistant changed since) after its hand-off was prepared: the
    connection is given back, the hand-off dropped unsent, and the create
    made again from a fresh read answered once."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    async with runtime.transaction() as session:
        await run_defaults.read(session, _PROJECT, assistant)
        changed = orm.Assistant.__table__.update().where(orm.Assistant.id == assistant).values(instructions="new")
        await session.execute(changed)
    checkouts = raw_checkouts(monkeypatch)
    prepared: list[asyncio.Future[None] | None] = []
    real_prepare = worker.prepare

    def prepare(created: orm.Run) -> asyncio.Future[None] | None:
        prepared.append(real_prepare(created))
        return prepared[-1]

    monkeypatch.setattr(worker, "prepare", prepare)
    dropped: list[str] = []
    real_dropped = worker.dropped

    def drop(created: orm.Run, committed: asyncio.Future[None], **kwargs: bool) -> None:
        dropped.append(created.id)
        real_dropped(created, committed, **kwargs)

    monkeypatch.setattr(worker, "dropped", drop)
    pool = runtime.engine.sync_engine.pool
    checked_out_before = pool.checkedout()
    body = ThreadAndRunCreate.model_validate(
        {"assistant_id": assistant, "thread": {"messages": [{"role": "user", "content": "hi"}]}}
    )
    made: list[orm.Run] = []
    await api_runs._queue_remembering(
        runtime, _PROJECT, False, assistant, lambda remembered: _making(runtime, body, made, remembered)
    )
    await asyncio.wait_for(worker._handed(), DEADLINE)
    await worker.run_until_idle()
    assert checkouts and checkouts[0] is not None, checkouts  # (the create's, raw)
    assert prepared[:1] != [None] and dropped == [made[0].id]
    assert not worker._gates and not worker._handing
    assert pool.checkedout() == checked_out_before
    assert (await _row(runtime, made[-1].id)).status == "completed"
    await _assert_numbered_once(runtime, made[-1].id)


async def test_a_worker_executing_a_run_builds_no_hand_off_ahead_of_the_create(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load (a run executing) the hand-off is decided after the create
    has committed, as before: nothing is begun ahead of it."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    executing = asyncio.get_running_loop().create_future()
    worker._tasks["run_executing"] = asyncio.ensure_future(executing)
    prepared: list[asyncio.Future[None] | None] = []
    real_prepare = worker.prepare

    def prepare(created: orm.Run) -> asyncio.Future[None] | None:
        prepared.append(real_prepare(created))
        return prepared[-1]

    monkeypatch.setattr(worker, "prepare", prepare)
    handed = _count_hand_offs(monkeypatch)
    try:
        run = await _queue(runtime, assistant)
        await asyncio.wait_for(worker._handed(), DEADLINE)
    finally:
        executing.set_result(None)
        del worker._tasks["run_executing"]
    assert prepared == [None]
    # Handed all the same, after the commit (the lone-run rule as on main).
    assert [execution.finished for execution in handed] == [True]
    assert (await _row(runtime, run.id)).status == "completed"


async def test_a_failed_create_throws_the_built_hand_off_away_unsent(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    handed = _count_hand_offs(monkeypatch)

    async def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("the create's statement", {}, ConnectionResetError("connection lost"))

    order = _holding_the_create(runtime, monkeypatch, then=fail)
    # (The create's own reads, the assistant's, go before its answer is built.)
    with statements_sent(runtime, lambda statement, _parameters: statement if order else None) as sent:
        with pytest.raises(OperationalError):
            await _queue(runtime, assistant)
        await asyncio.wait_for(worker._handed(), DEADLINE)
    assert order == ["answered", "at gate"]  # it had been built, and had come to its gate
    assert sent == [] and not handed  # and nothing of it was sent
    assert not worker._gates and not worker._handing and not worker._tasks
    async with runtime.transaction() as session:
        assert (await session.scalars(select(orm.Run.id).where(orm.Run.status != "completed"))).all() == []


def _between_commit_and_hand_off(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, action: Any
) -> list[asyncio.Task[None]]:
    """``action(run)`` (a transaction of another client) commits after the
    create has committed and before its hand-off's gate is opened
    (Worker.hand, which the API calls right after the commit); the task
    returned (one) opens it after."""
    worker = _worker(runtime)
    real_hand = worker.hand
    between: list[asyncio.Task[None]] = []

    async def act_then_hand(created: orm.Run) -> None:
        await action(created)
        assert real_hand(created)  # (the prepared hand-off's gate opened)

    def hand(created: orm.Run) -> bool:
        between.append(asyncio.create_task(act_then_hand(created)))
        return True

    monkeypatch.setattr(worker, "hand", hand)
    return between


async def test_a_run_cancelled_between_its_create_and_its_built_hand_off_stays_cancelled(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)

    async def cancel(run: orm.Run) -> None:
        async with runtime.transaction() as other:
            _answer, cancelled = await runs.cancel(other, _PROJECT, run.thread_id, run.id)
            await runtime.run_log.append(other, run.id, cancelled, run_locked=True)

    order = _holding_the_create(runtime, monkeypatch)
    between = _between_commit_and_hand_off(runtime, monkeypatch, cancel)
    run = await _queue(runtime, assistant)
    await asyncio.wait_for(asyncio.gather(*between), DEADLINE)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    _assert_sent_after_the_create(order)
    assert worker._wakeup.is_set()  # the lost hand-off leaves the run to the tick
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "cancelled" and row.started_at is None and row.lease_owner is None
    names = await _event_names(runtime, run.id)
    assert names[:3] == ["thread.created", "thread.run.created", "thread.run.queued"]
    assert "thread.run.in_progress" not in names and "thread.message.created" not in names  # nothing of the answer
    assert names[-1] == "thread.run.cancelled"
    await _assert_numbered_once(runtime, run.id)


async def test_a_built_hand_off_lost_to_a_change_leaves_the_run_answered_once_by_the_claim(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    handed = _count_hand_offs(monkeypatch)

    async def change(run: orm.Run) -> None:
        async with runtime.transaction() as other:
            changed = orm.Run.__table__.update().where(orm.Run.id == run.id).values(metadata={"changed": "yes"})
            await other.execute(changed)

    order = _holding_the_create(runtime, monkeypatch)
    between = _between_commit_and_hand_off(runtime, monkeypatch, change)
    run = await _queue(runtime, assistant)
    await asyncio.wait_for(asyncio.gather(*between), DEADLINE)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    # Built; its statement, sent after the create, missed its compare-and-set: nothing written.
    _assert_sent_after_the_create(order)
    assert not handed
    assert (await _row(runtime, run.id)).status == "queued"
    assert worker._wakeup.is_set()
    await worker.run_until_idle()
    assert (await _row(runtime, run.id)).status == "completed"
    assert await _event_names(runtime, run.id) == _ANSWERED
    await _assert_numbered_once(runtime, run.id)


async def test_a_create_cancelled_with_its_statement_out_leaves_a_committed_run_to_the_tick(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request cancelled while its create's statement is out (a client
    gone): the API takes the outcome for a rollback, the built hand-off is
    cancelled unsent; the statement had committed all the same, and the
    worker, woken by the cancelled hand-off, claims and answers the run."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    handed = _count_hand_offs(monkeypatch)
    committed: list[str] = []

    order = _holding_the_create(runtime, monkeypatch, then=committing_then_cancelled(committed))
    with pytest.raises(asyncio.CancelledError):
        await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert order == ["answered", "at gate"] and not handed and not worker._gates
    (run_id,) = committed
    assert (await _row(runtime, run_id)).status == "queued"  # nothing of the built answer
    assert worker._wakeup.is_set()
    await worker.run_until_idle()
    assert (await _row(runtime, run_id)).status == "completed"
    assert await _event_names(runtime, run_id) == _ANSWERED
    await _assert_numbered_once(runtime, run_id)


async def test_a_built_hand_offs_reads_wait_for_the_create_and_see_what_it_committed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scripted rule on the thread's metadata: the hand-off reads the new
    thread, which is not there before the create commits; the read is held
    (db.gate) and sees it."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    monkeypatch.setattr(runtime.llm.script, "needs_thread_metadata", lambda: True)
    seen: list[dict[str, str]] = []
    real_context = execute.RunExecution._context

    async def context(self: execute.RunExecution, session: Any, run: orm.Run) -> Any:
        made = await real_context(self, session, run)
        seen.append(dict(made.thread_metadata))
        return made

    monkeypatch.setattr(execute.RunExecution, "_context", context)
    run = await _queue(runtime, assistant, {"rule": "on"})
    await asyncio.wait_for(worker._handed(), DEADLINE)
    await asyncio.wait_for(asyncio.gather(*worker._tasks.values()), DEADLINE)
    assert seen == [{"rule": "on"}]
    assert (await _row(runtime, run.id)).status == "completed"
    await _assert_numbered_once(runtime, run.id)


async def test_a_statement_of_a_session_whose_gate_was_closed_fails_unsent(runtime: Runtime) -> None:
    """A gated session's statement executed after its create failed
    (Worker.dropped cancels the gate) raises the gate's cancellation in the
    listener, nothing sent."""
    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    closed.cancel()
    with statements_sent(runtime, lambda statement, _parameters: statement) as sent:
        async with runtime.unit_of_work() as session:
            db.gate(session, closed)
            with pytest.raises(asyncio.CancelledError):
                await session.execute(select(orm.Run.id))
    assert sent == []
