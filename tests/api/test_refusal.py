"""A model's refusal, through the official SDK, on both databases.

OpenAI's chat completions carry a refusal in its own field (``delta.refusal``
streamed, ``message.refusal`` whole, ``content`` null), notably with
structured outputs; the Assistants API shows it as a message content part
``{"type": "refusal", "refusal": ...}`` and streams it as
``thread.message.delta`` parts ``{"index", "type": "refusal", "refusal"}``
(MessageContentRefusalObject, MessageDeltaContentRefusalObject). A refusal
is an answer: the run completes. Before, the server never read
``delta.refusal``: the refusal streamed as nothing and the message was
stored empty. Shapes are checked against the OpenAPI schemas: every JSON
response by the ``http`` fixture, every streamed event by StreamRules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncAssistantEventHandler
from openai.types.beta.threads import Message, MessageDelta, Text, TextDelta

from app import llm
from app.llm import interface as llm_interface
from app.llm.provider import ChunkReader
from app.settings import Settings
from tests.api.test_v1 import v1, v1_valid
from tests.runner.fake_openai import REFUSAL, FakeOpenAI
from tests.streaming import rules

pytestmark = pytest.mark.timeout(60)

BETA = {"OpenAI-Beta": "assistants=v2"}
SORRY = [{"role": "assistant", "content": "", "refusal": None}, {"content": None, "refusal": "I'm sorry, "}]
SORRY.append({"content": None, "refusal": "I can't help."})


class Recorder(AsyncAssistantEventHandler):
    """What the SDK's stream helper hands an application: text deltas, and
    the refusal's pieces in its message deltas."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""
        self.refusal = ""

    async def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text += delta.value or ""

    async def on_message_delta(self, delta: MessageDelta, snapshot: Message) -> None:
        for part in delta.content or []:
            if part.type == "refusal":
                self.refusal += part.refusal or ""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """With /admin, where a test scripts the offline model."""
    return settings.model_copy(update={"admin_api": True})


@pytest.fixture
def provider_settings(settings: Settings, fake: FakeOpenAI, tmp_path: Path) -> Settings:
    """Every model to the fake provider, a direct route (the default for an
    OpenAI-compatible one). Through litellm (1.100.5) a refusal is lost
    before it reaches the server: its stream wrapper drops a chunk whose
    only payload is ``refusal`` (``is_chunk_non_empty`` does not count it);
    the server reads a refusal in litellm's objects all the same
    (test_the_chunk_reader_reads_a_refusal)."""
    entry = {"model": "openai/*", "api_base": fake.api_base, "api_key": "sk-fake", "max_retries": 0}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": entry, "direct": True}]}))
    settings.llm_config = path
    return settings


def test_the_chunk_reader_reads_a_refusal() -> None:
    """In the direct route's parsed JSON and in litellm's objects alike; a
    delta with text is read as text (OpenAI sends a refusal's pieces with
    ``content`` null), so text deltas pay nothing for refusals."""
    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

    parsed = {"choices": [{"index": 0, "delta": {"content": None, "refusal": "No."}}]}
    objects = ModelResponseStream(choices=[StreamingChoices(delta=Delta(content=None, refusal="No."))])
    for chunk in (parsed, objects):
        reader = ChunkReader()
        assert list(reader.read(chunk)) == [llm.RefusalDelta("No.")]
        assert reader.output == ["No."]  # counted as completion tokens when no usage comes
    first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}}]}
    assert list(ChunkReader().read(first)) == []
    # A cassette records and replays it (app/cassettes.py keeps events as JSON).
    assert llm_interface.event_from_json(llm_interface.event_to_json(llm.RefusalDelta("No."))) == llm.RefusalDelta(
        "No."
    )


async def _streamed(http: httpx2.AsyncClient, thread_id: str, assistant_id: str) -> list[rules.SSE]:
    """A run's raw event stream, every event held to the schemas and the SDKs' rules."""
    body = {"assistant_id": assistant_id, "stream": True}
    async with http.stream("POST", f"/v1/threads/{thread_id}/runs", json=body, headers=BETA) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    events, _ = rules.read([raw])
    return events


def _content(events: list[rules.SSE]) -> list[dict[str, Any]]:
    completed = [event.data for event in events if event.event == "thread.message.completed"]
    assert len(completed) == 1, rules.names(events)
    content: list[dict[str, Any]] = completed[0]["content"]
    return content


async def _listed_and_retrieved(client: openai.AsyncOpenAI, thread_id: str) -> list[dict[str, Any]]:
    """The latest message's content as listed, checked equal to it as retrieved."""
    latest = (await client.beta.threads.messages.list(thread_id, limit=1)).data[0]
    retrieved = await client.beta.threads.messages.retrieve(latest.id, thread_id=thread_id)
    assert retrieved.content == latest.content and retrieved.status == "completed"
    return [part.model_dump() for part in latest.content]


