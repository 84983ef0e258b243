"""A provider's answer with a NUL character reaches the client as given,
through the official SDK, on both databases: the run completes, the message
lists and streams with it (app/runner/turn.py says why it is kept). One
with a lone surrogate is stored, and then cannot be read (a known bug, the
same on both databases: xfail)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from fastapi import FastAPI

from app import llm

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


@pytest.mark.xfail(raises=openai.InternalServerError, strict=True, reason="a lone surrogate is stored, then unreadable")
@pytest.mark.parametrize("answer_text", ["before\ud83dafter"])
@pytest.mark.usefixtures("provider")
async def test_a_lone_surrogate_in_a_providers_answer_leaves_the_thread_readable(client: openai.AsyncOpenAI) -> None:
    """A provider's text with a lone surrogate (a JSON escape of half a
    pair, which Python's json decodes): the run completes on both
    databases, and every list of the thread's messages is then a 500 (the
    response cannot be encoded as UTF-8). Not fixed here: see the pgerr
    report (the fix belongs where a provider's deltas are taken, a pair
    split across two deltas kept whole)."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
    )
    assert run.status == "completed", run.last_error
    latest = (await client.beta.threads.messages.list(thread.id, limit=1)).data[0]
    assert latest.content[0].text.value == "before\ufffdafter"  # type: ignore[union-attr]
