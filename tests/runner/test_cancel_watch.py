"""The executor's cancel watch while a model answers (execute._CancelWatch,
issue 17: a bus watch and a timer instead of a watcher task): a cancel on
this process's bus stops the answer at once, one made elsewhere is found in
the run's row, and an answer's end leaves nothing watching."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, update

from app import orm
from app.bus import EventBus
from app.runner import execute
from app.runtime import Runtime
from app.wire.events import Event
from tests.runner.helpers import until
from tests.runner.test_worker import _make_runs

_OWNER = "test:0:watch"
_DEADLINE_SECONDS = 20


async def _executing(runtime: Runtime, text: str) -> tuple[str, asyncio.Task[None]]:
    """A run claimed, started and executing in a task of its own, its model
    answering ``text``'s cue (still streaming when this returns)."""
    (run_id,) = await _make_runs(runtime, 1, text=text)
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    assert execution.run_id == run_id and not execution.finished
    return run_id, asyncio.ensure_future(execute.run(execution))


async def _watched(runtime: Runtime, run_id: str) -> None:
    await until(lambda: runtime.bus.watched(run_id), "the answer under the cancel watch")


async def _last_event(runtime: Runtime, run_id: str) -> str:
    async with runtime.transaction() as session:
        query = select(orm.RunEvent.event).where(orm.RunEvent.run_id == run_id).order_by(orm.RunEvent.seq.desc())
        return str((await session.execute(query.limit(1))).scalar_one())


async def _ends(runtime: Runtime, run_id: str, executing: asyncio.Task[None], status: str) -> None:
    """The execution ends in time, the run ``status`` with its log's last event saying so."""
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await executing
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and run.status == status
    assert await _last_event(runtime, run_id) == f"thread.run.{status}"


async def test_a_cancel_on_the_bus_stops_a_silent_model(runtime: Runtime) -> None:
    # The row is left in_progress: only the bus can stop the answer.
    run_id, executing = await _executing(runtime, "[[hang]] hi")
    await _watched(runtime, run_id)
    runtime.bus.publish(run_id, [Event("thread.run.cancelling", {"id": run_id})])
    await _ends(runtime, run_id, executing, "cancelled")


async def test_a_cancel_made_elsewhere_is_found_in_the_row(runtime: Runtime) -> None:
    # As from another process: the row changes, nothing is published here.
    run_id, executing = await _executing(runtime, "[[hang]] hi")
    await _watched(runtime, run_id)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(status="cancelling"))
    await _ends(runtime, run_id, executing, "cancelled")


async def test_a_streamed_answer_completes_and_leaves_nothing_watching(runtime: Runtime) -> None:
    run_id, executing = await _executing(runtime, "[[delay 1]] hello there")
    await _ends(runtime, run_id, executing, "completed")
    assert not runtime.bus.watched(run_id)


def test_a_watch_sees_its_topic_only_and_a_failing_one_fails_nobody(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[str] = []

    def failing(_event: Event) -> None:
        raise RuntimeError("watcher broke")

    with bus.watch("run_a", lambda event: seen.append(event.name)), bus.watch("run_a", failing):
        bus.publish("run_a", [Event("one", {}), Event("two", {})])
        bus.publish("run_b", [Event("other", {})])
    bus.publish("run_a", [Event("after", {})])
    assert seen == ["one", "two"] and not bus.watched("run_a")
    assert "an event watcher failed" in caplog.text


async def _winding_down() -> asyncio.Task[None]:
    """An answer still ending (its task not done yet)."""
    return asyncio.ensure_future(asyncio.Event().wait())


async def test_a_row_read_ending_after_the_watch_closed_starts_no_more_reads() -> None:
    """The execution is cancelled (worker stop) while the row's read is in
    flight: that read's end arms no timer for another, which would read the
    run after its execution ended, past the Runtime's close (review)."""
    gate = asyncio.Event()
    reads: list[None] = []

    async def cancel_requested() -> bool:
        reads.append(None)
        await gate.wait()
        return False

    answer = await _winding_down()
    watch = execute._CancelWatch(answer, cancel_requested)
    try:
        assert watch.timer is not None
        watch.timer.cancel()
        watch._check()  # as its timer does: the read is in flight
        check = watch.check
        assert check is not None
        watch.close()  # the answer is ending
        gate.set()
        await asyncio.wait_for(watch.until_checked(), _DEADLINE_SECONDS)
        assert watch.timer is None and watch.check is None and len(reads) == 1
    finally:
        watch.close()
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)


async def test_stopping_events_after_the_first_cancel_the_answer_once() -> None:
    """A batch with several stopping events (cancelling, then cancelled):
    one cancel of the answer, whose cancelling() count its timeouts read."""

    async def cancel_requested() -> bool:
        return False

    answer = await _winding_down()
    watch = execute._CancelWatch(answer, cancel_requested)
    try:
        watch.on_event(Event("thread.run.cancelling", {}))
        watch.on_event(Event("thread.run.cancelled", {}))
        assert watch.stopped and answer.cancelling() == 1
    finally:
        watch.close()
        await asyncio.gather(answer, return_exceptions=True)
