"""A run this process's API created for its own worker is handed to it with
its row (issue 17): no wake, tick or claim statement; the claim is a
compare-and-set sent with the run's commit. Whatever is off (the run taken
or cancelled first, the commit failing, the hand-off cancelled, the worker
stopping) leaves the run to today's claim, never lost, never run twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, orm, run_log, sqlite_driver
from app.runner import execute, prompt
from app.runtime import Runtime
from app.services import run_events, run_execution, run_state, runs, threads
from app.services.projects import Project
from app.settings import Settings
from app.wire.runs import RunCreate, SubmitToolOutputs, ThreadAndRunCreate
from app.wire.threads import ThreadCreate
from app.worker import Worker
from tests.runner.helpers import DEADLINE, statements_sent, until
from tests.runner.test_instant_answer import _ANSWERED as _ANSWERING
from tests.runner.test_instant_answer import _event_names
from tests.runner.test_raw_autocommit import raw_checkouts
from tests.runner.test_worker import _make_runs, user_message

pytestmark = pytest.mark.timeout(30)

# SQLite's hand-off (a transaction) and PostgreSQL's (one statement) differ:
# each database's tests run there alone (not as the other's skipped twins).
_ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
_ON_POSTGRES = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


# A new thread's run answered at once, its events in order (each series of deltas as one name).
_ANSWERED = [
    "thread.created",
    "thread.run.created",
    "thread.run.queued",
    *_ANSWERING,
    "thread.run.step.completed",
    "thread.run.completed",
]


@pytest.fixture
async def bare_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A runtime without a worker (the tests make their own)."""
    rt = await Runtime.start(settings)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
def sqlite_runtime(bare_runtime: Runtime) -> Runtime:
    """bare_runtime, for the tests marked _ON_SQLITE."""
    return bare_runtime


async def _assistant(runtime: Runtime) -> str:
    """An assistant of the offline model (made with a run that has ended: no work for a claim)."""
    (ended,) = await _make_runs(runtime, 1, status="completed")
    return (await _row(runtime, ended)).assistant_id


async def _create(
    runtime: Runtime, worker: Worker, texts: tuple[str, ...] = ("hi",), assistant_id: str | None = None, **fields: Any
) -> orm.Run:
    """A new thread (its user messages ``texts``) and run (of
    ``assistant_id``, else a new one, with the body's other ``fields``)
    reserved for ``worker``, committed as the API commits it (api/runs.py's
    _queue_run), not handed yet."""
    project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
    messages = [{"role": "user", "content": text} for text in texts]
    body = ThreadAndRunCreate.model_validate(
        {"assistant_id": assistant_id or await _assistant(runtime), "thread": {"messages": messages}, **fields}
    )
    async with runtime.transaction() as session:
        _thread, run, events = await runs.create_thread_and_run(
            session, project, body, expires_in=600, reservation=worker.reservation(), remembered=False
        )
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    return run


async def _waiting_for_any_worker(runtime: Runtime) -> tuple[Worker, orm.Run]:
    """A queued run whose reservation (for the other worker returned) has
    lapsed: claimable by any worker's tick."""
    other = Worker(runtime)
    waiting = await _create(runtime, other)
    await _lapse(runtime, waiting.id)
    return other, waiting


async def _lapse(runtime: Runtime, run_id: str) -> None:
    """``run_id``'s reservation (or lease) lapsed: any worker may claim it."""
    async with runtime.transaction() as session:
        lapsed = orm.Run.__table__.update().where(orm.Run.id == run_id).values(lease_expires_at=time.time() - 1)
        await session.execute(lapsed)


async def _assert_answered(runtime: Runtime, run_id: str) -> None:
    """``run_id`` completed with the instant answer's events, each once, in order."""
    assert (await _row(runtime, run_id)).status == "completed"
    assert await _event_names(runtime, run_id) == _ANSWERED


def _looping(worker: Worker) -> Worker:
    """``worker`` as while its run_forever() goes round (it hands runs only
    then), without the loop: each test drives its ticks."""
    worker._looping = True
    return worker


async def _row(runtime: Runtime, run_id: str) -> orm.Run:
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
    assert run is not None
    return run


