"""A lone run whose answer is not instant (a provider's) is inserted
started by its create (issue 17: Worker.prepare, run_state.start_in_create;
PostgreSQL: its one statement; SQLite: its one hop, the start an UPDATE held
back behind the run's INSERT), leased to its worker, its start logged after the
create's events; the hand-off sends nothing and the run's execution goes on
as a claimed run's once the create has committed. Every way a create or its
run can go is answered as before: a failed create leaves nothing, a create
whose outcome is unknown and that committed is released by the worker's
next tick and taken by its claim, a cancel ends the run as a running run's,
a prompt that cannot be built fails it, a process killed after the commit
leaves it to be resumed once its lease lapses, a create slower than the
lease leaves the run to a claim. The claim itself is pgearly's: a run whose
execution crashed under this worker's lease is claimed again only once that
lease lapses (not at every tick)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import Response
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, held_back, orm, sqlite_driver, sqlite_groups
from app import worker as worker_module
from app.api import runs as api_runs
from app.runner import execute, prompt
from app.runtime import Runtime
from app.services import run_execution, run_state, runs
from app.services.projects import Project
from app.settings import Settings
from app.wire.events import Event
from app.wire.runs import ThreadAndRunCreate
from app.worker import Worker
from tests.runner.helpers import DEADLINE
from tests.runner.test_hand_off import (
    _assert_numbered_once,
    _assistant,
    _create,
    _lapse,
    _never_at_once,
    _row,
)
from tests.runner.test_hand_off_early import _making, _worker, committing_then_cancelled, handing_runtime
from tests.runner.test_instant_answer import _event_names

pytestmark = pytest.mark.timeout(30)

_PROJECT = Project(id=orm.DEFAULT_PROJECT_ID, name="default")

_OPENING = ["thread.created", "thread.run.created", "thread.run.queued", "thread.run.in_progress"]


@pytest.fixture
async def runtime(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    """A runtime with a worker attached as the server's, its loop not
    started (each test drives its ticks), whose model is taken for a
    provider's: answered streamed, never at once (the offline model made to
    stream: the same path as a provider's route)."""
    async with handing_runtime(settings) as rt:
        monkeypatch.setattr(rt.llm, "streams", lambda _model: True)
        monkeypatch.setattr(rt.llm, "answer_at_once", _never_at_once)
        yield rt


async def _queue(
    runtime: Runtime, assistant_id: str, *, remembering: bool = False, stream: bool = False
) -> tuple[orm.Run, Response]:
    """POST /threads/runs's create as the API makes it (api/runs.py's
    _queue_run, answered as JSON, or with ``stream`` as a stream): the run
    object and the response. Not
    ``remembering``, the assistant is read (the create's session connects);
    ``remembering``, from its remembered defaults as the API makes it
    (_queue_remembering: on SQLite a unit that never connects, one hop;
    defaults found stale make the run again from a read) the last run made."""
    thread = {"messages": [{"role": "user", "content": "hi"}]}
    body = ThreadAndRunCreate.model_validate({"assistant_id": assistant_id, "thread": thread})
    made: list[orm.Run] = []

    def change(remembered: bool) -> api_runs.QueueRun:
        return _making(runtime, body, made, remembered)

    if remembering:
        response = await api_runs._queue_remembering(runtime, _PROJECT, False, assistant_id, change)
        return made[-1], response
    response = await api_runs._queue_run(runtime, stream, change(False))
    return made[0], response


