"""A run this process's API queues again with its tool outputs is kept for
its own worker, and on SQLite handed back to it as a new run is handed
(issue 17): no wake, tick or claim statement for a function call's answer.
Its earlier messages are read first and must be unchanged at the hand-off's
COMMIT; whatever is off (a cancel first, a message changed, a long thread,
PostgreSQL) leaves the run to the tick's claim, answered once."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import delete, select

from app import orm
from app.runtime import Runtime
from app.services import run_execution, runs
from app.services.projects import Project
from app.wire.runs import SubmitToolOutputs
from app.worker import Worker
from tests.runner.helpers import until
from tests.runner.test_hand_off import (
    _ON_POSTGRES,
    _ON_SQLITE,
    _count_hand_offs,
    _counted,
    _create,
    _looping,
    _row,
    bare_runtime,
    sqlite_runtime,
)
from tests.runner.test_instant_answer import _ANSWERED, _event_names

__all__ = ["bare_runtime", "sqlite_runtime"]  # (fixtures, by import)

pytestmark = pytest.mark.timeout(30)

_PROJECT = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# What a function call's answer logs after the submit's events: the instant answer, read from the output.
_ANSWERED_BACK = [*_ANSWERED, "thread.run.step.completed", "thread.run.completed"]


async def _waiting_for_its_call(runtime: Runtime, worker: Worker, *earlier: str) -> orm.Run:
    """A new thread (its user messages ``earlier``, then one asking for the
    weather) and run, executed by ``worker`` until it waits in requires_action."""
    run = await _create(runtime, worker, (*earlier, "Weather? [[call get_weather]]"), tools=_TOOLS)
    await worker.run_until_idle()
    row = await _row(runtime, run.id)
    assert row.status == "requires_action", row.last_error
    return row


async def _submit(runtime: Runtime, worker: Worker, waiting: orm.Run) -> orm.Run:
    """Its call answered ("sunny") as the API answers it (api/runs.py's
    submit_tool_outputs: reserved for ``worker``), not handed yet."""
    calls = waiting.required_action["submit_tool_outputs"]["tool_calls"]  # type: ignore[index]
    body = SubmitToolOutputs.model_validate(
        {"tool_outputs": [{"tool_call_id": c["id"], "output": "sunny"} for c in calls]}
    )
    async with runtime.transaction() as session:
        run, events = await runs.submit_tool_outputs(
            session, _PROJECT, waiting.thread_id, waiting.id, body, worker.reservation()
        )
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    return run


async def _answer_of(runtime: Runtime, run_id: str) -> str:
    """The text of the run's last message (the offline model's answer)."""
    async with runtime.transaction() as session:
        query = select(orm.Message).where(orm.Message.run_id == run_id).order_by(orm.Message.seq.desc())
        message = (await session.scalars(query)).first()
    assert message is not None
    return str(message.content[0]["text"]["value"])


@_ON_SQLITE
async def test_a_run_back_from_its_call_is_handed_back_without_a_claim(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    waiting = await _waiting_for_its_call(runtime, worker, "I am in Tokyo.")
    before = await _event_names(runtime, waiting.id)
    submitted = await _submit(runtime, worker, waiting)
    assert submitted.lease_owner == run_execution.reserved_for(worker.owner)  # kept for this worker
    handed, claims = _count_hand_offs(monkeypatch), _counted(monkeypatch, "claim_and_start")
    assert worker.hand(submitted)
    await worker._handed()
    try:
        assert [execution.finished for execution in handed] == [True] and not claims
        row = await _row(runtime, waiting.id)
        assert row.status == "completed" and row.lease_owner is None
        names = await _event_names(runtime, waiting.id)
        assert names == [*before, "thread.run.step.completed", "thread.run.queued", *_ANSWERED_BACK]
        assert "sunny" in await _answer_of(runtime, waiting.id)  # its prompt had the call's output
    finally:
        await worker.stop()


@_ON_SQLITE
async def test_a_hand_back_loses_to_a_cancel_and_the_run_stays_cancelled(sqlite_runtime: Runtime) -> None:
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    submitted = await _submit(runtime, worker, await _waiting_for_its_call(runtime, worker))
    async with runtime.transaction() as session:
        _answer, events = await runs.cancel(session, _PROJECT, submitted.thread_id, submitted.id)
        await runtime.run_log.append(session, submitted.id, events, run_locked=True)
    assert worker.hand(submitted)
    await worker._handed()
    try:
        assert (await _row(runtime, submitted.id)).status == "cancelled"
        names = await _event_names(runtime, submitted.id)
        assert names[-1] == "thread.run.cancelled" and names.count("thread.run.in_progress") == 1  # its first start
    finally:
        await worker.stop()


@_ON_SQLITE
async def test_a_hand_back_whose_earlier_messages_changed_after_its_read_is_claimed_instead(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message before the run deleted between the hand-back's read and its
    COMMIT: the compare-and-set misses, nothing is written, and the tick's
    claim answers the run from the thread as it is now."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    submitted = await _submit(runtime, worker, await _waiting_for_its_call(runtime, worker, "first"))
    original = run_execution.note_resumed

    async def then_deleted(reader: Any, run: orm.Run) -> bool:
        noted = await original(reader, run)
        async with runtime.transaction() as session:
            first = select(orm.Message.id).where(orm.Message.thread_id == run.thread_id).order_by(orm.Message.seq)
            await session.execute(delete(orm.Message).where(orm.Message.id == (await session.scalars(first)).first()))
        return noted

    monkeypatch.setattr(run_execution, "note_resumed", then_deleted)
    handed = _count_hand_offs(monkeypatch)
    assert worker.hand(submitted)
    await worker._handed()
    try:
        assert not handed and (await _row(runtime, submitted.id)).status == "queued"  # nothing of it written
        assert worker._wakeup.is_set()  # woken: its claim takes the run
        await worker.run_until_idle()
        assert (await _row(runtime, submitted.id)).status == "completed"
        assert (await _event_names(runtime, submitted.id))[-len(_ANSWERED_BACK) :] == _ANSWERED_BACK
    finally:
        await worker.stop()


@_ON_SQLITE
async def test_a_run_on_a_long_thread_is_claimed_not_handed_back(
    sqlite_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More earlier messages than the claim's prefetch: its prompt reads and
    truncates them, which the hand-back does not; the tick claims it."""
    runtime = sqlite_runtime
    worker = _looping(Worker(runtime))
    earlier = [f"message {n}" for n in range(run_execution.PREFETCH_MOST_MESSAGES)]
    submitted = await _submit(runtime, worker, await _waiting_for_its_call(runtime, worker, *earlier))
    handed, claims = _count_hand_offs(monkeypatch), _counted(monkeypatch, "claim_and_start")
    assert worker.hand(submitted)
    await worker._handed()
    try:
        assert not handed and worker._wakeup.is_set()
        assert not [record for record in caplog.records if "handing run" in record.getMessage()]  # quietly
        await worker.run_until_idle()
        assert claims and (await _row(runtime, submitted.id)).status == "completed"
    finally:
        await worker.stop()


