"""A run's create as transactions (issue 17): a create made from remembered
assistant defaults is one statement on PostgreSQL, run in autocommit (no
BEGIN, no COMMIT); the live-run rule holds on that path and on the
live-run index's retry; the workers are woken in-process or by the create's
own statement, never both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import event, func, insert, select, text, update

from app import db, ids, orm
from app import run_log as run_log_module
from app.main import create_app
from app.runtime import Runtime
from app.services import new_rows, projects, run_defaults, run_events, thread_lock
from app.settings import Settings
from tests.conftest import error_of

_HELLO: Any = {"messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def no_worker(settings: Settings) -> Settings:
    """Runs stay where the test leaves them (request this before `client`)."""
    settings.embedded_worker = False
    return settings


async def _assistant(client: openai.AsyncOpenAI, **kwargs: Any) -> str:
    return (await client.beta.assistants.create(model="gpt-4o", **kwargs)).id


def _is_postgres(runtime: Runtime) -> bool:
    return runtime.run_log.postgres


def _count_begins(monkeypatch: pytest.MonkeyPatch, begins: list[object]) -> None:
    """Until ``monkeypatch.undo()``: every transaction asyncpg begins (its
    BEGIN) is appended to ``begins``, but those of the embedded worker's tasks
    (a claim or reap of its next tick, a run it executes, the lease renewal),
    which a loaded machine lets fall within the requests a test counts."""
    original = asyncpg.connection.Connection.transaction

    def counted(self: asyncpg.connection.Connection, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        name = "" if task is None else task.get_name()
        if not (name in _WORKER_TASKS or name.startswith(("run ", "hand-off "))):
            begins.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "transaction", counted)


# The embedded worker's tasks (app/main.py, app/worker.py, app/lease_renewer.py); "run …" executes one
# run, "hand-off …" takes one handed to it. The run log's notifier is counted: its NOTIFY has no BEGIN.
_WORKER_TASKS = frozenset({"worker", "listen", "lease renewal"})


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_a_remembered_create_is_one_statement_outside_a_transaction(
    no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /threads/runs from remembered defaults: its one statement (thread,
    message, run, events) runs with no BEGIN (a create that reads the
    assistant first is still one transaction), on a connection checked out
    of the pool raw (no session connection, transaction or commit:
    db.autocommit_connection); the connection goes back to the pool out of
    autocommit. (Streamed: test_a_process_with_a_worker_...)"""
    runtime: Runtime = app.state.runtime
    begins: list[object] = []
    _count_begins(monkeypatch, begins)
    autocommitted: list[Any] = []
    raw: list[Any] = []
    checkout = db.autocommit_connection

    async def checked_out(engine: Any) -> Any:
        raw.append(await checkout(engine))
        return raw[-1]

    monkeypatch.setattr(db, "autocommit_connection", checked_out)

    def before(connection: Any, *_args: Any) -> None:
        # No SQLAlchemy Connection: the statement goes on the raw one.
        driver = raw[-1].adapted if connection is None else connection.connection.dbapi_connection
        if driver.autocommit:  # the driver's, as SQLAlchemy or db.autocommit_connection set it
            autocommitted.append(driver)

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", before)
    try:
        assistant_id = await _assistant(client, instructions="Be brief.")
        begins.clear()
        read = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
        assert len(begins) == 1 and not autocommitted and not raw  # the assistant read, then the rows: one transaction
        assert run_defaults.remembered(projects.DEFAULT, assistant_id) is not None
        begins.clear()
        run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
        assert (run.status, run.instructions) == ("queued", "Be brief.")
        assert not begins and len(autocommitted) == 1 and [found.adapted for found in raw] == autocommitted
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", before)
    # Back in the pool as any connection: its next transaction is one again.
    assert all(not connection.autocommit for connection in autocommitted)
    async with runtime.transaction() as session:
        threads = await session.scalar(select(func.count()).select_from(orm.Thread))
        messages = await session.scalar(select(func.count()).select_from(orm.Message))
        logged = await session.scalar(select(func.count()).select_from(orm.RunEvent))
    assert (threads, messages, logged) == (2, 2, 6)
    assert read.id != run.id


