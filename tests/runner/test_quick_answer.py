"""A streamed answer all of which arrives within QUICK_ANSWER_SECONDS of its
first event (a stub, a cache, a one-chunk reply) is written with the run's
move, as an instant answer is (issue 17: no opening of its own, no delta
flush); a slower one is streamed as before, its message written while the
model is still silent; a failure is the run's, whenever it comes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from app import llm, orm
from app.runner import execute
from app.runtime import Runtime
from app.worker import Worker
from tests.runner.test_instant_answer import _ANSWERED, _event_names, _transactions_of, statements_by_transaction
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.timeout(60)

_USAGE = llm.Usage(prompt_tokens=3, completion_tokens=2)


def _provider(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, script: Any) -> None:
    """The model answers through ``script`` (an async generator function of
    the request), streamed as a provider's answer is (never at once)."""

    async def not_at_once(_request: llm.ChatRequest) -> None:
        return None

    monkeypatch.setattr(runtime.llm, "answer_at_once", not_at_once)
    monkeypatch.setattr(runtime.llm, "stream", script)


async def _message(runtime: Runtime, run_id: str) -> orm.Message | None:
    async with runtime.transaction() as session:
        return (await session.scalars(select(orm.Message).where(orm.Message.run_id == run_id))).first()


async def _written_message(runtime: Runtime, run_id: str) -> orm.Message:
    """The run's message once it is in the database (the model still silent)."""
    async with asyncio.timeout(30):
        while True:
            message = await _message(runtime, run_id)
            if message is not None:
                return message
            await asyncio.sleep(execute.QUICK_ANSWER_SECONDS)


async def _run(runtime: Runtime, run_id: str) -> orm.Run:
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
    assert run is not None
    return run


