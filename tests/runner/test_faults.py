"""The worker against faults, in-process: dropped PostgreSQL connections, a
SQLite database locked past the busy timeout, stalled model streams, runs
past their deadline while executing, and shutdown with runs in flight
(issue 10). Process-level faults (kill -9, SIGTERM) are in test_processes.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from app import ids, orm
from app.runner import execute
from app.runner.tools import ToolResult
from app.runner.tools.file_search import FileSearch, FileSearchResult
from app.runtime import Runtime
from app.services import run_execution, runs
from app.settings import Settings
from app.worker import Worker
from tests.runner.helpers import DEADLINE, running_worker, runtime_with_lease, stop_worker, until
from tests.runner.test_worker import _make_runs, _statuses

FINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_with_lease(settings, 1.0) as rt:
        yield rt


async def _all_final(runtime: Runtime, run_ids: list[str]) -> bool:
    return set((await _statuses(runtime, run_ids)).values()) <= FINAL


async def _answers(runtime: Runtime, run_id: str) -> list[orm.Message]:
    async with runtime.transaction() as session:
        query = select(orm.Message).where(orm.Message.run_id == run_id).order_by(orm.Message.seq)
        return list((await session.scalars(query)).all())


async def _terminate_backends(runtime: Runtime) -> int:
    """pg_terminate_backend on every connection to the test's database but
    the one asking: what a PostgreSQL restart or a failover does to a pool."""
    url = make_url(runtime.settings.resolved_database_url())
    admin = await asyncpg.connect(user="postgres", database="postgres", host=url.query["host"])
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            url.database,
        )
    finally:
        await admin.close()
    return len(rows)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # PostgreSQL connections only
async def test_worker_survives_dropped_postgres_connections(runtime: Runtime) -> None:
    worker, task = await running_worker(runtime)
    # The test's own reads and writes use a pool of their own, renewed after
    # the drop: only the worker's connections are put to the test.
    client = await Runtime.start(runtime.settings)
    try:
        # One run in flight while its connections are killed, more queued after.
        (slow,) = await _make_runs(client, 1, text="[[delay 50]] [[tokens 20]]")
        await until(lambda: worker.busy == 1, "the slow run to start")
        # Whoever meets a dead connection first (the loop, the executor, the
        # listener) fails; the pool then reconnects. Nothing may stay stuck.
        assert await _terminate_backends(runtime) > 0
        await client.engine.dispose()
        after = await _make_runs(client, 3)
        await until(lambda: _all_final(client, [slow, *after]), "the runs to finish")
        assert set((await _statuses(client, [slow, *after])).values()) == {"completed"}
        assert worker.last_error is None
        answers = await _answers(client, slow)
        assert [(m.status, len(m.content[0]["text"]["value"].split())) for m in answers] == [("completed", 20)]
    finally:
        await stop_worker(worker, task)
        await client.close()


def _short_busy_timeout(runtime: Runtime) -> None:
    """Let "database is locked" come after 0.2 s instead of the server's 30 s
    (the test's own PRAGMA runs after the server's on every new connection)."""

    def pragma(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA busy_timeout=200")
        cursor.close()

    event.listen(runtime.engine.sync_engine, "connect", pragma)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # SQLite locking only
async def test_worker_survives_a_sqlite_lock_held_past_the_busy_timeout(runtime: Runtime) -> None:
    url = runtime.settings.resolved_database_url()
    _short_busy_timeout(runtime)
    await runtime.engine.dispose()  # new connections get the short timeout
    worker, task = await running_worker(runtime)
    # The locker's calls block, so they run in a thread: on the event loop's
    # thread, waiting for the lock would stall the executor's open transaction
    # that holds it, and the two would wait on each other until the timeout.
    locker = sqlite3.connect(make_url(url).database or "", isolation_level=None, check_same_thread=False)
    try:
        (slow,) = await _make_runs(runtime, 1, text="[[delay 20]] [[tokens 50]]")
        await until(lambda: worker.busy == 1, "the slow run to start")
        await asyncio.to_thread(locker.execute, "BEGIN IMMEDIATE")  # another process writing for too long
        await until(lambda: "locked" in (worker.last_error or ""), "the worker to hit the lock")
        await asyncio.to_thread(locker.execute, "ROLLBACK")
        run_ids = await _make_runs(runtime, 3)
        await until(lambda: _all_final(runtime, [slow, *run_ids]), "the runs to finish")
        assert set((await _statuses(runtime, [slow, *run_ids])).values()) == {"completed"}
        assert worker.last_error is None
        answers = await _answers(runtime, slow)
        assert [(m.status, len(m.content[0]["text"]["value"].split())) for m in answers] == [("completed", 50)]
    finally:
        locker.close()
        await stop_worker(worker, task)


async def test_a_silent_model_stream_fails_the_run(settings: Settings) -> None:
    settings = settings.model_copy(update={"model_idle_timeout_seconds": 0.3})
    rt = await Runtime.start(settings)
    try:
        (run_id,) = await _make_runs(rt, 1, text="[[reply partial]] [[hang]]")
        await Worker(rt).run_until_idle()
        async with rt.transaction() as session:
            run = await session.get(orm.Run, run_id)
        assert run is not None and run.status == "failed"
        assert run.last_error == {
            "code": "server_error",
            "message": "The model sent nothing for 0.3 seconds; the run was stopped.",
        }
        assert [(m.status, m.content[0]["text"]["value"]) for m in await _answers(rt, run_id)] == [
            ("incomplete", "partial")
        ]
    finally:
        await rt.close()


async def test_executing_runs_expire_and_free_their_slots(settings: Settings) -> None:
    # A lease of 30 s, not the file's 1 s: the runs must still be executing,
    # their leases live, when the reaper finds them past their deadline. With
    # 1 s, a loop held 0.6 s on a loaded machine (CI's) gave the leases up, the
    # tick released them and the same tick's reaper failed the runs as
    # unresumable, rightly for a worker that stalled, not what this tests.
    async with runtime_with_lease(settings, 30.0) as runtime:
        await _expire_executing_runs(runtime)


async def _expire_executing_runs(runtime: Runtime) -> None:
    worker, task = await running_worker(runtime, concurrency=2)
    try:
        hung = await _make_runs(runtime, 2, text="[[hang]]")
        await until(lambda: worker.busy == 2, "both hung runs to take a slot")
        waiting = await _make_runs(runtime, 1)
        async with runtime.transaction() as session:
            await session.execute(update(orm.Run).where(orm.Run.id.in_(hung)).values(expires_at=ids.now() - 1))
        await until(lambda: _all_final(runtime, [*hung, *waiting]), "the runs to end")
        statuses = await _statuses(runtime, [*hung, *waiting])
        assert [statuses[run_id] for run_id in [*hung, *waiting]] == ["expired", "expired", "completed"]
        await until(lambda: worker.busy == 0, "the expired executions to stop")
    finally:
        await stop_worker(worker, task)


async def test_shutdown_drains_then_releases_runs_for_another_worker(settings: Settings) -> None:
    # A lease of 30 s, not the file's 1 s: with 1 s, a loop held up on a
    # loaded machine (CI's) may give a lease up mid-drain and stop its run,
    # a run given up, not a drain, which is what this tests.
    async with runtime_with_lease(settings, 30.0) as runtime:
        await _drain_then_release(runtime)


async def _drain_then_release(runtime: Runtime) -> None:
    first, task = await running_worker(runtime)
    # A drain of 5 s, not 1 s: the quick run (0.4 s) finishes within it on a
    # loaded machine too; the slow run (10 s: its delays alone take that
    # long) does not, and the second worker executes it again in full well
    # within the deadline (few deltas: little work for a loaded machine).
    quick, slow = (
        (await _make_runs(runtime, 1, text="[[delay 100]] [[tokens 3]]"))[0],
        (await _make_runs(runtime, 1, text="[[delay 100]] [[tokens 100]]"))[0],
    )
    await until(lambda: first.busy == 2, "both runs to start")
    first.drain_seconds = 5.0
    first.request_stop()
    await task
    statuses = await _statuses(runtime, [quick, slow])
    assert statuses == {quick: "completed", slow: "in_progress"}  # drained / released, not failed
    async with runtime.transaction() as session:
        released = await session.get(orm.Run, slow)
    assert released is not None and released.lease_owner is None and released.lease_expires_at is None
    second, task = await running_worker(runtime)
    try:
        assert second.owner != first.owner
        await until(lambda: _all_final(runtime, [slow]), "the released run to finish elsewhere")
        assert (await _statuses(runtime, [slow]))[slow] == "completed"
        answers = await _answers(runtime, slow)
        assert [(m.status, len(m.content[0]["text"]["value"].split())) for m in answers] == [("completed", 100)]
    finally:
        await stop_worker(second, task)


@pytest.mark.parametrize("lease_seconds", [1.0, 600.0], ids=["renewer", "cancel-watcher"])
async def test_an_execution_whose_lease_was_taken_over_stops(settings: Settings, lease_seconds: float) -> None:
    """An execution streaming an answer of minutes stops within the test once
    another worker holds the run: with a short lease its renewer notices;
    with one far longer than the test, its cancel watcher, reading the row,
    finds it in another lease."""
    update_settings = {"worker_poll_seconds": 0.05, "run_lease_seconds": lease_seconds}
    rt = await Runtime.start(settings.model_copy(update=update_settings))
    worker, task = await running_worker(rt)
    try:
        (run_id,) = await _make_runs(rt, 1, text="[[delay 100]] [[tokens 3000]]")  # five minutes
        await until(lambda: worker.busy == 1, "the run to start")
        async with rt.transaction() as session:  # as if another worker claimed it after a lapse
            # With a lease of its own, as a claim stamps: with the old one left
            # to lapse, this worker could claim the run back (and finish it)
            # before the check below, on a machine slow enough.
            await session.execute(
                update(orm.Run)
                .where(orm.Run.id == run_id)
                .values(lease_owner="other-worker", lease_expires_at=time.time() + 600)
            )
        await until(lambda: worker.busy == 0, "the execution to stop")
        async with rt.transaction() as session:
            run = await session.get(orm.Run, run_id)
        assert run is not None and (run.status, run.lease_owner) == ("in_progress", "other-worker")
    finally:
        await stop_worker(worker, task)
        await rt.close()


async def test_a_worker_leaves_alone_a_run_it_still_executes_whose_lease_lapsed(settings: Settings) -> None:
    """A lease that lapsed under its own worker's execution (renewals slower
    than the lease, or failing while the database was locked: the flaky
    busy-timeout test above) does not make the run claimable by that same
    worker: a second execution under the same owner passes every lease
    check, its resume deletes the first's message, and whichever ends the
    run leaves the other's message in_progress with part of its text. The
    first execution goes on and finishes. (A lease far longer than the
    test: no renewal stamps it again meanwhile.)"""
    update_settings = {"worker_poll_seconds": 0.05, "run_lease_seconds": 600.0}
    rt = await Runtime.start(settings.model_copy(update=update_settings))
    worker, task = await running_worker(rt)
    try:
        (run_id,) = await _make_runs(rt, 1, text="[[delay 20]] [[tokens 50]]")

        async def streaming() -> bool:
            return bool(await _answers(rt, run_id))

        await until(streaming, "the answer's message to open")
        async with rt.transaction() as session:
            lapsed = update(orm.Run).where(orm.Run.id == run_id).values(lease_expires_at=time.time() - 1)
            await session.execute(lapsed)
        worker.wake()  # a claim at once, while the answer still streams
        await until(lambda: _all_final(rt, [run_id]), "the run to finish")
        assert await _statuses(rt, [run_id]) == {run_id: "completed"}
        answers = await _answers(rt, run_id)
        assert [(m.status, len(m.content[0]["text"]["value"].split())) for m in answers] == [("completed", 50)]
    finally:
        await stop_worker(worker, task)
        await rt.close()


async def test_a_late_release_spares_a_run_the_worker_executes_again(settings: Settings) -> None:
    """A run whose release failed after a database error is handed back at a
    later tick; if this worker has claimed it again meanwhile (its lease had
    lapsed) and executes it, that release would take the new execution's
    lease away (the execution then stops as if taken over): it is skipped."""
    update_settings = {"worker_poll_seconds": 0.05, "run_lease_seconds": 600.0}
    rt = await Runtime.start(settings.model_copy(update=update_settings))
    worker, task = await running_worker(rt)
    try:
        (run_id,) = await _make_runs(rt, 1, text="[[delay 20]] [[tokens 50]]")
        await until(lambda: worker.busy == 1, "the run to start")
        worker._unreleased.add(run_id)  # as a failed release of an earlier execution of it left it
        worker.wake()
        await until(lambda: not worker._unreleased, "a tick to hand back what it holds")
        async with rt.transaction() as session:
            run = await session.get(orm.Run, run_id)
        assert run is not None and (run.status, run.lease_owner) in {("in_progress", worker.owner), ("completed", None)}
        await until(lambda: _all_final(rt, [run_id]), "the run to finish")
        answers = await _answers(rt, run_id)
        assert [(m.status, len(m.content[0]["text"]["value"].split())) for m in answers] == [("completed", 50)]
    finally:
        await stop_worker(worker, task)
        await rt.close()


async def test_a_failed_release_is_not_dropped_by_the_tick_its_own_wake_starts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An execution stops on a database error and its release fails too (the
    database still locked): the run is left to a later tick. The tick that
    the failed release's own wake starts runs while the task is still listed;
    it used to subtract the run from the release and forget it, leaving the
    run in_progress under this worker's lease until the lease lapsed (review
    of the late-release fix)."""
    rt = await Runtime.start(settings.model_copy(update={"worker_poll_seconds": 0.05, "run_lease_seconds": 600.0}))
    original_run, original_release = execute.run, run_execution.release
    failures = {"run": 1, "release": 1}

    def locked() -> OperationalError:
        return OperationalError("UPDATE runs ...", {}, sqlite3.OperationalError("database is locked"))

    async def run(execution: execute.RunExecution) -> None:
        if failures["run"]:
            failures["run"] -= 1
            await asyncio.sleep(0.3)  # mid-stream, the worker's loop idle
            raise locked()
        await original_run(execution)

    async def release(session: Any, owner: str, run_ids: list[str] | None = None) -> Any:
        if run_ids is not None and failures["release"]:
            failures["release"] -= 1
            raise locked()
        return await original_release(session, owner, run_ids)

    monkeypatch.setattr(execute, "run", run)
    monkeypatch.setattr(run_execution, "release", release)
    worker, task = await running_worker(rt)
    try:
        (run_id,) = await _make_runs(rt, 1, text="[[delay 20]] [[tokens 5]]")  # streamed: not answered in its claim
        await until(lambda: failures["release"] == 0, "the failed release")
        # Resumed at once (the wake after the task left its list), not after its 600 s lease.
        await until(lambda: _all_final(rt, [run_id]), "the run to be resumed and finish")
        assert await _statuses(rt, [run_id]) == {run_id: "completed"}
    finally:
        await stop_worker(worker, task)
        await rt.close()