def _count_hand_offs(monkeypatch: pytest.MonkeyPatch) -> list[execute.RunExecution]:
    return _counted(monkeypatch, "hand_off")


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """What each call of execute's coroutine function ``name`` returned, from now on."""
    returned: list[Any] = []
    original = getattr(execute, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        returned.append(result)
        return result

    monkeypatch.setattr(execute, name, counted)
    return returned


@_ON_SQLITE
async def test_a_created_run_answered_at_once_is_ended_by_its_hand_off_without_a_claim(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    handed = _count_hand_offs(monkeypatch)
    claims: list[int] = []
    monkeypatch.setattr(execute, "claim_and_start", lambda *a, **k: claims.append(1))  # never called
    run = await _create(runtime, worker)
    assert worker.hand(run)
    await worker._handed()
    assert [execution.finished for execution in handed] == [True] and not claims
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None
    assert await _event_names(runtime, run.id) == _ANSWERED
    await worker.stop()


async def test_a_hand_off_loses_to_another_workers_claim_and_leaves_the_run_to_it(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = bare_runtime
    worker, other = _looping(Worker(runtime)), Worker(runtime)
    run = await _create(runtime, worker)
    # The reservation lapsed and another worker claimed it before the hand-off ran.
    await _lapse(runtime, run.id)
    assert await other.claim(1) == [run.id]
    woken: list[bool] = []
    monkeypatch.setattr(worker, "wake", lambda **_: woken.append(True))
    assert worker.hand(run)
    await worker._handed()
    row = await _row(runtime, run.id)
    assert row.status == "queued" and row.lease_owner == other.owner  # nothing of the hand-off stayed
    assert await _event_names(runtime, run.id) == _ANSWERED[:3]
    assert woken == [True]  # the claim's way, as for any run (it finds nothing of its own)
    assert not [record for record in caplog.records if "handing run" in record.getMessage()]  # quietly: a lost CAS
    await worker.stop()
    await other.stop()


@pytest.mark.parametrize(
    ("database_url", "on_thread"),
    [("sqlite", False), ("postgres", False), ("sqlite", True)],
    ids=["sqlite-new thread", "postgres-new thread", "sqlite-existing thread"],
    indirect=["database_url"],
)  # (a run on an existing thread is handed on SQLite alone)
async def test_a_hand_off_loses_to_a_cancel_and_the_run_stays_cancelled(
    bare_runtime: Runtime, caplog: pytest.LogCaptureFixture, on_thread: bool
) -> None:
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = (
        await _create_on(runtime, worker, await _thread(runtime, ["hi"]))
        if on_thread
        else await _create(runtime, worker)
    )
    async with runtime.transaction() as session:
        project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
        _answer, events = await runs.cancel(session, project, run.thread_id, run.id)
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    assert worker.hand(run)
    await worker._handed()
    assert (await _row(runtime, run.id)).status == "cancelled"
    names = await _event_names(runtime, run.id)
    assert "thread.run.in_progress" not in names and names[-1] == "thread.run.cancelled"
    assert not [record for record in caplog.records if "handing run" in record.getMessage()]  # quietly: a lost CAS
    await worker.stop()


async def test_a_hand_off_whose_metadata_changed_since_the_create_is_claimed_instead(
    bare_runtime: Runtime,
) -> None:
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    async with runtime.transaction() as session:
        await session.execute(
            orm.Run.__table__.update().where(orm.Run.id == run.id).values(metadata={"changed": "yes"})
        )
    assert worker.hand(run)
    await worker._handed()
    assert (await _row(runtime, run.id)).status == "queued"  # the hand-off's row was stale: nothing written
    assert worker._wakeup.is_set()  # woken: its claim takes the run
    assert run.id not in execute._NOT_AT_ONCE  # its loss refused nothing of the answer: the claim answers at once
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.metadata_ == {"changed": "yes"}
    assert await _event_names(runtime, run.id) == _ANSWERED
    await worker.stop()


@_ON_SQLITE
async def test_a_failed_commit_of_the_hand_off_leaves_the_run_to_the_woken_worker(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection lost at the guarded COMMIT: nothing of it stays, and
    the worker, woken, claims the run (its loop would otherwise wait a whole
    poll interval)."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    failed: list[bool] = []
    real = sqlite_driver.OneHopConnection.commit_straight

    async def lost_once(self: sqlite_driver.OneHopConnection, **options: bool) -> None:
        if not failed:
            failed.append(True)
            await self._connection.close()  # the connection lost under the COMMIT: "no active connection"
        await real(self, **options)

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_straight", lost_once)
    assert worker.hand(run)
    await worker._handed()
    assert (await _row(runtime, run.id)).status == "queued"
    assert worker._wakeup.is_set()  # its loop goes round at once, not after a poll interval
    await worker.tick()
    assert (await _row(runtime, run.id)).status == "completed"
    await worker.stop()
    assert failed == [True]
    assert [record for record in caplog.records if "handing run" in record.getMessage()]  # said, unlike a lost CAS
    assert await _event_names(runtime, run.id) == _ANSWERED


@_ON_SQLITE
async def test_a_cancelled_hand_off_leaves_the_run_reserved_and_the_worker_claims_it(sqlite_runtime: Runtime) -> None:
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    assert worker.hand(run)
    (task,) = worker._handing.values()
    task.cancel()
    await asyncio.wait({task})
    assert (await _row(runtime, run.id)).lease_owner == run_execution.reserved_for(worker.owner)
    assert worker._wakeup.is_set()
    await worker.tick()  # its own reserved run, claimed at once
    assert (await _row(runtime, run.id)).status == "completed"
    await worker.stop()
    assert await _event_names(runtime, run.id) == _ANSWERED


@_ON_SQLITE
async def test_a_hand_off_cancelled_while_its_commit_is_out_is_committed_once(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its one hop (the compare-and-set, the answer, the
    COMMIT) is on the connection's thread: the commit is seen through, the
    run ended once, and the tick the cancellation wakes finds nothing."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    sending = asyncio.Event()
    real = sqlite_driver.OneHopConnection.commit_straight

    async def noted(self: sqlite_driver.OneHopConnection, **options: bool) -> None:
        sending.set()
        await real(self, **options)

    monkeypatch.setattr(sqlite_driver.OneHopConnection, "commit_straight", noted)
    assert worker.hand(run)
    (task,) = worker._handing.values()
    await sending.wait()
    task.cancel()
    await asyncio.wait({task})
    monkeypatch.undo()
    assert (await _row(runtime, run.id)).status == "completed"
    await worker.tick()
    await worker.stop()
    assert await _event_names(runtime, run.id) == _ANSWERED
    async with runtime.transaction() as session:
        seqs = list((await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run.id))).all())
    assert sorted(seqs) == list(range(1, len(seqs) + 1))


async def test_a_worker_stopping_with_a_hand_off_in_flight_drains_its_run(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handed run whose answer is not instant becomes one of the worker's
    executions: a stop that comes meanwhile waits for the hand-off, then
    stops and releases it as any other (resumed by the next worker)."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    started = asyncio.Event()

    async def endless(self: execute.RunExecution, *_args: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(execute.RunExecution, "_loop", endless)
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    assert worker.hand(run)
    stopping = asyncio.create_task(worker.stop())
    await stopping
    row = await _row(runtime, run.id)
    assert row.status == "in_progress" and row.lease_owner is None  # released: the next worker resumes it
    assert not worker._tasks and not worker._handing
    other = Worker(runtime)
    monkeypatch.undo()
    await other.run_until_idle()
    assert (await _row(runtime, run.id)).status == "completed"
    await other.stop()


async def _never_at_once(_request: Any) -> None:
    return None


async def test_a_worker_dead_after_its_hand_off_started_the_run_leaves_it_to_be_resumed(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-off's start committed (on PostgreSQL its one statement),
    then the process died before the run's task began: the run stays in
    progress under the dead worker's lease, which no claim takes; once it
    lapses another worker resumes the run and completes it, its start's
    event once, its events numbered once."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    run = await _create(runtime, worker)
    monkeypatch.setattr(worker, "_start", lambda _execution, _claimed_at: None)  # died: no task
    assert worker.hand(run)
    await worker._handed()
    row = await _row(runtime, run.id)
    assert row.status == "in_progress" and row.lease_owner == worker.owner
    assert row.lease_expires_at is not None and row.lease_expires_at > time.time()
    other = Worker(runtime)
    assert await other.claim(1) == []  # the dead worker's lease still held
    await _lapse(runtime, run.id)
    monkeypatch.undo()
    await other.run_until_idle()
    assert (await _row(runtime, run.id)).status == "completed"
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names.count("thread.run.in_progress") == 1 and names[-1] == "thread.run.completed"
    await _assert_numbered_once(runtime, run.id)
    await other.stop()


@_ON_SQLITE
async def test_runs_not_alone_or_not_known_are_claimed_as_before(sqlite_runtime: Runtime) -> None:
    """Runs created together (another reserved since the last claim), one
    while a hand-off is in flight, one reserved for another worker, one for
    a worker not going round or stopping go the claim's way (the caller
    wakes the worker)."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    first, second = await _create(runtime, worker), await _create(runtime, worker)
    assert not worker.hand(first) and not worker.hand(second)  # one claim and one commit for both
    await worker.tick()
    assert (await _row(runtime, first.id)).status == (await _row(runtime, second.id)).status == "completed"
    alone = await _create(runtime, worker)
    assert worker.hand(alone)
    assert not worker.hand(alone)  # one hand-off at a time
    await worker._handed()
    assert (await _row(runtime, alone.id)).status == "completed"
    unreserved = await _create(runtime, Worker(runtime))
    assert not worker.hand(unreserved)
    idle = Worker(runtime)  # not going round: claims when driven, as before
    assert not idle.hand(await _create(runtime, idle))
    last = await _create(runtime, worker)
    worker.request_stop()
    assert not worker.hand(last)
    await worker.stop()


async def test_a_tick_during_a_hand_off_leaves_its_slot(bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker of concurrency 1 handing a run that will not end at once: a
    tick meanwhile (its poll, another wake) claims nothing more."""
    runtime = bare_runtime
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    going = asyncio.Event()

    async def endless(self: execute.RunExecution, *_args: Any) -> None:
        await going.wait()

    monkeypatch.setattr(execute.RunExecution, "_loop", endless)
    worker = _looping(Worker(runtime, concurrency=1))
    other, waiting = await _waiting_for_any_worker(runtime)
    handed = await _create(runtime, worker)
    assert worker.hand(handed)
    await worker.tick()
    await worker._handed()
    try:
        assert list(worker._tasks) == [handed.id]
        assert (await _row(runtime, waiting.id)).status == "queued"
    finally:
        going.set()
        await worker.stop()
        await other.stop()


async def test_a_hand_off_never_takes_a_run_back_to_queued_after_its_start(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker (another process, the reservation lapsed) started the
    run, which came back to queued (requires_action, then its tool outputs)
    with its lease free: queued and unleased as created, but not the row the
    hand-off holds."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    handed = _count_hand_offs(monkeypatch)
    run = await _create(runtime, worker)
    async with runtime.transaction() as session:
        back = orm.Run.__table__.update().where(orm.Run.id == run.id)
        await session.execute(back.values(status="queued", started_at=123, lease_owner=None, lease_expires_at=None))
    assert worker.hand(run)
    await worker._handed()
    try:
        assert not handed
        assert (await _row(runtime, run.id)).started_at == 123
    finally:
        await worker.stop()


@_ON_SQLITE
async def test_an_instant_hand_off_after_a_tick_at_capacity_wakes_the_worker(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick during the hand-off counted its slot and, at capacity, claimed
    nothing; the handed run then ends at once: the run left waiting is
    claimed at the next tick, woken now, not at the next poll."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime, concurrency=1))
    other, waiting = await _waiting_for_any_worker(runtime)
    handed = await _create(runtime, worker)
    # The hand-off held in flight until the tick has counted its slot
    # (unheld, it could end first: the tick then claimed the waiting run).
    tick_done = asyncio.Event()
    original = execute.hand_off

    async def after_the_tick(*args: Any, **kwargs: Any) -> execute.RunExecution:
        await tick_done.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(execute, "hand_off", after_the_tick)
    worker._wakeup.clear()
    assert worker.hand(handed)
    await worker.tick()
    # Whatever the tick left, cleared before the hand-off may go on (it
    # may end, and wake, during any await after this): its end must wake.
    worker._wakeup.clear()
    tick_done.set()
    assert (await _row(runtime, waiting.id)).status == "queued"  # at capacity: the tick claimed nothing
    await asyncio.wait_for(worker._handed(), 30)
    try:
        assert (await _row(runtime, handed.id)).status == "completed"
        assert (await _row(runtime, waiting.id)).status == "queued"
        assert worker._wakeup.is_set()
    finally:
        await worker.stop()
        await other.stop()


async def test_a_hand_off_ended_after_a_claim_leaves_a_newer_reservation_counted(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim during the hand-off counted the reservations anew; a run
    reserved after it is still counted when the hand-off ends."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    # The hand-off held until the tick's claim has counted (unheld, on
    # PostgreSQL it may end first: then no claim came during it).
    tick_done = asyncio.Event()
    original = execute.hand_off

    async def after_the_tick(*args: Any, **kwargs: Any) -> execute.RunExecution:
        await tick_done.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(execute, "hand_off", after_the_tick)
    assert worker.hand(run)
    await worker.tick()
    assert worker.reservation() is not None
    tick_done.set()
    await asyncio.wait_for(worker._handed(), DEADLINE)
    try:
        assert worker._reserved == 1
    finally:
        await worker.stop()


async def test_a_hand_off_never_restarts_a_run_another_worker_started(
    bare_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """Its reservation lapsed, another worker claimed and started the run,
    then released its lease (stopping): in progress, lease free. The
    hand-off, from the create's row (queued), loses its compare-and-set
    (quietly: not a later write of its transaction failing)."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    async with runtime.transaction() as session:
        started = orm.Run.__table__.update().where(orm.Run.id == run.id)
        await session.execute(started.values(status="in_progress", lease_owner=None, lease_expires_at=None))
    assert worker.hand(run)
    await worker._handed()
    try:
        assert "thread.run.in_progress" not in await _event_names(runtime, run.id)
        assert not worker._tasks
        assert "handing run" not in caplog.text
    finally:
        await worker.stop()


@pytest.mark.parametrize("on_thread", [False, True], ids=["new thread", "existing thread"])
async def test_a_streamed_run_through_the_api_is_handed(
    app: FastAPI, http: Any, monkeypatch: pytest.MonkeyPatch, settings: Settings, on_thread: bool
) -> None:
    """POST /threads/runs, or the SDK's usual flow: a thread, its message,
    then POST /threads/{id}/runs."""
    postgres = settings.resolved_database_url().startswith("postgresql")
    handed = _count_hand_offs(monkeypatch)
    worker = app.state.runtime.worker
    # It hands runs only while going round, between its ticks.
    assistant = (await http.post("/v1/assistants", json={"model": "m"})).json()["id"]
    message = {"role": "user", "content": "hi"}
    for _attempt in range(3):  # (a run created while the worker's poll tick is under way is claimed by it)
        path, body = "/v1/threads/runs", {"assistant_id": assistant, "stream": True, "thread": {"messages": [message]}}
        if on_thread:
            thread = (await http.post("/v1/threads", json={})).json()["id"]
            await http.post(f"/v1/threads/{thread}/messages", json=message)
            path, body = f"/v1/threads/{thread}/runs", {"assistant_id": assistant, "stream": True}
        await until(lambda: worker._looping and not worker._ticking, "the worker's loop waiting")
        async with http.stream("POST", path, json=body) as response:
            text = "".join([chunk async for chunk in response.aiter_text()])
        names = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
        assert names[-2:] == ["thread.run.completed", "done"]
        assert [name for name in names if name != "thread.message.delta"] == [
            name for name in _ANSWERED[1 if on_thread else 0 :] if name != "thread.message.delta"
        ] + ["done"]
        if handed or (postgres and on_thread):
            break
    assert len(handed) == (0 if postgres and on_thread else 1)  # (on SQLite alone on an existing thread)
    if handed:
        assert handed[0].finished
        await _assert_numbered_once(app.state.runtime, handed[0].run_id)


async def _assert_numbered_once(runtime: Runtime, run_id: str) -> None:
    async with runtime.transaction() as session:
        seqs = list((await session.scalars(select(orm.RunEvent.seq).where(orm.RunEvent.run_id == run_id))).all())
    assert sorted(seqs) == list(range(1, len(seqs) + 1))


async def _lock_waits(runtime: Runtime) -> bool:
    """Whether a backend of this database waits for a lock (the handed run's
    one statement, for the row another transaction holds)."""
    async with runtime.engine.connect() as watcher:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return bool((await watcher.execute(text(query))).scalar())


async def _row_held(
    runtime: Runtime, run_id: str, locked: asyncio.Event, release: asyncio.Event, then: Any = None
) -> None:
    """Hold ``run_id``'s row locked in a transaction (``locked`` set once
    its FOR UPDATE has returned) until ``release``, then run ``then`` (a
    statement) in that same transaction and commit."""
    async with runtime.transaction() as session:
        await session.execute(select(orm.Run.id).where(orm.Run.id == run_id).with_for_update())
        locked.set()
        await release.wait()
        if then is not None:
            await session.execute(then)


async def _holding(runtime: Runtime, run_id: str, release: asyncio.Event, then: Any = None) -> asyncio.Task[None]:
    """_row_held's task, once it holds the row (it fails the test if the
    holder fails first or not by the deadline)."""
    locked = asyncio.Event()
    holder = asyncio.create_task(_row_held(runtime, run_id, locked, release, then))
    waiting = asyncio.create_task(locked.wait())
    await asyncio.wait({holder, waiting}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if holder.done():
        await holder  # raises what it failed with
    assert locked.is_set(), "timed out waiting for the row held"
    return holder


def _units_of_work(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each of ``runtime``'s units of work, once it has ended: whether
    its one statement ran autocommitted (run_log.autocommitted)."""
    ended: list[bool] = []
    unit_of_work = runtime.unit_of_work

    @contextlib.asynccontextmanager
    async def recorded() -> AsyncIterator[AsyncSession]:
        async with unit_of_work() as session:
            yield session
        ended.append(run_log.autocommitted(session))

    monkeypatch.setattr(runtime, "unit_of_work", recorded)
    return ended


@_ON_POSTGRES
async def test_postgresql_ends_a_handed_instant_run_in_one_statement(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No claim, no transaction: the hand-off's compare-and-set, the start,
    the answer, the end and its events in one autocommitted statement (its
    unit of work's first and only: a read before it would begin a
    transaction, BEGIN and COMMIT round trips of their own)."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    handed = _count_hand_offs(monkeypatch)
    claims: list[int] = []
    monkeypatch.setattr(execute, "claim_and_start", lambda *a, **k: claims.append(1))  # never called
    begun: list[bool] = []
    monkeypatch.setattr(runtime, "claiming", lambda: begun.append(True))  # never called: no transaction
    units = _units_of_work(runtime, monkeypatch)
    run = await _create(runtime, worker)
    assert worker.hand(run)
    raw = raw_checkouts(monkeypatch)
    with statements_sent(runtime, lambda statement, _parameters: statement) as sent:
        await worker._handed()
    assert [execution.finished for execution in handed] == [True] and not claims and not begun
    assert units == [True] and len(sent) == 1  # one unit of work, its one statement autocommitted
    assert len(raw) == 1 and raw[0] is not None  # on a connection checked out raw (db.autocommit_connection)
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None and row.started_at is not None
    assert await _event_names(runtime, run.id) == _ANSWERED
    await _assert_numbered_once(runtime, run.id)
    assert worker._reserved == 0 and not worker._tasks
    await worker.stop()


# Values that differ between two runs alike (ids, times) in their stored events.
_OWN_PREFIXES = ("asst_", "call_", "msg_", "run_", "step_", "thread_")


def _alike(value: Any) -> Any:
    """``value`` (an event's payload) with its ids and times masked."""
    if isinstance(value, dict):
        return {
            key: "*" if item is not None and (key == "id" or key.endswith(("_id", "_at"))) else _alike(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_alike(item) for item in value]
    if isinstance(value, str) and value.startswith(_OWN_PREFIXES):
        return "*"
    return value


async def _stored_events(runtime: Runtime, run_id: str) -> list[tuple[str, Any]]:
    async with runtime.transaction() as session:
        query = select(orm.RunEvent.event, orm.RunEvent.data).where(orm.RunEvent.run_id == run_id)
        rows = (await session.execute(query.order_by(orm.RunEvent.seq))).all()
    return [(name, _alike(data)) for name, data in rows]


_CALLING_F = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
}


# A handed run's two ways to end with the offline model: an answer, and a
# function call (requires_action); the text sent, the run's fields, its end.
HANDED_ENDS = pytest.mark.parametrize(
    ("text", "fields", "ends"),
    [("hi", {}, "completed"), ("[[call f {}]]", _CALLING_F, "requires_action")],
    ids=["answered", "requires action"],
)


@HANDED_ENDS
async def test_a_handed_run_stores_what_a_claimed_run_stores(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, text: str, fields: dict[str, Any], ends: str
) -> None:
    """A run handed and its twin claimed by a tick: the same events, with
    the same payloads (ids and times aside), the same row as they end
    (an offline answer calling a function ends requires_action, its lease
    cleared, as a claimed one), and the same steps, answer message and
    model request (on SQLite both go through start_claimed, so those rows
    can differ only on PostgreSQL, whose hand-off writes its own)."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    handed = _count_hand_offs(monkeypatch)
    assistant_id = await _assistant(runtime)
    run = await _create(runtime, worker, (text,), assistant_id, **fields)
    assert worker.hand(run)
    await worker._handed()
    assert [execution.run_id for execution in handed] == [run.id]
    twin = await _create(runtime, worker, (text,), assistant_id, **fields)
    await worker.tick()
    assert [execution.run_id for execution in handed] == [run.id]  # the twin claimed
    stored = await _stored_events(runtime, run.id)
    assert stored[-1][0] == f"thread.run.{ends}"
    assert stored == await _stored_events(runtime, twin.id)
    row, twin_row = await _row(runtime, run.id), await _row(runtime, twin.id)
    assert row.status == ends and row.lease_owner is None and row.lease_expires_at is None
    kept = set(run_state.RUN_COLUMNS) - {"id", "thread_id", "seq", "created_at", "started_at", "completed_at"}
    kept -= {"expires_at"}
    assert {key: _alike(getattr(row, key)) for key in kept} == {key: _alike(getattr(twin_row, key)) for key in kept}
    # Its steps, its answer message (none for a call) and its model request stored alike too.
    for model in (orm.RunStep, orm.Message, orm.ModelRequest):
        stored_rows = await _stored_rows(runtime, model, run.id)
        assert stored_rows or (model is orm.Message and ends == "requires_action"), model.__name__
        assert stored_rows == await _stored_rows(runtime, model, twin.id), model.__name__
    await worker.stop()


async def _stored_rows(runtime: Runtime, model: type[orm.Base], run_id: str) -> list[dict[str, Any]]:
    """``run_id``'s rows of ``model``, every column (ids, times, order and
    durations masked), in their order."""
    columns = [attribute.key for attribute in inspect(model).column_attrs]
    differing = {"seq", "duration_ms"}
    async with runtime.transaction() as session:
        query = select(model).where(model.run_id == run_id).order_by(model.id)  # type: ignore[attr-defined]
        found = (await session.scalars(query)).all()
    return [{key: _masked(key, getattr(row, key), differing) for key in columns} for row in found]


def _masked(key: str, value: Any, differing: set[str]) -> Any:
    """``value`` as two alike rows store it: "*" for a column that differs
    between them by design, else _alike's masking of ids and times."""
    return "*" if key in differing else _alike({key: value})[key]


@_ON_POSTGRES
async def test_postgresql_a_hand_off_colliding_with_an_append_is_claimed_instead(
    bare_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """An append committed while the statement waited for the run's row:
    its snapshot numbered the events over it, the insert collides, the
    statement writes nothing, and the claim ends the run after that event."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    release = asyncio.Event()
    other = orm.RunEvent.__table__.insert().values(
        run_id=run.id, seq=len(_ANSWERED[:3]) + 1, event="thread.run.other", data={}, created_at=time.time()
    )
    holder = await _holding(runtime, run.id, release, other)
    assert worker.hand(run)
    await until(lambda: _lock_waits(runtime), "the hand-off's statement waiting for the row")
    release.set()
    await holder
    await worker._handed()
    assert (await _row(runtime, run.id)).status == "queued"  # nothing of the statement stayed
    assert run.id not in execute._NOT_AT_ONCE and "handing run" not in caplog.text  # quietly, answered at once again
    assert worker._wakeup.is_set()
    await worker.tick()
    assert (await _row(runtime, run.id)).status == "completed"
    names = await _event_names(runtime, run.id)
    assert names[:4] == [*_ANSWERED[:3], "thread.run.other"] and names[4:] == _ANSWERED[3:]
    await _assert_numbered_once(runtime, run.id)
    await worker.stop()


async def _hand_cancelled_while_waiting(runtime: Runtime, worker: Worker, run: orm.Run, then: Any = None) -> None:
    """Hand ``run`` while another transaction holds its row (and runs
    ``then`` before letting go: _row_held), cancel the hand-off once its
    statement waits for the row, let the row go, and see the hand-off end
    cancelled."""
    release = asyncio.Event()
    holder = await _holding(runtime, run.id, release, then)
    assert worker.hand(run)
    (task,) = worker._handing.values()
    await until(lambda: _lock_waits(runtime), "the hand-off's statement waiting for the row")
    task.cancel()
    await asyncio.sleep(0)  # the cancellation delivered while the statement is out
    release.set()
    await holder
    await asyncio.wait({task})
    assert task.cancelled()


@_ON_POSTGRES
async def test_postgresql_a_hand_off_cancelled_with_its_statement_out_is_seen_through(
    bare_runtime: Runtime,
) -> None:
    """Cancelled while its one statement waits for the row: the statement
    ends (committed), what it wrote reaches the run's streams, and the tick
    the cancellation wakes finds nothing to do."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    delivered: list[str] = []
    with runtime.bus.watch(run.id, lambda event: delivered.append(event.name)):
        await _hand_cancelled_while_waiting(runtime, worker, run)
    assert delivered[-1] == "thread.run.completed"  # its events published, as a commit publishes them
    assert (await _row(runtime, run.id)).status == "completed"
    assert worker._wakeup.is_set()
    await worker.tick()
    assert await _event_names(runtime, run.id) == _ANSWERED
    await _assert_numbered_once(runtime, run.id)
    await worker.stop()


@_ON_POSTGRES
async def test_postgresql_a_hand_off_cancelled_with_a_missing_statement_out_leaves_the_run_to_the_claim(
    bare_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled while its one statement waits for the row, which the
    holder changes (its metadata) before letting go: the statement misses,
    nothing of it is written, and the tick the cancellation wakes claims
    and answers the run as any other."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    changed = orm.Run.__table__.update().where(orm.Run.id == run.id).values(metadata={"changed": "yes"})
    await _hand_cancelled_while_waiting(runtime, worker, run, changed)
    row = await _row(runtime, run.id)
    assert row.status == "queued" and row.started_at is None  # nothing of the statement stayed
    assert await _event_names(runtime, run.id) == _ANSWERED[:3]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]  # quietly: a lost CAS
    assert worker._wakeup.is_set()
    await worker.tick()
    await _assert_answered(runtime, run.id)
    assert (await _row(runtime, run.id)).metadata_ == {"changed": "yes"}
    await _assert_numbered_once(runtime, run.id)
    await worker.stop()


@_ON_POSTGRES
async def test_postgresql_a_worker_stopping_with_a_hand_off_in_flight_waits_for_its_statement(
    bare_runtime: Runtime,
) -> None:
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    release = asyncio.Event()
    holder = await _holding(runtime, run.id, release)
    assert worker.hand(run)
    await until(lambda: _lock_waits(runtime), "the hand-off's statement waiting for the row")
    stopping = asyncio.create_task(worker.stop())
    # The statement still waits for the row (a round trip for stop() to go
    # as far as it may): the stop waits for it.
    assert await _lock_waits(runtime)
    assert worker._handing and not stopping.done()  # the hand-off's one statement first
    release.set()
    await holder
    await stopping
    assert (await _row(runtime, run.id)).status == "completed"
    assert not worker._tasks and not worker._handing


@_ON_POSTGRES
async def test_postgresql_a_hand_off_dying_before_its_statement_leaves_the_run_reserved_until_it_lapses(
    bare_runtime: Runtime,
) -> None:
    """The process dies (its hand-off never sent): the run stays queued and
    reserved for that worker; another claims it once the reservation lapses."""
    runtime = bare_runtime
    gone, other = _looping(Worker(runtime)), Worker(runtime)
    run = await _create(runtime, gone)
    assert gone.hand(run)
    (task,) = gone._handing.values()
    task.cancel()  # before its first turn: nothing sent
    await asyncio.wait({task})
    row = await _row(runtime, run.id)
    assert row.status == "queued" and row.lease_owner == run_execution.reserved_for(gone.owner)
    assert await other.claim(1) == []  # another worker's claim leaves a reserved run alone
    await _lapse(runtime, run.id)
    await other.run_until_idle()
    await _assert_answered(runtime, run.id)
    await other.stop()


def _lose_the_first_carried_statement(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The first statement carried by run events' insert (PostgreSQL's
    hand-off) fails as a dropped connection does; the list returned says
    whether it has."""
    real = run_events.insert_carrying
    lost: list[bool] = []

    async def lost_once(session: Any, *args: Any, **kwargs: Any) -> int:
        if not lost:
            lost.append(True)
            raise OperationalError("the hand-off's statement", {}, ConnectionResetError("connection lost"))
        return await real(session, *args, **kwargs)

    monkeypatch.setattr(run_events, "insert_carrying", lost_once)
    return lost


@_ON_POSTGRES
async def test_postgresql_a_hand_off_whose_connection_is_lost_leaves_the_run_to_the_claim(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    run = await _create(runtime, worker)
    lost = _lose_the_first_carried_statement(monkeypatch)
    assert worker.hand(run)
    await worker._handed()
    assert lost == [True]  # the hand-off's statement was the one lost
    assert (await _row(runtime, run.id)).status == "queued"
    assert worker._wakeup.is_set()
    assert "handing run" in caplog.text  # said, unlike a lost compare-and-set
    await worker.tick()
    await _assert_answered(runtime, run.id)
    await worker.stop()


# PostgreSQL: a run whose answer is not instant (a provider's; here the
# offline model made to stream, the same path: RunExecution.start_handed)
# is started by its hand-off's one statement, then executed as a claimed run.


@_ON_POSTGRES
async def test_postgresql_starts_a_handed_streamed_run_in_one_statement(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No claim, no transaction, no wake: the hand-off's compare-and-set,
    the start, the worker's lease and the start's events in one
    autocommitted statement; the run's task then answers it as a claimed
    run's does."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    handed = _count_hand_offs(monkeypatch)
    claims: list[int] = []
    monkeypatch.setattr(execute, "claim_and_start", lambda *a, **k: claims.append(1))  # never called
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    units = _units_of_work(runtime, monkeypatch)
    run = await _create(runtime, worker)
    assert worker.hand(run)
    raw = raw_checkouts(monkeypatch)
    with statements_sent(runtime, lambda statement, _parameters: statement) as sent:
        await worker._handed()
    by_the_hand_off = list(raw)  # (not the run's task's, answering it after)
    assert [execution.finished for execution in handed] == [False] and not claims
    assert units == [True] and len(sent) == 1  # one unit of work, its one statement autocommitted
    assert len(by_the_hand_off) == 1 and by_the_hand_off[0] is not None  # checked out raw (db.autocommit_connection)
    assert not worker._wakeup.is_set() and list(worker._tasks) == [run.id]
    row = await _row(runtime, run.id)
    assert row.status in ("in_progress", "completed") and row.started_at is not None
    await asyncio.wait_for(asyncio.gather(*worker._tasks.values()), DEADLINE)
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:4] == ["thread.created", "thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert names[-1] == "thread.run.completed" and names.count("thread.run.in_progress") == 1
    await _assert_numbered_once(runtime, run.id)
    assert "handing run" not in caplog.text and not claims
    await worker.stop()


@_ON_POSTGRES
async def test_postgresql_a_streamed_run_cancelled_before_its_hand_off_stays_cancelled(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its start's compare-and-set misses: nothing written (no start, no
    lease, no event), quietly, and the run stays cancelled."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    run = await _create(runtime, worker)
    async with runtime.transaction() as session:
        project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
        _answer, events = await runs.cancel(session, project, run.thread_id, run.id)
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    before = await _event_names(runtime, run.id)
    assert worker.hand(run)
    await worker._handed()
    row = await _row(runtime, run.id)
    assert row.status == "cancelled" and row.started_at is None and row.lease_owner is None
    assert await _event_names(runtime, run.id) == before  # nothing of the hand-off's statement
    assert not worker._tasks and worker._wakeup.is_set()
    assert "handing run" not in caplog.text  # quietly: a lost compare-and-set
    await worker.run_until_idle()
    assert (await _row(runtime, run.id)).status == "cancelled"
    await _assert_numbered_once(runtime, run.id)
    await worker.stop()


@_ON_POSTGRES
async def test_postgresql_a_streamed_runs_hand_off_whose_connection_is_lost_leaves_it_to_the_claim(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The start's one statement fails (a dropped connection): the run
    stays queued, reserved for the worker, whose woken tick claims it and
    completes it."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    run = await _create(runtime, worker)
    lost = _lose_the_first_carried_statement(monkeypatch)
    assert worker.hand(run)
    await worker._handed()
    assert lost == [True]  # the hand-off's statement was the one lost
    row = await _row(runtime, run.id)
    assert row.status == "queued" and row.lease_owner == run_execution.reserved_for(worker.owner)
    assert worker._wakeup.is_set() and not worker._tasks
    assert "handing run" in caplog.text  # said, unlike a lost compare-and-set
    await worker.run_until_idle()
    assert (await _row(runtime, run.id)).status == "completed"
    await _assert_numbered_once(runtime, run.id)
    await worker.stop()


async def _change_since_the_create(runtime: Runtime, run: orm.Run, change: str, other: Worker) -> None:
    """Make ``run``'s row or thread, committed by _create, no longer as the
    create left them, by ``change``: its metadata changed; started by
    another worker (which released its lease); started and queued again
    (requires_action, then its tool outputs), its lease free; one of its
    thread's messages deleted; one replaced by another writer (as many
    messages before the run, the same last one); or claimed by ``other``
    once the reservation lapsed."""
    runs_table = orm.Run.__table__
    async with runtime.transaction() as session:
        this_run = runs_table.update().where(orm.Run.id == run.id)
        first_messages = (
            select(orm.Message.id, orm.Message.seq)
            .where(orm.Message.thread_id == run.thread_id)
            .order_by(orm.Message.seq)
        )
        if change == "metadata changed":
            await session.execute(this_run.values(metadata={"changed": "yes"}))
        elif change == "started elsewhere":
            await session.execute(this_run.values(status="in_progress", lease_owner=None, lease_expires_at=None))
        elif change == "queued again":
            await session.execute(
                this_run.values(status="queued", started_at=123, lease_owner=None, lease_expires_at=None)
            )
        elif change == "message deleted":
            first = (await session.execute(first_messages.limit(1))).one()
            await session.execute(orm.Message.__table__.delete().where(orm.Message.id == first.id))
        elif change == "message replaced":
            first, second = (await session.execute(first_messages.limit(2))).all()
            await session.execute(orm.Message.__table__.delete().where(orm.Message.id == first.id))
            late = user_message(run.thread_id, [{"type": "text", "text": {"value": "late", "annotations": []}}])
            late.seq = second.seq - 1
            session.add(late)
    if change == "claimed by another":
        await _lapse(runtime, run.id)
        assert await other.claim(1) == [run.id]


@_ON_POSTGRES
@pytest.mark.parametrize(
    "change",
    [
        "metadata changed",
        "started elsewhere",
        "queued again",
        "message deleted",
        "message replaced",
        "claimed by another",
    ],
)
async def test_postgresql_a_streamed_runs_hand_off_to_a_run_not_as_created_writes_nothing(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    """The start alone (run_state.carried_handed_start) is under the whole
    hand-off condition (HandedFrom), not its status alone: whatever of the
    row or thread is not as the create left it, the statement misses,
    nothing of it is written (no start, no lease, no event), quietly, and
    the worker starts no task."""
    runtime = bare_runtime
    worker, other = _looping(Worker(runtime)), Worker(runtime)
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    handed = _count_hand_offs(monkeypatch)
    run = await _create(runtime, worker, ("first", "second", "third"))
    await _change_since_the_create(runtime, run, change, other)
    before = await _row(runtime, run.id), await _event_names(runtime, run.id)
    assert worker.hand(run)
    await worker._handed()
    try:
        assert not handed and not worker._tasks
        row = await _row(runtime, run.id)
        assert (row.status, row.started_at, row.lease_owner, row.lease_expires_at) == (
            before[0].status,
            before[0].started_at,
            before[0].lease_owner,
            before[0].lease_expires_at,
        )
        assert await _event_names(runtime, run.id) == before[1]
        assert "handing run" not in caplog.text  # quietly: a lost compare-and-set
    finally:
        await worker.stop()
        await other.stop()


@_ON_POSTGRES
async def test_postgresql_a_handed_start_whose_context_reads_goes_in_a_transaction(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scripted rule on the thread's metadata: the start reads the thread
    first, so its statement is not the unit's first; the unit is then a
    transaction (BEGIN, the read, the start's statement, COMMIT), the run
    still handed, started and completed by its task."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    monkeypatch.setattr(runtime.llm.script, "needs_thread_metadata", lambda: True)
    handed = _count_hand_offs(monkeypatch)
    units = _units_of_work(runtime, monkeypatch)
    run = await _create(runtime, worker)
    assert worker.hand(run)
    await worker._handed()
    assert [execution.finished for execution in handed] == [False] and units == [False]  # not autocommitted
    assert list(worker._tasks) == [run.id]
    await asyncio.wait_for(asyncio.gather(*worker._tasks.values()), DEADLINE)
    assert (await _row(runtime, run.id)).status == "completed"
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:4] == ["thread.created", "thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert names[-1] == "thread.run.completed" and names.count("thread.run.in_progress") == 1
    await _assert_numbered_once(runtime, run.id)
    await worker.stop()


# A run created on an existing thread (POST /threads/{id}/runs: the SDK's
# usual flow) is handed too: its create reads the thread's last messages
# with its live run (runs.create, run_execution.note_read).


async def _thread(runtime: Runtime, texts: list[str]) -> str:
    """A thread with a user message of each of ``texts``, committed."""
    project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
    body = ThreadCreate.model_validate({"messages": [{"role": "user", "content": text} for text in texts]})
    async with runtime.transaction() as session:
        thread = await threads.create(session, project, body)
    return thread.id


async def _create_on(runtime: Runtime, worker: Worker, thread_id: str, **options: Any) -> orm.Run:
    """A run on ``thread_id`` reserved for ``worker``, committed as the API
    commits it, not handed yet."""
    project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
    body = RunCreate.model_validate({"assistant_id": await _assistant(runtime), **options})
    async with runtime.transaction() as session:
        run, events = await runs.create(
            session, project, thread_id, body, expires_in=600, reservation=worker.reservation(), remembered=False
        )
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    return run


def _histories(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[run_execution.EarlierMessage]]:
    """Each run's prompt history as its execution took it."""
    taken: dict[str, list[run_execution.EarlierMessage]] = {}
    original = run_execution.earlier_messages

    async def noted(session: Any, run: orm.Run) -> Any:
        taken[run.id] = list(await original(session, run))
        return taken[run.id]

    monkeypatch.setattr(run_execution, "earlier_messages", noted)
    return taken


async def _read_history(runtime: Runtime, run: orm.Run) -> list[run_execution.EarlierMessage]:
    """The run's earlier messages as its thread holds them now (no prefetch)."""
    async with runtime.transaction() as session:
        return list(await run_execution.earlier_messages(session, run))


@_ON_SQLITE
async def test_a_run_on_an_existing_thread_is_handed_with_the_threads_messages(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its messages, an earlier run's answer among them, and its own
    additional messages, as its prompt's history, with no claim."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    handed, histories = _count_hand_offs(monkeypatch), _histories(monkeypatch)
    thread_id = await _thread(runtime, ["first", "second"])
    earlier = await _create_on(runtime, worker, thread_id)  # answered: the thread gets its assistant message
    assert worker.hand(earlier)
    await worker._handed()
    run = await _create_on(
        runtime, worker, thread_id, additional_messages=[{"role": "user", "content": "third"}], instructions="Be brief."
    )
    assert run_execution.handable(run)
    assert worker.hand(run)
    await worker._handed()
    assert [execution.run_id for execution in handed] == [earlier.id, run.id]
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None and row.instructions == "Be brief."
    expected = await _read_history(runtime, row)
    assert [message.role for message in expected] == ["user", "user", "assistant", "user"]
    assert histories[run.id] == expected
    assert await _event_names(runtime, run.id) == _ANSWERED[1:]  # (no thread.created)
    await worker.stop()


@_ON_SQLITE
@pytest.mark.parametrize("change", ["deleted", "added"])
async def test_a_hand_off_whose_threads_messages_changed_since_the_create_is_claimed_instead(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A message deleted after the create's commit (the API allows it while
    the run is queued), or one added before the run's seq (as another
    process might, its clock behind): the hand-off's noted messages are not
    the thread's; it loses its compare-and-set quietly, and the claim reads
    the thread as it is."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    handed, histories = _count_hand_offs(monkeypatch), _histories(monkeypatch)
    thread_id = await _thread(runtime, ["first", "second"])
    run = await _create_on(runtime, worker, thread_id)
    async with runtime.transaction() as session:
        if change == "deleted":
            first = await session.scalar(
                select(orm.Message.id).where(orm.Message.thread_id == thread_id).order_by(orm.Message.seq).limit(1)
            )
            await session.execute(orm.Message.__table__.delete().where(orm.Message.id == first))
        else:
            content = [{"type": "text", "text": {"value": "late", "annotations": []}}]
            late = user_message(thread_id, content)
            late.seq = run.seq - 1
            session.add(late)
    assert worker.hand(run)
    await worker._handed()
    assert not handed
    assert not [record for record in caplog.records if "handing run" in record.getMessage()]  # quietly: a lost CAS
    assert (await _row(runtime, run.id)).status == "queued"
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "completed"
    assert histories[run.id] == await _read_history(runtime, row)
    assert len(histories[run.id]) == (1 if change == "deleted" else 3)
    await worker.stop()


async def test_a_new_threads_hand_off_after_one_of_its_messages_was_deleted_is_claimed_instead(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A new thread's message deleted between the create's commit and the
    hand-off: on either database (PostgreSQL's one statement as SQLite's
    transaction) the hand-off's noted messages are not the thread's; it
    writes nothing, and the claim answers from the thread as it is."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    handed, histories = _count_hand_offs(monkeypatch), _histories(monkeypatch)
    run = await _create(runtime, worker, ("first", "second"))
    async with runtime.transaction() as session:
        first = await session.scalar(
            select(orm.Message.id).where(orm.Message.thread_id == run.thread_id).order_by(orm.Message.seq).limit(1)
        )
        await session.execute(orm.Message.__table__.delete().where(orm.Message.id == first))
    assert worker.hand(run)
    await worker._handed()
    assert not handed
    assert not [record for record in caplog.records if "handing run" in record.getMessage()]  # quietly: a lost CAS
    row = await _row(runtime, run.id)
    assert row.status == "queued" and row.started_at is None
    assert await _event_names(runtime, run.id) == _ANSWERED[:3]  # nothing of the hand-off written
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "completed"
    assert histories[run.id] == await _read_history(runtime, row)
    assert len(histories[run.id]) == 1
    await worker.stop()


async def test_a_new_threads_hand_off_after_a_message_was_replaced_behind_the_apis_back_is_claimed_instead(
    bare_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new thread's first message deleted and another written in its
    place by a writer outside the API (which refuses a message while the
    run is live): as many messages before the run, the same last one, yet
    not those the create noted. On either database the hand-off writes
    nothing, and the claim answers from the thread as it is."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    handed, histories = _count_hand_offs(monkeypatch), _histories(monkeypatch)
    run = await _create(runtime, worker, ("first", "second", "third"))
    async with runtime.transaction() as session:
        first, second = (
            await session.execute(
                select(orm.Message.id, orm.Message.seq)
                .where(orm.Message.thread_id == run.thread_id)
                .order_by(orm.Message.seq)
                .limit(2)
            )
        ).all()
        await session.execute(orm.Message.__table__.delete().where(orm.Message.id == first.id))
        late = user_message(run.thread_id, [{"type": "text", "text": {"value": "late", "annotations": []}}])
        late.seq = second.seq - 1
        session.add(late)
    assert worker.hand(run)
    await worker._handed()
    assert not handed
    row = await _row(runtime, run.id)
    assert row.status == "queued" and row.started_at is None
    assert await _event_names(runtime, run.id) == _ANSWERED[:3]  # nothing of the hand-off written
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "completed"
    assert histories[run.id] == await _read_history(runtime, row)
    assert [message.content[0]["text"]["value"] for message in histories[run.id]] == ["late", "second", "third"]
    await worker.stop()


@_ON_SQLITE
async def test_a_run_on_a_thread_longer_than_the_prefetch_is_claimed(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its prompt reads (and truncates) the thread's messages: not handed.
    At the limit exactly, with its additional message, it still is."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    histories = _histories(monkeypatch)
    most = run_execution.PREFETCH_MOST_MESSAGES
    at_limit = await _create_on(
        runtime,
        worker,
        await _thread(runtime, [f"m{i}" for i in range(most - 1)]),
        additional_messages=[{"role": "user", "content": "last"}],
    )
    assert run_execution.handable(at_limit) and worker.hand(at_limit)
    await worker._handed()
    assert len(histories[at_limit.id]) == most
    longer = await _create_on(
        runtime,
        worker,
        await _thread(runtime, [f"m{i}" for i in range(most)]),
        additional_messages=[{"role": "user", "content": "last"}],
    )
    assert not run_execution.handable(longer) and not worker.hand(longer)
    await worker.run_until_idle()
    row = await _row(runtime, longer.id)
    assert row.status == "completed"
    assert histories[longer.id] == await _read_history(runtime, row) and len(histories[longer.id]) == most + 1
    await worker.stop()


_FUNCTION = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


@_ON_SQLITE
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"truncation_strategy": {"type": "last_messages", "last_messages": 2}},
        {"tools": [_FUNCTION]},
        {
            "instructions": "Be brief.",
            "additional_instructions": "And kind.",
            "additional_messages": [{"role": "assistant", "content": "noted"}, {"role": "user", "content": "go"}],
        },
    ],
    ids=["plain", "truncated", "tools", "overrides"],
)
async def test_a_handed_run_on_a_thread_is_prompted_and_ends_as_a_claimed_one(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    """The same run on two threads alike, one handed, one claimed by a
    tick: the same prompt, the same end."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    chats: dict[str, list[dict[str, Any]]] = {}
    original = prompt.build

    async def noted(session: Any, storage: Any, llm: Any, run: orm.Run, *args: Any, **kwargs: Any) -> Any:
        chats[run.id] = await original(session, storage, llm, run, *args, **kwargs)
        return chats[run.id]

    monkeypatch.setattr(prompt, "build", noted)
    handed = _count_hand_offs(monkeypatch)
    ends = []
    for handing in (True, False):
        run = await _create_on(runtime, worker, await _thread(runtime, ["first", "second", "third"]), **options)
        if handing:
            assert worker.hand(run)
            await worker._handed()
        else:
            await worker.run_until_idle()
        row = await _row(runtime, run.id)
        ends.append((row.status, chats[run.id], await _event_names(runtime, run.id)))
    assert len(handed) == 1 and ends[0] == ends[1]
    await worker.stop()


@_ON_SQLITE
async def test_a_run_on_a_thread_whose_last_run_required_action(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While it requires action, a run on its thread is refused as before;
    once its tool outputs ended it, the next run is handed, its history the
    thread's (the tool round's answer among it)."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    histories = _histories(monkeypatch)
    project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
    thread_id = await _thread(runtime, ["[[call lookup]]"])
    first = await _create_on(runtime, worker, thread_id, tools=[_FUNCTION])
    assert worker.hand(first)
    await worker._handed()
    waiting = await _row(runtime, first.id)
    assert waiting.status == "requires_action" and waiting.required_action is not None
    with pytest.raises(errors.APIError, match="already has an active run"):
        await _create_on(runtime, worker, thread_id)
    (call,) = waiting.required_action["submit_tool_outputs"]["tool_calls"]
    outputs = SubmitToolOutputs.model_validate({"tool_outputs": [{"tool_call_id": call["id"], "output": "42"}]})
    async with runtime.transaction() as session:
        _answer, events = await runs.submit_tool_outputs(session, project, thread_id, first.id, outputs)
        await runtime.run_log.append(session, first.id, events, run_locked=True)
    await worker.run_until_idle()
    assert (await _row(runtime, first.id)).status == "completed"
    then = await _create_on(runtime, worker, thread_id)
    assert worker.hand(then)
    await worker._handed()
    row = await _row(runtime, then.id)
    assert row.status == "completed"
    assert histories[then.id] == await _read_history(runtime, row)
    assert [message.role for message in histories[then.id]] == ["user", "assistant"]
    await worker.stop()
