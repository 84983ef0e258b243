"""A streamed answer's reader hands its stream over (execute._HandOver):
past the first events, which a task of its own reads (the quick answer's
gathering), the model's answer is read on in the run's own task, one task
wake-up a token instead of two (issue 17). What the reader did with the
stream, the run's task does after it: a failure is the run's, a
CancelledError from inside the stream is a server error, the stream is
closed however the answer ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app import llm
from app.runtime import Runtime
from app.wire.events import Event
from app.worker import Worker
from tests.runner.test_quick_answer import _USAGE, _message, _provider, _run, _written_message
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.timeout(60)

_DEADLINE_SECONDS = 30.0


async def _streamed_run(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, script: Any, go_on: asyncio.Event
) -> tuple[str, asyncio.Task[None], asyncio.Future[None]]:
    """One run answered by ``script``, which waits for ``go_on`` after its
    first event: once its message is written (the answer streamed, the
    reader asked to hand over), ``go_on`` is set. The run, its task, and
    the worker's run_until_idle()."""
    _provider(runtime, monkeypatch, script)
    (run_id,) = await _make_runs(runtime, 1)
    worker = Worker(runtime, concurrency=1)
    working = asyncio.ensure_future(worker.run_until_idle())
    try:
        await _written_message(runtime, run_id)
        return run_id, worker._tasks[run_id], working
    finally:
        go_on.set()


async def test_past_its_first_events_the_answer_is_read_in_the_runs_task(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first event is read in the reader's task; once the model has been
    silent (the answer is streamed) the reader takes one more event and
    stops, and every later step of the stream runs in the run's own task.
    The run completes with the whole text, the stream closed once, by the
    run's task (not left past its Finish for the loop's finalizer to close
    in a task of its own)."""
    go_on = asyncio.Event()
    readers: list[asyncio.Task[object] | None] = []
    closed: list[asyncio.Task[object] | None] = []

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        try:
            readers.append(asyncio.current_task())
            yield llm.TextDelta("Hello")
            await go_on.wait()
            readers.append(asyncio.current_task())
            yield llm.TextDelta(" wide")  # the reader's last event
            for word in (" world", "!"):
                readers.append(asyncio.current_task())
                yield llm.TextDelta(word)
            readers.append(asyncio.current_task())
            yield llm.Finish("stop", _USAGE)
        finally:
            closed.append(asyncio.current_task())

    run_id, run_task, working = await _streamed_run(runtime, monkeypatch, streamed, go_on)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await working
    reader = readers[0]
    assert reader is not None and reader is not run_task
    assert readers[1] is reader  # the event after the ask: still the reader's
    assert readers[2:] == [run_task, run_task, run_task]  # the rest in the run's task
    assert closed == [run_task]
    assert (await _run(runtime, run_id)).status == "completed"
    message = await _message(runtime, run_id)
    assert message is not None and message.content[0]["text"]["value"] == "Hello wide world!"


async def test_a_cancelled_error_from_inside_the_handed_stream_fails_the_run(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CancelledError out of the stream after the hand-over (a library's
    cancel scope leaking), in the run's task but not its cancel: the run
    fails with the server error the reader made of it, keeping its text."""
    go_on = asyncio.Event()
    raised_in: list[asyncio.Task[object] | None] = []

    async def interrupted(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await go_on.wait()
        yield llm.TextDelta(" world")  # the reader's last event
        raised_in.append(asyncio.current_task())
        raise asyncio.CancelledError

    run_id, run_task, working = await _streamed_run(runtime, monkeypatch, interrupted, go_on)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await working
    assert raised_in == [run_task]
    run = await _run(runtime, run_id)
    assert run.status == "failed"
    assert run.last_error == {"code": "server_error", "message": "The model stream was interrupted."}
    message = await _message(runtime, run_id)
    assert message is not None and message.content[0]["text"]["value"] == "Hello world"


async def test_a_cancel_of_the_run_after_the_hand_over_closes_the_stream(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run cancelled while its task waits on the handed stream: the run
    ends cancelled and the provider's stream is closed before the worker
    is done with the run (not left to the garbage collector)."""
    go_on = asyncio.Event()
    handed = asyncio.Event()
    closed: list[bool] = []

    async def hanging(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        try:
            yield llm.TextDelta("Hello")
            await go_on.wait()
            yield llm.TextDelta(" world")  # the reader's last event
            handed.set()
            await asyncio.Event().wait()  # the model goes silent, in the run's task
            yield llm.Finish("stop", _USAGE)
        finally:
            closed.append(True)

    run_id, _task, working = await _streamed_run(runtime, monkeypatch, hanging, go_on)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await handed.wait()
        runtime.bus.publish(run_id, [Event("thread.run.cancelling", {"id": run_id})])
        await working
    assert closed == [True]
    assert (await _run(runtime, run_id)).status == "cancelled"