def _noting(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, then: Any = None) -> list[str]:
    """The order of what happens from the create on: "create sent" (its
    append called), "created" (committed: PostgreSQL, its append has
    returned; SQLite, its unit's hop), "sent" (any other statement of the
    runtime's engine, through SQLAlchemy's cursor or straight on asyncpg;
    on SQLite any other writer taking the write lock), "executing" (the
    worker's task for the run started, Worker._start), "claimed" (a claim's
    statement). ``then`` (an async function of the session, run id, events,
    the real append and its keywords) stands in for the create's append."""
    order: list[str] = []
    creating = [False]
    sqlite = not runtime.run_log.postgres
    if sqlite:
        # Every writer takes the process's write lock (a session's BEGIN, a
        # raw transaction's, a collected unit's hop): one "sent" a writer.
        lock = db.writers_of(runtime.engine)._lock
        real_try = lock.try_acquire

        def try_acquire() -> bool:
            if not creating[0]:
                order.append("sent")
            return real_try()

        monkeypatch.setattr(lock, "try_acquire", try_acquire)
        # Every COMMIT whose outcome matters (a collected unit's hop, a
        # connected transaction's commit) is seen through here.
        real_noted = db.commit_noted_through

        async def noted(session: AsyncSession, commit: Any, *args: Any, **kwargs: Any) -> None:
            if not creating[0]:
                return await real_noted(session, commit, *args, **kwargs)
            try:
                await real_noted(session, commit, *args, **kwargs)
            finally:
                creating[0] = False
            order.append("created")

        monkeypatch.setattr(db, "commit_noted_through", noted)
        real_claim_runs = run_execution.claim_runs

        async def claim_runs(*args: Any, **kwargs: Any) -> Any:
            order.append("claimed")
            return await real_claim_runs(*args, **kwargs)

        monkeypatch.setattr(run_execution, "claim_runs", claim_runs)

    def before(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not creating[0]:
            order.append("claimed" if "candidates" in statement else "sent")

    real_fetched = held_back._fetched_on_asyncpg

    async def fetched(adapted: Any, statement: str, *args: Any) -> Any:
        if not creating[0]:
            order.append("claimed" if "candidates" in statement else "sent")
        return await real_fetched(adapted, statement, *args)

    monkeypatch.setattr(held_back, "_fetched_on_asyncpg", fetched)
    event.listen(runtime.engine.sync_engine, "before_cursor_execute", before)  # (this test's engine alone)
    log = runtime.run_log
    real_append = log.append

    async def append(session: Any, run_id: str, events: list[Event], **kwargs: Any) -> Any:
        if not any(each.name == "thread.run.created" for each in events):
            return await real_append(session, run_id, events, **kwargs)
        order.append("create sent")
        creating[0] = True
        try:
            if then is not None:
                return await then(session, run_id, events, real_append, **kwargs)
            entries = await real_append(session, run_id, events, **kwargs)
        except BaseException:
            creating[0] = False
            raise
        finally:
            if not sqlite:
                creating[0] = False
        if not sqlite:  # (SQLite: once its unit's hop has committed, above)
            order.append("created")
        return entries

    monkeypatch.setattr(log, "append", append)
    worker = _worker(runtime)
    real_start = worker._start

    def start(execution: execute.RunExecution, claimed_at: float) -> None:
        order.append("executing")
        real_start(execution, claimed_at)

    monkeypatch.setattr(worker, "_start", start)
    return order


def _nothing_sent_after_the_create(order: list[str]) -> bool:
    """Whether no statement went after the create's (none of a hand-off's own)."""
    return order[order.index("created") + 1 :] in ([], ["executing"])


def _committing_then_cancelled(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, committed: list[str]) -> Any:
    """A ``then`` for _noting(): the create committed, its request cancelled
    before the API saw the outcome (taken for a rollback: dropped()). On
    PostgreSQL its statement commits, then the cancellation; on SQLite its
    unit's hop commits and the cancellation comes while it was out, seen
    through as sqlite_groups.commit_collected sees it (db.commit_noted_through:
    noted committed, then the cancellation raised)."""
    if runtime.run_log.postgres:
        return committing_then_cancelled(committed)

    async def then(session: Any, run_id: str, events: list[Event], append: Any, **kwargs: Any) -> Any:
        entries = await append(session, run_id, events, **kwargs)
        real_noted = db.commit_noted_through  # (_noting's, seeing the create's COMMIT)

        async def noted_then_cancelled(session: AsyncSession, commit: Any, *args: Any, **kwargs: Any) -> None:
            monkeypatch.setattr(db, "commit_noted_through", real_noted)  # the create's alone
            await real_noted(session, commit, *args, **kwargs)
            session.info[db._COMMITTED] = True  # as a cancellation seen through its COMMIT leaves it
            raise asyncio.CancelledError

        monkeypatch.setattr(db, "commit_noted_through", noted_then_cancelled)
        committed.append(run_id)
        return entries

    return then


async def _bodies(runtime: Runtime, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with runtime.transaction() as session:
        query = select(orm.RunEvent.event, orm.RunEvent.data).where(orm.RunEvent.run_id == run_id)
        rows = (await session.execute(query.order_by(orm.RunEvent.seq))).all()
    return [(name, data if isinstance(data, dict) else json.loads(data)) for name, data in rows]


async def _executed(runtime: Runtime) -> None:
    worker = _worker(runtime)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    if worker._tasks:
        await asyncio.wait_for(asyncio.gather(*worker._tasks.values()), DEADLINE)


async def test_a_lone_provider_run_is_inserted_started_by_its_create_and_executed_with_no_statement_between(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order = _noting(runtime, monkeypatch)
    before = time.time()
    run, response = await _queue(runtime, assistant)
    await _executed(runtime)
    # The create's statement (after its reads), then the run's task at once:
    # no hand-off statement, no claim.
    assert order[order.index("create sent") :][:3] == ["create sent", "created", "executing"], order
    assert "claimed" not in order
    assert json.loads(bytes(response.body))["status"] == "queued"  # the create's answer: the run as queued
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1
    await _assert_numbered_once(runtime, run.id)
    # Each opening event carries the run as it was at that event.
    bodies = await _bodies(runtime, run.id)
    assert [body["status"] for _name, body in bodies[1:4]] == ["queued", "queued", "in_progress"]
    assert bodies[1][1]["started_at"] is None and bodies[3][1]["started_at"] >= int(before)
    assert not worker._gates and not worker._handing and worker._reserved == 0


def _prompt_sessions(monkeypatch: pytest.MonkeyPatch, *, read_first: bool = False) -> list[str]:
    """How each session prompt.build is given reads: "elsewhere" (it never
    connects: db.READS_ELSEWHERE), "gated" (db.gate's, until the create has
    committed) or "connects". ``read_first``: the build first reads the
    run's thread on its session, as a prompt that needs a read does (a
    session that never connects raises db.RawSessionConnected)."""
    seen: list[str] = []
    real_build = prompt.build

    async def build(session: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        reads = (
            "elsewhere" if db.READS_ELSEWHERE in session.info else "gated" if db.GATE in session.info else "connects"
        )
        seen.append(reads)
        if read_first:
            run = args[2]
            thread = await session.get(orm.Thread, run.thread_id)
            assert thread is not None, "a gated read sees the create's rows"
        return await real_build(session, *args, **kwargs)

    monkeypatch.setattr(prompt, "build", build)
    return seen


async def test_a_started_creates_prompt_that_reads_nothing_is_built_on_a_session_that_never_connects(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its thread's messages noted by the create, the first prompt reads
    nothing: built once, on a session that never connects (PostgreSQL too:
    no session begun, gated or committed while the create's statement is
    out; issue 17)."""
    assistant = await _assistant(runtime)
    seen = _prompt_sessions(monkeypatch)
    order = _noting(runtime, monkeypatch)
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    assert seen == ["elsewhere"]
    assert order[order.index("create sent") :][:3] == ["create sent", "created", "executing"], order
    assert (await _row(runtime, run.id)).status == "completed"
    await _assert_numbered_once(runtime, run.id)


async def test_a_started_creates_prompt_that_needs_a_read_reads_what_its_create_committed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first prompt that needs a read (input files, a longer thread) is
    read once the create has committed: on PostgreSQL through a gated
    session, tried after the session that never connects refused it; on
    SQLite on a WAL reader (RunExecution._first_prompt). Either way the
    run is answered by its fold, with no claim."""
    assistant = await _assistant(runtime)
    seen = _prompt_sessions(monkeypatch, read_first=True)
    order = _noting(runtime, monkeypatch)
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    assert seen == (["elsewhere", "gated"] if runtime.run_log.postgres else ["elsewhere", "connects"])
    assert "claimed" not in order
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.last_error is None
    await _assert_numbered_once(runtime, run.id)


async def test_the_started_create_leases_the_run_to_its_worker_until_the_claims_expiry(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen as the create committed it (the run's task kept from starting)."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    started: list[execute.RunExecution] = []
    order = _noting(runtime, monkeypatch)
    monkeypatch.setattr(worker, "_start", lambda execution, _at: started.append(execution))
    before = time.time()
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert _nothing_sent_after_the_create(order), order
    row = await _row(runtime, run.id)
    assert row.status == "in_progress" and row.lease_owner == worker.owner
    assert row.lease_expires_at is not None
    assert before + worker.lease_seconds <= row.lease_expires_at <= time.time() + worker.lease_seconds
    assert [execution.run_id for execution in started] == [run.id]


async def test_the_started_create_writes_every_column_the_start_sets(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A column the start sets (run_state._values) is written by the create
    as the run object and its in_progress event show it (SQLite: the
    start's UPDATE held back behind the INSERT writes what start_in_create
    set, no list kept by hand). A start made to set one more column here."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    real_values = run_state._values

    def values(run: orm.Run, to: str, fields: dict[str, Any]) -> dict[str, Any]:
        moved = real_values(run, to, fields)
        if to == "in_progress":
            moved["incomplete_details"] = {"reason": "set by the start"}
        return moved

    monkeypatch.setattr(run_state, "_values", values)
    monkeypatch.setattr(worker, "_start", lambda _execution, _at: None)  # the row as the create left it
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    bodies = await _bodies(runtime, run.id)
    assert bodies[3][0] == "thread.run.in_progress"
    assert bodies[3][1]["incomplete_details"] == {"reason": "set by the start"}
    row = await _row(runtime, run.id)
    assert row.status == "in_progress" and row.incomplete_details == {"reason": "set by the start"}


async def test_a_failed_started_create_commits_nothing_and_executes_nothing(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)

    async def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("the create's statement", {}, ConnectionResetError("connection lost"))

    order = _noting(runtime, monkeypatch, then=fail)
    with pytest.raises(OperationalError):
        await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert worker._wakeup.is_set()  # the dropped hand-off's end: a tick finds nothing
    await worker.run_until_idle()
    assert "executing" not in order
    assert not worker._gates and not worker._handing and not worker._tasks
    # SQLite's create that failed uncancelled is known rolled back: nothing
    # noted to release (PostgreSQL's statement may have committed all the same).
    assert bool(worker._folded_unreleased) == runtime.run_log.postgres
    async with runtime.transaction() as session:
        assert (await session.scalars(select(orm.Run.id).where(orm.Run.status != "completed"))).all() == []


async def test_a_started_create_cancelled_with_its_statement_out_is_executed_by_the_next_claim(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request cancelled while its create's statement is out: the API
    takes the outcome for a rollback, the hand-off is dropped; the statement
    had committed all the same, the run in_progress under the worker's own
    lease, executed by nobody. The worker, woken by the dropped hand-off,
    releases it at its next tick (Worker.dropped noted it) and that tick's
    claim takes it (not only once its lease lapses), once."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    committed: list[str] = []

    order = _noting(runtime, monkeypatch, then=_committing_then_cancelled(runtime, monkeypatch, committed))
    with pytest.raises(asyncio.CancelledError):
        await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    (run_id,) = committed
    row = await _row(runtime, run_id)
    assert row.status == "in_progress" and row.lease_owner == worker.owner  # nobody executes it
    assert row.lease_expires_at is not None and row.lease_expires_at > time.time() + 10
    assert "executing" not in order and not worker._gates and worker._wakeup.is_set()
    await worker.tick()  # the wake's tick
    assert list(worker._tasks) == [run_id]
    await _executed(runtime)
    assert (await _row(runtime, run_id)).status == "completed"
    names = [name for name in await _event_names(runtime, run_id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1 and names.count("thread.message.completed") == 1
    await _assert_numbered_once(runtime, run_id)


async def test_a_started_create_of_unknown_outcome_cancelled_before_any_claim_is_ended_by_the_next_tick(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and the run cancelled before the worker's claim took it (a
    running run's cancel: cancelling, its execution to end it): the next
    tick releases it and its reaper ends it cancelled, not once its lease
    lapsed."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    committed: list[str] = []
    _noting(runtime, monkeypatch, then=_committing_then_cancelled(runtime, monkeypatch, committed))
    with pytest.raises(asyncio.CancelledError):
        await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    (run_id,) = committed
    run = await _row(runtime, run_id)
    async with runtime.transaction() as other:
        answer, cancelling = await runs.cancel(other, _PROJECT, run.thread_id, run.id)
        await runtime.run_log.append(other, run.id, cancelling, run_locked=True)
    assert answer.status == "cancelling"
    await worker.tick()
    await _executed(runtime)
    row = await _row(runtime, run.id)
    assert row.status == "cancelled" and row.lease_owner is None
    names = await _event_names(runtime, run.id)
    assert names == [*_OPENING, "thread.run.cancelling", "thread.run.cancelled"]
    await _assert_numbered_once(runtime, run.id)


async def test_another_workers_claim_leaves_a_started_create_to_its_own_worker(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's claim leaves a run its create started under this
    worker's lease alone."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order = _noting(runtime, monkeypatch)
    monkeypatch.setattr(worker, "_start", lambda _execution, _at: None)  # its task never starts
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert _nothing_sent_after_the_create(order), order  # started by the create itself
    other = Worker(runtime)
    assert await other.claim(1) == []
    assert (await _row(runtime, run.id)).lease_owner == worker.owner
    await other.stop()


async def test_a_started_create_cancelled_before_its_execution_moves_ends_cancelled(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel committed between the create's commit and the run's task (a
    running run's cancel: cancelling, then cancelled by its execution)."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    real_hand = worker.hand
    between: list[asyncio.Task[None]] = []

    async def cancel_then_hand(created: orm.Run) -> None:
        async with runtime.transaction() as other:
            answer, cancelling = await runs.cancel(other, _PROJECT, created.thread_id, created.id)
            await runtime.run_log.append(other, created.id, cancelling, run_locked=True)
        assert answer.status == "cancelling"  # a running run's cancel
        assert real_hand(created)

    def hand(created: orm.Run) -> bool:
        between.append(asyncio.create_task(cancel_then_hand(created)))
        return True

    monkeypatch.setattr(worker, "hand", hand)
    order = _noting(runtime, monkeypatch)
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(asyncio.gather(*between), DEADLINE)
    await _executed(runtime)
    assert "claimed" not in order
    row = await _row(runtime, run.id)
    assert row.status == "cancelled" and row.lease_owner is None
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:5] == [*_OPENING, "thread.run.cancelling"] and names[-1] == "thread.run.cancelled"
    await _assert_numbered_once(runtime, run.id)


async def test_a_started_creates_prompt_that_cannot_be_built_fails_the_run_as_a_claims_would(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the prompt cannot be built")

    monkeypatch.setattr(prompt, "build", broken)
    order = _noting(runtime, monkeypatch)
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    assert "claimed" not in order
    assert order[order.index("create sent") :][:3] == ["create sent", "created", "executing"], order
    row = await _row(runtime, run.id)
    assert row.status == "failed" and row.lease_owner is None
    assert row.last_error == dict(execute.SERVER_ERROR)
    names = await _event_names(runtime, run.id)
    assert names[:4] == _OPENING and names[-1] == "thread.run.failed"
    assert not worker._tasks
    await _assert_numbered_once(runtime, run.id)


async def test_a_process_killed_after_a_started_create_leaves_the_run_resumed_once_its_lease_lapses(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    gone = _worker(runtime)
    order = _noting(runtime, monkeypatch)
    monkeypatch.setattr(gone, "_start", lambda _execution, _at: None)  # died: no task
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(gone._handed(), DEADLINE)
    assert _nothing_sent_after_the_create(order), order  # started by the create itself
    other = Worker(runtime)
    assert await other.claim(1) == []  # the dead worker's lease still held
    await _lapse(runtime, run.id)
    await other.run_until_idle()
    assert (await _row(runtime, run.id)).status == "completed"
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1
    await _assert_numbered_once(runtime, run.id)
    await other.stop()


async def test_an_offline_models_instant_run_is_not_started_by_its_create(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its whole answer goes in the hand-off's one statement (pgearly's path): its create inserts it queued."""
    monkeypatch.undo()  # the model's own route: the offline model, answered at once
    assistant = await _assistant(runtime)
    created: list[str] = []
    real_append = runtime.run_log.append

    async def append(session: Any, run_id: str, events: list[Event], **kwargs: Any) -> Any:
        if any(each.name == "thread.run.created" for each in events):
            created.extend(each.name for each in events)
        return await real_append(session, run_id, events, **kwargs)

    monkeypatch.setattr(runtime.run_log, "append", append)
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    assert created == ["thread.created", "thread.run.created", "thread.run.queued"]
    assert (await _row(runtime, run.id)).status == "completed"


async def _committed_then_cancelled_create(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> str:
    """A folded create whose statement committed, its request cancelled
    before the API saw the outcome (taken for a rollback: dropped()): the
    run's id, in_progress under the worker's lease, executed by nobody."""
    assistant = await _assistant(runtime)
    committed: list[str] = []

    _noting(runtime, monkeypatch, then=_committing_then_cancelled(runtime, monkeypatch, committed))
    with pytest.raises(asyncio.CancelledError):
        await _queue(runtime, assistant)
    await asyncio.wait_for(_worker(runtime)._handed(), DEADLINE)
    (run_id,) = committed
    return run_id


async def test_a_started_create_of_unknown_outcome_is_released_by_a_later_tick_if_not_by_the_first(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create's commit may land after the first tick's release (which
    then finds no row): the note is kept, the next tick releases the run."""
    worker = _worker(runtime)
    run_id = await _committed_then_cancelled_create(runtime, monkeypatch)
    real_release = run_execution.release
    releases: list[list[str]] = []

    async def release(session: AsyncSession, owner: str, run_ids: list[str] | None = None) -> list[str]:
        if not releases:  # the first: as if the create had not committed yet
            releases.append([])
            return []
        released = await real_release(session, owner, run_ids)
        releases.append(released)
        return released

    monkeypatch.setattr(run_execution, "release", release)
    await worker.tick()
    assert not worker._tasks  # the lease still held: nothing claimed
    await worker.tick()
    assert releases == [[], [run_id]] and list(worker._tasks) == [run_id]
    await _executed(runtime)
    assert (await _row(runtime, run_id)).status == "completed"
    assert not worker._folded_unreleased
    await worker.tick()
    assert releases == [[], [run_id]]  # released once: not sent again


async def test_a_tick_right_after_the_folded_create_does_not_claim_its_run(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick whose claim goes out after the create has committed, before
    the hand-off has made the run a task of the worker's, leaves it to the
    hand-off (the claim's ``executing`` lists the runs being handed)."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    real_hand = worker.hand
    worker._next_reap = worker._next_prune = float("inf")  # the tick goes straight to its claim
    worker.concurrency = 4  # room for a claim beside the hand-off
    ticks: list[asyncio.Task[None]] = []

    def hand(created: orm.Run) -> bool:
        handed = real_hand(created)
        ticks.append(asyncio.create_task(worker.tick(ingest=False)))
        return handed

    monkeypatch.setattr(worker, "hand", hand)
    claimed: list[str] = []
    real_claim = execute.claim_and_start

    async def claim_and_start(*args: Any, **kwargs: Any) -> list[execute.RunExecution]:
        executions = await real_claim(*args, **kwargs)
        claimed.extend(each.run_id for each in executions)
        return executions

    monkeypatch.setattr(execute, "claim_and_start", claim_and_start)
    order = _noting(runtime, monkeypatch)
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(asyncio.gather(*ticks), DEADLINE)
    await _executed(runtime)
    assert "claimed" in order and claimed == []  # the claim went out, and took nothing
    assert (await _row(runtime, run.id)).status == "completed"
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names.count("thread.message.created") == 1, names
    await _assert_numbered_once(runtime, run.id)


async def test_a_create_slower_than_the_lease_leaves_its_run_to_the_claim(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is stamped before the create's statement goes: a commit
    that came past the renewer's give-up moment is not executed under it;
    the next tick releases the run and its claim takes it with a new lease.
    (The worker's clock is moved a lease ahead while the create is out.)"""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    ahead = [0.0]

    class Clock:
        time = staticmethod(time.time)

        @staticmethod
        def monotonic() -> float:
            return time.monotonic() + ahead[0]

    monkeypatch.setattr(worker_module, "time", Clock)

    async def slow(session: Any, run_id: str, events: list[Event], append: Any, **kwargs: Any) -> Any:
        entries = await append(session, run_id, events, **kwargs)
        ahead[0] = worker.lease_seconds  # a whole lease went by
        return entries

    order = _noting(runtime, monkeypatch, then=slow)
    run, _response = await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    assert "executing" not in order and not worker._tasks  # not executed under the lapsed lease
    row = await _row(runtime, run.id)
    assert row.status == "in_progress" and row.lease_owner == worker.owner
    assert worker._wakeup.is_set()
    ahead[0] = 0.0
    await worker.tick()  # the wake's: releases the run, its claim takes it
    assert list(worker._tasks) == [run.id]
    await _executed(runtime)
    assert (await _row(runtime, run.id)).status == "completed"
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1 and names.count("thread.message.completed") == 1
    await _assert_numbered_once(runtime, run.id)


async def test_a_run_whose_execution_crashed_is_claimed_again_once_a_lease_not_every_tick(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An execution that escapes execute() with an error that is not the
    database's (its loop failed, and its end too) leaves its run in_progress
    under the worker's lease, unreleased: the same worker's next ticks do
    not claim it again (a model call per tick), only its lease's lapse does."""
    attempts: list[str] = []

    async def loop(self: execute.RunExecution, *_args: Any) -> None:
        attempts.append(self.run_id)
        raise RuntimeError("the model call failed unexpectedly")

    async def end(self: execute.RunExecution, *_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("and so did the run's end (a bug)")

    monkeypatch.setattr(execute.RunExecution, "_loop", loop)
    monkeypatch.setattr(execute.RunExecution, "_end", end)
    worker = Worker(runtime)  # (not the server's: driven tick by tick, it hands nothing)
    try:
        run = await _create(runtime, worker)
        for _ in range(3):
            await worker.tick(ingest=False)
            if worker._tasks:
                await asyncio.wait_for(asyncio.gather(*worker._tasks.values(), return_exceptions=True), DEADLINE)
        assert attempts == [run.id]
        row = await _row(runtime, run.id)
        assert row.status == "in_progress" and row.lease_owner == worker.owner
        await _lapse(runtime, run.id)
        await worker.tick(ingest=False)
        await asyncio.wait_for(asyncio.gather(*worker._tasks.values(), return_exceptions=True), DEADLINE)
        assert attempts == [run.id, run.id]  # once per lease
    finally:
        await worker.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_a_folded_create_from_remembered_defaults_is_one_hop_and_a_stale_one_is_made_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the create from remembered defaults never connects (its
    writes, the start's UPDATE behind the run's checked INSERT among them,
    one hop); defaults found stale at that hop fail it whole (nothing noted
    to release, nothing executed) and the run made again from a read is
    folded and executed, once."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    _first, _response = await _queue(runtime, assistant)  # reads the assistant: its defaults remembered
    await _executed(runtime)
    hops: list[str] = []
    real_hop = sqlite_groups.commit_collected_seen_through

    async def hop(session: AsyncSession, engine: Any) -> None:
        hops.append("hop")
        await real_hop(session, engine)

    monkeypatch.setattr(sqlite_groups, "commit_collected_seen_through", hop)
    order = _noting(runtime, monkeypatch)
    run, response = await _queue(runtime, assistant, remembering=True)
    await _executed(runtime)
    assert hops == ["hop"]  # the whole create: one collected unit
    assert order[order.index("create sent") :][:3] == ["create sent", "created", "executing"], order
    assert json.loads(bytes(response.body))["status"] == "queued"
    assert (await _row(runtime, run.id)).status == "completed"
    names = [name for name in await _event_names(runtime, run.id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names[-1] == "thread.run.completed"
    await _assert_numbered_once(runtime, run.id)
    # The assistant changed behind the remembered defaults (not through the
    # API, which would forget them): the first attempt's hop fails whole.
    async with runtime.transaction() as session:
        await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant).values(instructions="new"))
    order.clear()
    hops.clear()
    again, _response = await _queue(runtime, assistant, remembering=True)
    await _executed(runtime)
    # (The failed attempt's reservation is counted until the next claim: the
    # run made again is not alone, claimed by the tick its create woke.)
    assert worker._wakeup.is_set()
    await worker.run_until_idle()
    assert hops == ["hop"]  # the stale attempt's (the one made from a read connects: its commit)
    assert not worker._folded_unreleased and not worker._gates and not worker._handing
    assert (await _row(runtime, again.id)).status == "completed"
    async with runtime.transaction() as session:
        live = (await session.scalars(select(orm.Run.id).where(orm.Run.status != "completed"))).all()
    assert list(live) == []  # the stale attempt left no run behind
    names = [name for name in await _event_names(runtime, again.id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names.count("thread.run.in_progress") == 1
    await _assert_numbered_once(runtime, again.id)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_a_folded_create_cancelled_while_its_commit_is_in_the_thread_is_answered_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite, the real path (not the emulated one of
    _committing_then_cancelled): the create's one hop (a create from
    remembered defaults, a collected unit) is held in aiosqlite's thread,
    at its COMMIT (sqlite_driver._commit), while its request is
    cancelled; let go, it commits. The create raises the cancellation (its
    outcome unknown to the API, taken for a rollback: dropped()), the run
    committed in_progress under the worker's lease is noted for release,
    and the next tick releases it and claims it: executed and completed
    once, its start logged once, each event numbered once."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    await _queue(runtime, assistant)  # reads the assistant: its defaults remembered
    await _executed(runtime)
    loop = asyncio.get_running_loop()
    at_commit = asyncio.Event()
    let_go = threading.Event()
    real_commit = sqlite_driver._commit
    held: list[bool] = []

    def commit(*args: Any, **kwargs: Any) -> Any:
        if not held:  # the create's COMMIT alone (the first after this point)
            held.append(True)
            loop.call_soon_threadsafe(at_commit.set)
            let_go.wait(DEADLINE)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(sqlite_driver, "_commit", commit)
    monkeypatch.setattr(sqlite_driver, "COMMITS_ON_LOOP", False)  # the thread's path: a lone COMMIT goes on the loop's
    creating = asyncio.create_task(_queue(runtime, assistant, remembering=True))
    try:
        await asyncio.wait_for(at_commit.wait(), DEADLINE)
        creating.cancel()  # while the COMMIT is in the thread
    finally:
        let_go.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(creating, DEADLINE)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    async with runtime.transaction() as session:
        live = (await session.scalars(select(orm.Run.id).where(orm.Run.status != "completed"))).all()
    (run_id,) = live  # committed despite the cancellation
    assert list(worker._folded_unreleased) == [run_id]  # noted for release
    row = await _row(runtime, run_id)
    assert row.status == "in_progress" and row.lease_owner == worker.owner and not worker._tasks
    await worker.tick()  # releases it; its claim takes it
    assert list(worker._tasks) == [run_id] and not worker._folded_unreleased
    await _executed(runtime)
    assert (await _row(runtime, run_id)).status == "completed"
    names = [name for name in await _event_names(runtime, run_id) if name != "thread.message.delta"]
    assert names[:4] == _OPENING and names[-1] == "thread.run.completed"
    assert names.count("thread.run.in_progress") == 1 and names.count("thread.message.completed") == 1
    await _assert_numbered_once(runtime, run_id)