@_ON_POSTGRES
async def test_postgresql_claims_a_run_back_from_its_call(bare_runtime: Runtime) -> None:
    """PostgreSQL's hand-off is one statement for a run never started: a
    run back from its call, reserved for this worker, is its tick's to claim."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    submitted = await _submit(runtime, worker, await _waiting_for_its_call(runtime, worker))
    assert submitted.lease_owner == run_execution.reserved_for(worker.owner)
    try:
        assert not worker.hand(submitted)
        await worker.run_until_idle()
        assert (await _row(runtime, submitted.id)).status == "completed"
    finally:
        await worker.stop()


async def test_a_submit_loads_nothing_into_its_session_and_writes_its_steps(bare_runtime: Runtime) -> None:
    """submit_tool_outputs reads its run and its waiting steps as records
    (no ORM instance in the session: nothing for a flush) and writes the
    steps' completion itself: the step is stored completed with the output."""
    runtime = bare_runtime
    worker = _looping(Worker(runtime))
    waiting = await _waiting_for_its_call(runtime, worker)
    (call,) = waiting.required_action["submit_tool_outputs"]["tool_calls"]  # type: ignore[index]
    body = SubmitToolOutputs.model_validate({"tool_outputs": [{"tool_call_id": call["id"], "output": "sunny"}]})
    async with runtime.transaction() as session:
        run, events = await runs.submit_tool_outputs(session, _PROJECT, waiting.thread_id, waiting.id, body)
        assert not session.identity_map and not (session.new or session.dirty)
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    try:
        assert [event.name for event in events] == ["thread.run.step.completed", "thread.run.queued"]
        async with runtime.transaction() as session:
            (step,) = (await session.scalars(select(orm.RunStep).where(orm.RunStep.run_id == run.id))).all()
        assert step.status == "completed" and step.completed_at is not None
        assert step.step_details["tool_calls"][0]["function"]["output"] == "sunny"
        assert (await _row(runtime, run.id)).status == "queued"
    finally:
        await worker.stop()


async def test_a_function_calls_answer_through_the_api_is_answered_from_this_process(
    app: FastAPI, http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submit_tool_outputs, streamed: the run kept for this process's worker
    (on SQLite handed back to it) and answered with the call's output."""
    runtime: Runtime = app.state.runtime
    worker = runtime.worker
    assert worker is not None
    handed = _count_hand_offs(monkeypatch)
    assistant = (await http.post("/v1/assistants", json={"model": "m", "tools": _TOOLS})).json()["id"]
    message = {"role": "user", "content": "Weather? [[call get_weather]]"}
    body = {"assistant_id": assistant, "thread": {"messages": [message]}}
    run = (await http.post("/v1/threads/runs", json=body)).json()
    path = f"/v1/threads/{run['thread_id']}/runs/{run['id']}"

    async def waiting() -> bool:
        nonlocal run
        run = (await http.get(path)).json()
        return bool(run["status"] == "requires_action")

    await until(waiting, "the run waiting for its call's output")
    handed.clear()
    await until(lambda: worker._looping and not worker._ticking, "the worker's loop waiting")
    outputs = [
        {"tool_call_id": c["id"], "output": "sunny"}
        for c in run["required_action"]["submit_tool_outputs"]["tool_calls"]
    ]
    async with http.stream(
        "POST", f"{path}/submit_tool_outputs", json={"tool_outputs": outputs, "stream": True}
    ) as answer:
        text = "".join([chunk async for chunk in answer.aiter_text()])
    names = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["thread.run.step.completed", "thread.run.queued"]
    assert names[-2:] == ["thread.run.completed", "done"]
    assert "sunny" in text
    if not runtime.run_log.postgres and handed:  # (a poll tick under way at the submit claims it instead)
        assert [execution.finished for execution in handed] == [True]
