"""A folded run's first model call goes out before its create answers
(issue 17: Worker.answer_after, RunExecution.open_first_call): opened by
the hand-off once the create has committed (on PostgreSQL while the create's
statement is out, no more than its first event read until the commit), its
reading taken by the run's task as any call's, made once; closed when
nothing takes it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app import llm, orm
from app.runner import execute
from app.runtime import Runtime
from app.settings import Settings
from tests.runner.helpers import DEADLINE, streamed_to_end, until
from tests.runner.test_hand_off import _assistant, _never_at_once, _row
from tests.runner.test_hand_off_early import _worker, handing_runtime
from tests.runner.test_start_folded import _executed, _noting, _queue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def runtime(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    """As test_start_folded's: a worker attached, its ticks driven by each
    test, the offline model taken for a provider's (streamed, never at once);
    on PostgreSQL once its listener hears the assistants' changes (the
    defaults read after it are vouched for: test_first_call_vouched)."""
    async with handing_runtime(settings) as rt:
        monkeypatch.setattr(rt.llm, "streams", lambda _model: True)
        monkeypatch.setattr(rt.llm, "answer_at_once", _never_at_once)
        if rt.run_log.postgres:
            await until(lambda: rt.run_log.listening, "the runtime's listener to listen")
        yield rt


def _calls(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, order: list[str], *, then: str = "answer", reads: bool = False
) -> asyncio.Event:
    """Each model call noted in ``order``: "call sent" when its stream is
    first read (the request goes out there), "closed" when it is closed,
    and with ``reads`` "event read" as each of its events is taken;
    ``then``: "answer" (the model's answer), "ready" (that answer made
    first, then read with no wait between its events, as an answer already
    in the socket's buffer is), "fail" (a rate limit), "hang"
    (nothing more, until closed). The event returned is set at a close."""
    closed = asyncio.Event()
    real_stream = runtime.llm.stream

    async def stream(request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        order.append("call sent")
        try:
            if then == "fail":
                raise llm.LLMError("rate_limit_exceeded", "Slow down.")
            if then == "hang":
                await asyncio.Event().wait()
            answer = real_stream(request)
            if then == "ready":
                answer = _at_once([event async for event in answer])
            async for event in answer:
                if reads:
                    order.append("event read")
                yield event
        finally:
            order.append("closed")
            closed.set()

    monkeypatch.setattr(runtime.llm, "stream", stream)
    return closed


async def _at_once(events: list[llm.Event]) -> AsyncIterator[llm.Event]:
    for event in events:
        yield event


async def test_the_first_call_goes_out_before_the_create_answers_and_is_made_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order: list[str] = []
    _calls(runtime, monkeypatch, order)
    run, response = await _queue(runtime, assistant)
    order.append("answered")
    assert json.loads(bytes(response.body))["status"] == "queued"
    await _executed(runtime)
    assert order == ["call sent", "answered", "closed"], order
    row = await _row(runtime, run.id)
    assert row.status == "completed" and row.lease_owner is None
    assert not worker._calls_out and not worker._handing and not worker._tasks


async def test_a_failed_early_call_fails_the_run_as_any_first_call_would(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant = await _assistant(runtime)
    order: list[str] = []
    _calls(runtime, monkeypatch, order, then="fail")
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    assert order.count("call sent") == 1, order
    row = await _row(runtime, run.id)
    assert row.status == "failed" and row.last_error == {"code": "rate_limit_exceeded", "message": "Slow down."}


async def test_a_streamed_create_answers_once_its_runs_task_waits_for_a_silent_model(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed, the create waits for the run's task's first step
    (Worker.answer_after), not for the answer: a model that says nothing
    holds no stream's head back."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order: list[str] = []
    closed = _calls(runtime, monkeypatch, order, then="hang")
    run, response = await _queue(runtime, assistant, stream=True)
    order.append("answered")
    assert order == ["call sent", "answered"] and worker.executes(run.id), order
    assert not worker._under_way
    worker._tasks[run.id].cancel()  # (the model never answers)
    await asyncio.wait_for(closed.wait(), DEADLINE)
    await response._follower.close()  # type: ignore[attr-defined]  # (never sent: the stream's end never comes)


async def test_a_run_task_cancelled_before_its_first_step_closes_the_early_call(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker stopping between the hand-off and the run's first step:
    the task never runs execute(), its done callback closes the call."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order: list[str] = []
    closed = _calls(runtime, monkeypatch, order, then="hang")
    real_start = worker._start

    def start_then_cancel(execution: execute.RunExecution, claimed_at: float) -> None:
        real_start(execution, claimed_at)
        worker._tasks[execution.run_id].cancel()

    monkeypatch.setattr(worker, "_start", start_then_cancel)
    await _queue(runtime, assistant)
    await asyncio.wait_for(closed.wait(), DEADLINE)
    assert order == ["call sent", "closed"], order


async def test_an_execution_that_ends_before_taking_the_early_call_closes_it_first(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run failed before its answer was asked for (here its call step
    raising): the call is closed before the execution ends."""
    assistant = await _assistant(runtime)
    order: list[str] = []
    _calls(runtime, monkeypatch, order, then="hang")

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the turn cannot be made")

    monkeypatch.setattr(execute.RunExecution, "_call", broken)
    real_execute = execute.RunExecution.execute

    async def execute_noted(self: execute.RunExecution) -> None:
        await real_execute(self)
        order.append("execution ended")

    monkeypatch.setattr(execute.RunExecution, "execute", execute_noted)
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    # Closed, and its reader ended, before the execution: nothing of the
    # run left running once its task has (the worker's stop waits for it).
    assert order == ["call sent", "closed", "execution ended"], order
    row = await _row(runtime, run.id)
    assert row.status == "failed" and row.last_error == dict(execute.SERVER_ERROR)


async def test_a_create_whose_hand_off_opens_no_call_is_answered_all_the_same(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No prompt built by the hand-off (its run left to start()): the create
    waits no longer once the hand-off has ended; the run's task calls."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order: list[str] = []
    _calls(runtime, monkeypatch, order)

    async def unbuilt(*_args: Any, **_kwargs: Any) -> None:
        return None

    monkeypatch.setattr(execute.RunExecution, "take_started", unbuilt)
    run, _response = await _queue(runtime, assistant)
    order.append("answered")
    await _executed(runtime)
    assert order == ["answered", "call sent", "closed"], order
    assert (await _row(runtime, run.id)).status == "completed"
    assert not worker._calls_out


_ON_POSTGRES = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def _held_until_the_call_is_out(order: list[str], *, then_fail: bool = False) -> Any:
    """A ``then`` for _noting(): the create's statement waits until the
    run's first call has gone out (a call sent only once the create has
    committed never goes: the wait's deadline fails the test), then goes
    ("statement sent", "created" once it has committed: autocommitted), or
    fails as a lost connection fails it."""

    async def then(session: Any, run_id: str, events: list[Any], append: Any, **kwargs: Any) -> Any:
        # (Within the test's own timeout, so that a call that never goes is
        # named: it goes within milliseconds.)
        await until(lambda: "call sent" in order, "the first call to go out before the create's statement", 10)
        order.append("statement sent")
        if then_fail:
            raise OperationalError("the create's statement", {}, ConnectionResetError("connection lost"))
        entries = await append(session, run_id, events, **kwargs)
        order.append("created")
        return entries

    return then


async def _held_create(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, *, then_fail: bool = False, then: str = "answer"
) -> tuple[str, list[str], list[str], asyncio.Event]:
    """An assistant, and the next create's statement held until its first
    call is out (_held_until_the_call_is_out), its calls' events noted:
    (the assistant, the order of the call and the statement, _noting()'s
    order, the event set when the call closes)."""
    assistant = await _assistant(runtime)
    order: list[str] = []
    noted = _noting(runtime, monkeypatch, then=_held_until_the_call_is_out(order, then_fail=then_fail))
    closed = _calls(runtime, monkeypatch, order, then=then, reads=True)
    return assistant, order, noted, closed


@_ON_POSTGRES
async def test_postgres_the_first_call_goes_out_while_the_create_is_out_and_is_read_on_once_it_has_committed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant, order, noted, _closed = await _held_create(runtime, monkeypatch)
    worker = _worker(runtime)
    run, _response = await _queue(runtime, assistant)
    await _executed(runtime)
    assert order.index("call sent") < order.index("statement sent") < order.index("created"), order
    # The answer's first event may be read before the commit; nothing after it.
    assert order[: order.index("created")].count("event read") <= 1, order
    assert order.count("event read") > 1 and order.count("call sent") == 1 and order[-1] == "closed", order
    assert "claimed" not in noted and (await _row(runtime, run.id)).status == "completed"
    assert not worker._calls_out and not worker._handing and not worker._tasks


@_ON_POSTGRES
async def test_postgres_a_streamed_create_whose_answer_came_while_it_was_out_has_the_runs_end_sent_first(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its answer already read when the create commits, the run's task takes
    it and sends the run's end before the stream's head is written (issue
    17: written while that statement is out, not ahead of it); answered as
    JSON, the create answers first (test above: the poll that follows is
    held while the end is out)."""
    assistant, order, noted, _closed = await _held_create(runtime, monkeypatch, then="ready")
    run, response = await _queue(runtime, assistant, stream=True)
    noted.append("answered")
    names = await streamed_to_end(response)
    await _executed(runtime)
    assert order.index("statement sent") < order.index("created"), order
    began = noted.index("executing")
    assert noted.index("create sent") < began < noted.index("sent", began) < noted.index("answered"), noted
    assert names[0] == "thread.created" and names[-2:] == ["thread.run.completed", "done"], names
    assert (await _row(runtime, run.id)).status == "completed"


@_ON_POSTGRES
async def test_postgres_a_create_that_fails_with_its_first_call_out_closes_the_call_unread(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant, order, noted, closed = await _held_create(runtime, monkeypatch, then_fail=True)
    worker = _worker(runtime)
    with pytest.raises(OperationalError):
        await _queue(runtime, assistant)
    await asyncio.wait_for(closed.wait(), DEADLINE)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    await worker.run_until_idle()
    assert order.count("call sent") == 1 and order.count("event read") <= 1 and order[-1] == "closed", order
    assert "executing" not in noted and not worker._tasks and not worker._calls_out
    async with runtime.transaction() as session:
        assert (await session.scalars(select(orm.Run.id).where(orm.Run.status != "completed"))).all() == []


@_ON_POSTGRES
async def test_postgres_a_create_slower_than_the_lease_closes_its_early_call(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_start_folded's create that commits past its lease's give-up
    moment, its run left to the claim: the call sent while it was out is
    closed with the hand-off, the claim's execution making its own."""
    assistant = await _assistant(runtime)
    worker = _worker(runtime)
    order: list[str] = []
    closed = _calls(runtime, monkeypatch, order, then="hang")
    held = _held_until_the_call_is_out(order)

    async def slow(session: Any, run_id: str, events: list[Any], append: Any, **kwargs: Any) -> Any:
        entries = await held(session, run_id, events, append, **kwargs)
        monkeypatch.setattr(worker.leases, "give_up_at", lambda _claimed_at: 0.0)  # a whole lease went by
        return entries

    noted = _noting(runtime, monkeypatch, then=slow)
    await _queue(runtime, assistant)
    await asyncio.wait_for(worker._handed(), DEADLINE)
    await asyncio.wait_for(closed.wait(), 10)  # (named, within the test's timeout: it closes at once)
    assert order == ["call sent", "statement sent", "created", "closed"], order
    assert "executing" not in noted and not worker._tasks
