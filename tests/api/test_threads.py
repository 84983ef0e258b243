"""Threads through the official SDK (and raw HTTP where the SDK cannot send
the shape under test), on both databases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import orm
from tests.conftest import error_of
from tests.runner.helpers import until

BETA = {"OpenAI-Beta": "assistants=v2"}


@pytest.fixture
async def client(http: httpx2.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The SDK with strict response validation: a response that does not
    parse as the SDK's own type fails the test."""
    yield openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key="sk-test",
        http_client=http,
        max_retries=0,
        _strict_response_validation=True,
    )


async def new_file(client: openai.AsyncOpenAI, name: str = "a.txt") -> str:
    return (await client.files.create(file=(name, b"hi"), purpose="assistants")).id


async def counts(app: FastAPI) -> tuple[int, int]:
    """(threads, messages) in the store."""
    async with app.state.runtime.transaction() as session:
        threads = await session.scalar(select(func.count()).select_from(orm.Thread))
        messages = await session.scalar(select(func.count()).select_from(orm.Message))
    return int(threads or 0), int(messages or 0)


async def test_create_with_empty_body_and_with_no_body(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    before = int(time.time())
    thread = await client.beta.threads.create()
    assert thread.id.startswith("thread_")
    assert thread.object == "thread"
    assert before <= thread.created_at <= int(time.time())
    assert thread.metadata == {} and thread.tool_resources is not None
    assert thread.tool_resources.model_dump(exclude_none=True) == {}

    response = await http.post("/v1/threads", headers=BETA)  # no body, no content type
    assert response.status_code == 200, response.text
    raw = response.json()
    assert raw["object"] == "thread" and raw["metadata"] == {} and raw["tool_resources"] == {}
    assert raw["id"] != thread.id

    response = await http.post("/v1/threads", headers={**BETA, "content-type": "application/json"}, content=b"{}")
    assert response.status_code == 200, response.text


async def test_create_with_messages_of_every_content_kind(client: openai.AsyncOpenAI) -> None:
    image = await new_file(client, "cat.png")
    doc = await new_file(client, "notes.txt")
    thread = await client.beta.threads.create(
        messages=[
            {"role": "user", "content": "Plain text", "metadata": {"n": "1"}},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look at these"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "high"}},
                    {"type": "image_file", "image_file": {"file_id": image}},
                ],
                "attachments": [{"file_id": doc, "tools": [{"type": "code_interpreter"}, {"type": "file_search"}]}],
            },
            {"role": "assistant", "content": "I see a cat."},
        ],
        metadata={"user": "alice"},
    )
    assert thread.metadata == {"user": "alice"}
    listed = (await client.beta.threads.messages.list(thread.id, order="asc")).data
    assert [m.role for m in listed] == ["user", "user", "assistant"]
    first, second, third = listed
    assert first.content[0].model_dump() == {"type": "text", "text": {"value": "Plain text", "annotations": []}}
    assert first.metadata == {"n": "1"} and first.attachments == []
    assert [part.type for part in second.content] == ["text", "image_url", "image_file"]
    assert second.content[1].model_dump(exclude_none=True) == {
        "type": "image_url",
        "image_url": {"url": "https://example.com/cat.png", "detail": "high"},
    }
    assert second.content[2].model_dump(exclude_none=True) == {"type": "image_file", "image_file": {"file_id": image}}
    assert second.attachments is not None
    assert [a.model_dump(exclude_none=True) for a in second.attachments] == [
        {"file_id": doc, "tools": [{"type": "code_interpreter"}, {"type": "file_search"}]}
    ]
    for message in listed:
        assert message.thread_id == thread.id
        assert message.status == "completed" and message.completed_at is not None
        assert message.assistant_id is None and message.run_id is None
        assert message.created_at >= thread.created_at
    assert third.content[0].text.value == "I see a cat."  # type: ignore[union-attr]