@pytest.mark.usefixtures("provider_settings")
async def test_a_providers_streamed_refusal_is_the_messages_refusal_part(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    fake.deltas["fake-refuses"] = SORRY
    assistant = await client.beta.assistants.create(model="fake-refuses")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "help me"}])
    recorder = Recorder()
    async with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant.id, event_handler=recorder
    ) as stream:
        await stream.until_done()
        final = await stream.get_final_run()
        messages = await stream.get_final_messages()
    assert final.status == "completed", final.last_error
    expected = [{"type": "refusal", "refusal": "I'm sorry, I can't help."}]
    assert recorder.refusal == "I'm sorry, I can't help." and recorder.text == ""
    assert [part.model_dump() for part in messages[0].content] == expected
    assert await _listed_and_retrieved(client, thread.id) == expected
    events = await _streamed(http, thread.id, assistant.id)
    deltas = [event.data["delta"]["content"] for event in events if event.event == "thread.message.delta"]
    assert deltas == [
        [{"index": 0, "type": "refusal", "refusal": "I'm sorry, "}],
        [{"index": 0, "type": "refusal", "refusal": "I can't help."}],
    ]
    assert _content(events) == expected
    assert rules.names(events)[-2:] == ["thread.run.completed", "done"]
    # The second run's prompt has the first's refusal as the assistant's text.
    assert fake.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "help me"},
        {"role": "assistant", "content": "I'm sorry, I can't help."},
    ]


@pytest.mark.usefixtures("provider_settings")
@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (
            [{"content": "Here is"}, {"content": " what"}, {"content": None, "refusal": "No."}],
            [
                {"type": "text", "text": {"value": "Here is what", "annotations": []}},
                {"type": "refusal", "refusal": "No."},
            ],
        ),
        (
            [{"content": None, "refusal": "No"}, {"content": "but this"}, {"content": None, "refusal": "!"}],
            [
                {"type": "refusal", "refusal": "No!"},
                {"type": "text", "text": {"value": "but this", "annotations": []}},
            ],
        ),
        (
            [{"content": None, "refusal": "smile \ud83d"}, {"content": None, "refusal": "\ude00 no \udc00"}],
            [{"type": "refusal", "refusal": "smile \U0001f600 no \ufffd"}],
        ),
        (
            [{"content": "【"}, {"content": None, "refusal": "No"}],
            [
                {"type": "text", "text": {"value": "【", "annotations": []}},
                {"type": "refusal", "refusal": "No"},
            ],
        ),
    ],
    ids=["text-then-refusal", "refusal-then-text", "surrogates", "held-marker-start"],
)
async def test_text_and_refusal_are_separate_parts_in_their_order(
    fake: FakeOpenAI,
    client: openai.AsyncOpenAI,
    http: httpx2.AsyncClient,
    deltas: list[dict[str, Any]],
    expected: list[dict[str, Any]],
) -> None:
    """Text and a refusal in one answer: two parts, each its own index, in
    the order they began (StreamRules checks the indexes are contiguous and
    the final parts are what the deltas said). A refusal's surrogate halves
    are mended as text's are (a pair split across deltas joined, a lone
    half U+FFFD). Text held back for a possible citation marker ("【")
    goes out before the refusal's first delta: the SDK, which accumulates
    parts by index as they come, ends with what is stored."""
    fake.deltas["fake-mixed"] = deltas
    assistant = await client.beta.assistants.create(model="fake-mixed")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "help me"}])
    events = await _streamed(http, thread.id, assistant.id)
    assert rules.names(events)[-2] == "thread.run.completed"
    assert _content(events) == expected
    assert await _listed_and_retrieved(client, thread.id) == expected
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        await stream.until_done()
        messages = await stream.get_final_messages()
    assert [part.model_dump() for part in messages[-1].content] == expected
    assert await _listed_and_retrieved(client, thread.id) == expected


