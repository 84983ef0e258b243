"""PostgreSQL: a run created on an existing thread is handed to this
process's worker with its row (issue 17): its create reads the thread's last
messages in the statement that locks the thread (runs.create,
thread_lock.locked_with_column), and its insert, which goes with its events,
requires them unchanged (runs._live_only_if). A provider's run is then
started by its create (Worker.prepare's fold), an instant answer handed
off; neither is claimed. The lock statement's snapshot is taken before its
lock is granted: a message its holder committed meanwhile is missing from
what was read, the insert refuses, and the run is made again from fresh
reads and claimed, its prompt the thread as it is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.api import runs as api_runs
from app.runtime import Runtime
from app.services import new_rows, run_execution, runs, thread_lock
from app.services.projects import Project
from app.settings import Settings
from app.wire.events import Event
from app.wire.runs import RunCreate
from tests.runner.helpers import DEADLINE, until
from tests.runner.test_hand_off import (
    _assistant,
    _count_hand_offs,
    _counted,
    _histories,
    _never_at_once,
    _read_history,
    _row,
    _thread,
)
from tests.runner.test_hand_off_early import _worker, handing_runtime
from tests.runner.test_worker import user_message

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

_PROJECT = Project(id=orm.DEFAULT_PROJECT_ID, name="default")


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A runtime with a worker attached as the server's, its loop not
    started (each test drives it), on the offline model (instant answers)."""
    async with handing_runtime(settings) as rt:
        yield rt


