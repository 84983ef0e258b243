"""A provider's answer with a NUL character reaches the client as given,
through the official SDK, on both databases: the run completes, the message
lists and streams with it (app/runner/turn.py says why it is kept). One
with a surrogate half is made valid Unicode where it enters the server
(app/llm/unicode_text.py): a pair split across deltas joined, a lone half
U+FFFD."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from app import llm, orm
from app.settings import Settings
from tests.runner import fake_openai
from tests.runner.fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

ANSWER = "before\x00after"


@pytest.fixture
def answer_text() -> str:
    """Overridden with ``@pytest.mark.parametrize("answer_text", [...])``."""
    return ANSWER


@pytest.fixture
def provider(app: FastAPI, monkeypatch: pytest.MonkeyPatch, answer_text: str) -> None:
    """The model answers ``answer_text``, streamed in two deltas as a provider's is."""
    runtime = app.state.runtime

    async def not_at_once(_request: llm.ChatRequest) -> None:
        return None

    async def answer(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta(answer_text[:7])
        yield llm.TextDelta(answer_text[7:])
        yield llm.Finish("stop", llm.Usage(prompt_tokens=3, completion_tokens=2))

    monkeypatch.setattr(runtime.llm, "answer_at_once", not_at_once)
    monkeypatch.setattr(runtime.llm, "stream", answer)


@pytest.mark.usefixtures("provider")
async def test_a_nul_in_a_providers_answer_reaches_the_client(client: openai.AsyncOpenAI) -> None:
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "completed", run.last_error
    latest = (await client.beta.threads.messages.list(thread.id, limit=1)).data[0]
    assert latest.content[0].text.value == ANSWER  # type: ignore[union-attr]
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        streamed = "".join([text async for text in stream.text_deltas])
        final = await stream.get_final_run()
    assert final.status == "completed" and streamed == ANSWER


@pytest.fixture
def fake_settings(settings: Settings, fake: FakeOpenAI, tmp_path: Path) -> Settings:
    """Every model to the fake provider, a direct route: its text deltas
    come as JSON escapes, as a provider's do."""
    entry = {"model": "openai/*", "api_base": fake.api_base, "api_key": "sk-fake", "max_retries": 0}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": entry, "direct": True}]}))
    settings.llm_config = path
    return settings


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (["before\ud83d", "after"], "before\ufffdafter"),  # a high half, no low half follows
        (["be\ude00fore", " after"], "be\ufffdfore after"),  # a low half alone
        (["smile \ud83d", "\ude00 done"], "smile \U0001f600 done"),  # a pair split across two deltas
        (["the end \ud83d"], "the end \ufffd"),  # a high half at the stream's end
    ],
    ids=["lone-high", "lone-low", "split-pair", "high-at-end"],
)
async def test_a_lone_surrogate_in_a_providers_answer_leaves_the_thread_readable(
    fake_settings: Settings, fake: FakeOpenAI, client: openai.AsyncOpenAI, deltas: list[str], expected: str
) -> None:
    """A provider's text with a surrogate half (a JSON escape of half a
    pair, which Python's json decodes): the run completed and every list
    of the thread's messages was then a 500 (the response cannot be
    encoded as UTF-8), on both databases. Now a pair split across deltas is
    streamed and listed as its character, a lone half as U+FFFD."""
    fake.texts["fake-halves"] = deltas
    assistant = await client.beta.assistants.create(model="fake-halves")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        streamed = "".join([text async for text in stream.text_deltas])
        final = await stream.get_final_run()
    assert final.status == "completed", final.last_error
    assert streamed == expected
    listed = (await client.beta.threads.messages.list(thread.id, limit=1)).data[0]
    assert listed.content[0].text.value == expected  # type: ignore[union-attr]


BETA = {"OpenAI-Beta": "assistants=v2", "content-type": "application/json"}


async def test_a_lone_surrogate_sent_by_a_user_is_a_400(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    """What users send (a run's messages, a tool's output) is refused with
    a lone surrogate before anything is stored, the hot routes' bodies too:
    only a model's text needs mending (app/llm/unicode_text.py)."""
    tools: Any = [{"type": "function", "function": {"name": "f"}}]
    assistant = await client.beta.assistants.create(model="gpt-4o", tools=tools)
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[call f]]"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "requires_action", run.last_error
    assert run.required_action is not None
    call_id = run.required_action.submit_tool_outputs.tool_calls[0].id
    refused = [
        (
            f"/v1/threads/{thread.id}/runs/{run.id}/submit_tool_outputs",
            {"tool_outputs": [{"tool_call_id": call_id, "output": "x<half>"}]},
            "tool_outputs[0].output",
        ),
        (f"/v1/threads/{thread.id}/messages", {"role": "user", "content": "x<half>"}, "content"),
        (
            "/v1/threads/runs",
            {"assistant_id": assistant.id, "thread": {"messages": [{"role": "user", "content": "<half>"}]}},
            "thread.messages[0].content",
        ),
        (f"/v1/threads/{thread.id}/runs", {"assistant_id": assistant.id, "instructions": "<half>"}, "instructions"),
    ]
    for path, payload, param in refused:
        # The JSON escape of half a pair, which only a raw body can carry.
        body = json.dumps(payload).replace("<half>", "\\ud83d")
        response = await http.post(path, headers=BETA, content=body.encode())
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == param, response.text
    still = await client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert still.status == "requires_action"


