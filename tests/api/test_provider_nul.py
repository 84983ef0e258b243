"""A provider's answer with a NUL character reaches the client as given,
through the official SDK, on both databases: the run completes, the message
lists and streams with it (app/runner/turn.py says why it is kept)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from fastapi import FastAPI

from app import llm

pytestmark = pytest.mark.timeout(60)

ANSWER = "before\x00after"


@pytest.fixture
def provider(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model answers ANSWER, streamed in two deltas as a provider's is."""
    runtime = app.state.runtime

    async def not_at_once(_request: llm.ChatRequest) -> None:
        return None

    async def answer(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta(ANSWER[:7])
        yield llm.TextDelta(ANSWER[7:])
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
