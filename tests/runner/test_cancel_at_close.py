"""A cancel that reaches the executor while the model's text before a tool
call is being closed (Turn._close_message, not deferred: the text becomes a
completed message of its own, in a transaction of its own): the cancelled
run's message keeps the text the server had and streamed, completed if the
close committed, incomplete if it rolled back, never empty. Also the tool
call's step: a cancel at its insert's COMMIT loses nothing streamed. And a
run the reaper ends while its executor still streams (expired): the open
message and step, swept, still get what was streamed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from app import ids, llm, orm
from app.runner import execute
from app.runner.turn import Turn
from app.runtime import Runtime
from app.services import run_steps
from app.wire.events import Event
from app.worker import Worker
from tests.runner.helpers import until
from tests.runner.test_answer_in_task import _cancelled_at_the_commit, _streamed
from tests.runner.test_carried_end import _a_delta_logged, _logged
from tests.runner.test_faults import _short_busy_timeout
from tests.runner.test_quick_answer import _USAGE, _message, _provider, _run, _written_message
from tests.runner.test_worker import _make_runs

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])]

_DEADLINE_SECONDS = 20
_TEXT = "Let me look that up."


def _text_then_a_tool_call(go_on: asyncio.Event | None = None) -> Any:
    """A model that streams text, then (once ``go_on`` is set, if given) a
    tool call's first piece, then stays silent until cancelled."""

    async def answering(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta(_TEXT)
        if go_on is not None:
            await go_on.wait()
        yield llm.ToolCallDelta(0, id="call_model", name="lookup", arguments='{"q": ')
        await asyncio.Event().wait()
        yield llm.Finish("tool_calls", _USAGE)

    return answering


def _answering(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, go_on: asyncio.Event | None = None) -> None:
    """The model above, streamed (read in the executor's own task, so the
    text's close is a transaction of its own, not left for the run's end)."""
    _provider(runtime, monkeypatch, _text_then_a_tool_call(go_on))
    _streamed(runtime, monkeypatch)


def _cancelled_before_the_commit(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """The run's cancel reaches its executor at the first await of the
    transaction logging ``written`` from its events' append on (the
    append's statement on PostgreSQL, which is then cancelled and the
    transaction rolled back; on SQLite, whose append is held back for the
    COMMIT, the COMMIT, seen through)."""
    append = runtime.run_log.append

    async def cancelled_there(session: Any, run_id: str, events: list[Event], **options: Any) -> Any:
        if any(event.name == written for event in events):
            runtime.bus.publish(run_id, [Event("thread.run.cancelling", {"id": run_id})])
        return await append(session, run_id, events, **options)

    monkeypatch.setattr(runtime.run_log, "append", cancelled_there)


async def _cancelled(runtime: Runtime, run_id: str) -> orm.Message:
    """The run once the worker is done with it: cancelled; its message."""
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await Worker(runtime, concurrency=1).run_until_idle()
    assert (await _run(runtime, run_id)).status == "cancelled"
    message = await _message(runtime, run_id)
    assert message is not None
    return message


async def _steps(runtime: Runtime, run_id: str) -> list[orm.RunStep]:
    async with runtime.transaction() as session:
        query = select(orm.RunStep).where(orm.RunStep.run_id == run_id).order_by(orm.RunStep.seq)
        return list((await session.scalars(query)).all())


def _kept_text(message: orm.Message) -> None:
    """The streamed text is the message's, closed one way or the other."""
    assert message.status in ("completed", "incomplete")
    assert [part["text"]["value"] for part in message.content] == [_TEXT]


async def test_a_cancel_before_the_closes_commit_keeps_the_text(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel at the close's events' append: on PostgreSQL the close
    is rolled back and the message closed incomplete by the cancel, with
    its text; on SQLite the close goes with its COMMIT (seen through), the
    message completed. Its step matches it either way."""
    _answering(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    _cancelled_before_the_commit(runtime, monkeypatch, "thread.message.completed")
    message = await _cancelled(runtime, run_id)
    _kept_text(message)
    (step,) = await _steps(runtime, run_id)
    closed_as = "completed" if message.status == "completed" else "cancelled"
    assert (step.type, step.status) == ("message_creation", closed_as)


_CITED = {"type": "file_citation", "text": "[1]", "file_citation": {"file_id": "file_x"}, "start_index": 0}


def _decorated(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's decoration of its message at close (a built-in tool's
    citations, as file_search adds): what the text alone does not hold."""
    return [{"type": "text", "text": {**part["text"], "annotations": [_CITED]}} for part in content]


async def test_a_cancel_at_the_closes_commit_keeps_the_completed_message(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close committed (seen through), the executor told only
    "cancelled": the message stays completed with its text as the close
    decorated it; what the cancel then writes (save_partial: the text
    undecorated) does not undo, empty or overwrite it."""
    _answering(runtime, monkeypatch)
    monkeypatch.setattr(execute.RunExecution, "_decorate", lambda _self, _run, content: _decorated(content))
    (run_id,) = await _make_runs(runtime, 1)
    _cancelled_at_the_commit(runtime, monkeypatch, "thread.message.completed")
    message = await _cancelled(runtime, run_id)
    assert message.status == "completed" and message.incomplete_at is None
    assert message.content == [{"type": "text", "text": {"value": _TEXT, "annotations": [_CITED]}}]
    (step,) = await _steps(runtime, run_id)
    assert (step.type, step.status) == ("message_creation", "completed")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # SQLite's write lock
async def test_a_cancel_while_the_close_waits_for_sqlites_write_lock_keeps_the_text(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock while the text is closed;
    the cancel arrives meanwhile (at the close's COMMIT, which waits for the
    lock) and the lock is held past the busy timeout, so the close rolls
    back. Freed once the cancel is being handled: the run is cancelled, its
    message incomplete with the text the user saw streamed."""
    _short_busy_timeout(runtime)
    await runtime.engine.dispose()  # new connections get the short timeout
    go_on = asyncio.Event()
    _answering(runtime, monkeypatch, go_on)
    (run_id,) = await _make_runs(runtime, 1)
    _cancelled_at_the_commit(runtime, monkeypatch, "thread.message.completed")
    holder = sqlite3.connect(
        str(make_url(runtime.settings.database_url).database), isolation_level=None, check_same_thread=False
    )
    held: list[bool] = []
    save_partial = Turn.save_partial

    async def freeing_the_lock(turn: Turn) -> None:
        if held:
            held.clear()
            await asyncio.to_thread(holder.execute, "ROLLBACK")
        await save_partial(turn)

    monkeypatch.setattr(Turn, "save_partial", freeing_the_lock)
    try:
        worker = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
        await _written_message(runtime, run_id)
        # The text's delta logged (the flusher done) before the lock is taken.
        await until(lambda: _a_delta_logged(runtime, run_id), "the text's delta logged")
        await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
        held.append(True)
        go_on.set()
        async with asyncio.timeout(_DEADLINE_SECONDS):
            await worker
    finally:
        holder.close()
    assert not held  # the close waited for the lock and failed; the cancel freed it
    message = await _cancelled(runtime, run_id)
    assert message.status == "incomplete"
    _kept_text(message)


def _cancelled_at_the_tool_steps_commit(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """As _cancelled_at_the_commit, at the COMMIT of the tool calls step's insert."""
    append = runtime.run_log.append

    async def cancelled_there(session: Any, run_id: str, events: list[Event], **options: Any) -> Any:
        entries = await append(session, run_id, events, **options)
        if any(_a_tool_calls_step_created(event) for event in events):
            runtime.bus.publish(run_id, [Event("thread.run.cancelling", {"id": run_id})])
        return entries

    monkeypatch.setattr(runtime.run_log, "append", cancelled_there)


def _a_tool_calls_step_created(event: Event) -> bool:
    return (
        event.name == "thread.run.step.created" and isinstance(event.data, dict) and event.data["type"] == "tool_calls"
    )


async def test_a_cancel_at_the_commit_of_the_tool_calls_step_loses_nothing_streamed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tool calls step is the turn's only once inserted; a cancel at
    that insert's COMMIT (seen through: the step written, the executor told
    only "cancelled") finds no call streamed yet (the call's first delta
    follows the insert), so the step, cancelled, rightly holds none; the
    text before it is a completed message."""
    _answering(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    _cancelled_at_the_tool_steps_commit(runtime, monkeypatch)
    message = await _cancelled(runtime, run_id)
    assert message.status == "completed"
    _kept_text(message)
    steps = [(step.type, step.status, step.step_details) for step in await _steps(runtime, run_id)]
    assert steps[0][:2] == ("message_creation", "completed")
    assert steps[1] == ("tool_calls", "cancelled", {"type": "tool_calls", "tool_calls": []})
    logged = await _logged(runtime, run_id)
    assert [name for _seq, name, _data in logged if name == "thread.run.step.delta"] == []


async def _a_step_delta_logged(runtime: Runtime, run_id: str) -> bool:
    return any(name == "thread.run.step.delta" for _seq, name, _data in await _logged(runtime, run_id))


async def test_a_cancel_while_the_model_is_silent_mid_call_keeps_the_call(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's name and arguments so far, streamed, are the cancelled
    step's (save_partial), as the text before them is its message's."""
    _answering(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    worker = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
    await until(lambda: _a_step_delta_logged(runtime, run_id), "the call's first delta streamed (and logged)")
    runtime.bus.publish(run_id, [Event("thread.run.cancelling", {"id": run_id})])
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await worker
    message = await _cancelled(runtime, run_id)
    assert message.status == "completed"
    _kept_text(message)
    *_, step = await _steps(runtime, run_id)
    assert (step.type, step.status) == ("tool_calls", "cancelled")
    (call,) = step.step_details["tool_calls"]
    assert call["function"]["name"] == "lookup" and call["function"]["arguments"] == '{"q": '


@pytest.mark.parametrize("closed_as", ["completed", "incomplete", None], ids=["completed", "swept", "still-open"])
async def test_save_partial_keeps_a_completed_message_as_it_was_closed(runtime: Runtime, closed_as: str | None) -> None:
    """save_partial writes the turn's text into its message unless the
    message is completed (its close committed as the cancel arrived: left
    as it was closed); one swept incomplete meanwhile (content still empty)
    gets it, as one still in_progress. The turn's calls go into its tool
    step whatever the step's status (only sweeps close it before the turn
    ends)."""
    (run_id,) = await _make_runs(runtime, 1)
    turn = Turn(runtime, await _run(runtime, run_id))
    turn.text.append(_TEXT)
    await turn._write_message(turn._new_message())
    turn.tool_step = run_steps.new(turn.run, "tool_calls", {"type": "tool_calls", "tool_calls": []})
    await turn._insert([turn.tool_step], [])
    turn.calls[0] = {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{", "output": None}}
    closed_content = [{"type": "text", "text": {"value": "as closed", "annotations": []}}]
    if closed_as is not None:
        content = closed_content if closed_as == "completed" else []
        async with runtime.transaction() as session:
            closing = update(orm.Message).where(orm.Message.run_id == run_id)
            await session.execute(closing.values(status=closed_as, content=content))
            closing_step = update(orm.RunStep).where(orm.RunStep.run_id == run_id, orm.RunStep.type == "tool_calls")
            await session.execute(closing_step.values(status=closed_as if closed_as == "completed" else "expired"))
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await turn.save_partial()
    message = await _message(runtime, run_id)
    assert message is not None
    *_, step = await _steps(runtime, run_id)
    if closed_as == "completed":
        assert message.content == closed_content
    else:
        assert [part["text"]["value"] for part in message.content] == [_TEXT]
    assert step.step_details == {"type": "tool_calls", "tool_calls": [turn.calls[0]]}


def _text_then_maybe_a_call(with_call: bool) -> Any:
    """A model that streams text (and, ``with_call``, a tool call's first
    piece), then stays silent."""

    async def answering(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta(_TEXT)
        if with_call:
            yield llm.ToolCallDelta(0, id="call_model", name="lookup", arguments='{"q": ')
        await asyncio.Event().wait()
        yield llm.Finish("stop", _USAGE)

    return answering


@pytest.mark.parametrize("with_call", [False, True], ids=["text", "call"])
async def test_a_run_the_reaper_expires_while_it_streams_keeps_what_was_streamed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, with_call: bool
) -> None:
    """The reaper's close_out sweeps the open message (content not written
    yet: it is written at close) to incomplete and the open tool step to
    expired; the executor's watch then stops the turn, and save_partial
    still writes the text and the call into them: a swept row is no close
    of the turn's own (after the reviewer's scratch test of the branch)."""
    _provider(runtime, monkeypatch, _text_then_maybe_a_call(with_call))
    _streamed(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    worker = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
    await until(lambda: _a_delta_logged(runtime, run_id), "the text's delta logged")
    if with_call:
        await until(lambda: _a_step_delta_logged(runtime, run_id), "the call's first delta logged")
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(expires_at=ids.now() - 1))
    await Worker(runtime).reap()
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await worker
    assert (await _run(runtime, run_id)).status == "expired"
    message = await _message(runtime, run_id)
    assert message is not None
    steps = await _steps(runtime, run_id)
    if not with_call:
        assert message.status == "incomplete"
        _kept_text(message)
        (step,) = steps
        assert (step.type, step.status) == ("message_creation", "expired")
        return
    assert message.status == "completed"  # closed by the turn before the call
    _kept_text(message)
    assert [(step.type, step.status) for step in steps] == [
        ("message_creation", "completed"),
        ("tool_calls", "expired"),
    ]
    (call,) = steps[1].step_details["tool_calls"]
    assert call["function"]["name"] == "lookup" and call["function"]["arguments"] == '{"q": '
