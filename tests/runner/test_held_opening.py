"""A streamed answer's opening (its step and message) is held back for the
run's end when the answer comes quickly, written on its own once
OPENING_HOLD_SECONDS pass, and written first by any other way a turn ends
(issue 17; app/runner/turn.py HeldOpening)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, update

from app import orm
from app.bus import Entry
from app.runner import execute
from app.runtime import Runtime
from app.services import run_state, runs
from app.wire.events import Event
from app.worker import Worker
from tests.runner.test_faults import DEADLINE, _answers, _running_worker, _stop, _until
from tests.runner.test_instant_answer import _ANSWERED, _event_names, _transactions_of, statements_by_transaction
from tests.runner.test_worker import _make_runs, _statuses

pytestmark = pytest.mark.timeout(60)


async def _cancel(runtime: Runtime, run_id: str) -> None:
    """What the API's cancel does to an executing run."""
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id, with_for_update=True)
        assert run is not None
        events = [Event.of(await run_state.transition(session, run, "cancelling"), runs.to_wire(run))]
        await runtime.run_log.append(session, run_id, events)


async def test_a_quick_streamed_answer_is_opened_by_the_runs_end(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim and end: two transactions for the run, the answer's rows and
    every event of it (deltas too, no flush of their own) in the end's."""
    monkeypatch.setattr(execute, "OPENING_HOLD_SECONDS", 60.0)  # however slow the machine
    (run_id,) = await _make_runs(runtime, 1, text="[[delay 1]] [[tokens 3]]")  # streamed, not at once
    with statements_by_transaction(runtime) as seen:
        async with asyncio.timeout(DEADLINE):
            await Worker(runtime, concurrency=1).run_until_idle()
    moved = sorted(_transactions_of(seen, "UPDATE runs SET status"))
    assert len(moved) == 2, seen  # the claim (in_progress), the end
    end = moved[1]
    assert _transactions_of(seen, "INSERT INTO messages") == {end}, seen
    assert _transactions_of(seen, "INSERT INTO run_steps") == {end}, seen
    assert _transactions_of(seen, "INSERT INTO run_events") <= set(moved), seen
    assert await _event_names(runtime, run_id) == [*_ANSWERED, "thread.run.step.completed", "thread.run.completed"]
    assert [(m.status, m.content[0]["text"]["value"]) for m in await _answers(runtime, run_id)] == [
        ("completed", "lorem ipsum dolor")
    ]


async def test_a_slow_answers_message_is_written_while_it_streams(runtime: Runtime) -> None:
    """Past the bound the opening is written on its own: the message is in
    the database, in progress, while the model is still answering."""
    worker, task = await _running_worker(runtime)
    try:
        (run_id,) = await _make_runs(runtime, 1, text="[[reply partial]] [[hang]]")

        async def opened() -> bool:
            return [m.status for m in await _answers(runtime, run_id)] == ["in_progress"]

        await _until(opened, "the answer's message to be written")
        assert await _statuses(runtime, [run_id]) == {run_id: "in_progress"}
        await _cancel(runtime, run_id)
        await _until(lambda: _is(runtime, run_id, "cancelled"), "the cancel")
        assert [(m.status, m.content[0]["text"]["value"]) for m in await _answers(runtime, run_id)] == [
            ("incomplete", "partial")
        ]
    finally:
        await _stop(worker, task)


async def _is(runtime: Runtime, run_id: str, status: str) -> bool:
    return await _statuses(runtime, [run_id]) == {run_id: status}


async def test_a_cancel_while_the_opening_is_held_writes_and_closes_it(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel before the bound: the held rows are written (the partial
    answer kept) and closed by the cancel's sweep, the log's events in a
    stream's order, each object created before it is closed."""
    monkeypatch.setattr(execute, "OPENING_HOLD_SECONDS", 60.0)
    published: list[str] = []
    runtime.bus.taps.append(lambda _run, events: published.extend(event.name for event in events))
    worker, task = await _running_worker(runtime)
    try:
        (run_id,) = await _make_runs(runtime, 1, text="[[reply partial]] [[hang]]")
        await _until(lambda: "thread.message.delta" in published, "the answer to start")
        assert await _answers(runtime, run_id) == []  # held back
        await _cancel(runtime, run_id)
        await _until(lambda: _is(runtime, run_id, "cancelled"), "the cancel")
        assert [(m.status, m.content[0]["text"]["value"]) for m in await _answers(runtime, run_id)] == [
            ("incomplete", "partial")
        ]
        assert await _event_names(runtime, run_id) == [
            *_ANSWERED[:-1],
            "thread.run.cancelling",
            "thread.run.step.cancelled",  # the cancel's sweep (runs.close_out)
            "thread.message.incomplete",
            "thread.run.cancelled",
        ]
    finally:
        await _stop(worker, task)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_followers_here_get_a_held_opening_at_once_on_sqlite(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process followers see the opening and the deltas as they come,
    numbered in order, while the rows wait (SQLite: run_log.deliver_early)."""
    monkeypatch.setattr(execute, "OPENING_HOLD_SECONDS", 60.0)
    worker, task = await _running_worker(runtime)
    try:
        (run_id,) = await _make_runs(runtime, 1, text="[[reply partial]] [[hang]]")
        seen: list[Entry] = []
        async with runtime.bus.follow(run_id) as queue:

            async def follow() -> bool:
                while not queue.empty():
                    entries = queue.get_nowait()
                    seen.extend(entries or [])
                return any(entry.event.name == "thread.message.delta" for entry in seen)

            await _until(follow, "the answer's first delta")
            assert await _answers(runtime, run_id) == []  # held back
            names = [entry.event.name for entry in seen]
            assert names[names.index("thread.run.step.created") :] == [
                "thread.run.step.created",
                "thread.run.step.in_progress",
                "thread.message.created",
                "thread.message.in_progress",
                "thread.message.delta",
            ]
            numbers = [entry.seq for entry in seen]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        await _cancel(runtime, run_id)
        await _until(lambda: _is(runtime, run_id, "cancelled"), "the cancel")
    finally:
        await _stop(worker, task)


async def test_an_opening_held_past_its_run_ending_elsewhere_is_dropped(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run ends elsewhere (the reaper expires it) while the answer's
    opening is held: once the bound passes nothing of it is written, no
    rows and no events after the run's last one (as the flusher drops an
    ended run's deltas)."""
    monkeypatch.setattr(execute, "OPENING_HOLD_SECONDS", 0.3)
    published: list[str] = []
    runtime.bus.taps.append(lambda _run, events: published.extend(event.name for event in events))
    worker, task = await _running_worker(runtime)
    try:
        (run_id,) = await _make_runs(runtime, 1, text="[[reply partial]] [[hang]]")
        await _until(lambda: "thread.message.delta" in published, "the answer to start")
        async with runtime.transaction() as session:
            await session.execute(
                update(orm.Run).where(orm.Run.id == run_id).values(status="expired", lease_owner=None)
            )
            logged = await session.scalar(select(func.max(orm.RunEvent.seq)).where(orm.RunEvent.run_id == run_id))
        assert runtime.run_log.held(run_id)
        await _until(lambda: not runtime.run_log.held(run_id), "the bound to pass")
        await _until(lambda: worker.busy == 0, "the execution to stop")
        async with runtime.transaction() as session:
            late = await session.scalar(
                select(func.count()).where(orm.RunEvent.run_id == run_id, orm.RunEvent.seq > (logged or 0))
            )
        assert late == 0
        assert await _answers(runtime, run_id) == []
    finally:
        await _stop(worker, task)