HALVES = "x\ud83d y \ud83d\ude00 z"


@pytest.fixture
def respond() -> str:
    """Overridden with ``@pytest.mark.parametrize("respond", [...])``."""
    return HALVES


@pytest.fixture
def rules_settings(settings: Settings, tmp_path: Path, respond: str) -> Settings:
    """Every model offline, with a rule whose reply spells surrogate halves."""
    rule = {"match": "half", "respond": respond}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"offline": {"rules": [rule]}}))  # ASCII escapes, the halves as \udXXX
    settings.llm_config = path
    return settings


# Answered at once (LLM.answer_at_once), and streamed (a delay keeps the
# answer from being instant).
@pytest.mark.parametrize("respond", [HALVES, f"[[delay 1]] [[reply {HALVES}]]"], ids=["at-once", "streamed"])
@pytest.mark.usefixtures("rules_settings")
async def test_an_offline_rules_surrogate_halves_are_mended(client: openai.AsyncOpenAI) -> None:
    """The offline model's text may come from the routing file's rules, whose
    JSON can spell half a pair: mended as a provider's is, whether the
    answer is instant or streamed. Both were a 500 on listing before."""
    expected = "x\ufffd y \U0001f600 z"
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "half"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "completed", run.last_error
    latest = (await client.beta.threads.messages.list(thread.id, limit=1)).data[0]
    assert latest.content[0].text.value == expected  # type: ignore[union-attr]
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        streamed = "".join([text async for text in stream.text_deltas])
        final = await stream.get_final_run()
    assert final.status == "completed" and streamed == expected
    latest = (await client.beta.threads.messages.list(thread.id, limit=1)).data[0]
    assert latest.content[0].text.value == expected  # type: ignore[union-attr]


async def test_a_surrogate_half_in_a_providers_error_leaves_the_run_readable(
    fake_settings: Settings, monkeypatch: pytest.MonkeyPatch, client: openai.AsyncOpenAI
) -> None:
    """A provider's error message is text from its JSON as well: the run
    fails with it as its last_error, which must read back."""
    monkeypatch.setitem(fake_openai.ERRORS, "fake-halves-error", (400, "invalid", "bad \ud83d input"))
    assistant = await client.beta.assistants.create(model="fake-halves-error")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "failed" and run.last_error is not None
    assert "bad \ufffd input" in run.last_error.message
    listed = (await client.beta.threads.runs.list(thread.id)).data[0]
    assert listed.last_error == run.last_error


@pytest.mark.parametrize("respond", ["[[\ud83d]] x"])
@pytest.mark.usefixtures("rules_settings")
async def test_an_offline_cue_error_quoting_a_surrogate_half_leaves_the_run_readable(
    client: openai.AsyncOpenAI,
) -> None:
    """An offline rule's unknown directive is quoted in the run's
    last_error: a half in it is mended as a provider's error is (LLMError),
    and the thread's runs list (a 500 before)."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "half"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "failed" and run.last_error is not None
    assert run.last_error.code == "invalid_prompt" and "[[\ufffd]]" in run.last_error.message
    listed = (await client.beta.threads.runs.list(thread.id)).data[0]
    assert listed.last_error == run.last_error


async def test_rows_stored_with_a_surrogate_half_before_the_mend_still_read(
    client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """A database written before model text was mended on its way in may
    hold a lone half in a message (and, by any older path, a thread's
    metadata): read, listed and retrieved, each half is answered as U+FFFD
    (a 500 before: UTF-8 cannot carry it), and the row is left as stored."""
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "x"}])
    stored = [{"type": "text", "text": {"value": "a\ud83d b \ud83d\ude00", "annotations": []}}]
    async with app.state.runtime.transaction() as session:
        await session.execute(update(orm.Message).values(content=stored))
        await session.execute(update(orm.Thread).values(metadata_={"k": "v\ud83d"}))
    listed = (await client.beta.threads.messages.list(thread.id)).data
    assert [part.model_dump() for part in listed[0].content] == [
        {"type": "text", "text": {"value": "a\ufffd b \U0001f600", "annotations": []}}
    ]
    retrieved = await client.beta.threads.messages.retrieve(listed[0].id, thread_id=thread.id)
    assert retrieved.content == listed[0].content
    assert (await client.beta.threads.retrieve(thread.id)).metadata == {"k": "v\ufffd"}
    async with app.state.runtime.transaction() as session:
        row = await session.get(orm.Message, listed[0].id)
    assert row is not None and row.content[0]["text"]["value"].startswith("a\ud83d b ")