async def test_shutdown_returns_as_soon_as_the_runs_in_flight_are_done(runtime: Runtime) -> None:
    worker, task = await running_worker(runtime)
    (run_id,) = await _make_runs(runtime, 1, text="[[delay 20]] [[tokens 20]]")
    await until(lambda: worker.busy == 1, "the run to start")
    worker.drain_seconds = 600.0  # far longer than the test may take
    worker.request_stop()
    async with asyncio.timeout(DEADLINE):
        await task
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}


@pytest.mark.parametrize(
    ("cue", "move"), [("[[tokens 5]]", "completed"), ('[[call lookup {"q": 1}]]', "requires_action")]
)
@pytest.mark.parametrize(
    ("status", "owner"),
    [("in_progress", "other-worker"), ("expired", None)],
    ids=["taken-over", "ended-elsewhere"],
)
async def test_a_move_after_a_takeover_writes_nothing(
    settings: Settings, cue: str, move: str, status: str, owner: str | None
) -> None:
    """A worker whose lease was taken over between the model's answer and its
    commit (before its renewer noticed: a lease far longer than the test)
    leaves the run to the new owner: no move, no rows, no events of its own.
    So does one whose run ended elsewhere meanwhile (the reaper, or the new
    owner, finished it): nothing follows its last event.
    (The answer's deltas are logged before the takeover, and the flusher
    waits far longer than the test after that: a flush between the takeover
    and the commit would log deltas the worker could not know were late.)"""
    slow_flushes = {"run_lease_seconds": 600.0, "run_events_flush_seconds": 600.0}
    rt = await Runtime.start(settings.model_copy(update=slow_flushes))
    try:
        (run_id,) = await _make_runs(rt, 1, text=cue)
        logged_at_takeover: list[int] = []

        async def take_over(_exchange: Any) -> None:
            # The LLM's completion hook, awaited before the answer's end
            # reaches the executor: another worker claims the run now.
            await rt.run_log.flush()
            async with rt.transaction() as session:
                await session.execute(
                    update(orm.Run)
                    .where(orm.Run.id == run_id)
                    .values(status=status, lease_owner=owner, lease_expires_at=owner and time.time() + 600)
                )
                logged = await session.scalar(select(func.max(orm.RunEvent.seq)).where(orm.RunEvent.run_id == run_id))
            logged_at_takeover.append(logged or 0)

        rt.llm.observer = take_over
        async with asyncio.timeout(DEADLINE):
            await Worker(rt).run_until_idle()
        async with rt.transaction() as session:
            run = await session.get(orm.Run, run_id)
            late = (
                await session.scalars(
                    select(orm.RunEvent.event).where(
                        orm.RunEvent.run_id == run_id, orm.RunEvent.seq > logged_at_takeover[0]
                    )
                )
            ).all()
        assert run is not None and (run.status, run.lease_owner) == (status, owner)
        assert run.required_action is None and run.usage is None, move
        assert list(late) == []
        assert [m.status for m in await _answers(rt, run_id)] == ["in_progress"]  # as the answer opened it
    finally:
        await rt.close()