@pytest.mark.parametrize("at_once", [True, False], ids=["at-once", "streamed"])
async def test_a_run_failing_after_a_refusal_keeps_its_text_and_refusal(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient, at_once: bool
) -> None:
    """A run that fails mid-answer keeps what the model said (Turn.save_partial):
    its text and its refusal, as the SDK accumulated them from the stream."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    respond = {"text": "Hi there", "refusal": "No way", "fail": {"code": "server_error", "after": 3}}
    rule: dict[str, Any] = {"match": {"assistant_id": assistant.id}, "respond": respond}
    if not at_once:
        rule["delay_ms"] = 1
    added = await http.post("/admin/offline/rules", json=rule)
    assert added.status_code == 200, added.text
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "do it"}])
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        await stream.until_done()
        final = await stream.get_final_run()
        messages = await stream.get_final_messages()
    assert final.status == "failed"
    retrieved = await client.beta.threads.messages.retrieve(messages[-1].id, thread_id=thread.id)
    assert retrieved.status == "incomplete"
    content = [part.model_dump() for part in retrieved.content]
    assert [part.model_dump() for part in messages[-1].content] == content
    assert [part["type"] for part in content] == ["text", "refusal"], content


@pytest.mark.usefixtures("provider_settings")
async def test_text_after_a_refusal_and_a_tool_call_is_a_message_of_its_own(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    """A refusal's message closes at the answer's tool call; text after the
    call (in the same completion) opens a new message without the refusal.
    Read by polling: the stream of text after a call has a message step
    created while the tool step is active, which StreamRules refuses (as
    before refusals: the same holds for text, text, call)."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    fake.deltas["fake-refuse-call"] = [{"content": None, "refusal": "No"}, {"tool_calls": [call]}, {"content": "After"}]
    function = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    assistant = await client.beta.assistants.create(
        model="fake-refuse-call", tools=[{"type": "function", "function": function}]
    )
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "help me"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "requires_action", run.last_error
    listed = await client.beta.threads.messages.list(thread.id, order="asc")
    assert [[part.model_dump() for part in message.content] for message in listed.data[1:]] == [
        [{"type": "refusal", "refusal": "No"}],
        [{"type": "text", "text": {"value": "After", "annotations": []}}],
    ]


@pytest.mark.usefixtures("provider_settings")
async def test_a_whole_json_answers_refusal(client: openai.AsyncOpenAI) -> None:
    """A provider that answers ``stream: true`` with a whole chat.completion
    (read by the direct route): its
    ``message.refusal`` is the message's refusal part."""
    assistant = await client.beta.assistants.create(model="fake-json-refusal")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "help me"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "completed", run.last_error
    assert await _listed_and_retrieved(client, thread.id) == [{"type": "refusal", "refusal": REFUSAL}]


@pytest.mark.parametrize("at_once", [True, False], ids=["at-once", "streamed"])
async def test_a_scripted_refusal(client: openai.AsyncOpenAI, http: httpx2.AsyncClient, at_once: bool) -> None:
    """A test author scripts a refusal for the offline model (a rule's
    ``refusal``, docs/testing.md), answered at once or streamed."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    respond: dict[str, Any] = {"text": "Well.", "refusal": "I won't do that."}
    rule = {"match": {"assistant_id": assistant.id}, "respond": respond}
    if not at_once:
        rule["delay_ms"] = 1
    added = await http.post("/admin/offline/rules", json=rule)
    assert added.status_code == 200, added.text
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "do it"}])
    recorder = Recorder()
    async with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant.id, event_handler=recorder
    ) as stream:
        await stream.until_done()
        final = await stream.get_final_run()
    assert final.status == "completed", final.last_error
    assert (recorder.text, recorder.refusal) == ("Well.", "I won't do that.")
    expected = [
        {"type": "text", "text": {"value": "Well.", "annotations": []}},
        {"type": "refusal", "refusal": "I won't do that."},
    ]
    assert await _listed_and_retrieved(client, thread.id) == expected
    events = await _streamed(http, thread.id, assistant.id)
    assert _content(events) == expected


async def test_a_refuse_directive_in_chat_completions(client: openai.AsyncOpenAI) -> None:
    """The server's own chat completions answer a refusal as OpenAI does:
    ``message.refusal`` with ``content`` null, ``delta.refusal`` streamed
    (checked against the spec: the ``http`` fixture, the SDK's types)."""
    messages: Any = [{"role": "user", "content": "[[refuse Not this.]]"}]
    completion = await client.chat.completions.create(model="gpt-4o", messages=messages)
    message = completion.choices[0].message
    assert (message.content, message.refusal) == (None, "Not this.")
    stream = await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
    pieces = [chunk.choices[0].delta async for chunk in stream if chunk.choices]
    assert "".join(delta.refusal or "" for delta in pieces) == "Not this."
    assert "".join(delta.content or "" for delta in pieces) == ""


async def test_a_refusal_read_as_v1(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    """v1 had no refusal part: a v1 client reads it as text (shapes.py), in
    the v1 spec's shape (a whole message's text has annotations)."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[refuse Not this.]]"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "completed", run.last_error
    listed = v1_valid(await v1(http, "GET", f"/threads/{thread.id}/messages?limit=1"), "ListMessagesResponse")
    assert listed["data"][0]["content"] == [{"type": "text", "text": {"value": "Not this.", "annotations": []}}]
