"""The offline model with built-in tools and no directives (issue 12): offered
file_search (auto, or forced with tool_choice) it searches with the user's
question and cites what it found, as the README promises."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.timeout(60)

POLICY = b"Refunds are accepted within 30 days of purchase with a receipt."
HOURS = b"The shop opens at nine and closes at six, Monday to Saturday."


async def _store(client: openai.AsyncOpenAI) -> tuple[str, dict[str, str]]:
    store = await client.vector_stores.create(name="shop")
    await client.vector_stores.file_batches.upload_and_poll(
        store.id, files=[("refunds.txt", POLICY), ("hours.txt", HOURS)]
    )
    names = {}
    for item in (await client.vector_stores.files.list(store.id)).data:
        names[(await client.files.retrieve(item.id)).filename] = item.id
    return store.id, names


async def _search_call(client: openai.AsyncOpenAI, run: Any) -> Any:
    steps = await client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")
    (call,) = [c for s in steps.data if s.type == "tool_calls" for c in s.step_details.tool_calls]  # type: ignore[union-attr]
    assert call.type == "file_search"
    return call


async def _answer(client: openai.AsyncOpenAI, thread_id: str) -> Any:
    message = (await client.beta.threads.messages.list(thread_id, limit=1)).data[0]
    part = message.content[-1]
    assert part.type == "text"
    return part.text


async def test_auto_searches_with_the_question_and_cites(client: openai.AsyncOpenAI) -> None:
    store_id, names = await _store(client)
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "When are refunds accepted?"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    call = await _search_call(client, run)
    assert call.file_search.results is not None and call.file_search.results[0].file_name == "refunds.txt"
    text = await _answer(client, thread.id)
    cited = [a.file_citation.file_id for a in text.annotations if a.type == "file_citation"]  # type: ignore[union-attr]
    assert cited and cited[0] == names["refunds.txt"]
    assert "30 days" in text.value


async def test_forced_file_search_uses_the_question(client: openai.AsyncOpenAI) -> None:
    store_id, names = await _store(client)
    assistant = await client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    thread = await client.beta.threads.create(
        messages=[{"role": "user", "content": "What time does the shop open?"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    run = await client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, tool_choice={"type": "file_search"}
    )
    assert run.status == "completed", run.last_error
    call = await _search_call(client, run)
    assert call.file_search.results and call.file_search.results[0].file_name == "hours.txt"
    text = await _answer(client, thread.id)
    assert names["hours.txt"] in [a.file_citation.file_id for a in text.annotations if a.type == "file_citation"]  # type: ignore[union-attr]


async def test_a_scripted_call_without_query_searches_with_the_question(client: openai.AsyncOpenAI) -> None:
    store_id, _ = await _store(client)
    assistant = await client.beta.assistants.create(
        model="gpt-4o",
        tools=[{"type": "file_search"}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}},
    )
    thread = await client.beta.threads.create(
        messages=[{"role": "user", "content": "opening hours [[call file_search]]"}]
    )
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    call = await _search_call(client, run)
    assert call.file_search.results and call.file_search.results[0].file_name == "hours.txt"


async def test_chat_completion_offered_file_search_calls_it(client: openai.AsyncOpenAI) -> None:
    tool: Any = {"type": "function", "function": {"name": "file_search", "parameters": {"type": "object"}}}
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "refund window?"}], tools=[tool]
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"query": "refund window?"}  # type: ignore[union-attr]