async def test_create_with_tool_resources_and_retrieve(client: openai.AsyncOpenAI) -> None:
    files = [await new_file(client, f"f{i}.csv") for i in range(2)]
    created = await client.beta.threads.create(
        tool_resources={"code_interpreter": {"file_ids": files}, "file_search": {"vector_store_ids": []}},
        metadata={"a": "b"},
    )
    assert created.tool_resources is not None
    assert created.tool_resources.code_interpreter is not None
    assert created.tool_resources.code_interpreter.file_ids == files
    fetched = await client.beta.threads.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()


async def test_modify_metadata_and_tool_resources(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    file_a, file_b = await new_file(client), await new_file(client)
    thread = await client.beta.threads.create(
        metadata={"keep": "me"}, tool_resources={"code_interpreter": {"file_ids": [file_a]}}
    )
    updated = await client.beta.threads.update(thread.id, metadata={"v": "2"})
    assert updated.metadata == {"v": "2"}  # metadata is replaced, not merged
    assert updated.tool_resources == thread.tool_resources

    # tool_resources replaces the whole object
    updated = await client.beta.threads.update(thread.id, tool_resources={"file_search": {"vector_store_ids": []}})
    assert updated.tool_resources is not None and updated.tool_resources.code_interpreter is None
    updated = await client.beta.threads.update(thread.id, tool_resources={"code_interpreter": {"file_ids": [file_b]}})
    assert updated.tool_resources is not None and updated.tool_resources.code_interpreter is not None
    assert updated.tool_resources.code_interpreter.file_ids == [file_b]
    assert updated.tool_resources.file_search is None

    # go-openai's ModifyThreadRequest sends "metadata": null on every call: "unchanged".
    response = await http.post(f"/v1/threads/{thread.id}", headers=BETA, json={"metadata": None})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"v": "2"}
    response = await http.post(
        f"/v1/threads/{thread.id}", headers=BETA, json={"metadata": None, "tool_resources": None}
    )
    assert response.json()["tool_resources"] == {"code_interpreter": {"file_ids": [file_b]}}
    response = await http.post(f"/v1/threads/{thread.id}", headers=BETA, json={})
    assert response.json()["metadata"] == {"v": "2"}
    cleared = await client.beta.threads.update(thread.id, metadata={})
    assert cleared.metadata == {}
    assert (await client.beta.threads.retrieve(thread.id)).model_dump() == cleared.model_dump()


async def test_modify_rejects_the_create_only_vector_stores_helper(client: openai.AsyncOpenAI) -> None:
    thread = await client.beta.threads.create(metadata={"a": "b"})
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.update(
            thread.id, extra_body={"tool_resources": {"file_search": {"vector_stores": [{"file_ids": []}]}}}
        )
    assert error_of(exc) == {
        "message": "Unknown parameter: 'tool_resources.file_search.vector_stores'.",
        "type": "invalid_request_error",
        "param": "tool_resources.file_search.vector_stores",
        "code": "unknown_parameter",
    }
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.update(thread.id, extra_body={"messages": []})
    assert error_of(exc)["message"] == "Unknown parameter: 'messages'."
    assert (await client.beta.threads.retrieve(thread.id)).metadata == {"a": "b"}


async def test_delete_takes_the_messages_with_it(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    keep = await client.beta.threads.create(messages=[{"role": "user", "content": "stay"}])
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "one"}])
    await client.beta.threads.messages.create(thread.id, role="user", content="two")
    assert await counts(app) == (2, 3)

    deleted = await client.beta.threads.delete(thread.id)
    assert deleted.model_dump() == {"id": thread.id, "object": "thread.deleted", "deleted": True}
    assert await counts(app) == (1, 1)

    missing = f"No thread found with id '{thread.id}'."
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.threads.retrieve(thread.id)
    assert error_of(exc) == {"message": missing, "type": "invalid_request_error", "param": None, "code": None}
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.threads.messages.list(thread.id)
    assert error_of(exc)["message"] == missing
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.threads.messages.create(thread.id, role="user", content="three")
    assert error_of(exc)["message"] == missing
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.update(thread.id, metadata={"a": "b"})
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.delete(thread.id)
    assert [m.content[0].text.value for m in (await client.beta.threads.messages.list(keep.id)).data] == ["stay"]  # type: ignore[union-attr]


