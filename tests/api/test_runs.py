"""Runs through the official SDK: the seed flows, function calling, cancel,
locking; executed by the in-process worker with the built-in model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any

import aiosqlite
import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, func, select, update

from app import db, orm, sqlite_driver
from app.activity import ACTIVITY
from app.main import create_app
from app.services import projects, run_defaults
from app.settings import Settings
from tests.conftest import error_of
from tests.runner.helpers import until


async def _assistant(client: openai.AsyncOpenAI, **kwargs: object) -> str:
    assistant = await client.beta.assistants.create(model="gpt-4o", name="Math Tutor", **kwargs)  # type: ignore[arg-type]
    return assistant.id


async def test_math_tutor_flow(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client, instructions="You are a personal math tutor.")
    thread = await client.beta.threads.create()
    await client.beta.threads.messages.create(thread.id, role="user", content="I need to solve 3x + 11 = 14.")
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    assert run.status == "completed"
    assert run.started_at is not None and run.completed_at is not None
    assert run.expires_at is None
    assert run.usage is not None and run.usage.total_tokens > 0
    assert run.instructions == "You are a personal math tutor."
    listed = await client.beta.threads.messages.list(thread.id, order="asc")
    assert [m.role for m in listed.data] == ["user", "assistant"]
    answer = listed.data[1]
    assert answer.run_id == run.id and answer.assistant_id == assistant_id
    assert answer.status == "completed"
    assert answer.content[0].type == "text" and answer.content[0].text.value
    by_run = await client.beta.threads.messages.list(thread.id, run_id=run.id)
    assert [m.id for m in by_run.data] == [answer.id]
    steps = await client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
    assert len(steps.data) == 1
    step = steps.data[0]
    assert step.type == "message_creation" and step.status == "completed"
    assert step.step_details.message_creation.message_id == answer.id  # type: ignore[union-attr]
    runs = await client.beta.threads.runs.list(thread.id)
    assert [r.id for r in runs.data] == [run.id]


async def test_create_thread_and_run(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    run = await client.beta.threads.create_and_run_poll(
        assistant_id=assistant_id,
        thread={"messages": [{"role": "user", "content": "Hello there"}]},
    )
    assert run.status == "completed"
    messages = await client.beta.threads.messages.list(run.thread_id)
    assert messages.data[0].role == "assistant"


async def test_the_process_counts_itself_lone_again_once_its_requests_and_runs_have_ended(
    client: openai.AsyncOpenAI,
) -> None:
    """app/activity.py's counts, by which a lone process commits SQLite's
    transactions on the event loop's thread (issue 17), come back to zero
    after streamed and polled runs: a count left behind would keep every
    later commit off that path."""
    assistant_id = await _assistant(client)
    thread = {"messages": [{"role": "user", "content": "Hello there"}]}
    async with client.beta.threads.create_and_run_stream(assistant_id=assistant_id, thread=thread) as stream:
        await stream.until_done()
    run = await client.beta.threads.create_and_run_poll(assistant_id=assistant_id, thread=thread)  # type: ignore[arg-type]
    assert run.status == "completed"
    await until(lambda: (ACTIVITY.requests, ACTIVITY.runs) == (0, 0), "the counts back at zero", deadline=10)


def _hops_of_this_task(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the jobs the calling task sends to aiosqlite's thread
    (the in-process transport runs the SDK's request in the caller's task;
    the worker's, in tasks of its own, are left out). Every lone
    transaction on the loop's thread: not every ninth one on aiosqlite's,
    for its WAL checkpoint (sqlite_driver), which would make these counts
    depend on what the connection did before."""
    monkeypatch.setattr(sqlite_driver, "_LOOP_COMMITS_BETWEEN_THREAD_COMMITS", 10**9)
    caller = asyncio.current_task()
    sent: list[str] = []
    hop = aiosqlite.Connection._execute

    async def noting(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if asyncio.current_task() is caller:
            sent.append(repr(args))
        return await hop(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", noting)
    return sent


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_lone_processs_creates_on_a_thread_send_nothing_to_sqlites_thread(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's usual flow with one client: a message, then a run, created
    on a thread made first. Each create's transaction reads the thread (its
    owner and live run: a brief statement, db.BRIEF) before it writes; in a
    lone process that read, its writes and its COMMIT all run on the event
    loop's thread (issue 17: sqlite_driver's BRIEF), none of it sent to
    aiosqlite's thread, and the run completes as usual. (After a first
    run, whose create reads the assistant's defaults, on a reader of its
    own, and remembers them.)"""
    assistant_id = await _assistant(client)
    first = await client.beta.threads.create_and_run_poll(assistant_id=assistant_id, thread={})  # type: ignore[arg-type]
    assert first.status == "completed"
    thread = await client.beta.threads.create()
    await until(lambda: (ACTIVITY.requests, ACTIVITY.runs) == (0, 0), "the process lone", deadline=10)
    sent = _hops_of_this_task(monkeypatch)
    await client.beta.threads.messages.create(thread.id, role="user", content="Hello there")
    assert sent == []
    run = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    assert sent == []
    run = await client.beta.threads.runs.poll(run.id, thread_id=thread.id)
    assert run.status == "completed"
    listed = await client.beta.threads.messages.list(thread.id, order="asc")
    assert [message.role for message in listed.data] == ["user", "assistant"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_lone_processs_submit_tool_outputs_sends_nothing_to_sqlites_thread(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function call's answer, one client: submit_tool_outputs's
    transaction (the run, its waiting steps and its events, each by index:
    db.brief_on_sqlite) runs on the event loop's thread in a lone process
    (issue 17), nothing of it sent to aiosqlite's thread, and the run then
    completes with the output."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assistant_id = await _assistant(client, tools=tools)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Weather? [[call get_weather]]"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    assert run.status == "requires_action" and run.required_action is not None
    call = run.required_action.submit_tool_outputs.tool_calls[0]
    await until(lambda: (ACTIVITY.requests, ACTIVITY.runs) == (0, 0), "the process lone", deadline=10)
    sent = _hops_of_this_task(monkeypatch)
    run = await client.beta.threads.runs.submit_tool_outputs(
        run.id, thread_id=thread.id, tool_outputs=[{"tool_call_id": call.id, "output": "sunny"}]
    )
    assert run.status == "queued"
    assert sent == []
    run = await client.beta.threads.runs.poll(run.id, thread_id=thread.id)
    assert run.status == "completed"
    steps = await client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc")
    details = steps.data[0].step_details
    assert details.type == "tool_calls" and details.tool_calls[0].function.output == "sunny"  # type: ignore[union-attr]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("queued", [True, False], ids=["queued", "in progress"])
async def test_a_lone_processs_cancel_sends_nothing_to_sqlites_thread(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch, queued: bool
) -> None:
    """A cancel, one client: its transaction (the run and, for a run nobody
    executes, its steps and messages closed out, each by index:
    db.brief_on_sqlite) runs on the event loop's thread in a lone process
    (issue 17), nothing of it sent to aiosqlite's thread; the run ends
    cancelled, whether it was still queued or being answered."""
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[delay 200]] slow answer"}])
    runtime = app.state.runtime
    if queued:
        monkeypatch.setattr(runtime, "worker", None)  # nobody to execute it: the cancel closes it out itself
        monkeypatch.setattr(runtime, "wake", lambda **_: None)
    run = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    await until(lambda: ACTIVITY.requests == 0 and ACTIVITY.runs <= 1, "the process lone", deadline=10)
    sent = _hops_of_this_task(monkeypatch)
    cancelled = await client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert sent == []
    monkeypatch.undo()
    run = await client.beta.threads.runs.poll(run.id, thread_id=thread.id)
    assert run.status == "cancelled"


async def test_thread_and_run_takes_an_assistant_as_it_is_now(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """The assistant changed or deleted behind this process's back (another
    process sharing the database), after a run remembered its defaults
    (app/services/run_defaults.py): the next run takes it as it is now,
    and a deleted one is a 404; the attempt that found it changed left no
    thread behind."""
    assistant_id = await _assistant(client, instructions="Before.", temperature=0.5, tools=[{"type": "file_search"}])
    body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
    first = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
    assert (first.instructions, first.temperature) == ("Before.", 0.5)
    runtime = app.state.runtime
    for change in [
        {"instructions": "After."},
        {"temperature": 0.25},
        {"tools": [{"type": "code_interpreter"}]},
        {"response_format": {"type": "json_object"}},
    ]:
        async with runtime.transaction() as session:
            await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values(**change))
            threads_before = await session.scalar(select(func.count()).select_from(orm.Thread))
        run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        assert run.instructions == "After."
        if "temperature" in change or run.temperature != 0.5:
            assert run.temperature == 0.25
        if "tools" in change:
            assert [tool.type for tool in run.tools] == ["code_interpreter"]
        if "response_format" in change:
            assert run.response_format is not None and run.response_format.type == "json_object"  # type: ignore[union-attr]
        async with runtime.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(orm.Thread)) == threads_before + 1
    # A run on an existing thread checks the remembered defaults as well.
    thread = await client.beta.threads.create(messages=body["messages"])
    async with runtime.transaction() as session:
        await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values(model="gpt-4.1"))
    run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
    assert (run.model, run.instructions) == ("gpt-4.1", "After.")
    async with runtime.transaction() as session:
        await session.execute(delete(orm.Assistant).where(orm.Assistant.id == assistant_id))
    with pytest.raises(openai.NotFoundError) as refused:
        await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
    assert error_of(refused.value)["message"] == f"No assistant found with id '{assistant_id}'."


async def test_tool_choice_is_checked_against_the_assistant_as_it_is_now(
    client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """A tool_choice naming a function the assistant was given by another
    process after a run remembered its defaults (app/services/run_defaults.py,
    SQLite): checked against the assistant as it is now, not refused with
    the remembered tools; and a deleted assistant is a 404, not that 400."""
    assistant_id = await _assistant(client, tools=[{"type": "code_interpreter"}])
    body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
    await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
    function = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}
    runtime = app.state.runtime
    async with runtime.transaction() as session:  # as another process would
        await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values(tools=[function]))
    choice: Any = {"type": "function", "function": {"name": "g"}}
    run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body, tool_choice=choice)
    assert [tool.type for tool in run.tools] == ["function"] and run.tool_choice.function.name == "g"  # type: ignore[union-attr]
    # A run on an existing thread, the function again new to what was remembered.
    async with runtime.transaction() as session:
        await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values(tools=[]))
    run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
    assert run.tools == []
    thread = await client.beta.threads.create(messages=body["messages"])
    async with runtime.transaction() as session:
        both = [function, {"type": "code_interpreter"}]
        await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values(tools=both))
    run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant_id, tool_choice=choice)
    assert [tool.type for tool in run.tools] == ["function", "code_interpreter"]
    async with runtime.transaction() as session:
        await session.execute(delete(orm.Assistant).where(orm.Assistant.id == assistant_id))
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body, tool_choice=choice)


async def test_a_large_assistant_is_not_remembered(client: openai.AsyncOpenAI) -> None:
    """The remembered run defaults (app/services/run_defaults.py) keep no
    assistant whose stored values are large (instructions up to 256k
    characters, large tool schemas): a thousand of them would stay resident."""
    small = await _assistant(client, instructions="Short.")
    large = await _assistant(client, instructions="x" * (run_defaults.REMEMBERED_MAX_CHARS + 1))
    # Under the limit in characters, ~1 MB decoded: each "{}" is a dict.
    wide_schema = {"type": "object", "examples": [{}] * (run_defaults.REMEMBERED_MAX_CHARS // 5)}
    wide = await _assistant(client, tools=[{"type": "function", "function": {"name": "f", "parameters": wide_schema}}])
    body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
    for assistant_id in (small, large, large, wide, wide):
        run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        assert run.status == "queued" and run.assistant_id == assistant_id
    assert small in run_defaults._REMEMBERED
    assert large not in run_defaults._REMEMBERED and wide not in run_defaults._REMEMBERED


async def test_another_runtimes_change_of_the_assistant_reaches_the_next_run(
    client: openai.AsyncOpenAI, app: FastAPI, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runtimes on one database: the second updates, then deletes, the
    assistant between the first's creates, after the first remembered its
    defaults (app/services/run_defaults.py; the second's forget() cannot
    reach the first's memory, as in two processes). Each run of the first
    takes the assistant as it is now, on a new thread and on an existing
    one; the attempt that met the change left nothing half-written; a busy
    thread is still its 400; a deleted assistant is the documented 404."""
    monkeypatch.setattr(run_defaults, "forget", lambda _assistant_id: None)
    other = create_app(settings)
    body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
    async with (
        other.router.lifespan_context(other),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=other), base_url="http://testserver") as other_http,
    ):
        elsewhere = openai.AsyncOpenAI(
            base_url="http://testserver/v1", api_key="sk-test", http_client=other_http, max_retries=0
        )
        assistant_id = await _assistant(
            client, instructions="First.", tools=[{"type": "function", "function": {"name": "f"}}]
        )
        await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        assert run_defaults.remembered(projects.DEFAULT, assistant_id) is not None
        busy = await client.beta.threads.create(messages=[{"role": "user", "content": "[[call f]]"}])
        live = await client.beta.threads.runs.create_and_poll(thread_id=busy.id, assistant_id=assistant_id)
        assert live.status == "requires_action"
        idle = await client.beta.threads.create(messages=body["messages"])
        async with app.state.runtime.transaction() as session:
            counts = [await session.scalar(select(func.count()).select_from(table)) for table in _CREATED]
        await elsewhere.beta.assistants.update(assistant_id, instructions="Second.")
        run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        assert (run.assistant_id, run.instructions) == (assistant_id, "Second.")
        await elsewhere.beta.assistants.update(assistant_id, instructions="Third.", model="gpt-4.1")
        run = await client.beta.threads.runs.create(idle.id, assistant_id=assistant_id)
        assert (run.instructions, run.model) == ("Third.", "gpt-4.1")
        async with app.state.runtime.transaction() as session:
            after = [await session.scalar(select(func.count()).select_from(table)) for table in _CREATED]
        # Exactly what the two runs made: one thread and two runs (the attempts that met a change, none).
        assert [b - a for a, b in zip(counts, after, strict=True)] == [1, 2]
        await elsewhere.beta.assistants.update(assistant_id, instructions="Fourth.")
        with pytest.raises(openai.BadRequestError) as refused:
            await client.beta.threads.runs.create(busy.id, assistant_id=assistant_id)
        assert error_of(refused.value)["message"] == f"Thread {busy.id} already has an active run {live.id}."
        await elsewhere.beta.assistants.delete(assistant_id)
        missing = f"No assistant found with id '{assistant_id}'."
        with pytest.raises(openai.NotFoundError) as gone:
            await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        assert error_of(gone.value)["message"] == missing
        fresh = await client.beta.threads.create()
        with pytest.raises(openai.NotFoundError) as gone:
            await client.beta.threads.runs.create(fresh.id, assistant_id=assistant_id)
        assert error_of(gone.value)["message"] == missing


