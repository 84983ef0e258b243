"""The run event log without HTTP (issue 11): what a run logs, pruning after
the retention, and closing what a dead worker's stream left open."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, orm, run_log, sqlite_driver
from app.bus import FollowerQueue
from app.run_log import RUN_EVENTS_CHANNEL
from app.runtime import Runtime
from app.services import run_events, run_state
from app.settings import Settings
from app.wire.events import Event
from app.worker import Worker
from tests.runner.helpers import until
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.timeout(60)


async def _log(runtime: Runtime, run_id: str) -> list[str]:
    async with runtime.transaction() as session:
        return [entry.event.name for entry in await run_events.read(session, run_id, 0)]


async def test_a_run_logs_its_whole_stream_in_order(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1, text="[[tokens 30]]")
    worker = Worker(runtime)
    try:
        await worker.run_until_idle()
    finally:
        await worker.stop()
    await runtime.run_log.flush()
    logged = await _log(runtime, run_id)
    assert logged[:5] == [
        "thread.run.in_progress",  # the run was inserted directly: no created/queued were logged
        "thread.run.step.created",
        "thread.run.step.in_progress",
        "thread.message.created",
        "thread.message.in_progress",
    ]
    assert logged.count("thread.message.delta") == 30
    assert logged[-3:] == ["thread.message.completed", "thread.run.step.completed", "thread.run.completed"]


async def test_finished_logs_are_pruned_after_the_retention_and_live_ones_kept(runtime: Runtime) -> None:
    finished, live = await _make_runs(runtime, 2)
    worker = Worker(runtime)
    try:
        async with runtime.transaction() as session:  # only the first is executed
            await session.execute(update(orm.Run).where(orm.Run.id == live).values(status="requires_action"))
        await worker.run_until_idle()
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, live, [Event("thread.run.requires_action", {"id": live})])
        assert await _log(runtime, finished) and await _log(runtime, live)
        await worker.prune_run_events()  # within the retention (a day): nothing goes
        assert await _log(runtime, finished)
        runtime.settings.run_events_retention_seconds = -1  # "ended a second from now": everything is old
        await worker.prune_run_events()
        assert await _log(runtime, finished) == [] and await _log(runtime, live) != []
    finally:
        await worker.stop()
    async with runtime.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(orm.RunEvent)) == 1


def test_what_a_dead_worker_left_open_is_closed_with_what_it_had_streamed() -> None:
    message = {"id": "msg_1", "object": "thread.message", "status": "in_progress", "content": []}
    step = {"id": "step_1", "object": "thread.run.step", "status": "in_progress", "type": "message_creation"}
    done_step = {"id": "step_0", "object": "thread.run.step", "status": "completed", "type": "tool_calls"}
    tracker = run_events.OpenObjects()
    for event in [
        Event("thread.run.step.created", done_step),
        Event("thread.run.step.completed", done_step),
        Event("thread.run.step.created", step),
        Event("thread.message.created", message),
        Event("thread.message.delta", {"id": "msg_1", "delta": {"content": [_text(0, "Hel", [])]}}),
        Event("thread.message.delta", {"id": "msg_1", "delta": {"content": [_text(0, "lo")]}}),
    ]:
        tracker.feed(event)
    message_closed, step_closed = tracker.closing_events(now=100)
    assert message_closed.name == "thread.message.incomplete" and isinstance(message_closed.data, dict)
    assert message_closed.data["status"] == "incomplete" and message_closed.data["incomplete_at"] == 100
    assert message_closed.data["content"] == [{"type": "text", "text": {"value": "Hello", "annotations": []}}]
    assert step_closed.name == "thread.run.step.failed" and isinstance(step_closed.data, dict)
    assert step_closed.data["id"] == "step_1" and step_closed.data["last_error"]["code"] == "server_error"


def test_a_dead_workers_open_refusal_is_closed_whole() -> None:
    message = {"id": "msg_1", "object": "thread.message", "status": "in_progress", "content": []}
    tracker = run_events.OpenObjects()
    for event in [
        Event("thread.message.created", message),
        Event("thread.message.delta", {"id": "msg_1", "delta": {"content": [_text(0, "Hi", [])]}}),
        Event("thread.message.delta", {"id": "msg_1", "delta": {"content": [_refusal(1, "No ")]}}),
        Event("thread.message.delta", {"id": "msg_1", "delta": {"content": [_refusal(1, "way")]}}),
    ]:
        tracker.feed(event)
    (message_closed,) = tracker.closing_events(now=100)
    assert isinstance(message_closed.data, dict)
    assert message_closed.data["content"] == [
        {"type": "text", "text": {"value": "Hi", "annotations": []}},
        {"type": "refusal", "refusal": "No way"},
    ]


def _refusal(index: int, value: str) -> dict[str, object]:
    return {"index": index, "type": "refusal", "refusal": value}


def _text(index: int, value: str, annotations: list[object] | None = None) -> dict[str, object]:
    text: dict[str, object] = {"value": value}
    if annotations is not None:
        text["annotations"] = annotations
    return {"index": index, "type": "text", "text": text}


async def test_an_append_numbered_ahead_is_checked_against_what_the_log_wrote(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """On SQLite this process numbers an append by its own counter and sends
    the insert with the COMMIT (issue 17); the log numbers the rows itself.
    When another process wrote the run's log meanwhile (a row put here
    directly), the entries returned and handed to followers are the log's."""
    (run_id,) = await _make_runs(runtime, 1)
    created = [Event("thread.run.created", {"id": run_id}), Event("thread.run.queued", {"id": run_id})]
    async with runtime.transaction() as session:
        opening = await runtime.run_log.append(session, run_id, created)
    assert [entry.seq for entry in opening] == [1, 2]
    async with runtime.transaction() as session:  # another process's append
        await session.execute(
            insert(orm.RunEvent).values(run_id=run_id, seq=3, event="thread.run.cancelling", data={}, created_at=0.0)
        )
    async with runtime.bus.follow(run_id) as delivered:
        async with runtime.transaction() as session:
            entries = await runtime.run_log.append(session, run_id, [Event("thread.run.cancelled", {"id": run_id})])
        assert [entry.seq for entry in entries] == [4]
        assert [entry.seq for entry in delivered.get_nowait() or []] == [4]
    # SQLite guessed 3 (PostgreSQL numbers in the statement and never guesses).
    assert ("written elsewhere" in caplog.text) is not runtime.run_log.postgres
    async with runtime.transaction() as session:
        logged = await run_events.read(session, run_id, 0)
    assert [(entry.seq, entry.event.name) for entry in logged] == [
        (1, "thread.run.created"),
        (2, "thread.run.queued"),
        (3, "thread.run.cancelling"),
        (4, "thread.run.cancelled"),
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_rolled_back_append_gives_back_only_the_numbers_it_did_not_hand_out(runtime: Runtime) -> None:
    """Deltas handed to followers before they are written (SQLite, a sole
    process) keep their numbers when the transaction that took them fails:
    the next deltas are numbered after them, never over them, so what a
    stream showed is what the log holds."""
    assert runtime.run_log.deliver_early
    runtime.run_log.flush_seconds = 60.0  # the deltas stay buffered until an append takes them
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.created", {"id": run_id})])

    def delta(n: int) -> Event:
        return Event("thread.message.delta", {"n": n})

    async with runtime.bus.follow(run_id) as delivered:
        runtime.run_log.publish(run_id, [delta(1), delta(2)])
        with pytest.raises(ZeroDivisionError):
            async with runtime.transaction() as session:
                await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {})])
                raise ZeroDivisionError
        runtime.run_log.publish(run_id, [delta(3)])
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.step.completed", {})])
        seen: list[tuple[int, object]] = []
        while not delivered.empty():
            seen += [(entry.seq, entry.event.data.get("n")) for entry in delivered.get_nowait() or []]
    assert seen == [(2, 1), (3, 2), (4, 3), (5, None)]
    async with runtime.transaction() as session:
        logged = await run_events.read(session, run_id, 0)
    assert [(entry.seq, entry.event.name, entry.event.data.get("n")) for entry in logged] == [
        (1, "thread.run.created", None),
        (2, "thread.message.delta", 1),
        (3, "thread.message.delta", 2),
        (4, "thread.message.delta", 3),
        (5, "thread.run.step.completed", None),
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_delta_published_while_a_flush_writes_unnumbered_ones_waits_for_their_numbers(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deltas published while an append was uncommitted wait, unnumbered,
    for the log to number them. One published while the flush that writes
    them is in flight is not numbered ahead over them (it took the numbers
    they were being given): it waits for the log too, and each follower
    sees every number once, as logged."""
    runtime.run_log.flush_seconds = 60.0  # the flusher sleeps: this test's flush() is the one
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])

    def delta(n: int) -> Event:
        return Event("thread.message.delta", {"n": n})

    inserting, go_on = asyncio.Event(), asyncio.Event()

    def held_up(original: Any) -> Any:
        async def inserted(*args: Any, **kwargs: Any) -> Any:
            inserting.set()
            await go_on.wait()
            return await original(*args, **kwargs)

        return inserted

    seen: list[tuple[int, object]] = []
    async with runtime.bus.follow(run_id) as delivered:
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.step.created", {})])
            runtime.run_log.publish(run_id, [delta(1), delta(2)])  # the append uncommitted: not numbered
        with monkeypatch.context() as patch:
            for name in ("insert", "insert_live_behind"):
                patch.setattr(run_events, name, held_up(getattr(run_events, name)))
            flushing = asyncio.ensure_future(runtime.run_log.flush())
            try:
                async with asyncio.timeout(10):
                    await inserting.wait()  # deltas 1 and 2 taken, their numbers not known yet
                    runtime.run_log.publish(run_id, [delta(3)])
                    go_on.set()
                    await flushing
            finally:
                go_on.set()
                await asyncio.gather(flushing, return_exceptions=True)
        await runtime.run_log.flush()
        while not delivered.empty():
            seen += [(entry.seq, entry.event.data.get("n")) for entry in delivered.get_nowait() or []]
    logged = await _logged(runtime, run_id)
    assert logged == [
        (1, "thread.run.in_progress", None),
        (2, "thread.run.step.created", None),
        (3, "thread.message.delta", 1),
        (4, "thread.message.delta", 2),
        (5, "thread.message.delta", 3),
    ]
    assert sorted(seen) == [(2, None), (3, 1), (4, 2), (5, 3)]


async def _logged(runtime: Runtime, run_id: str, after: int = 0) -> list[tuple[int, str, object]]:
    """The run's log after ``after``: (seq, event name, the test delta's "n")."""
    async with runtime.transaction() as session:
        return [(e.seq, e.event.name, e.event.data.get("n")) for e in await run_events.read(session, run_id, after)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_deltas_published_while_an_append_is_uncommitted_get_the_numbers_the_log_gives_them(
    runtime: Runtime,
) -> None:
    """Deltas published while an append numbered ahead (SQLite, a sole
    process) is not committed yet, which then fails: a follower never sees
    one number with two contents, and one that reconnects from any number
    it saw resumes with exactly what follows it in the log."""
    assert runtime.run_log.deliver_early
    runtime.run_log.flush_seconds = 60.0  # the deltas stay buffered until an append takes them
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")  # live: a flush logs its deltas
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.created", {"id": run_id})])

    def delta(n: int) -> Event:
        return Event("thread.message.delta", {"n": n})

    seen: list[tuple[int, str, object]] = []
    async with runtime.bus.follow(run_id) as delivered:
        runtime.run_log.publish(run_id, [delta(1)])
        with pytest.raises(ZeroDivisionError):
            async with runtime.transaction() as session:  # a cancel, say, whose COMMIT fails
                await runtime.run_log.append(session, run_id, [Event("thread.run.cancelling", {})])
                runtime.run_log.publish(run_id, [delta(2), delta(3)])  # the executor streams meanwhile
                raise ZeroDivisionError
        runtime.run_log.publish(run_id, [delta(4)])
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.step.completed", {})])
        runtime.run_log.publish(run_id, [delta(5)])
        await runtime.run_log.flush()
        while not delivered.empty():
            seen += [(e.seq, e.event.name, e.event.data.get("n")) for e in delivered.get_nowait() or []]
    logged = await _logged(runtime, run_id)
    assert logged == [
        (1, "thread.run.created", None),
        (2, "thread.message.delta", 1),
        (3, "thread.message.delta", 2),
        (4, "thread.message.delta", 3),
        (5, "thread.message.delta", 4),
        (6, "thread.run.step.completed", None),
        (7, "thread.message.delta", 5),
    ]
    assert sorted(seen) == logged[1:]  # each once, as logged
    for seq, _name, _n in seen:  # a reconnect after each
        resumed = await _logged(runtime, run_id, after=seq)
        assert resumed == [entry for entry in logged if entry[0] > seq]


async def test_deltas_an_append_took_are_kept_when_its_insert_fails(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append whose insert raises (a held-back write's failure surfacing,
    a dropped connection, a cancelled task) gives the buffered deltas it
    took back: the next append logs them, under the numbers followers saw."""
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.created", {"id": run_id})])

    async def refuse(*_args: object, **_kwargs: object) -> None:
        raise ConnectionResetError("the insert is refused")

    seen: list[tuple[int, int]] = []
    async with runtime.bus.follow(run_id) as delivered, runtime.run_log.holding(run_id):  # no flush takes them
        runtime.run_log.publish(run_id, [Event("thread.message.delta", {"n": n}) for n in (1, 2)])
        with monkeypatch.context() as patch, pytest.raises(ConnectionResetError):
            patch.setattr(run_events, "insert_behind", refuse)
            patch.setattr(run_events, "insert", refuse)
            async with runtime.transaction() as session:
                await runtime.run_log.append(session, run_id, [Event("thread.run.step.completed", {})])
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.step.completed", {})])
        while not delivered.empty():
            seen += [(e.seq, e.event.data["n"]) for e in delivered.get_nowait() or [] if "n" in e.event.data]
    logged = await _logged(runtime, run_id)
    assert logged == [
        (1, "thread.run.created", None),
        (2, "thread.message.delta", 1),
        (3, "thread.message.delta", 2),
        (4, "thread.run.step.completed", None),
    ]
    assert seen == [(2, 1), (3, 2)]


async def _notify(runtime: Runtime, topic: str, *, via: Runtime | None = None) -> None:
    """``runtime``'s NOTIFY for ``topic``, sent by a connection of ``via``'s
    pool (its own by default)."""
    async with (via or runtime).transaction() as session:
        await run_events.notify(session, run_events.Signal(RUN_EVENTS_CHANNEL, runtime.run_log.origin), [topic])


async def _nudged(queue: FollowerQueue, seconds: float) -> bool:
    """Whether a nudge (None) comes within ``seconds``; entries handed over are skipped."""
    try:
        async with asyncio.timeout(seconds):
            while await queue.get() is not None:
                pass
    except TimeoutError:
        return False
    return True


def _nudges(queue: FollowerQueue) -> int:
    """The nudges (None) waiting in ``queue``, taken out."""
    taken = []
    while not queue.empty():
        taken.append(queue.get_nowait())
    return taken.count(None)


async def _until_listening(listener: Runtime, sender: Runtime) -> None:
    """Until ``listener``'s process hears ``sender``'s NOTIFYs (its listening
    connection is opened by a task of its own)."""
    async with listener.bus.follow("marker") as marker:
        async with asyncio.timeout(20):
            while True:
                await _notify(sender, "marker")
                if await _nudged(marker, 0.1):
                    return


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_commit_signals_other_processes_itself_and_not_its_own(runtime: Runtime, settings: Settings) -> None:
    """PostgreSQL (issue 17): the INSERT that logs a run's events NOTIFYs
    other processes in their own transaction (no notifier transaction), and
    the writing process, whose followers are handed the entries at commit,
    does not wake them to read the log back."""
    other = await Runtime.start(settings)  # a second process on the same database
    try:
        await _until_listening(other, runtime)
        await _until_listening(runtime, other)
        (run_id,) = await _make_runs(runtime, 1)
        async with runtime.bus.follow(run_id) as here, other.bus.follow(run_id) as there:
            async with runtime.transaction() as session:
                await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
            assert await _nudged(there, 20)
            assert runtime.run_log._notifier is None  # the INSERT told them
            # A NOTIFY from the other process after that commit: heard here in
            # commit order, so a nudge for our own would have come before it.
            async with runtime.bus.follow("marker") as marker:
                await _notify(other, "marker")
                assert await _nudged(marker, 20)
            assert [entry.seq for entry in here.get_nowait() or []] == [1]
            assert here.empty()
    finally:
        await other.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_notifiers_news_go_straight_to_the_driver_and_reach_the_other_process(
    runtime: Runtime, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL (issue 17): the news the run log's notifier sends in its
    own statement (runs whose commits did not NOTIFY themselves) go straight
    on asyncpg (db.run_now), not through SQLAlchemy's execution, and another
    process's followers of each run are woken by them."""
    other = await Runtime.start(settings)  # a second process on the same database
    try:
        await _until_listening(other, runtime)
        executed: list[object] = []
        session_execute = AsyncSession.execute

        async def execute(self: AsyncSession, statement: Any, *args: Any, **kwargs: Any) -> Any:
            executed.append(statement)
            return await session_execute(self, statement, *args, **kwargs)

        monkeypatch.setattr(AsyncSession, "execute", execute)
        async with other.bus.follow("run_a") as first, other.bus.follow("run_b") as second:
            runtime.run_log._tell_others("run_a")
            runtime.run_log._tell_others("run_b")
            assert await _nudged(first, 20)
            assert await _nudged(second, 20)
        assert executed == []  # neither the NOTIFY nor anything else through session.execute
    finally:
        await other.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_process_skips_its_own_notifies_whichever_backend_sends_them(
    runtime: Runtime, settings: Settings
) -> None:
    """Two processes on one database, each NOTIFY sent by a server backend
    of the other's pool (as a pooler in front of PostgreSQL may hand one
    backend to both, or a backend's pid be reused): each process is woken
    by the other's NOTIFYs only, told apart by the token in the payload."""
    other = await Runtime.start(settings)  # a second process on the same database
    try:
        assert runtime.run_log.origin != other.run_log.origin
        await _until_listening(other, runtime)
        await _until_listening(runtime, other)
        async with (
            runtime.bus.follow("theirs") as theirs_here,
            runtime.bus.follow("ours") as ours_here,
            other.bus.follow("theirs") as theirs_there,
            other.bus.follow("ours") as ours_there,
        ):
            await _notify(other, "theirs", via=runtime)  # the other's news, from this pool's backend
            await _notify(runtime, "ours", via=other)  # this process's, from the other's backend
            # NOTIFYs reach a listener in commit order: once a marker sent
            # after them is heard, every nudge for them has come.
            for listener, sender in ((runtime, other), (other, runtime)):
                async with listener.bus.follow("marker") as marker:
                    await _notify(sender, "marker")
                    assert await _nudged(marker, 20)
            # Each process is woken by the other's news only.
            assert [_nudges(queue) for queue in (theirs_here, ours_here, theirs_there, ours_there)] == [1, 0, 0, 1]
    finally:
        await other.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_followers_rely_on_notifies_only_while_a_listener_answers(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams read the log as a mere safety net only while this process
    listens (log_news_announced). A listening connection that stops
    answering (a half-open connection after a partition: here its check
    never returns) is given up and another opened, and each opening, the
    first too, nudges every follower (a NOTIFY may have been missed while
    nobody listened)."""
    await until(runtime.log_news_announced, "the runtime's listener to open")
    runtime.run_log.listening = False
    assert not runtime.log_news_announced()
    monkeypatch.setattr(db, "LISTENER_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(db, "LISTENER_REPLY_SECONDS", 0.05)
    monkeypatch.setattr(db, "LISTENER_CHECK", "SELECT pg_sleep(30)")  # no answer in time
    states: list[bool] = []
    async with runtime.bus.follow("a-run") as follower:
        tasks = [
            asyncio.create_task(
                db.listen(
                    runtime.engine, "test_channel", lambda _payload: None, on_listening=states.append, retry_seconds=0
                )
            ),
            asyncio.create_task(run_log.listen(runtime.engine, runtime.run_log, retry_seconds=0)),
        ]
        try:
            assert await _nudged(follower, 20)  # a listener opened
            await until(lambda: states.count(True) >= 3, "three listeners opened in turn")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert states[:4] == [True, False, True, False]  # each one given up, then another opened
    assert not runtime.log_news_announced()  # the one it cancelled stopped listening


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_followers_are_nudged_when_another_process_opens_the_sqlite_file(runtime: Runtime) -> None:
    """Alone on its SQLite file, a process tells its followers of every
    append, and they wait seconds between reads of the log; once another
    process opens the file (stop_early_delivery), a follower already in such
    a wait looks again at once: the newcomer's appends reach it only so."""
    assert runtime.log_news_announced()
    async with runtime.bus.follow("a-run") as follower:
        await runtime.run_log.stop_early_delivery()
        assert not runtime.log_news_announced()
        assert await _nudged(follower, 0)


class _Abandon(Exception):
    """Raised to roll a transaction back after its writes."""


async def test_a_new_run_and_its_opening_events_are_written_together_or_not_at_all(runtime: Runtime) -> None:
    """POST /threads/runs's path (issue 17): the new thread, its message
    and its run left unwritten by create_thread_and_run, and inserted by
    the append that logs their events (on PostgreSQL one statement, the
    run's events beside the run they belong to); a rollback leaves none."""
    from app.services import assistants, new_rows, projects, runs
    from app.wire.assistants import AssistantCreate
    from app.wire.runs import ThreadAndRunCreate

    async with runtime.transaction() as session:
        assistant = await assistants.create(session, projects.DEFAULT, AssistantCreate(model="gpt-4o"))
    body = ThreadAndRunCreate.model_validate(
        {"assistant_id": assistant.id, "thread": {"messages": [{"role": "user", "content": "hello"}]}}
    )

    async def create() -> tuple[str, list[int]]:
        async with runtime.transaction() as session:
            unwritten = new_rows.Unwritten()
            _thread, run, events = await runs.create_thread_and_run(
                session, projects.DEFAULT, body, expires_in=600, unwritten=unwritten
            )
            entries = await runtime.run_log.append(
                session, run.id, events, run_locked=True, inserting=unwritten.rows, inserting_only_if=unwritten.only_if
            )
            if abandon:
                raise _Abandon
            return run.id, [entry.seq for entry in entries]

    abandon = False
    run_id, seqs = await create()
    assert seqs == [1, 2, 3]
    assert await _log(runtime, run_id) == ["thread.created", "thread.run.created", "thread.run.queued"]
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and run.status == "queued"
        count = select(func.count()).select_from(orm.Message).where(orm.Message.thread_id == run.thread_id)
        assert await session.scalar(count) == 1
    abandon = True
    with pytest.raises(_Abandon):
        await create()
    async with runtime.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(orm.Run)) == 1
        assert await session.scalar(select(func.count()).select_from(orm.RunEvent)) == 3


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_run_created_by_a_commit_is_not_signalled_to_other_processes(
    runtime: Runtime, settings: Settings
) -> None:
    """PostgreSQL (issue 17): the append that logs a run's creation sends
    no NOTIFY, neither by its insert nor by the notifier: no other process
    can follow a run before the commit that makes it known (a follower that
    comes later reads the log first). The run's next append signals again."""
    other = await Runtime.start(settings)  # a second process on the same database
    try:
        await _until_listening(other, runtime)
        (run_id,) = await _make_runs(runtime, 1)
        async with other.bus.follow(run_id) as there:
            async with runtime.transaction() as session:
                created = [Event("thread.run.created", {"id": run_id}), Event("thread.run.queued", {"id": run_id})]
                await runtime.run_log.append(session, run_id, created)
            # NOTIFYs arrive in commit order: a nudge for the creation would come before the marker.
            async with other.bus.follow("marker") as marker:
                await _notify(runtime, "marker")
                assert await _nudged(marker, 20)
            assert _nudges(there) == 0
            assert runtime.run_log._notifier is None
            async with runtime.transaction() as session:
                await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
            assert await _nudged(there, 20)
    finally:
        await other.close()


def _commits_then_wait(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, *, then_fails: bool = False
) -> tuple[asyncio.Event, asyncio.Event]:
    """The driver's next COMMIT commits, then waits for ``release``: a
    cancellation that reaches the task awaiting it finds the transaction
    committed (SQLite's thread runs a COMMIT it was sent whatever happens to
    the task; PostgreSQL may have it). ``then_fails``: the COMMIT waits
    first, then fails without committing."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
    from sqlalchemy.util import await_only

    driver: Any = AsyncAdapt_asyncpg_connection if runtime.run_log.postgres else sqlite_driver.OneHopConnection
    committed, release = asyncio.Event(), asyncio.Event()
    real_commit = driver.commit

    def commit(self: Any) -> None:
        if committed.is_set():  # the next one only
            real_commit(self)
            return
        if not then_fails:
            real_commit(self)
        committed.set()
        await_only(release.wait())
        if then_fails:  # as a failed COMMIT leaves it: rolled back
            self.rollback()
            raise OSError("disk I/O error")

    monkeypatch.setattr(driver, "commit", commit)
    if runtime.run_log.postgres:
        return committed, release
    # SQLite: Runtime.transaction commits on the driver, outside SQLAlchemy's commit (db.commit_straight).
    real_straight = sqlite_driver.OneHopConnection.commit_straight

    async def commit_straight(self: sqlite_driver.OneHopConnection, **options: bool) -> None:
        if committed.is_set():  # the next one only
            await real_straight(self, **options)
            return
        if not then_fails:
            await real_straight(self, **options)
            committed.set()
            await release.wait()
            return
        committed.set()
        try:
            await release.wait()
        finally:  # as a failed COMMIT leaves it: rolled back
            self.begin_deferred, self.held_back, self.transaction_open = None, [], False
            await self._connection.rollback()  # the write lock left to the caller's rollback
        raise OSError("disk I/O error")

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_straight", commit_straight)
    return committed, release


def _flush_commits_then_wait(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, *, then_fails: bool = False
) -> tuple[asyncio.Event, asyncio.Event]:
    """_commits_then_wait() for the run log's next flush. On PostgreSQL the
    flush has no COMMIT of its own (one autocommitted statement,
    run_events.flush_postgres): its statement commits, then waits for
    ``release``; ``then_fails``: it waits first, then fails, nothing
    written (a lost connection)."""
    if not runtime.run_log.postgres:
        return _commits_then_wait(runtime, monkeypatch, then_fails=then_fails)
    committed, release = asyncio.Event(), asyncio.Event()
    real_flush = run_events.flush_postgres

    async def flush_postgres(*args: Any, **kwargs: Any) -> dict[str, int]:
        if committed.is_set():  # the next one only
            return await real_flush(*args, **kwargs)
        firsts = {} if then_fails else await real_flush(*args, **kwargs)
        committed.set()
        await release.wait()
        if then_fails:
            raise OSError("disk I/O error")
        return firsts

    monkeypatch.setattr(run_events, "flush_postgres", flush_postgres)
    return committed, release


async def test_a_transaction_cancelled_in_its_commit_hands_on_what_it_committed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation (a lost lease, shutdown) that arrives while the COMMIT
    is in flight: the events committed reach the run's followers, as after
    any commit, and the cancellation still ends the task. (Told only
    "cancelled", the run log handed nothing on and took the transaction for
    rolled back.)"""
    (run_id,) = await _make_runs(runtime, 1)
    committed, release = _commits_then_wait(runtime, monkeypatch)
    assert await _cancelled_in_its_commit(runtime, run_id, committed, release) == ["thread.run.cancelling"]
    assert await _log(runtime, run_id) == ["thread.run.cancelling"]


async def _cancelled_in_its_commit(
    runtime: Runtime, run_id: str, reached: asyncio.Event, release: asyncio.Event
) -> list[str] | None:
    """A transaction logging the run's cancelling event, cancelled once its
    COMMIT is ``reached`` (then ``release``d): the cancellation must end its
    task. Returns the events handed to the run's followers (None: nothing)."""

    async def cancelling() -> None:
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.cancelling", {"id": run_id})])

    async with runtime.bus.follow(run_id) as delivered:
        task = asyncio.create_task(cancelling())
        async with asyncio.timeout(10):
            await reached.wait()
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return None if delivered.empty() else [entry.event.name for entry in delivered.get_nowait() or []]


async def test_the_flusher_cancelled_in_its_commit_writes_its_deltas_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() (shutdown) cancels the flusher, then flushes what is
    buffered: deltas whose COMMIT (on PostgreSQL the flush's one
    statement) was in flight at the cancellation are not put back and
    written a second time."""
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:  # a live run: its deltas are logged
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(status="in_progress"))
        await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
    committed, release = _flush_commits_then_wait(runtime, monkeypatch)
    runtime.run_log.publish(run_id, [Event("thread.message.delta", {"n": 1})])  # wakes the flusher
    async with asyncio.timeout(10):
        await committed.wait()
        flusher = runtime.run_log._flusher
        closing = asyncio.create_task(runtime.run_log.close())
        await asyncio.sleep(0)  # close() has cancelled the flusher
        assert flusher is not None and flusher.cancelling()  # else the release came first: nothing tested
        release.set()
        await closing
    assert await _log(runtime, run_id) == ["thread.run.in_progress", "thread.message.delta"]


async def _live_and_ended_runs(runtime: Runtime) -> tuple[str, str]:
    """Two runs whose logs hold their start, one of them ended since
    (expired, say), with the flusher asleep: the test's flush() is the one."""
    live, ended = await _make_runs(runtime, 2, status="in_progress")
    for run_id in (live, ended):
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == ended).values(status="expired"))
    runtime.run_log.flush_seconds = 60.0
    return live, ended


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_flush_on_a_sqlite_file_is_one_hop_and_drops_the_deltas_of_ended_runs(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush of a lone process's SQLite file: BEGIN, the insert of every
    run's deltas and COMMIT go to aiosqlite's thread together (issue 17: a
    lock's SELECT, the insert and the COMMIT were three hops), not to the
    event loop's thread, where a lone process's transactions may run (a
    streaming model's tokens would wait for it). A run that
    ended meanwhile (expired, say) has its late deltas dropped, the live
    run's beside it are logged after its log's end, under the numbers its
    followers were handed."""
    live, ended = await _live_and_ended_runs(runtime)
    hops = 0
    hop = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await hop(self, fn, *args, **kwargs)

    async with runtime.bus.follow(live) as delivered:
        runtime.run_log.publish(live, [Event("thread.message.delta", {"n": n}) for n in (1, 2)])
        runtime.run_log.publish(ended, [Event("thread.message.delta", {"n": 3})])
        with monkeypatch.context() as patch:
            patch.setattr(aiosqlite.Connection, "_execute", counted)
            await runtime.run_log.flush()
        seen = [(e.seq, e.event.data.get("n")) for e in delivered.get_nowait() or []]
    assert hops == 1
    assert await _logged(runtime, live) == [
        (1, "thread.run.in_progress", None),
        (2, "thread.message.delta", 1),
        (3, "thread.message.delta", 2),
    ]
    assert seen == [(2, 1), (3, 2)]  # handed out early, as then logged
    assert await _logged(runtime, ended) == [(1, "thread.run.in_progress", None)]
    assert runtime.run_log.flushed_rows == 2 and not runtime.run_log._buffer


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_flush_on_postgres_is_one_autocommitted_statement_and_drops_the_deltas_of_ended_runs(
    runtime: Runtime,
) -> None:
    """A PostgreSQL flush is one statement outside a transaction block
    (migration 0017's function: the live runs' locks, then the numbering
    insert; issue 17: it was BEGIN with the lock, the insert, COMMIT). A run
    that ended meanwhile has its late deltas dropped; the live run's are
    logged after its log's end."""
    live, ended = await _live_and_ended_runs(runtime)
    sent: list[tuple[str, object]] = []

    def noted(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append((statement, connection))

    engine = runtime.engine.sync_engine
    async with runtime.bus.follow(live) as delivered:
        runtime.run_log.publish(live, [Event("thread.message.delta", {"n": n}) for n in (1, 2)])
        runtime.run_log.publish(ended, [Event("thread.message.delta", {"n": 3})])
        sa_event.listen(engine, "before_cursor_execute", noted)
        try:
            await runtime.run_log.flush()
        finally:
            sa_event.remove(engine, "before_cursor_execute", noted)
        seen = [(e.seq, e.event.data.get("n")) for e in delivered.get_nowait() or []]
    # Alone, and straight on a connection checked out raw in autocommit
    # (db.run_now tells the listeners so: no SQLAlchemy Connection).
    assert [(statement.split("FROM ")[-1][:17], connection) for statement, connection in sent] == [
        ("run_events_flush(", None)
    ], sent
    assert await _logged(runtime, live) == [
        (1, "thread.run.in_progress", None),
        (2, "thread.message.delta", 1),
        (3, "thread.message.delta", 2),
    ]
    assert seen == [(2, 1), (3, 2)]
    assert await _logged(runtime, ended) == [(1, "thread.run.in_progress", None)]
    assert runtime.run_log.flushed_rows == 2 and not runtime.run_log._buffer


async def test_an_append_for_a_run_whose_thread_was_deleted_logs_nothing(runtime: Runtime) -> None:
    """Its run gone, an append that takes the run's lock itself fails and
    leaves no event behind: on PostgreSQL its lock finds no row
    (run_events.lock_inserting; the log has no foreign key since 0018), on
    SQLite the foreign key refuses it."""
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
        thread_id = (await session.get(orm.Run, run_id)).thread_id  # type: ignore[union-attr]
    async with runtime.transaction() as session:
        await session.execute(delete(orm.RunEvent).where(orm.RunEvent.run_id == run_id))
        await session.execute(delete(orm.Run).where(orm.Run.thread_id == thread_id))
    with pytest.raises((run_state.TransitionConflict, IntegrityError)):
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.message.completed", {"id": "msg_x"})])
    async with runtime.transaction() as session:
        logged = await session.scalar(
            select(func.count()).select_from(orm.RunEvent).where(orm.RunEvent.run_id == run_id)
        )
    assert logged == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_postgres_flush_waits_for_an_append_holding_the_run_and_numbers_after_it(runtime: Runtime) -> None:
    """Another process's append holds the run's row (FOR NO KEY UPDATE, as
    every append takes it) and has logged an event, uncommitted. The flush
    waits for that lock, and its insert, a statement of its own inside the
    function, sees the append's event once it commits: the deltas are
    numbered after it. (Numbered on a snapshot from before the wait, they
    would take the append's number and fail on the log's key.)"""
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
    runtime.run_log.flush_seconds = 60.0  # the flusher sleeps: this test's flush() is the one

    async def flush_waiting() -> bool:
        async with runtime.engine.connect() as connection:
            query = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype IN ('tuple', 'transactionid')")
            return bool((await connection.execute(query)).scalar())

    async with runtime.engine.connect() as other:  # the other process's append, uncommitted
        await other.execute(text("SELECT id FROM runs WHERE id = :id FOR NO KEY UPDATE"), {"id": run_id})
        await other.execute(
            text(
                "INSERT INTO run_events (run_id, seq, event, data, created_at) "
                "VALUES (:id, 2, 'thread.run.cancelling', CAST('{}' AS json), 0)"
            ),
            {"id": run_id},
        )
        runtime.run_log.publish(run_id, [Event("thread.message.delta", {"n": n}) for n in (1, 2)])
        flushing = asyncio.ensure_future(runtime.run_log.flush())
        try:
            async with asyncio.timeout(20):
                await until(flush_waiting, "the flush to wait for the run's lock")
                assert not flushing.done()
                await other.commit()
                await flushing
        finally:
            await asyncio.gather(flushing, return_exceptions=True)
    assert await _logged(runtime, run_id) == [
        (1, "thread.run.in_progress", None),
        (2, "thread.run.cancelling", None),
        (3, "thread.message.delta", 1),
        (4, "thread.message.delta", 2),
    ]


async def test_a_flush_whose_commit_fails_keeps_its_deltas_for_the_next(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush's COMMIT fails (a disk error, a lost connection; on
    PostgreSQL its one statement): its deltas go back to the buffer, and the next flush logs them once, under
    the numbers their followers were handed."""
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    async with runtime.transaction() as session:
        await runtime.run_log.append(session, run_id, [Event("thread.run.in_progress", {"id": run_id})])
    # The flusher sleeps (PostgreSQL's too, whose first flush is otherwise
    # at once): this test's flush() is the one.
    runtime.run_log.flush_seconds = 60.0
    monkeypatch.setattr(run_log, "FIRST_FLUSH_GRACE_SECONDS", 60.0)
    committed, release = _flush_commits_then_wait(runtime, monkeypatch, then_fails=True)
    async with runtime.bus.follow(run_id) as delivered:
        runtime.run_log.publish(run_id, [Event("thread.message.delta", {"n": n}) for n in (1, 2)])
        flushing = asyncio.ensure_future(runtime.run_log.flush())
        async with asyncio.timeout(10):
            await committed.wait()
            release.set()
            with pytest.raises(Exception, match="disk I/O error"):
                await flushing
        assert await _logged(runtime, run_id) == [(1, "thread.run.in_progress", None)]
        await runtime.run_log.flush()
        seen: list[tuple[int, object]] = []
        while not delivered.empty():
            seen += [(e.seq, e.event.data.get("n")) for e in delivered.get_nowait() or []]
    assert await _logged(runtime, run_id) == [
        (1, "thread.run.in_progress", None),
        (2, "thread.message.delta", 1),
        (3, "thread.message.delta", 2),
    ]
    assert seen == [(2, 1), (3, 2)]  # each once: handed out early (SQLite) or once written


async def test_a_cancelled_transaction_whose_commit_fails_is_rolled_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The COMMIT a cancellation waited for failed: nothing is handed on,
    the failure is logged, the cancellation ends the task."""
    (run_id,) = await _make_runs(runtime, 1)
    started, release = _commits_then_wait(runtime, monkeypatch, then_fails=True)
    assert await _cancelled_in_its_commit(runtime, run_id, started, release) is None
    assert "a cancelled transaction's COMMIT failed (disk I/O error)" in caplog.text
    assert await _log(runtime, run_id) == []


async def test_a_cancelled_transaction_waits_for_a_hung_commit_only_so_long(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A COMMIT that never ends (a synchronous standby down) is abandoned
    COMMIT_OUTCOME_WAIT_SECONDS after the cancellation: the task ends."""
    (run_id,) = await _make_runs(runtime, 1)
    monkeypatch.setattr(db, "COMMIT_OUTCOME_WAIT_SECONDS", 0.2)
    started, release = _commits_then_wait(runtime, monkeypatch, then_fails=True)

    async def cancelling() -> None:
        async with runtime.transaction() as session:
            await runtime.run_log.append(session, run_id, [Event("thread.run.cancelling", {"id": run_id})])

    task = asyncio.create_task(cancelling())
    try:
        async with asyncio.timeout(10):
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        release.set()
    assert "a cancelled transaction's COMMIT did not end within 0.2 s; abandoned" in caplog.text