async def test_delete_takes_its_runs_logs_with_it(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """A deleted thread's runs' event logs go with it, by the delete itself
    (PostgreSQL's run_events has no foreign key to cascade: migration 0018);
    another thread's stay."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    runs = []
    for content in ("keep", "delete"):
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": content}])
        run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
        assert run.status == "completed"
        runs.append(run)
    kept, deleted = runs

    async def logged(run_id: str) -> int:
        async with app.state.runtime.transaction() as session:
            query = select(func.count()).select_from(orm.RunEvent).where(orm.RunEvent.run_id == run_id)
            return int(await session.scalar(query) or 0)

    assert await logged(deleted.id) > 0
    await client.beta.threads.delete(deleted.thread_id)
    assert await logged(deleted.id) == 0
    assert await logged(kept.id) > 0
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.runs.retrieve(deleted.id, thread_id=deleted.thread_id)


async def _a_delete_waits(engine: AsyncEngine) -> bool:
    """Whether a statement waits for a row lock (PostgreSQL)."""
    async with engine.connect() as connection:
        query = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype IN ('tuple', 'transactionid')")
        return bool((await connection.execute(query)).scalar())


async def _delete_once_committed(
    client: openai.AsyncOpenAI,
    thread_id: str,
    other: AsyncConnection,
    what: str,
    while_waiting: Callable[[AsyncConnection], Awaitable[object]] | None = None,
) -> None:
    """Delete the thread while ``other`` holds what it wrote uncommitted:
    the delete must wait for it (a lock not granted, ``what``), through
    ``while_waiting`` (more of ``other``'s work) too, then finish once
    ``other`` commits."""
    deleting = asyncio.ensure_future(client.beta.threads.delete(thread_id))
    try:
        async with asyncio.timeout(20):
            await until(lambda: _a_delete_waits(other.engine), what)
            if while_waiting is not None:
                await while_waiting(other)
            assert not deleting.done()
            await other.commit()
            assert (await deleting).deleted
    finally:
        deleting.cancel()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_delete_that_waits_for_an_append_takes_what_it_logged(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """Another process's append holds a run's row (FOR NO KEY UPDATE, as
    every append takes it) and has logged an event, uncommitted, when the
    thread is deleted: the delete of the runs waits for it, and the delete
    of their logs, after, sees the event once committed. (Logs deleted
    before the runs would miss it: no foreign key deletes it since 0018.)"""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    engine = app.state.runtime.engine
    async with engine.connect() as other:  # the other process's append, uncommitted
        await other.execute(text("SELECT id FROM runs WHERE id = :id FOR NO KEY UPDATE"), {"id": run.id})
        await other.execute(
            text(
                "INSERT INTO run_events (run_id, seq, event, data, created_at) "
                "VALUES (:id, 1000, 'thread.run.step.delta', CAST('{}' AS json), 0)"
            ),
            {"id": run.id},
        )
        await _delete_once_committed(client, thread.id, other, "the delete to wait for the run's lock")
    async with app.state.runtime.transaction() as session:
        query = select(func.count()).select_from(orm.RunEvent).where(orm.RunEvent.run_id == run.id)
        assert await session.scalar(query) == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_delete_waits_for_a_run_ending_without_a_deadlock(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """A run's end holds its run's row, then checks its thread's (a
    message's foreign key share-locks it) while the thread is deleted: the
    delete takes the runs' rows before the thread's, as the run does, so it
    waits for the end instead of deadlocking with it (PostgreSQL would abort
    one of them after deadlock_timeout: the delete, a 500)."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    engine = app.state.runtime.engine

    async def check_its_thread(other: AsyncConnection) -> None:
        # Its message's foreign key check; a deadlock would hold it for
        # deadlock_timeout (a second) and then fail the delete.
        async with asyncio.timeout(0.5):
            await other.execute(text("SELECT id FROM threads WHERE id = :id FOR KEY SHARE"), {"id": thread.id})

    async with engine.connect() as other:  # the run's end, uncommitted
        await other.execute(text("SELECT id FROM runs WHERE id = :id FOR NO KEY UPDATE"), {"id": run.id})
        await _delete_once_committed(client, thread.id, other, "the delete to wait for the run's end", check_its_thread)
    async with app.state.runtime.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(orm.Run).where(orm.Run.id == run.id)) == 0


async def _blocked_by(engine: AsyncEngine, blocker: AsyncConnection) -> bool:
    """Whether a backend waits for a lock ``blocker``'s backend holds (PostgreSQL)."""
    held_by = (await blocker.execute(text("SELECT pg_backend_pid()"))).scalar()
    async with engine.connect() as connection:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE CAST(:pid AS int) = ANY(pg_blocking_pids(pid))")
        return bool((await connection.execute(query, {"pid": held_by})).scalar())


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_delete_that_deadlocks_with_a_new_runs_end_is_made_again(
    client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """The one order the delete cannot avoid: a run created in the thread
    after the delete locked the thread's runs (its create committed while
    the delete waited for the thread's row) ends while the delete goes on.
    Its end holds the new run's row and wants the thread's (its message's
    foreign key); the delete holds the thread's and wants the run's.
    PostgreSQL fails the one whose deadlock_timeout passes first: here the
    delete, which waited first (the run's end here waits 30 s before it
    checks). The delete is made again, after the end, and succeeds: not a
    500."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    earlier = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    engine = app.state.runtime.engine
    new_run = {"thread": thread.id, "assistant": assistant.id}
    async with (
        engine.connect() as create,  # another process's create, then its run's end
        engine.connect() as end,
        engine.connect() as steps,  # holds the delete after it has the thread's row
    ):
        await end.execute(text("SET deadlock_timeout = '30s'"))
        await create.execute(
            text(
                "INSERT INTO runs (id, seq, created_at, thread_id, assistant_id, status, model, instructions, "
                "tools, metadata, parallel_tool_calls) VALUES ('run_late', 1, 1, :thread, :assistant, "
                "'in_progress', 'm', '', '[]', '{}', true)"
            ),
            new_run,
        )
        await steps.execute(text("SELECT id FROM run_steps WHERE run_id = :id FOR UPDATE"), {"id": earlier.id})
        deleting = asyncio.ensure_future(client.beta.threads.delete(thread.id))
        ending: asyncio.Future[object] | None = None
        try:
            async with asyncio.timeout(30):
                await until(lambda: _blocked_by(engine, create), "the delete to wait for the create")
                await create.commit()  # the delete now holds the thread's row
                await until(lambda: _blocked_by(engine, steps), "the delete to wait for the earlier run's steps")
                # The new run's end: its row first, as its UPDATE takes it.
                await end.execute(text("SELECT id FROM runs WHERE id = 'run_late' FOR NO KEY UPDATE"))
                await steps.commit()
                await until(lambda: _blocked_by(engine, end), "the delete to wait for the new run's end")
                # Then its message, whose foreign key share-locks the thread.
                message = {
                    "id": "msg_late",
                    "seq": 1,
                    "created_at": 1,
                    "thread_id": thread.id,
                    "role": "assistant",
                    "content": [],
                    "status": "completed",
                    "run_id": "run_late",
                    "metadata_": {},
                }
                ending = asyncio.ensure_future(end.execute(insert(orm.Message).values(**message)))
                await ending  # once PostgreSQL has failed the delete's transaction
                await end.commit()
                assert (await deleting).deleted
        finally:
            deleting.cancel()
            if ending is not None:
                ending.cancel()
    async with app.state.runtime.transaction() as session:
        left = select(func.count()).select_from(orm.Run).where(orm.Run.thread_id == thread.id)
        assert await session.scalar(left) == 0
        messages = select(func.count()).select_from(orm.Message).where(orm.Message.thread_id == thread.id)
        assert await session.scalar(messages) == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_delete_that_meets_a_run_being_created_takes_its_log(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """Another process's create has inserted a run in the thread and logged
    its opening event, uncommitted, when the thread is deleted: the delete
    waits for it (the thread's row lock) and then deletes that run's log
    too. (Without the lock the thread's delete took the run by its cascade
    and left the log: run_events has no foreign key since 0018.)"""
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    engine = app.state.runtime.engine
    async with engine.connect() as other:  # the other process's create, uncommitted
        await other.execute(
            text(
                "INSERT INTO runs (id, seq, created_at, thread_id, assistant_id, status, model, instructions, "
                "tools, metadata, parallel_tool_calls) VALUES ('run_racing', 1, 1, :thread, 'asst_x', 'queued', "
                "'m', '', '[]', '{}', true)"
            ),
            {"thread": thread.id},
        )
        await other.execute(
            text(
                "INSERT INTO run_events (run_id, seq, event, data, created_at) "
                "VALUES ('run_racing', 1, 'thread.run.created', CAST('{}' AS json), 0)"
            )
        )
        await _delete_once_committed(client, thread.id, other, "the delete to wait for the create")
    async with app.state.runtime.transaction() as session:
        runs = await session.scalar(select(func.count()).select_from(orm.Run).where(orm.Run.id == "run_racing"))
        query = select(func.count()).select_from(orm.RunEvent).where(orm.RunEvent.run_id == "run_racing")
        assert (runs, await session.scalar(query)) == (0, 0)


@pytest.mark.parametrize("operation", ["retrieve", "update", "delete"])
async def test_ids_are_checked(client: openai.AsyncOpenAI, operation: str) -> None:
    call = getattr(client.beta.threads, operation)
    with pytest.raises(openai.BadRequestError) as exc:
        await call("asst_abc")
    assert error_of(exc) == {
        "message": "Invalid 'thread_id': 'asst_abc'. Expected an ID that begins with 'thread'.",
        "type": "invalid_request_error",
        "param": "thread_id",
        "code": None,
    }
    with pytest.raises(openai.NotFoundError) as exc:
        await call("thread_doesnotexist")
    assert error_of(exc)["message"] == "No thread found with id 'thread_doesnotexist'."


def _message(**fields: Any) -> dict[str, Any]:
    return {"role": "user", "content": "hi", **fields}


BAD_CREATES = [
    pytest.param(
        {"messages": [_message(metadata={f"k{i}": "v" for i in range(17)})]},
        "messages[0].metadata",
        "object_above_max_properties",
        "Invalid 'messages[0].metadata': too many properties. Expected an object with at most 16 properties, "
        "but got an object with 17 properties instead.",
        id="message-metadata-too-many-keys",
    ),
    pytest.param(
        {"messages": [_message(), _message(metadata={"k": "v" * 513})]},
        "messages[1].metadata.k",
        "string_above_max_length",
        "Invalid 'messages[1].metadata.k': string too long. Expected a string with maximum length 512, "
        "but got a string with length 513 instead.",
        id="message-metadata-value-too-long",
    ),
    pytest.param(
        {"metadata": {"k" * 65: "v"}},
        "metadata",
        "string_above_max_length",
        None,
        id="metadata-key-too-long",
    ),
    pytest.param(
        {"metadata": {"k": "v" * 513}},
        "metadata.k",
        "string_above_max_length",
        None,
        id="metadata-value-too-long",
    ),
    pytest.param(
        {"file_ids": ["file-abc"]}, "file_ids", "unknown_parameter", "Unknown parameter: 'file_ids'.", id="v1-file_ids"
    ),
    pytest.param(
        {"messages": [_message(file_ids=["file-abc"])]},
        "messages[0].file_ids",
        "unknown_parameter",
        "Unknown parameter: 'messages[0].file_ids'.",
        id="v1-message-file_ids",
    ),
    pytest.param(
        {"messages": [{"content": "hi"}]},
        "messages[0].role",
        "missing_required_parameter",
        "Missing required parameter: 'messages[0].role'.",
        id="missing-role",
    ),
    pytest.param(
        {"messages": [_message(role="system")]},
        "messages[0].role",
        "invalid_value",
        "Invalid value: 'system'. Supported values are: 'user' and 'assistant'.",
        id="bad-role",
    ),
    pytest.param(
        {"messages": [_message(content=[])]},
        "messages[0].content",
        "empty_array",
        "Invalid 'messages[0].content': empty array. Expected an array with minimum length 1, "
        "but got an empty array instead.",
        id="empty-content",
    ),
    pytest.param(
        {"messages": [_message(content={"type": "text", "text": "hi"})]},
        "messages[0].content",
        "invalid_type",
        "Invalid type for 'messages[0].content': expected one of a string or array of objects, "
        "but got an object instead.",
        id="content-object",
    ),
    pytest.param(
        {"messages": [_message(content=[{"type": "input_text", "text": "hi"}])]},
        "messages[0].content[0].type",
        "invalid_value",
        "Invalid value: 'input_text'. Supported values are: 'text', 'image_file', and 'image_url'.",
        id="content-part-type",
    ),
    pytest.param(
        {"messages": [_message(content=[{"type": "image_url", "image_url": {}}])]},
        "messages[0].content[0].image_url.url",
        "missing_required_parameter",
        None,
        id="image-url-missing-url",
    ),
    pytest.param(
        {
            "messages": [
                _message(content=[{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4A=="}}])
            ]
        },
        "messages[0].content[0].image_url.url",
        "invalid_value",
        "Invalid 'messages[0].content[0].image_url.url'. Expected a valid URL, but got a value with an invalid format.",
        id="image-url-base64-data-url",
    ),
    pytest.param(
        {
            "messages": [
                _message(content=[{"type": "image_file", "image_file": {"file_id": "file-x", "detail": "max"}}])
            ]
        },
        "messages[0].content[0].image_file.detail",
        "invalid_value",
        None,
        id="image-detail",
    ),
    pytest.param(
        {"messages": [_message(attachments=[{"file_id": "file-x", "tools": [{"type": "retrieval"}]}])]},
        "messages[0].attachments[0].tools[0].type",
        "invalid_value",
        "Invalid value: 'retrieval'. Supported values are: 'code_interpreter' and 'file_search'.",
        id="v1-retrieval-tool",
    ),
    pytest.param({"messages": {}}, "messages", "invalid_type", None, id="messages-object"),
    pytest.param({"metadata": ["a"]}, "metadata", "invalid_type", None, id="metadata-array"),
    pytest.param(
        {"metadata": {"a": 1}},
        "metadata.a",
        "invalid_type",
        "Invalid type for 'metadata.a': expected a string, but got an integer instead.",
        id="metadata-value-int",
    ),
    pytest.param(
        {"tool_resources": {"code_interpreter": {"file_ids": [f"file-{i}" for i in range(21)]}}},
        "tool_resources.code_interpreter.file_ids",
        "array_above_max_length",
        None,
        id="too-many-code-files",
    ),
    pytest.param(
        {"tool_resources": {"file_search": {"vector_store_ids": ["vs_a", "vs_b"]}}},
        "tool_resources.file_search.vector_store_ids",
        "array_above_max_length",
        None,
        id="two-vector-stores",
    ),
    pytest.param(
        {"tool_resources": {"retrieval": {}}},
        "tool_resources.retrieval",
        "unknown_parameter",
        None,
        id="unknown-tool-resource",
    ),
    pytest.param(
        {"messages": [_message(content="a\u0000b")]},
        "messages[0].content",
        "invalid_value",
        "Invalid 'messages[0].content': string contains a null character (\\u0000), which is not supported.",
        id="nul-in-content",
    ),
    pytest.param(
        {"metadata": {"k": "\u0000"}},
        "metadata.k",
        "invalid_value",
        None,
        id="nul-in-metadata",
    ),
]


@pytest.mark.parametrize(("body", "param", "code", "message"), BAD_CREATES)
async def test_bad_create_is_400_and_stores_nothing(
    client: openai.AsyncOpenAI, app: FastAPI, body: dict[str, Any], param: str, code: str, message: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.post("/threads", body=body, cast_to=object)
    error = error_of(exc)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    if message is not None:
        assert error["message"] == message
    assert await counts(app) == (0, 0)


async def test_bad_update_changes_nothing(client: openai.AsyncOpenAI) -> None:
    thread = await client.beta.threads.create(metadata={"a": "b"})
    for body, param in [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        (
            {"metadata": {"a": "c"}, "tool_resources": {"code_interpreter": {"file_ids": "file-x"}}},
            "tool_resources.code_interpreter.file_ids",
        ),
        ({"metadata": {"a": "c"}, "bogus": 1}, "bogus"),
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.post(f"/threads/{thread.id}", body=body, cast_to=object)
        assert error_of(exc)["param"] == param
    assert (await client.beta.threads.retrieve(thread.id)).metadata == {"a": "b"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": [_message(attachments=[{"file_id": "file-nope", "tools": []}])]}, id="attachment"),
        pytest.param(
            {"messages": [_message(content=[{"type": "image_file", "image_file": {"file_id": "file-nope"}}])]},
            id="image-file",
        ),
        pytest.param({"tool_resources": {"code_interpreter": {"file_ids": ["file-nope"]}}}, id="tool-resources"),
    ],
)
async def test_unknown_files_are_404_and_store_nothing(
    client: openai.AsyncOpenAI, app: FastAPI, body: dict[str, Any]
) -> None:
    real = await new_file(client)
    # One good message first: it must not survive the bad one.
    body = {**body, "messages": [_message(attachments=[{"file_id": real, "tools": []}]), *body.get("messages", [])]}
    with pytest.raises(openai.NotFoundError) as exc:
        await client.post("/threads", body=body, cast_to=object)
    assert error_of(exc) == {
        "message": "No such File object: file-nope",
        "type": "invalid_request_error",
        "param": "id",
        "code": None,
    }
    assert await counts(app) == (0, 0)


async def test_update_with_unknown_file_changes_nothing(client: openai.AsyncOpenAI) -> None:
    real = await new_file(client)
    thread = await client.beta.threads.create(tool_resources={"code_interpreter": {"file_ids": [real]}})
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.threads.update(
            thread.id, tool_resources={"code_interpreter": {"file_ids": [real, "file-nope"]}}, metadata={"x": "y"}
        )
    assert error_of(exc)["message"] == "No such File object: file-nope"
    assert (await client.beta.threads.retrieve(thread.id)).model_dump() == thread.model_dump()


async def test_unicode_round_trips(client: openai.AsyncOpenAI) -> None:
    text = (
        "emoji \U0001f469\U0001f3fd\u200d\U0001f4bb\U0001f1ef\U0001f1f5 CJK 漢字かなカナ한국어 RTL مرحبا שלום\u200f"
        " tab\t nl\n cr\r ctl\u0001\u001f\u007f \u2028 \ufeff \U0001d11e"
    )
    metadata = {"名前": "値 ✓", "emoji🙂": "😀" * 100, "rtl": "עברית"}
    thread = await client.beta.threads.create(
        messages=[{"role": "user", "content": text, "metadata": metadata}], metadata=metadata
    )
    assert thread.metadata == metadata
    assert (await client.beta.threads.retrieve(thread.id)).metadata == metadata
    [message] = (await client.beta.threads.messages.list(thread.id)).data
    assert message.content[0].text.value == text  # type: ignore[union-attr]
    assert message.metadata == metadata
