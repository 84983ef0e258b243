"""A model's answer taken in the executor's own task (RunExecution._consume,
issue 17: no task of its own): the cancel watch stops it by cancelling that
task, and the cancel is taken back as ``asyncio.timeout`` takes its own back,
so the task goes on with no cancel left over (TurnStopped), unless it was
cancelled from outside as well (then it stays cancelled) or an enclosing
timeout expired with it (then that is a TimeoutError). Also a whole run's
stalled, dropped or cancelled answer on both loops, and a consumed stream
closed by its turn (not by the loop's finalizer)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any, cast

import pytest

from app import llm
from app.runner import execute
from app.runner.turn import Turn, TurnResult, TurnStopped
from app.runtime import Runtime
from app.wire.events import Event
from app.worker import Worker
from tests.runner.test_quick_answer import _USAGE, _message, _provider, _run, _written_message
from tests.runner.test_worker import _make_runs

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])]

_RUN = "run_answer_in_task"
_OWNER = "test:0:answer"
_DEADLINE_SECONDS = 20
_STOP = [Event("thread.run.cancelling", {"id": _RUN})]

Take = Callable[[Turn, AsyncGenerator[llm.Event, None]], Awaitable[TurnResult]]


def _execution(runtime: Runtime, take: Take, monkeypatch: pytest.MonkeyPatch) -> execute.RunExecution:
    """An execution whose answer is ``take`` (the run's row never read: no cancel from elsewhere)."""
    execution = execute.RunExecution(runtime, _RUN, owner=_OWNER)

    async def no_cancel_elsewhere() -> bool:
        return False

    monkeypatch.setattr(execution, "_take", take)
    monkeypatch.setattr(execution, "_cancel_requested", no_cancel_elsewhere)
    return execution


async def _nothing() -> AsyncIterator[llm.Event]:
    return
    yield  # an async generator, never read here


async def _consume(execution: execute.RunExecution) -> TurnResult:
    return await execution._consume(cast(Turn, None), _nothing())


async def _nothing_left_over() -> None:
    """This task has no cancel pending or counted: its next await is
    uneventful and a timeout of its own is a TimeoutError."""
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await asyncio.sleep(_DEADLINE_SECONDS)


async def _stops_cleanly(execution: execute.RunExecution) -> None:
    """The answer ends in TurnStopped, nothing of the watch's cancel left on this task."""
    with pytest.raises(TurnStopped):
        await _consume(execution)
    await _nothing_left_over()


def _silent(answering: asyncio.Event) -> Take:
    """An answer that sets ``answering`` then waits for ever."""

    async def silent(_turn: Turn, _stream: AsyncGenerator[llm.Event, None]) -> TurnResult:
        answering.set()
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    return silent


async def _started(runtime: Runtime, answering: asyncio.Event, work: Awaitable[Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(work)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await answering.wait()
    assert runtime.bus.watched(_RUN)
    return task


async def test_the_watchs_cancel_stops_the_answer_and_is_taken_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    answering = asyncio.Event()
    execution = _execution(runtime, _silent(answering), monkeypatch)

    task = await _started(runtime, answering, _stops_cleanly(execution))
    runtime.bus.publish(_RUN, _STOP)
    await asyncio.wait_for(task, _DEADLINE_SECONDS)
    assert not runtime.bus.watched(_RUN)


@pytest.mark.parametrize("ending", ["returns", "raises"])
async def test_an_answer_that_swallows_the_watchs_cancel_still_stops(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The cancel reached the answer and it went on (a library's cleanup
    swallowing it, or turning it into its own error): TurnStopped all the
    same, and nothing of the cancel left on the task."""
    answering = asyncio.Event()

    async def swallowing(_turn: Turn, _stream: AsyncGenerator[llm.Event, None]) -> TurnResult:
        answering.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if ending == "raises":
                raise llm.LLMError("server_error", "The connection was closed.") from None
        return cast(TurnResult, "an answer")

    execution = _execution(runtime, swallowing, monkeypatch)

    task = await _started(runtime, answering, _stops_cleanly(execution))
    runtime.bus.publish(_RUN, _STOP)
    await asyncio.wait_for(task, _DEADLINE_SECONDS)


async def test_a_cancel_not_yet_delivered_when_the_answer_ends_is_taken_back_there(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stopping event published from the answering task itself, just
    before the answer returns: the cancel has no await of the answer's left
    to reach; it is let through in _consume, not at the executor's next
    await (a commit's)."""

    async def stopping_itself(_turn: Turn, _stream: AsyncGenerator[llm.Event, None]) -> TurnResult:
        runtime.bus.publish(_RUN, _STOP)
        return cast(TurnResult, "an answer")

    execution = _execution(runtime, stopping_itself, monkeypatch)

    await asyncio.wait_for(_stops_cleanly(execution), _DEADLINE_SECONDS)


@pytest.mark.parametrize("with_the_watch", [True, False], ids=["with-the-watchs", "alone"])
async def test_a_cancel_from_outside_stays_a_cancel(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, with_the_watch: bool
) -> None:
    """The worker stopping, say: the task ends cancelled, not in TurnStopped."""
    answering = asyncio.Event()
    execution = _execution(runtime, _silent(answering), monkeypatch)
    task = await _started(runtime, answering, _consume(execution))
    if with_the_watch:
        runtime.bus.publish(_RUN, _STOP)
    task.cancel()
    await asyncio.wait({task}, timeout=_DEADLINE_SECONDS)
    assert task.cancelled() and not runtime.bus.watched(_RUN)


async def test_an_enclosing_timeout_expiring_with_the_watch_is_a_timeout(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    answering = asyncio.Event()
    execution = _execution(runtime, _silent(answering), monkeypatch)
    limit: list[asyncio.Timeout] = []

    async def executing() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as timeout:
                limit.append(timeout)
                await _consume(execution)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    task = await _started(runtime, answering, executing())
    # Both in the same loop iteration: the timeout's cancel is scheduled, the watch's made now.
    limit[0].reschedule(asyncio.get_running_loop().time() - 1)
    runtime.bus.publish(_RUN, _STOP)
    await asyncio.wait_for(task, _DEADLINE_SECONDS)


async def test_an_answers_own_failure_is_the_answers(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(_turn: Turn, _stream: AsyncGenerator[llm.Event, None]) -> TurnResult:
        raise llm.LLMError("rate_limit_exceeded", "Slow down.")

    execution = _execution(runtime, failing, monkeypatch)

    async def executing() -> None:
        with pytest.raises(llm.LLMError, match="Slow down"):
            await _consume(execution)
        await _nothing_left_over()

    await asyncio.wait_for(executing(), _DEADLINE_SECONDS)
    assert not runtime.bus.watched(_RUN)


# Whole runs, on both loops ------------------------------------------------------


def _streamed(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers streamed, never taken whole: an observer that may wait (the
    stream is then read in the executor's own task, not by a reader task)."""

    async def observe(_exchange: llm.Exchange) -> None:
        pass

    monkeypatch.setattr(runtime.llm, "observer", observe)


@pytest.mark.parametrize("quick", [True, False], ids=["quick-path", "streamed-path"])
async def test_a_model_stalling_mid_answer_fails_the_run_keeping_its_text(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, quick: bool
) -> None:
    """The idle limit, in the reader's task (an answer that may be taken
    whole) or in the executor's own (an observer that may wait: streamed)."""
    monkeypatch.setattr(runtime, "settings", runtime.settings.model_copy(update={"model_idle_timeout_seconds": 0.3}))

    async def stalling(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await asyncio.Event().wait()
        yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, stalling)
    if not quick:
        _streamed(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await Worker(runtime, concurrency=1).run_until_idle()
    run = await _run(runtime, run_id)
    assert run.status == "failed" and run.last_error == {
        "code": "server_error",
        "message": "The model sent nothing for 0.3 seconds; the run was stopped.",
    }
    message = await _message(runtime, run_id)
    assert message is not None and message.status == "incomplete"
    assert message.content[0]["text"]["value"] == "Hello"


async def test_a_model_dropping_mid_answer_fails_the_run(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    go_on = asyncio.Event()

    async def dropping(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await go_on.wait()
        raise llm.LLMError("server_error", "The provider closed the connection mid-answer.")

    _provider(runtime, monkeypatch, dropping)
    (run_id,) = await _make_runs(runtime, 1)
    worker = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
    await _written_message(runtime, run_id)
    go_on.set()
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await worker
    run = await _run(runtime, run_id)
    assert run.status == "failed" and run.last_error == {
        "code": "server_error",
        "message": "The provider closed the connection mid-answer.",
    }


@pytest.mark.parametrize("quick", [True, False], ids=["quick-path", "streamed-path"])
async def test_a_cancel_mid_answer_cancels_the_run_and_the_worker_goes_on(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, quick: bool
) -> None:
    """The watch's cancel of the executor's own task, taken back: the run
    ends cancelled (its text and its provider's stream closed: in the
    reader's task, or in the executor's by its turn), and the same worker
    executes the other run."""
    closed: list[bool] = []

    async def answering(request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        hangs = "hang" in str(request.messages)
        # Closed wherever the cancel finds it: in its wait, or still at its
        # first yield (the executor cancelled while it writes the message,
        # before it asks for more: a close there never enters the wait).
        try:
            yield llm.TextDelta("Hello")
            if hangs:
                await asyncio.Event().wait()
            yield llm.Finish("stop", _USAGE)
        finally:
            if hangs:
                closed.append(True)

    _provider(runtime, monkeypatch, answering)
    if not quick:
        _streamed(runtime, monkeypatch)
    (hanging,) = await _make_runs(runtime, 1, text="hang")
    (other,) = await _make_runs(runtime, 1)
    working = asyncio.ensure_future(Worker(runtime, concurrency=1).run_until_idle())
    await _written_message(runtime, hanging)
    runtime.bus.publish(hanging, [Event("thread.run.cancelling", {"id": hanging})])
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await working
    assert (await _run(runtime, hanging)).status == "cancelled" and closed == [True]
    assert (await _run(runtime, other)).status == "completed"
    message = await _message(runtime, hanging)
    assert message is not None and message.content[0]["text"]["value"] == "Hello"


def _cancelled_at_the_commit(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """The run's cancel reaches its executor at the COMMIT of the
    transaction logging the event ``written`` (the next await after the
    append; seen through, so its rows are written and the executor told
    only "cancelled"). Deterministic, where the test above met it only under
    load (its cancel sent once the message's row was seen, the executor not
    yet resumed from that row's COMMIT)."""
    append = runtime.run_log.append

    async def cancelled_there(session: Any, run_id: str, events: list[Event], **options: Any) -> Any:
        entries = await append(session, run_id, events, **options)
        if any(event.name == written for event in events):
            runtime.bus.publish(run_id, [Event("thread.run.cancelling", {"id": run_id})])
        return entries

    monkeypatch.setattr(runtime.run_log, "append", cancelled_there)


async def _cancelled_run_keeps(runtime: Runtime, run_id: str, text: str) -> None:
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await Worker(runtime, concurrency=1).run_until_idle()
    assert (await _run(runtime, run_id)).status == "cancelled"
    message = await _message(runtime, run_id)
    assert message is not None and message.status == "incomplete"
    assert [part["text"]["value"] for part in message.content] == [text]


@pytest.mark.parametrize("quick", [True, False], ids=["quick-path", "streamed-path"])
async def test_a_cancel_at_the_commit_of_the_message_its_text_opened_keeps_the_text(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, quick: bool
) -> None:
    """The model's first text opens the run's message; the cancel reaches
    the executor at that message's COMMIT (written, the executor told only
    "cancelled"): the text the server had is in the cancelled run's
    incomplete message, as a cancel a moment later keeps it."""

    async def answering(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        await asyncio.Event().wait()
        yield llm.Finish("stop", _USAGE)

    _provider(runtime, monkeypatch, answering)
    if not quick:
        _streamed(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    _cancelled_at_the_commit(runtime, monkeypatch, "thread.message.created")
    await _cancelled_run_keeps(runtime, run_id, "Hello")


async def test_a_consumed_stream_is_closed_by_its_turn_not_by_the_loop(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer's generators are closed when the turn ends, not left
    suspended past the Finish for the loop's finalizer (a task and a wake-up
    from call_soon_threadsafe per turn), on the quick path and the instant one."""
    finalized: list[str] = []
    firstiter, finalizer = sys.get_asyncgen_hooks()
    assert finalizer is not None

    def finalizing(generator: AsyncGenerator[Any, None]) -> None:
        finalized.append(generator.ag_code.co_qualname)
        finalizer(generator)

    sys.set_asyncgen_hooks(firstiter, finalizing)  # (taken by each generator at its first step)
    try:
        await _runs_answered(runtime, monkeypatch)
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)
    assert [name for name in finalized if name.startswith(("_replay", "_arrivals", "_idle_limited"))] == []


async def _runs_answered(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs answered at once by the offline model, two quick ones by a
    provider, two streamed by it."""

    async def quick(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        yield llm.Finish("stop", _USAGE)

    run_ids = await _make_runs(runtime, 2)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await Worker(runtime, concurrency=1).run_until_idle()
    _provider(runtime, monkeypatch, quick)
    run_ids += await _make_runs(runtime, 2)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await Worker(runtime, concurrency=1).run_until_idle()
    _streamed(runtime, monkeypatch)
    run_ids += await _make_runs(runtime, 2)
    async with asyncio.timeout(_DEADLINE_SECONDS):
        await Worker(runtime, concurrency=1).run_until_idle()
    assert {(await _run(runtime, run_id)).status for run_id in run_ids} == {"completed"}


async def test_a_cancel_from_outside_that_the_answer_swallows_stays_a_cancel(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(review) The worker stopping or the lease lost, the cancel swallowed
    by the answer (a library's cleanup): the task still ends cancelled."""
    answering = asyncio.Event()

    async def swallowing(_turn: Turn, _stream: AsyncGenerator[llm.Event, None]) -> TurnResult:
        answering.set()
        with suppress(asyncio.CancelledError):  # swallowed, as a library's cleanup might
            await asyncio.Event().wait()
        return cast(TurnResult, "an answer")

    execution = _execution(runtime, swallowing, monkeypatch)
    task = await _started(runtime, answering, _consume(execution))
    task.cancel()
    await asyncio.wait({task}, timeout=_DEADLINE_SECONDS)
    assert task.cancelled()