async def test_a_run_ended_during_a_builtin_tool_gets_nothing_after_its_last_event(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper expires a run while a built-in tool (file_search here) is
    still working for it: the round's end writes nothing (no step completed
    after the run's expired event, no new message opened by another model
    call), and every step and message stays as the reaper closed it. (A
    lease far longer than this file's 1 s: the expiry is the reaper's, not
    a lapse. With 1 s, a fresh-clone CI once saw the lease given up while
    the reaper's transaction was under way in the tool, and its rollback
    left the run in_progress; a stall of 0.9 s held in that transaction
    does the same. With 60 s it passes.)"""
    async with runtime_with_lease(settings, 60.0) as runtime:
        await _ended_during_a_builtin_tool(runtime, monkeypatch)


async def _ended_during_a_builtin_tool(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:

    async def expire_meanwhile(self: FileSearch, rt: Runtime, run: orm.Run, call_id: str, *_args: Any) -> ToolResult:
        async with rt.transaction() as session:  # as the reaper does to a run past its expires_at
            locked = await session.get(orm.Run, run.id, with_for_update=True)
            assert locked is not None
            await rt.run_log.append(session, run.id, await runs.close_out(session, locked, "expired"))
        call = {"id": call_id, "type": "file_search", "file_search": {"results": []}}
        return FileSearchResult(call=call, output="nothing found")

    monkeypatch.setattr(FileSearch, "execute", expire_meanwhile)
    (run_id,) = await _make_runs(runtime, 1, text="what do zebras eat")
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        run.tools = [{"type": "file_search"}]
    async with asyncio.timeout(DEADLINE):
        await Worker(runtime).run_until_idle()
    async with runtime.transaction() as session:
        names = list(
            (
                await session.scalars(
                    select(orm.RunEvent.event).where(orm.RunEvent.run_id == run_id).order_by(orm.RunEvent.seq)
                )
            ).all()
        )
        steps = list((await session.scalars(select(orm.RunStep.status).where(orm.RunStep.run_id == run_id))).all())
    assert names[-1] == "thread.run.expired", names
    assert (await _statuses(runtime, [run_id]))[run_id] == "expired"
    assert "in_progress" not in steps and [m.status for m in await _answers(runtime, run_id)] != ["in_progress"]


async def _a_read_of_runs_waits(locker: asyncpg.Connection) -> bool:
    """Whether a plain read of the runs table waits for ``locker``'s lock."""
    query = (
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'runs'::regclass AND mode = 'AccessShareLock'"
    )
    return bool(await locker.fetchval(query))


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # a read held up by a table lock
async def test_a_stopped_execution_leaves_no_read_of_its_run_behind(runtime: Runtime) -> None:
    """An execution stopped (shutdown, a lost lease) while its cancel watcher
    reads the run's row ends only once that read has ended. Left running on
    its own, the read kept its connection past the execution, and past the
    Runtime's close: the pool disposed of meanwhile took it back, for good,
    unclosed (an asyncpg ResourceWarning in whichever test the garbage
    collector ran in)."""
    await _make_runs(runtime, 1, text="[[delay 100]] [[tokens 3000]]")  # five minutes
    (execution,) = await execute.claim_and_start(runtime, "worker-1", 1, 600.0, {})
    before = asyncio.all_tasks()
    task = asyncio.create_task(execute.run(execution))
    url = make_url(runtime.settings.resolved_database_url())
    locker = await asyncpg.connect(user="postgres", database=url.database, host=url.query["host"])
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
            await until(lambda: _a_read_of_runs_waits(locker), "the watcher's read to wait")
            task.cancel()
            await asyncio.wait({task}, timeout=DEADLINE)
            assert task.done()
            # (Named tasks are the Runtime's own: the run log's flusher.)
            left = [t for t in asyncio.all_tasks() - before if not t.done() and t.get_name().startswith("Task-")]
            assert left == []
    finally:
        await locker.close()
