"""Messages through the official SDK, on both databases: shapes, pagination,
the run_id filter, the thread lock and unicode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from app import ids, orm
from app.settings import Settings
from tests.conftest import error_of

BETA = {"OpenAI-Beta": "assistants=v2"}
LIVE = ["queued", "in_progress", "requires_action", "cancelling"]
FINISHED = ["completed", "failed", "cancelled", "expired", "incomplete"]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Run rows are inserted by hand here; no worker may pick them up.
    settings.embedded_worker = False
    return settings


@pytest.fixture
async def client(http: httpx2.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The SDK with strict response validation."""
    yield openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key="sk-test",
        http_client=http,
        max_retries=0,
        _strict_response_validation=True,
    )


@pytest.fixture
async def thread_id(client: openai.AsyncOpenAI) -> str:
    return (await client.beta.threads.create()).id


async def insert_run(app: FastAPI, thread_id: str, status: str) -> str:
    """A run row as the run engine would leave it (the HTTP surface for runs is not under test here)."""
    seq = ids.next_seq()
    run_id = ids.new_id(ids.RUN, seq)
    async with app.state.runtime.transaction() as session:
        session.add(
            orm.Run(
                id=run_id,
                seq=seq,
                created_at=ids.seconds(seq),
                thread_id=thread_id,
                assistant_id=ids.new_id(ids.ASSISTANT),
                status=status,
                model="gpt-4o",
                instructions="",
                tools=[],
                metadata_={},
                parallel_tool_calls=True,
            )
        )
    return run_id


async def insert_assistant_message(app: FastAPI, thread_id: str, run_id: str, text: str) -> str:
    """A message written by a run (only the run engine sets run_id)."""
    seq = ids.next_seq()
    message_id = ids.new_id(ids.MESSAGE, seq)
    async with app.state.runtime.transaction() as session:
        session.add(
            orm.Message(
                id=message_id,
                seq=seq,
                created_at=ids.seconds(seq),
                thread_id=thread_id,
                role="assistant",
                content=[{"type": "text", "text": {"value": text, "annotations": []}}],
                status="completed",
                incomplete_details=None,
                completed_at=ids.seconds(seq),
                incomplete_at=None,
                assistant_id=ids.new_id(ids.ASSISTANT),
                run_id=run_id,
                attachments=[],
                metadata_={},
            )
        )
    return message_id


async def message_count(app: FastAPI) -> int:
    async with app.state.runtime.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(orm.Message)) or 0)


async def add(client: openai.AsyncOpenAI, thread_id: str, count: int) -> list[str]:
    return [
        (await client.beta.threads.messages.create(thread_id, role="user", content=f"m{i}")).id for i in range(count)
    ]


async def test_create_with_string_content(client: openai.AsyncOpenAI, http: httpx2.AsyncClient, thread_id: str) -> None:
    response = await http.post(
        f"/v1/threads/{thread_id}/messages",
        headers=BETA,
        json={"role": "user", "content": "How does AI work?", "metadata": {"k": "v"}},
    )
    assert response.status_code == 200, response.text
    raw = response.json()
    created_at = raw.pop("created_at")
    message_id = raw.pop("id")
    assert message_id.startswith("msg_")
    assert raw == {
        "object": "thread.message",
        "thread_id": thread_id,
        "status": "completed",
        "incomplete_details": None,
        "completed_at": created_at,
        "incomplete_at": None,
        "role": "user",
        "content": [{"type": "text", "text": {"value": "How does AI work?", "annotations": []}}],
        "assistant_id": None,
        "run_id": None,
        "attachments": [],
        "metadata": {"k": "v"},
    }
    fetched = await client.beta.threads.messages.retrieve(message_id, thread_id=thread_id)
    assert fetched.id == message_id and fetched.created_at == created_at