async def test_a_busy_thread_refuses_a_run_made_from_remembered_defaults(
    no_worker: Settings, client: openai.AsyncOpenAI
) -> None:
    """The busy-thread 400 on the remembered path, as the check finds it:
    answered as such, not taken for stale defaults (which would forget them
    and read the assistant again)."""
    assistant_id = await _assistant(client)
    busy = await client.beta.threads.create()
    live = await client.beta.threads.runs.create(busy.id, assistant_id=assistant_id)  # reads, then remembers
    assert run_defaults.remembered(projects.DEFAULT, assistant_id) is not None
    for create in (
        lambda: client.beta.threads.runs.create(busy.id, assistant_id=assistant_id),
        lambda: client.beta.threads.runs.create(busy.id, assistant_id=assistant_id, stream=True),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await create()
        assert error_of(refused.value)["message"] == f"Thread {busy.id} already has an active run {live.id}."
        assert run_defaults.remembered(projects.DEFAULT, assistant_id) is not None


def _statements(runtime: Runtime) -> list[str]:
    """Each statement sent from now on (until the runtime closes), but
    BEGIN and COMMIT (asyncpg sends those itself)."""
    sent: list[str] = []

    def before(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", before)
    return sent


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite holds its writes back to the COMMIT
async def test_a_run_on_a_thread_is_logged_by_the_statement_that_inserts_it(
    no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /threads/{id}/runs on PostgreSQL: the thread's lock, then one
    statement for the run, its additional messages and its opening events
    (issue 17: the events had a statement of their own, and the live run was
    read before; it still is before additional messages), in one
    transaction; from read defaults and from remembered ones; and a thread
    whose run is live still refuses another, naming it."""
    runtime: Runtime = app.state.runtime
    assistant_id = await _assistant(client)
    sent = _statements(runtime)
    begins: list[object] = []
    _count_begins(monkeypatch, begins)
    for remembered, extra in ((False, []), (True, []), (True, _HELLO["messages"] * 2)):
        assert (run_defaults.remembered(projects.DEFAULT, assistant_id) is not None) == remembered
        thread = await client.beta.threads.create()
        sent.clear()
        begins.clear()
        run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id, additional_messages=extra)
        assert len(begins) == 1
        inserting = [statement for statement in sent if "INSERT INTO runs" in statement]
        assert len(inserting) == 1 and "INSERT INTO run_events" in inserting[0]
        assert ("INSERT INTO messages" in inserting[0]) == bool(extra)
        assert len(sent) == 2 + bool(extra) + (not remembered)  # lock, (live run,) (assistant,) run + events
        async with runtime.transaction() as session:
            logged = await session.scalars(select(orm.RunEvent.event).where(orm.RunEvent.run_id == run.id))
            assert list(logged) == ["thread.run.created", "thread.run.queued"]
            found = await session.scalar(
                select(func.count()).select_from(orm.Message).where(orm.Message.thread_id == thread.id)
            )
            assert found == len(extra)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id, additional_messages=extra)
        assert error_of(refused.value)["message"] == f"Thread {thread.id} already has an active run {run.id}."


async def test_a_busy_thread_is_answered_before_the_runs_other_errors(
    no_worker: Settings, client: openai.AsyncOpenAI
) -> None:
    """A run asked of a thread whose run is live is refused as busy, whatever
    else is wrong with it (an assistant that does not exist, a tool_choice
    naming no tool): on PostgreSQL the live run is no longer read before the
    run is made, only when making it fails."""
    assistant_id = await _assistant(client)
    busy = await client.beta.threads.create()
    live = await client.beta.threads.runs.create(busy.id, assistant_id=assistant_id)
    choice: Any = {"type": "function", "function": {"name": "nowhere"}}
    for create in (
        lambda: client.beta.threads.runs.create(busy.id, assistant_id="asst_missing"),
        lambda: client.beta.threads.runs.create(busy.id, assistant_id=assistant_id, tool_choice=choice),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await create()
        assert error_of(refused.value)["message"] == f"Thread {busy.id} already has an active run {live.id}."


@asynccontextmanager
async def _aside(runtime: Runtime, _session: Any) -> AsyncIterator[Any]:
    """Where a concurrent writer writes: a transaction of its own, committed
    at once (the create's thread lock does not exclude inserting a run)."""
    async with runtime.transaction() as other:
        yield other


def _once(function: Callable[..., Any], hook: Callable[..., Any], *, after: bool = False) -> Callable[..., Any]:
    """``function``, with ``hook(*args)`` awaited before (``after``: after)
    its first call only."""
    pending = [True]

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        first, pending[:] = bool(pending), []
        if first and not after:
            await hook(*args)
        result = await function(*args, **kwargs)
        if first and after:
            await hook(*args)
        return result

    return wrapped


# PostgreSQL's: on SQLite no run can go live between the create's check and
# its COMMIT (the check took the write lock; only a run's create makes a run
# live, and each checks first), so the run's INSERT is held back to the
# COMMIT with no savepoint to retry in (services/runs.py, create).
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_run_refused_by_the_index_whose_winner_ended_is_created(
    no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /threads/{id}/runs that passed the live-run check, whose insert
    the live-run index refused (a run inserted by a writer that skipped the
    thread lock), and whose winner has ended by the time it looks for it:
    the create tries again and succeeds: with no defaults remembered yet,
    with remembered ones (services/runs.py: both go round again from a
    fresh read, the refusal being the events' statement's), and, from read
    defaults, with more additional messages than that statement takes (the
    insert's own retry, _insert_live_postgres's loop)."""
    runtime: Runtime = app.state.runtime
    assistant_id = await _assistant(client)
    many = [{"role": "user", "content": f"m{index}"} for index in range(new_rows.MAX_ROWS_TOGETHER)]
    for remembered, extra in ((False, []), (True, []), (False, many)):
        if not remembered:
            run_defaults.forget(assistant_id)  # read this time (remembered, a miss would read them again first)
        assert (run_defaults.remembered(projects.DEFAULT, assistant_id) is not None) == remembered
        thread = await client.beta.threads.create()
        seq = ids.next_seq()
        winner = ids.new_id(ids.RUN, seq)
        rogue = {
            "id": winner,
            "seq": seq,
            "created_at": ids.seconds(seq),
            "thread_id": thread.id,
            "assistant_id": assistant_id,
            "status": "queued",
            "model": "gpt-4o",
            "instructions": "",
            "tools": [],
            "metadata": {},
        }

        ended: list[str] = []
        won: list[str] = []

        async def win(session: Any, *_args: Any, rogue: dict[str, Any] = rogue, won: list[str] = won) -> None:
            if won:  # once, whichever check comes first
                return
            won.append(rogue["id"])
            async with _aside(runtime, session) as writer:
                await writer.execute(insert(orm.Run.__table__).values(**rogue))

        async def end(session: Any, *_args: Any, winner: str = winner, ended: list[str] = ended) -> None:
            ended.append(winner)
            async with _aside(runtime, session) as writer:
                over = {"status": "completed", "completed_at": ids.now()}
                await writer.execute(update(orm.Run).where(orm.Run.id == winner).values(**over))

        # After the check, or the lock where the live run is not read (PostgreSQL: runs.create).
        checked = _once(thread_lock.live_run_of_owned_thread, win, after=True)
        monkeypatch.setattr(thread_lock, "live_run_of_owned_thread", checked)
        monkeypatch.setattr(thread_lock, "lock_owned_thread", _once(thread_lock.lock_owned_thread, win, after=True))
        # Whichever looks for the winner: the refusal of the events' statement, or the insert's retry.
        monkeypatch.setattr(thread_lock, "active_run", _once(thread_lock.active_run, end))
        monkeypatch.setattr(thread_lock, "live_run", _once(thread_lock.live_run, end))
        run = await client.beta.threads.runs.create(
            thread.id,
            assistant_id=assistant_id,
            additional_messages=extra,  # type: ignore[arg-type]
        )
        monkeypatch.undo()
        assert ended == [winner]  # the insert was refused, and the winner had ended when looked for
        assert run.status == "queued" and run.id != winner
        async with runtime.transaction() as session:
            found = await session.execute(select(orm.Run.id, orm.Run.status).where(orm.Run.thread_id == thread.id))
            listed = {str(run_id): str(status) for run_id, status in found.all()}
        assert listed.get(winner, "completed") == "completed"
        assert [run_id for run_id, status in listed.items() if status == "queued"] == [run.id]


@asynccontextmanager
async def _heard_on_the_work_channel(engine: Any) -> AsyncIterator[list[str]]:
    """The payloads NOTIFYd on the workers' channel while inside, up to a
    marker NOTIFYd on leaving (a listener gets NOTIFYs in commit order)."""
    heard: list[str] = []
    listening, marked = asyncio.Event(), asyncio.Event()

    def on_notify(payload: str) -> None:
        heard.append(payload)
        if payload == "marker":
            marked.set()

    on_listening = lambda up: listening.set() if up else None  # noqa: E731
    listener = asyncio.create_task(db.listen(engine, db.WORK_CHANNEL, on_notify, on_listening=on_listening))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        yield heard
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_notify(:channel, 'marker')"), {"channel": db.WORK_CHANNEL})
            await connection.commit()
        await asyncio.wait_for(marked.wait(), 10)
        heard.remove("marker")
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no other processes to wake
async def test_a_process_with_a_worker_wakes_no_other_for_its_creates(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """A process that runs a worker (Runtime.wakes_by_notify() False) wakes
    it in-process for its own creates: nothing on the work channel, from
    read or remembered defaults, on a new or an existing thread, streamed
    or not."""
    runtime: Runtime = app.state.runtime
    assert runtime.worker is not None and not runtime.wakes_by_notify()
    async with _heard_on_the_work_channel(runtime.engine) as heard:
        assistant_id = await _assistant(client)
        for _remembered in range(2):
            run = await client.beta.threads.create_and_run_poll(assistant_id=assistant_id, thread=_HELLO)
            assert run.status == "completed"
            thread = await client.beta.threads.create(messages=_HELLO["messages"])
            run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
            assert run.status == "completed"
        async with await client.beta.threads.create_and_run(
            assistant_id=assistant_id, thread=_HELLO, stream=True
        ) as stream:
            assert [item.event async for item in stream][-1] == "thread.run.completed"
    assert heard == []


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no other processes to wake
async def test_a_replicas_create_that_met_changed_defaults_wakes_the_workers_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API replica's create from remembered defaults that another process
    has changed: the attempt that met the change (one statement, committed
    alone) wrote nothing and NOTIFYd nothing; the create made again from a
    fresh read wakes the workers: one wake-up per create."""
    settings.embedded_worker = False
    monkeypatch.setattr(run_defaults, "forget", lambda _assistant_id: None)  # the change is made elsewhere
    replica = create_app(settings)
    async with (
        replica.router.lifespan_context(replica),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=replica), base_url="http://testserver") as http,
    ):
        sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=http, max_retries=0)
        runtime: Runtime = replica.state.runtime
        assert runtime.wakes_by_notify()
        async with _heard_on_the_work_channel(runtime.engine) as heard:
            assistant_id = await _assistant(sdk, instructions="First.")
            await sdk.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
            await sdk.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
            async with runtime.transaction() as session:
                changed = {"instructions": "Second."}
                await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values(**changed))
            run = await sdk.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
            assert run.instructions == "Second."
        assert heard == [""] * 3
        async with runtime.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(orm.Thread)) == 3


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # NOTIFY is PostgreSQL's
async def test_signals_to_other_processes_are_one_statement_outside_a_transaction(
    no_worker: Settings, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """db.notify_work() (a replica's wake-up after a cancel), the run log's
    notifier (news of commits that could not carry their own NOTIFY) and
    close()'s last NOTIFY each send one statement with no BEGIN, and are
    heard."""
    runtime: Runtime = app.state.runtime
    begins: list[object] = []
    async with _heard_on_the_work_channel(runtime.engine) as heard:
        _count_begins(monkeypatch, begins)
        await db.notify_work(runtime.engine)
        monkeypatch.undo()
    assert heard == [""] and not begins
    listening, signalled, signals = asyncio.Event(), asyncio.Event(), []

    def on_signal(payload: str) -> None:
        signals.append(run_events.parse_signal(payload)[0])
        signalled.set()

    on_listening = lambda up: listening.set() if up else None  # noqa: E731
    channel = run_log_module.RUN_EVENTS_CHANNEL
    listener = asyncio.create_task(db.listen(runtime.engine, channel, on_signal, on_listening=on_listening))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        _count_begins(monkeypatch, begins)
        runtime.run_log._tell_others("run_elsewhere")  # as committed() does for an append that sent no NOTIFY
        await asyncio.wait_for(signalled.wait(), 10)
        signalled.clear()
        # News told once close() has begun waits for close()'s own last NOTIFY: sent the same way.
        runtime.run_log._closing = True
        runtime.run_log._tell_others("run_at_close")
        await runtime.run_log.close()
        await asyncio.wait_for(signalled.wait(), 10)
        monkeypatch.undo()
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
    assert signals == ["run_elsewhere", "run_at_close"] and not begins


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_a_runs_event_log_is_read_outside_a_transaction(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /threads/{id}/runs/{id}/events reads the run and its log a
    statement at a time, outside a transaction (no BEGIN, no COMMIT): from
    the start, and after the last event (nothing more: an empty stream)."""
    assistant_id = await _assistant(client)
    run = await client.beta.threads.create_and_run_poll(assistant_id=assistant_id, thread=_HELLO)
    assert run.status == "completed"
    begins: list[object] = []
    _count_begins(monkeypatch, begins)
    whole = await http.get(f"/v1/threads/{run.thread_id}/runs/{run.id}/events")
    assert whole.status_code == 200 and "event: thread.run.completed" in whole.text
    last = max(int(line[len("id: ") :]) for line in whole.text.splitlines() if line.startswith("id: "))
    after = await http.get(f"/v1/threads/{run.thread_id}/runs/{run.id}/events", params={"after": str(last)})
    assert after.status_code == 200 and "thread.run" not in after.text
    missing = await http.get(f"/v1/threads/{run.thread_id}/runs/run_missing/events")
    assert missing.status_code == 404
    monkeypatch.undo()
    assert not begins


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_run_on_a_thread_reads_its_thread_straight_on_sqlite(
    no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """POST /threads/{id}/runs on SQLite: the thread's owner, its live run
    and its last messages are read straight on the driver (held_back.run_now,
    issue 17), with no statement through SQLAlchemy's execution (its IN list
    of live statuses is written as constants, not rendered per execution);
    a thread whose run is live still refuses another, naming it, and a
    thread not there is not found."""
    runtime: Runtime = app.state.runtime
    assert not thread_lock._LIVE_RUN.compile(dialect=runtime.engine.sync_engine.dialect).post_compile_params
    assistant_id = await _assistant(client)
    # A first run reads its assistant (its defaults remembered from then on).
    await client.beta.threads.runs.create((await client.beta.threads.create()).id, assistant_id=assistant_id)
    thread = await client.beta.threads.create(**_HELLO)
    executed: list[str] = []

    def noted(_connection: Any, clause: Any, *_args: Any) -> None:
        executed.append(str(clause))

    event.listen(runtime.engine.sync_engine, "before_execute", noted)
    try:
        run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
        assert executed == []
        with pytest.raises(openai.BadRequestError) as refused:
            await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
        assert error_of(refused.value)["message"] == f"Thread {thread.id} already has an active run {run.id}."
        with pytest.raises(openai.NotFoundError):
            await client.beta.threads.runs.create("thread_" + "0" * 24, assistant_id=assistant_id)
    finally:
        event.remove(runtime.engine.sync_engine, "before_execute", noted)


async def test_a_message_reads_its_threads_live_run_straight(
    no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """POST /threads/{id}/messages: the thread's live run is read straight on
    the driver (held_back.run_now; issue 17), on both databases, with no
    statement on runs through SQLAlchemy's execution; a thread whose run is
    live still refuses the message, naming the run."""
    runtime: Runtime = app.state.runtime
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    executed: list[str] = []

    def noted(_connection: Any, clause: Any, *_args: Any) -> None:
        executed.append(str(clause))

    event.listen(runtime.engine.sync_engine, "before_execute", noted)
    try:
        await client.beta.threads.messages.create(thread.id, role="user", content="Hello")
        assert [statement for statement in executed if "FROM runs" in statement] == []
    finally:
        event.remove(runtime.engine.sync_engine, "before_execute", noted)
    run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.beta.threads.messages.create(thread.id, role="user", content="Hello again")
    assert error_of(refused.value)["message"] == f"Can't add messages to {thread.id} while a run {run.id} is active."


async def test_a_thread_read_the_driver_declines_goes_through_sqlalchemy(
    no_worker: Settings, client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where held_back.run_now declines a thread's read (it returns None: a
    shape it cannot send straight), thread_lock runs it through SQLAlchemy:
    the same message and run creates, the same refusal naming the live run,
    the same 404 (issue 17: the straight read's fallback, which serving
    never takes)."""
    declined: list[object] = []

    async def decline(_session: Any, statement: Any, _params: dict[str, Any]) -> None:
        declined.append(statement)
        return None

    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    monkeypatch.setattr(db, "run_now", decline)
    await client.beta.threads.messages.create(thread.id, role="user", content="hello")
    run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
    assert run.status == "queued"
    refusal = f"Thread {thread.id} already has an active run {run.id}."
    with pytest.raises(openai.BadRequestError) as refused:
        await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
    assert error_of(refused.value)["message"] == refusal
    with pytest.raises(openai.BadRequestError) as refused:
        await client.beta.threads.messages.create(thread.id, role="user", content="again")
    assert error_of(refused.value)["message"].endswith(f"while a run {run.id} is active.")
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.runs.create("thread_" + "0" * 24, assistant_id=assistant_id)
    assert declined  # the reads above went by the fallback


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no raw checkout
@pytest.mark.parametrize(
    ("refusal", "answered"),
    [
        # PostgreSQL refusing a new connection for now (a restart, a failover,
        # too many connections): not a lost one to SQLAlchemy, but a 503 all
        # the same (handlers._unavailable: a 500 before).
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), (503, "server_error")),
        (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"), (503, "server_error")),
        # One SQLAlchemy takes for lost (dialect.is_disconnect): main's 503.
        (
            asyncpg.exceptions.InterfaceError("connection is closed"),
            (503, "server_error"),
        ),  # errors.database_unavailable
    ],
)
async def test_a_remembered_create_whose_connection_fails_answers_as_a_sessions_checkout(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch, refusal: Exception, answered: Any
) -> None:
    """A create whose one statement's raw checkout (db.autocommit_connection)
    cannot connect is answered as when a session's checkout could not
    (SQLAlchemy's error, connection_invalidated where the connection is
    lost: handlers.unexpected_error), never as the adapter's bare error."""
    runtime: Runtime = app.state.runtime
    assistant_id = await _assistant(client, instructions="Be brief.")
    await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
    assert run_defaults.remembered(projects.DEFAULT, assistant_id) is not None
    refused: list[Exception] = []
    connect = asyncpg.connect

    async def refusing(*_args: Any, **_kwargs: Any) -> Any:
        refused.append(refusal)
        raise refusal

    # Every idle pooled connection held, so that the create's checkout
    # connects. (Not engine.dispose(): the connections the app's listeners
    # hold would be checked in to the disposed pool later, never closed.)
    idle = runtime.engine.sync_engine.pool.checkedin()  # type: ignore[attr-defined]
    held = [await runtime.engine.connect() for _ in range(idle)]
    try:
        monkeypatch.setattr(asyncpg, "connect", refusing)
        with pytest.raises(openai.APIStatusError) as raised:
            await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)
        monkeypatch.setattr(asyncpg, "connect", connect)
    finally:
        for connection in held:
            await connection.close()
    assert refused
    assert (raised.value.status_code, error_of(raised)["type"]) == answered
    await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=_HELLO)  # connecting again