@pytest.fixture
async def provider_runtime(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """``runtime`` whose model is taken for a provider's: answered
    streamed, never at once (the path of a provider's route)."""
    monkeypatch.setattr(runtime.llm, "streams", lambda _model: True)
    monkeypatch.setattr(runtime.llm, "answer_at_once", _never_at_once)
    return runtime


async def _queue_on(runtime: Runtime, thread_id: str, assistant_id: str, **fields: Any) -> list[orm.Run]:
    """POST /threads/{thread_id}/runs's create as the API makes it
    (api/runs.py's _queue_remembering, answered as JSON): the runs it made,
    the last one committed (a first attempt refused is made again)."""
    body = RunCreate.model_validate({"assistant_id": assistant_id, **fields})
    made: list[orm.Run] = []

    def change(remembered: bool) -> api_runs.QueueRun:
        async def create(session: AsyncSession, unwritten: new_rows.Unwritten) -> tuple[orm.Run, list[Event]]:
            run, events = await runs.create(
                session,
                _PROJECT,
                thread_id,
                body,
                expires_in=600,
                reservation=runtime.run_reservation(),
                remembered=remembered,
                unwritten=unwritten,
            )
            made.append(run)
            return run, events

        return create

    await api_runs._queue_remembering(runtime, _PROJECT, False, assistant_id, change)
    return made


async def _executed(runtime: Runtime) -> None:
    """Until the worker's hand-off, and the runs it took, have ended."""
    worker = _worker(runtime)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    if worker._tasks:
        await asyncio.wait_for(asyncio.gather(*worker._tasks.values()), DEADLINE)


def _texts(history: list[run_execution.EarlierMessage]) -> list[str]:
    return [message.content[0]["text"]["value"] for message in history]


async def test_a_provider_run_on_a_thread_is_started_by_its_create_with_the_threads_messages(
    provider_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its earlier messages, an earlier run's answer among them, and its own
    additional message, as its first prompt's history, with no claim: the
    run inserted started, leased to the worker, and executed."""
    runtime = provider_runtime
    claims, histories = _counted(monkeypatch, "claim_and_start"), _histories(monkeypatch)
    assistant_id = await _assistant(runtime)
    thread_id = await _thread(runtime, ["first", "second"])
    (earlier,) = await _queue_on(runtime, thread_id, assistant_id)
    await _executed(runtime)
    extra = {"role": "user", "content": "third"}
    (run,) = await _queue_on(runtime, thread_id, assistant_id, additional_messages=[extra])
    assert run_execution.handable(run) and run.status == "in_progress"  # (folded: Worker.prepare)
    await _executed(runtime)
    assert not claims
    assert (await _row(runtime, earlier.id)).status == (await _row(runtime, run.id)).status == "completed"
    history = histories[run.id]
    assert history == await _read_history(runtime, await _row(runtime, run.id))
    assert [message.role for message in history] == ["user", "user", "assistant", "user"]
    assert _texts(history)[:2] == ["first", "second"] and _texts(history)[3] == "third"


async def test_an_instant_answer_on_a_thread_is_handed_off_with_no_claim(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims, handed, histories = (
        _counted(monkeypatch, "claim_and_start"),
        _count_hand_offs(monkeypatch),
        _histories(monkeypatch),
    )
    assistant_id = await _assistant(runtime)
    thread_id = await _thread(runtime, ["first", "second"])
    (run,) = await _queue_on(runtime, thread_id, assistant_id)
    await _executed(runtime)
    assert [execution.finished for execution in handed] == [True] and not claims
    assert (await _row(runtime, run.id)).status == "completed"
    assert _texts(histories[run.id]) == ["first", "second"]


async def test_a_run_on_a_thread_longer_than_the_prefetch_is_not_noted_and_is_claimed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims, histories = _counted(monkeypatch, "claim_and_start"), _histories(monkeypatch)
    most = run_execution.PREFETCH_MOST_MESSAGES
    assistant_id = await _assistant(runtime)
    (run,) = await _queue_on(runtime, await _thread(runtime, [f"m{i}" for i in range(most + 1)]), assistant_id)
    assert not run_execution.handable(run)
    await _worker(runtime).run_until_idle()
    assert claims and (await _row(runtime, run.id)).status == "completed"
    assert len(histories[run.id]) == most + 1


async def test_a_message_committed_while_the_create_waited_for_the_threads_lock_is_in_the_runs_prompt(
    provider_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer holds the thread's lock (as a message's create holds
    it) and adds a message; the run's create waits for the lock, its read
    of the thread's messages made on the snapshot from before the wait.
    Once the writer commits, the run's insert finds the thread changed and
    refuses, nothing written; the run is made again from fresh reads (not
    noted, so not handed) and claimed, its prompt with the late message."""
    runtime = provider_runtime
    claims, histories = _counted(monkeypatch, "claim_and_start"), _histories(monkeypatch)
    assistant_id = await _assistant(runtime)
    thread_id = await _thread(runtime, ["first"])
    async with runtime.transaction() as holder:
        await thread_lock.active_run(holder, thread_id)  # the thread's lock, as a message's create takes it
        holder.add(user_message(thread_id, [{"type": "text", "text": {"value": "late", "annotations": []}}]))
        await holder.flush()
        creating = asyncio.create_task(_queue_on(runtime, thread_id, assistant_id))

        async def waiting_for_the_lock() -> bool:
            async with runtime.engine.connect() as connection:
                query = text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype IN ('tuple', 'transactionid')"
                )
                return bool((await connection.execute(query)).scalar())

        await until(waiting_for_the_lock, "the create to wait for the thread's lock")
        assert not creating.done()
    made = await asyncio.wait_for(creating, DEADLINE)
    run = made[-1]
    await _worker(runtime).run_until_idle()
    await _executed(runtime)
    assert (await _row(runtime, run.id)).status == "completed"
    assert _texts(histories[run.id]) == ["first", "late"]
    first, again = made  # refused, then made again
    assert run_execution.handable(first) and not run_execution.handable(again) and claims
    async with runtime.transaction() as session:
        assert await session.get(orm.Run, first.id) is None  # refused whole
    # (A first prompt built from the stale read while the refused statement
    # was out, if any, may have been sent, as a folded run's first call is
    # (execute.take_started), and closed unread past its first event when
    # the statement refused: test_first_call_out. The run it was for does
    # not exist.)
    assert _texts(histories.get(first.id, [])) in ([], ["first"])