async def test_create_with_parts(client: openai.AsyncOpenAI, thread_id: str) -> None:
    image = (await client.files.create(file=("cat.png", b"\x89PNG"), purpose="vision")).id
    message = await client.beta.threads.messages.create(
        thread_id,
        role="assistant",
        content=[
            {"type": "text", "text": "first"},
            {"type": "image_file", "image_file": {"file_id": image, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/x.webp"}},
            {"type": "text", "text": "second"},
        ],
        attachments=[{"file_id": image, "tools": [{"type": "file_search"}]}],
    )
    assert [part.model_dump(exclude_none=True) for part in message.content] == [
        {"type": "text", "text": {"value": "first", "annotations": []}},
        {"type": "image_file", "image_file": {"file_id": image, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.webp"}},
        {"type": "text", "text": {"value": "second", "annotations": []}},
    ]
    assert message.role == "assistant"
    assert message.attachments is not None and message.attachments[0].file_id == image
    fetched = await client.beta.threads.messages.retrieve(message.id, thread_id=thread_id)
    assert fetched.model_dump() == message.model_dump()


async def test_image_urls_on_the_web_are_kept_as_given(client: openai.AsyncOpenAI, thread_id: str) -> None:
    urls = [
        "http://127.0.0.1:8080/cat.png",
        "HTTPS://Example.com/a%20cat.png?size=large#top",
        "https://user@[2001:db8::1]/cat.gif",
    ]
    message = await client.beta.threads.messages.create(
        thread_id, role="user", content=[{"type": "image_url", "image_url": {"url": url}} for url in urls]
    )
    assert [part.image_url.url for part in message.content if part.type == "image_url"] == urls


async def test_list_pagination_is_exact_and_stable(client: openai.AsyncOpenAI, thread_id: str) -> None:
    # All created well within one second: order must come from the sequence, not created_at.
    made = await add(client, thread_id, 25)
    newest_first = made[::-1]

    first = await client.beta.threads.messages.list(thread_id)
    assert [m.id for m in first.data] == newest_first[:20]  # default limit 20, order desc
    assert first.has_more is True
    raw = first.model_dump()
    assert raw["first_id"] == newest_first[0] and raw["last_id"] == newest_first[19]
    second = await client.beta.threads.messages.list(thread_id, after=first.data[-1].id)
    assert [m.id for m in second.data] == newest_first[20:]
    assert second.has_more is False

    assert [m.id async for m in client.beta.threads.messages.list(thread_id, limit=4)] == newest_first
    assert [m.id async for m in client.beta.threads.messages.list(thread_id, limit=5, order="asc")] == made

    page = await client.beta.threads.messages.list(thread_id, limit=5, order="asc", after=made[19])
    assert [m.id for m in page.data] == made[20:] and page.has_more is False  # exactly limit left
    page = await client.beta.threads.messages.list(thread_id, limit=5, order="asc", after=made[18])
    assert [m.id for m in page.data] == made[19:24] and page.has_more is True
    page = await client.beta.threads.messages.list(thread_id, limit=3, order="asc", before=made[10])
    assert [m.id for m in page.data] == made[7:10] and page.has_more is True
    page = await client.beta.threads.messages.list(thread_id, limit=3, order="desc", before=made[22])
    assert [m.id for m in page.data] == [made[24], made[23]] and page.has_more is False
    page = await client.beta.threads.messages.list(thread_id, limit=100, order="asc", after=made[2], before=made[6])
    assert [m.id for m in page.data] == made[3:6] and page.has_more is False
    page = await client.beta.threads.messages.list(thread_id, limit=100)
    assert len(page.data) == 25 and page.has_more is False


async def test_list_of_an_empty_thread(client: openai.AsyncOpenAI, http: httpx2.AsyncClient, thread_id: str) -> None:
    response = await http.get(f"/v1/threads/{thread_id}/messages", headers=BETA)
    assert response.json() == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    assert [m async for m in client.beta.threads.messages.list(thread_id)] == []


async def test_list_and_delete_everything_loop(client: openai.AsyncOpenAI, thread_id: str) -> None:
    await add(client, thread_id, 7)
    async for message in client.beta.threads.messages.list(thread_id, limit=2):
        await client.beta.threads.messages.delete(message.id, thread_id=thread_id)
    assert (await client.beta.threads.messages.list(thread_id)).data == []


async def test_list_filters_by_run(client: openai.AsyncOpenAI, app: FastAPI, thread_id: str) -> None:
    before = await add(client, thread_id, 2)
    run_a = await insert_run(app, thread_id, "completed")
    run_b = await insert_run(app, thread_id, "completed")
    from_a = [await insert_assistant_message(app, thread_id, run_a, f"a{i}") for i in range(3)]
    from_b = await insert_assistant_message(app, thread_id, run_b, "b")

    page = await client.beta.threads.messages.list(thread_id, run_id=run_a, order="asc")
    assert [m.id for m in page.data] == from_a
    assert all(m.run_id == run_a and m.assistant_id is not None for m in page.data)
    page = await client.beta.threads.messages.list(thread_id, run_id=run_a, limit=2)
    assert [m.id for m in page.data] == from_a[::-1][:2] and page.has_more is True
    assert [m.id async for m in client.beta.threads.messages.list(thread_id, run_id=run_a, limit=1)] == from_a[::-1]
    assert [m.id for m in (await client.beta.threads.messages.list(thread_id, run_id=run_b)).data] == [from_b]
    assert (await client.beta.threads.messages.list(thread_id, run_id="run_unknown")).data == []
    everything = [m.id async for m in client.beta.threads.messages.list(thread_id, order="asc")]
    assert everything == [*before, *from_a, from_b]


async def test_modify_metadata(client: openai.AsyncOpenAI, http: httpx2.AsyncClient, thread_id: str) -> None:
    message = await client.beta.threads.messages.create(thread_id, role="user", content="x", metadata={"a": "1"})
    updated = await client.beta.threads.messages.update(message.id, thread_id=thread_id, metadata={"b": "2"})
    assert updated.metadata == {"b": "2"}
    assert updated.content == message.content and updated.created_at == message.created_at
    response = await http.post(f"/v1/threads/{thread_id}/messages/{message.id}", headers=BETA, json={"metadata": None})
    assert response.status_code == 200 and response.json()["metadata"] == {"b": "2"}
    response = await http.post(f"/v1/threads/{thread_id}/messages/{message.id}", headers=BETA, json={})
    assert response.status_code == 200 and response.json()["metadata"] == {"b": "2"}
    for body, param in [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"content": "changed"}, "content"),  # only metadata can be modified
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.post(f"/threads/{thread_id}/messages/{message.id}", body=body, cast_to=object)
        assert error_of(exc)["param"] == param
    fetched = await client.beta.threads.messages.retrieve(message.id, thread_id=thread_id)
    assert fetched.metadata == {"b": "2"} and fetched.content == message.content


async def test_delete(client: openai.AsyncOpenAI, app: FastAPI, thread_id: str) -> None:
    keep, drop = await add(client, thread_id, 2)
    deleted = await client.beta.threads.messages.delete(drop, thread_id=thread_id)
    assert deleted.model_dump() == {"id": drop, "object": "thread.message.deleted", "deleted": True}
    assert [m.id for m in (await client.beta.threads.messages.list(thread_id)).data] == [keep]
    assert await message_count(app) == 1
    for call in (
        lambda: client.beta.threads.messages.retrieve(drop, thread_id=thread_id),
        lambda: client.beta.threads.messages.delete(drop, thread_id=thread_id),
        lambda: client.beta.threads.messages.update(drop, thread_id=thread_id, metadata={}),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            await call()
        assert error_of(exc) == {
            "message": f"No message found with id '{drop}'.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }


async def test_message_of_another_thread_is_not_found(client: openai.AsyncOpenAI, thread_id: str) -> None:
    other = (await client.beta.threads.create()).id
    [message_id] = await add(client, other, 1)
    for call in (
        lambda: client.beta.threads.messages.retrieve(message_id, thread_id=thread_id),
        lambda: client.beta.threads.messages.update(message_id, thread_id=thread_id, metadata={"x": "y"}),
        lambda: client.beta.threads.messages.delete(message_id, thread_id=thread_id),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            await call()
        assert error_of(exc)["message"] == f"No message found with id '{message_id}'."
    survivor = await client.beta.threads.messages.retrieve(message_id, thread_id=other)
    assert survivor.metadata == {}


async def test_unknown_thread_is_404(client: openai.AsyncOpenAI) -> None:
    missing = "thread_nothere"
    for call in (
        lambda: client.beta.threads.messages.create(missing, role="user", content="x"),
        lambda: client.beta.threads.messages.list(missing),
        lambda: client.beta.threads.messages.retrieve("msg_x", thread_id=missing),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            await call()
        assert error_of(exc)["message"] == f"No thread found with id '{missing}'."


async def test_wrong_id_prefixes_are_400(client: openai.AsyncOpenAI, thread_id: str) -> None:
    cases: list[tuple[Any, str, str]] = [
        (
            lambda: client.beta.threads.messages.retrieve("thread_x", thread_id=thread_id),
            "message_id",
            "'thread_x'. Expected an ID that begins with 'msg'",
        ),
        (
            lambda: client.beta.threads.messages.update("run_x", thread_id=thread_id, metadata={}),
            "message_id",
            "'run_x'. Expected an ID that begins with 'msg'",
        ),
        (
            lambda: client.beta.threads.messages.delete("x", thread_id=thread_id),
            "message_id",
            "'x'. Expected an ID that begins with 'msg'",
        ),
        (
            lambda: client.beta.threads.messages.list("msg_x"),
            "thread_id",
            "'msg_x'. Expected an ID that begins with 'thread'",
        ),
        (
            lambda: client.beta.threads.messages.create("asst_x", role="user", content="x"),
            "thread_id",
            "'asst_x'. Expected an ID that begins with 'thread'",
        ),
        (
            lambda: client.beta.threads.messages.list(thread_id, after="thread_x"),
            "after",
            "'thread_x'. Expected an ID that begins with 'msg'",
        ),
        (
            lambda: client.beta.threads.messages.list(thread_id, before="asst_x"),
            "before",
            "'asst_x'. Expected an ID that begins with 'msg'",
        ),
    ]
    for call, param, detail in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            await call()
        assert error_of(exc) == {
            "message": f"Invalid '{param}': {detail}.",
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }


@pytest.mark.parametrize("status", LIVE)
async def test_live_run_locks_the_thread(client: openai.AsyncOpenAI, app: FastAPI, thread_id: str, status: str) -> None:
    [existing] = await add(client, thread_id, 1)
    run_id = await insert_run(app, thread_id, status)
    with pytest.raises(openai.BadRequestError) as exc:  # 400, not 409: the SDKs retry 409
        await client.beta.threads.messages.create(thread_id, role="user", content="too soon")
    assert exc.value.status_code == 400
    assert error_of(exc) == {
        "message": f"Can't add messages to {thread_id} while a run {run_id} is active.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert await message_count(app) == 1
    # Reading and annotating the thread stays possible while it is locked.
    assert [m.id for m in (await client.beta.threads.messages.list(thread_id)).data] == [existing]
    updated = await client.beta.threads.messages.update(existing, thread_id=thread_id, metadata={"seen": "yes"})
    assert updated.metadata == {"seen": "yes"}
    # Other threads are not affected.
    other = (await client.beta.threads.create()).id
    await client.beta.threads.messages.create(other, role="user", content="fine")


@pytest.mark.parametrize("status", FINISHED)
async def test_finished_run_does_not_lock(
    client: openai.AsyncOpenAI, app: FastAPI, thread_id: str, status: str
) -> None:
    await insert_run(app, thread_id, status)
    message = await client.beta.threads.messages.create(thread_id, role="user", content="next question")
    assert message.thread_id == thread_id


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        pytest.param(
            {"content": "x"}, "role", "missing_required_parameter", "Missing required parameter: 'role'.", id="no-role"
        ),
        pytest.param(
            {"role": "user"},
            "content",
            "missing_required_parameter",
            "Missing required parameter: 'content'.",
            id="no-content",
        ),
        pytest.param(
            {"role": "user", "content": 5},
            "content",
            "invalid_type",
            "Invalid type for 'content': expected one of a string or array of objects, but got an integer instead.",
            id="content-int",
        ),
        pytest.param(
            {"role": "user", "content": []},
            "content",
            "empty_array",
            "Invalid 'content': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            id="content-empty",
        ),
        pytest.param(
            {"role": "user", "content": [{"type": "text"}]},
            "content[0].text",
            "missing_required_parameter",
            "Missing required parameter: 'content[0].text'.",
            id="text-part-without-text",
        ),
        pytest.param(
            {"role": "user", "content": [{"type": "text", "text": {"value": "x"}}]},
            "content[0].text",
            "invalid_type",
            "Invalid type for 'content[0].text': expected a string, but got an object instead.",
            id="response-form-text-part",
        ),
        pytest.param(
            {"role": "user", "content": [{"text": "x"}]},
            "content[0].type",
            "missing_required_parameter",
            "Missing required parameter: 'content[0].type'.",
            id="part-without-type",
        ),
        pytest.param(
            {"role": "user", "content": "x", "file_ids": ["file-a"]},
            "file_ids",
            "unknown_parameter",
            "Unknown parameter: 'file_ids'.",
            id="v1-file_ids",
        ),
        pytest.param(
            {"role": "user", "content": "x", "attachments": [{"tools": []}]},
            "attachments[0].file_id",
            "missing_required_parameter",
            "Missing required parameter: 'attachments[0].file_id'.",
            id="attachment-without-file",
        ),
        pytest.param(
            {"role": "user", "content": "x", "attachments": "file-a"},
            "attachments",
            "invalid_type",
            "Invalid type for 'attachments': expected an array, but got a string instead.",
            id="attachments-string",
        ),
        pytest.param(
            {"role": "user", "content": "x", "metadata": {"k": "v" * 600}},
            "metadata.k",
            "string_above_max_length",
            "Invalid 'metadata.k': string too long. Expected a string with maximum length 512, "
            "but got a string with length 600 instead.",
            id="metadata-value",
        ),
        pytest.param(
            {"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "a\u0000"}]},
            "content[1].text",
            "invalid_value",
            "Invalid 'content[1].text': string contains a null character (\\u0000), which is not supported.",
            id="nul",
        ),
        pytest.param(
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}],
            },
            "content[0].image_url.url",
            "invalid_value",
            "Invalid 'content[0].image_url.url'. Expected a valid URL, but got a value with an invalid format.",
            id="image-url-base64-data-url",
        ),
        *(
            pytest.param(
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}],
                },
                "content[1].image_url.url",
                "invalid_value",
                "Invalid 'content[1].image_url.url'. Expected a valid URL, but got a value with an invalid format.",
                id=f"image-url-{name}",
            )
            for name, url in [
                ("relative", "cat.png"),
                ("no-host", "https:///cat.png"),
                ("ftp", "ftp://example.com/cat.png"),
                ("space", "https://example.com/a cat.png"),
                ("bad-ipv6", "http://[::1/cat.png"),
                ("empty", ""),
            ]
        ),
    ],
)
async def test_bad_create_is_400_and_stores_nothing(
    client: openai.AsyncOpenAI, app: FastAPI, thread_id: str, body: dict[str, Any], param: str, code: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.post(f"/threads/{thread_id}/messages", body=body, cast_to=object)
    assert error_of(exc) == {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    assert await message_count(app) == 0


async def test_unknown_files_are_404(client: openai.AsyncOpenAI, app: FastAPI, thread_id: str) -> None:
    for kwargs in (
        {"content": "x", "attachments": [{"file_id": "file-nope", "tools": [{"type": "code_interpreter"}]}]},
        {"content": [{"type": "image_file", "image_file": {"file_id": "file-nope"}}]},
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            await client.beta.threads.messages.create(thread_id, role="user", **kwargs)  # type: ignore[arg-type]
        assert error_of(exc) == {
            "message": "No such File object: file-nope",
            "type": "invalid_request_error",
            "param": "id",
            "code": None,
        }
    assert await message_count(app) == 0


async def test_lone_surrogates_are_400_not_500(http: httpx2.AsyncClient, app: FastAPI, thread_id: str) -> None:
    # Only a raw body can carry one: the escape is valid JSON, the string is not valid Unicode.
    response = await http.post(
        f"/v1/threads/{thread_id}/messages",
        headers={**BETA, "content-type": "application/json"},
        content=b'{"role": "user", "content": "x", "metadata": {"k": "\\ud83d"}}',
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata.k"
    assert await message_count(app) == 0


UNICODE = [
    "👩🏽‍💻 family 👨‍👩‍👧‍👦 flags 🇯🇵🇧🇷 skin 👍🏿 keycap 1️⃣",
    "日本語のテキスト、中文文本、한국어 텍스트",
    "العربية من اليمين إلى اليسار עברית \u200f mixed LTR",
    "control: tab\t newline\n cr\r bell\u0007 esc\u001b del\u007f c1\u0085 sep\u2028\u2029 bom\ufeff",
    "combining: e\u0301 a\u0308 zalgo z\u0351\u0352\u0353 astral: \U0001d573\U0001d58a \U0001d11e \U0001f004",
    'quotes \' " ` \\ backslash \\u0000 as text, json-ish {"a": [1]} <script>&amp;</script>',
]


@pytest.mark.parametrize("text", UNICODE)
async def test_unicode_round_trips(client: openai.AsyncOpenAI, thread_id: str, text: str) -> None:
    metadata = {text[:60]: text[:500], "k": text[-10:]}
    created = await client.beta.threads.messages.create(
        thread_id, role="user", content=[{"type": "text", "text": text}], metadata=metadata
    )
    assert created.content[0].text.value == text  # type: ignore[union-attr]
    assert created.metadata == metadata
    fetched = await client.beta.threads.messages.retrieve(created.id, thread_id=thread_id)
    listed = (await client.beta.threads.messages.list(thread_id)).data[0]
    assert fetched.model_dump() == listed.model_dump() == created.model_dump()
    updated = await client.beta.threads.messages.update(created.id, thread_id=thread_id, metadata={"v": text[:512]})
    assert updated.metadata == {"v": text[:512]}


@pytest.mark.usefixtures("sqlite_default_parameter_limit")
async def test_attachments_past_the_databases_parameter_limits_are_checked(
    client: openai.AsyncOpenAI, thread_id: str
) -> None:
    """A message may list any number of attachments (the spec sets no
    maxItems): 40,000 file ids, past asyncpg's 32,767 parameters and
    SQLite's 32,766, answer the 404 of the first missing file (they were
    bound one parameter each: a 500)."""
    real = (await client.files.create(file=("notes.txt", b"notes"), purpose="assistants")).id
    missing = [f"file-missing{n:05d}" for n in range(40_000)]
    attachments: Any = [{"file_id": file_id, "tools": [{"type": "code_interpreter"}]} for file_id in [real, *missing]]
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.threads.messages.create(
            thread_id, role="user", content="Read these.", attachments=attachments
        )
    assert error_of(exc)["message"] == f"No such File object: {missing[0]}"
    kept = await client.beta.threads.messages.create(
        thread_id,
        role="user",
        content="Read this.",
        attachments=[{"file_id": real, "tools": [{"type": "file_search"}]}],
    )
    assert [attachment.file_id for attachment in kept.attachments or []] == [real]