# What a create writes, counted by the test above.
_CREATED = (orm.Thread, orm.Run)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no other processes to wake
async def test_an_api_replicas_create_wakes_the_workers_with_its_own_commit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API replica (no worker in its process) on PostgreSQL: each create
    wakes the other processes' workers through the work channel, NOTIFYd by
    the create's own statement (delivered at its commit), not by a
    transaction of its own after it (db.notify_work: issue 17)."""
    settings.embedded_worker = False
    separately: list[object] = []

    async def notify_work(engine: object) -> None:
        separately.append(engine)

    monkeypatch.setattr(db, "notify_work", notify_work)
    replica = create_app(settings)
    async with (
        replica.router.lifespan_context(replica),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=replica), base_url="http://testserver") as http,
    ):
        sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=http, max_retries=0)
        listening, all_woken, woken = asyncio.Event(), asyncio.Event(), []

        def on_work(payload: str) -> None:
            woken.append(payload)
            if len(woken) == 4:
                all_woken.set()

        engine = replica.state.runtime.engine
        on_listening = lambda up: listening.set() if up else None  # noqa: E731
        listener = asyncio.create_task(db.listen(engine, db.WORK_CHANNEL, on_work, on_listening=on_listening))
        try:
            await asyncio.wait_for(listening.wait(), 10)
            assistant_id = await _assistant(client=sdk)
            body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
            for _remembered in range(2):  # read, then remembered defaults
                await sdk.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
                thread = await sdk.beta.threads.create()
                await sdk.beta.threads.runs.create(thread.id, assistant_id=assistant_id)
            await asyncio.wait_for(all_woken.wait(), 10)
            assert woken == [""] * 4
            assert separately == []
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def test_every_default_a_run_takes_is_checked() -> None:
    """What a run takes from its assistant is what the remembered path
    checks (app/services/run_defaults.py): AssistantDefaults' fields are
    RUN_TAKES, and the checked INSERT compares each (a field added to one
    without the other would let a run take a stale value)."""
    names = [field.name for field in dataclasses.fields(run_defaults.AssistantDefaults)]
    # (vouched_epoch: when they were read, not a value a run takes.)
    assert names == ["id", *run_defaults.RUN_TAKES, "stored", "vouched_epoch"]
    assert [column.name for column in run_defaults._CHECKED] == [
        "project_id",
        *run_defaults.RUN_TAKES,
    ]


def test_only_the_checked_insert_is_stale() -> None:
    """run_defaults.is_stale() knows the checked INSERT's failure by its
    class, not by the statement's text: another held-back write into runs
    that changed no row is no stale assistant."""
    other = sqlite_driver.HeldBackWriteMismatch("a held-back write changed 0 rows, not 1: INSERT INTO runs ...")
    assert not run_defaults.is_stale(other)
    assert run_defaults.is_stale(run_defaults.AssistantChanged("a held-back write changed 0 rows, not 1"))
    assert run_defaults.is_stale(run_defaults.StaleDefaults("asst_x"))


async def test_a_change_of_any_default_is_caught(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """Each column a run takes from its assistant, changed behind this
    process's back after a run remembered it: the next run is made from the
    assistant as it is now (its defaults read again), not refused."""
    changes: dict[str, Any] = {
        "model": "gpt-4.1",
        "instructions": "Changed.",
        "tools": [{"type": "code_interpreter"}],
        "temperature": 0.25,
        "top_p": 0.75,
        "response_format": {"type": "json_object"},
        "reasoning_effort": "low",
    }
    assert set(changes) == set(run_defaults.RUN_TAKES)
    body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
    for column, value in changes.items():
        assistant_id = await _assistant(client, instructions="Before.")
        await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        before = run_defaults._REMEMBERED[assistant_id]
        async with app.state.runtime.transaction() as session:
            await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant_id).values({column: value}))
        run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)
        assert run.status == "queued"
        after = run_defaults._REMEMBERED[assistant_id]
        assert getattr(after, column) == value != getattr(before, column), column


@pytest.mark.timeout(30)
async def test_thread_and_run_with_many_messages(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """A new thread of 2,500 messages and its run (the wire allows 100,000):
    on PostgreSQL not one statement of INSERT CTEs, which SQLAlchemy compiled
    in time quadratic in its rows and asyncpg refused past 32,767 parameters
    (a 500 after minutes of a frozen event loop): the run is queued and every
    message stored, in order."""
    assistant_id = await _assistant(client)
    words = [f"word{index}" for index in range(2500)]
    thread: Any = {"messages": [{"role": "user", "content": word} for word in words]}
    run = await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=thread)
    assert run.status == "queued"
    async with app.state.runtime.transaction() as session:
        stored = await session.scalars(
            select(orm.Message.content)
            .where(orm.Message.thread_id == run.thread_id, orm.Message.run_id.is_(None))
            .order_by(orm.Message.seq)
        )
        assert [content[0]["text"]["value"] for content in stored] == words


async def test_multi_round_function_calling(client: openai.AsyncOpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ]
    assistant_id = await _assistant(client, tools=tools)
    thread = await client.beta.threads.create(
        messages=[{"role": "user", "content": 'Weather? [[call get_weather {"city": "Tokyo"}]] [[call get_time]]'}]
    )
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    assert run.status == "requires_action", run.last_error
    assert run.required_action is not None
    calls = run.required_action.submit_tool_outputs.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Tokyo"}
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)

    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.runs.submit_tool_outputs(
            run.id, thread_id=thread.id, tool_outputs=[{"tool_call_id": calls[0].id, "output": "x"}]
        )
    assert (
        error_of(exc)["message"]
        == f"Expected tool outputs for call_ids {[c.id for c in calls]!r}, got {[calls[0].id]!r}"
    )

    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.messages.create(thread.id, role="user", content="interrupt")
    assert error_of(exc)["message"] == f"Can't add messages to {thread.id} while a run {run.id} is active."

    run = await client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id,
        thread_id=thread.id,
        tool_outputs=[
            {"tool_call_id": calls[0].id, "output": '{"temp": 22}'},
            {"tool_call_id": calls[1].id, "output": "noon"},
        ],
    )
    assert run.status == "completed", run.last_error
    steps = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc")).data
    assert [s.type for s in steps] == ["tool_calls", "message_creation"]
    tool_step = steps[0]
    assert tool_step.status == "completed"
    outputs = [c.function.output for c in tool_step.step_details.tool_calls]  # type: ignore[union-attr]
    assert outputs == ['{"temp": 22}', "noon"]


async def test_a_token_limit_too_large_to_store_is_a_400(client: openai.AsyncOpenAI) -> None:
    """max_prompt_tokens / max_completion_tokens go in INTEGER columns:
    beyond what both databases hold (2**31 - 1 on PostgreSQL; SQLite cannot
    bind 2**63) they are refused as any field out of range, not a 500."""
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    for field in ("max_prompt_tokens", "max_completion_tokens"):
        for value in (2**31, 2**63):
            with pytest.raises(openai.BadRequestError) as exc:
                await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, **{field: value})  # type: ignore[arg-type]
            assert error_of(exc)["message"] == (
                f"Invalid '{field}': integer above maximum value. Expected a value <= 2147483647, "
                f"but got {value} instead."
            )
            assert error_of(exc)["param"] == field
            with pytest.raises(openai.BadRequestError):
                await client.beta.threads.create_and_run(assistant_id=assistant_id, **{field: value})  # type: ignore[arg-type]
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant_id, max_prompt_tokens=2**31 - 1, max_completion_tokens=2**31 - 1
    )
    assert run.status == "completed" and run.max_prompt_tokens == 2**31 - 1


async def test_submit_when_not_waiting(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=thread.id, tool_outputs=[])
    assert error_of(exc)["message"] == 'Runs in status "completed" do not accept tool outputs.'
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    assert error_of(exc)["message"] == "Cannot cancel run with status 'completed'."


async def test_cancel_in_requires_action(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client, tools=[{"type": "function", "function": {"name": "f"}}])
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[call f]]"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    assert run.status == "requires_action"
    cancelled = await client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    assert cancelled.status == "cancelling"
    run = await client.beta.threads.runs.poll(run.id, thread_id=thread.id)
    assert run.status == "cancelled" and run.cancelled_at is not None
    step = (await client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)).data[0]
    assert step.status == "cancelled" and step.cancelled_at is not None
    # the thread is free again
    await client.beta.threads.messages.create(thread.id, role="user", content="again")


async def test_second_run_on_locked_thread(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client, tools=[{"type": "function", "function": {"name": "f"}}])
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[call f]]"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    assert error_of(exc)["message"] == f"Thread {thread.id} already has an active run {run.id}."


async def test_create_and_poll_needs_one_poll(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    """The SDK's poller waits server-side for the run to stop (issue 17)
    instead of sleeping openai-poll-after-ms between GETs; a plain retrieve
    of a running run still answers at once."""
    assistant_id = await _assistant(client)
    polls: list[str] = []

    async def count_polls(request: httpx2.Request) -> None:
        if request.method == "GET" and "/runs/" in request.url.path:
            polls.append(request.headers.get("x-stainless-poll-helper", ""))

    http.event_hooks["request"].append(count_polls)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[tokens 3]] [[delay 100]]"}])
    run = await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    running = await client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert running.status in ("queued", "in_progress")
    run = await client.beta.threads.runs.poll(run.id, thread_id=thread.id)
    assert run.status == "completed"
    assert polls == ["", "true"]


async def test_a_tool_choice_refused_against_the_requests_own_tools_is_not_retried(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool_choice refused against tools the request brings does not
    depend on the assistant: answered 400 at once, not taken for stale
    remembered defaults and the whole create made again from a fresh read."""
    assistant_id = await _assistant(client, tools=[{"type": "code_interpreter"}])
    body: Any = {"messages": [{"role": "user", "content": "Hello"}]}
    await client.beta.threads.create_and_run(assistant_id=assistant_id, thread=body)  # remembered
    reads: list[str] = []
    real = run_defaults.read

    async def counted(*args: Any) -> Any:
        reads.append(args[2])
        return await real(*args)

    monkeypatch.setattr(run_defaults, "read", counted)
    h: Any = {"type": "function", "function": {"name": "h", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError):
        await client.beta.threads.create_and_run(
            assistant_id=assistant_id,
            thread=body,
            tools=[h],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    assert reads == []