async def test_an_answer_that_arrives_at_once_is_written_with_the_runs_end(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def quick(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await asyncio.sleep(0)  # another read of the provider's socket
        yield llm.TextDelta(" world")
        yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, quick)
    monkeypatch.setattr(execute, "QUICK_ANSWER_SECONDS", 30)  # however loaded the machine
    (run_id,) = await _make_runs(runtime, 1)
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    opened = _transactions_of(seen, "INSERT INTO messages")
    # By when they were sent: an end carried alone autocommits (-1: no
    # transaction; PostgreSQL sends it on a raw connection), after the start.
    moved = [number for number, statement in seen if "UPDATE runs SET status" in statement]
    assert len(opened) == 1 and opened == set(moved[-1:]), seen  # the message went with the end
    if runtime.run_log.postgres and opened == {-1}:  # autocommitted: the end's one statement holds both
        assert any("INSERT INTO messages" in s and "UPDATE runs SET status" in s for n, s in seen if n == -1), seen
    assert "INSERT INTO run_events" not in " ".join(s for n, s in seen if n not in moved), seen  # no flush
    assert await _event_names(runtime, run_id) == [*_ANSWERED, "thread.run.step.completed", "thread.run.completed"]
    message = await _message(runtime, run_id)
    assert message is not None and message.status == "completed"
    assert message.content[0]["text"]["value"] == "Hello world"
    assert (await _run(runtime, run_id)).usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_a_slower_answer_is_streamed_its_message_written_while_the_model_is_silent(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    go_on = asyncio.Event()

    async def slow(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await go_on.wait()
        yield llm.TextDelta(" world")
        yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, slow)
    (run_id,) = await _make_runs(runtime, 1)
    worker = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
    try:
        message = await _written_message(runtime, run_id)
        assert message.status == "in_progress" and not worker.done()
    finally:
        go_on.set()
        await worker
    message = await _message(runtime, run_id)
    assert message is not None and message.status == "completed"
    assert message.content[0]["text"]["value"] == "Hello world"
    assert (await _run(runtime, run_id)).status == "completed"
    assert await _event_names(runtime, run_id) == [*_ANSWERED, "thread.run.step.completed", "thread.run.completed"]


@pytest.mark.parametrize("pause", [False, True], ids=["at-once", "later"])
async def test_a_failure_after_the_first_event_fails_the_run_and_keeps_the_text(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, pause: bool
) -> None:
    go_on = asyncio.Event()

    async def failing(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        if pause:
            await go_on.wait()
        raise llm.LLMError("rate_limit_exceeded", "Slow down.")

    _provider(runtime, monkeypatch, failing)
    (run_id,) = await _make_runs(runtime, 1)
    worker = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
    if pause:
        await _written_message(runtime, run_id)
        go_on.set()
    async with asyncio.timeout(30):
        await worker
    run = await _run(runtime, run_id)
    assert run.status == "failed" and run.last_error == {"code": "rate_limit_exceeded", "message": "Slow down."}
    message = await _message(runtime, run_id)
    assert message is not None and message.status == "incomplete"
    assert message.content[0]["text"]["value"] == "Hello"


async def test_a_stream_cancelled_from_inside_fails_the_run(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CancelledError out of the model's stream (a library's cancel scope
    leaking), not the execution's own cancel: the run fails with a server
    error; the answer's reader ended with nothing handed on, and the run
    waited in_progress until its deadline."""

    async def interrupted(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        raise asyncio.CancelledError

    _provider(runtime, monkeypatch, interrupted)
    (run_id,) = await _make_runs(runtime, 1)
    async with asyncio.timeout(30):
        await Worker(runtime, concurrency=1).run_until_idle()
    run = await _run(runtime, run_id)
    assert run.status == "failed" and run.last_error == {
        "code": "server_error",
        "message": "The model stream was interrupted.",
    }


async def test_nothing_is_read_after_the_finish(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A turn ends at the model's Finish: what the stream would do after it
    is never asked for (read on, a failure after the Finish was recorded as
    the call's outcome, a second model request logged)."""
    read_after: list[bool] = []

    async def finishing(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        yield llm.Finish("stop", _USAGE)
        read_after.append(True)
        raise llm.LLMError("server_error", "after the end")

    _provider(runtime, monkeypatch, finishing)
    (run_id,) = await _make_runs(runtime, 1)
    await Worker(runtime, concurrency=1).run_until_idle()
    assert (await _run(runtime, run_id)).status == "completed" and read_after == []


async def test_a_quick_answer_calling_a_built_in_tool_is_streamed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file_search call arriving at once is not taken as a quick answer:
    a built-in tool streams its progress while it runs, so its step is
    written (and its events sent) before the tool executes, not held for
    the turn's commit."""
    calls: list[int] = []

    async def searching(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        calls.append(len(calls))
        if len(calls) == 1:
            yield llm.ToolCallDelta(0, id="call_1", name="file_search", arguments='{"query": "zebras"}')
            yield llm.Finish("tool_calls", _USAGE)
        else:
            yield llm.TextDelta("Nothing found.")
            yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, searching)
    monkeypatch.setattr(execute, "QUICK_ANSWER_SECONDS", 30)  # however loaded the machine
    (run_id,) = await _make_runs(runtime, 1)
    worker = Worker(runtime, concurrency=1)
    steps_when_searched: list[list[str]] = []
    tool = worker.builtins["file_search"]
    real_execute = tool.execute

    async def execute_tool(*args: Any) -> Any:
        async with runtime.transaction() as session:
            steps = await session.scalars(select(orm.RunStep.type).where(orm.RunStep.run_id == run_id))
            steps_when_searched.append(list(steps))
        return await real_execute(*args)

    monkeypatch.setattr(tool, "execute", execute_tool)
    await worker.run_until_idle()
    assert steps_when_searched == [["tool_calls"]]
    assert (await _run(runtime, run_id)).status == "completed"
    message = await _message(runtime, run_id)
    assert message is not None and message.content[0]["text"]["value"] == "Nothing found."


async def test_a_nul_in_a_providers_answer_is_kept_and_the_run_completes(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider's answer with a NUL character: stored as given and the run
    completed on both databases (PostgreSQL's jsonb refused the escape, and
    the run was retried until it expired; json keeps the text as SQLite
    does)."""

    async def answer(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("a\x00b")
        yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, answer)
    (run_id,) = await _make_runs(runtime, 1)
    await asyncio.wait_for(Worker(runtime, concurrency=1).run_until_idle(), 30)
    assert (await _run(runtime, run_id)).status == "completed"
    message = await _message(runtime, run_id)
    assert message is not None and message.content[0]["text"]["value"] == "a\x00b"
